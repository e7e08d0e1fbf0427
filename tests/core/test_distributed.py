"""K-FAC across 2 ranks (torch.distributed, gloo, CPU): identical ranks, equivalence to one process
on the concatenated batch, distributed decompositions (KAISA, Pauloski et al. SC'21) equal to
every rank decomposing everything, collective fault decisions, and the byte figures.

One spawn of 2 processes runs every case of ``tests/ddp_scripts/engine_cases.py`` (float64,
10 steps, different data per rank); a hang fails the test after ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import math
import multiprocessing
import time

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core.assignment import greedy_assignment, layer_cost, rank_loads
from lightning_kfac.core.distributed import pack_symmetric, unpack_symmetric_
from tests.ddp_scripts import engine_cases as E
from tests.support.compare import nested_equal

TIMEOUT = 240.0
WORLD = 2


def spawn(target, args, world: int = WORLD, timeout: float = TIMEOUT) -> None:
    """Run ``target(rank, *args)`` in ``world`` spawned processes; fail on error or hang."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} rank(s) still running after {timeout:.0f} s (hang)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_engine")
    spawn(E.worker, (WORLD, str(out / "store"), str(out)))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks


def _max_diff(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (tuple, list)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return float((a - b).abs().max()) if a.numel() else 0.0


_equal = nested_equal


@pytest.mark.parametrize("case", [f"{m}:{f}" for m, f in E.CASES])
def test_ranks_identical(runs, case) -> None:
    """Parameters, factors, decompositions and counters are bit-identical on both ranks."""
    r0, r1 = runs[0][case], runs[1][case]
    for key in ("params", "factors", "decompositions", "counters", "failures"):
        assert _equal(r0[key], r1[key]), f"{case}: {key} differ across ranks"
    assert all(torch.isfinite(p).all() for p in r0["params"].values())


@pytest.mark.parametrize("fault", [None, "nan", "fail"])
def test_matches_single_process_on_concatenated_batch(runs, fault) -> None:
    """2 ranks x 4 examples == 1 process x 8 examples (float64, within 1e-6), faults included."""
    mode = "replicate" if fault is None else "decompositions"
    expected = {None: None, "nan": "non-finite factor estimate", "fail": "decomposition of layer"}
    if fault is None:
        ref = E.reference(fault)
    else:
        with pytest.warns(RuntimeWarning, match=expected[fault]):
            ref = E.reference(fault)
    got = runs[0][f"{mode}:{fault}"]
    assert _max_diff(got["factors"], ref["factors"]) < 1e-6
    assert _max_diff(got["params"], ref["params"]) < 1e-6
    assert got["counters"]["nonfinite_estimates"] == ref["counters"]["nonfinite_estimates"]
    assert got["counters"]["decomposition_failures"] == ref["counters"]["decomposition_failures"]


def test_fault_decisions_are_collective(runs) -> None:
    """NaN on rank 1 only: both ranks skip that update; a failure on the owner:
    both keep the old one."""
    nan = [runs[r]["decompositions:nan"]["counters"] for r in range(WORLD)]
    assert [c["nonfinite_estimates"] for c in nan] == [1, 1]
    for case in ("decompositions:fail", "replicate:fail", "gradients:fail"):
        counters = [runs[r][case]["counters"] for r in range(WORLD)]
        assert [c["decomposition_failures"] for c in counters] == [1, 1], case
        assert _equal(runs[0][case]["params"], runs[0]["decompositions:fail"]["params"]), case


@pytest.mark.parametrize("mode", ["decompositions", "gradients"])
def test_distributed_decompositions_equal_replicated(runs, mode) -> None:
    """Owner-computed, shared decompositions give exactly what every-rank-decomposes gives."""
    for r in range(WORLD):
        got, ref = runs[r][f"{mode}:None"], runs[r]["replicate:None"]
        assert _equal(got["decompositions"], ref["decompositions"])
        assert _equal(got["params"], ref["params"])
    # the work is split: each rank decomposed only its own layers
    refreshes = math.ceil(E.STEPS / E.OPTIONS["inv_update_steps"])
    local = [runs[r][f"{mode}:None"]["local_decompositions"] for r in range(WORLD)]
    owners = runs[0][f"{mode}:None"]["owners"]
    assert local == [refreshes * sum(1 for o in owners.values() if o == r) for r in range(WORLD)]
    assert all(0 < n < refreshes * len(owners) for n in local)


def test_bytes_counter_matches_communication_bytes(runs) -> None:
    """The communicator's byte counter equals the analytic per-update / per-refresh figures."""
    model = E.make_model()
    refreshes = math.ceil(E.STEPS / E.OPTIONS["inv_update_steps"])
    for mode in ("replicate", "decompositions", "gradients"):
        pre = KFACPreconditioner(model, distribute=mode, **E.OPTIONS)
        fig = pre.distributed.communication_bytes(world_size=WORLD)
        expected = (
            E.STEPS * (fig["factor_update"] + fig["per_step"])
            + refreshes * fig["decomposition_refresh"]
            + fig["state_dict"]
        )
        for r in range(WORLD):
            sent = runs[r][f"{mode}:None"]["sent"]
            snapshot_gather = fig["state_dict"]  # _snapshot calls state_dict() after `sent`
            assert sum(sent.values()) + snapshot_gather == expected, mode
        pre.remove()
    rep = KFACPreconditioner(
        model, distribute="replicate", **E.OPTIONS
    ).distributed.communication_bytes(2)
    grad = KFACPreconditioner(
        model, distribute="gradients", **E.OPTIONS
    ).distributed.communication_bytes(2)
    assert grad["decomposition_memory_per_rank"] < rep["decomposition_memory_per_rank"]


def test_gradients_mode_holds_only_owned_decompositions(runs) -> None:
    """distribute="gradients": each rank keeps the decompositions of its own layers only."""
    full = runs[0]["replicate:None"]["memory"]
    held = [runs[r]["gradients:None"]["memory"] for r in range(WORLD)]
    assert all(h < full for h in held)


@pytest.mark.reliability
def test_reliability_rows(runs, request) -> None:
    """reliability rows "DDP identical ranks" and "DDP fault on one rank" (make reliability)."""
    from tests.reliability_report import Row, record_row

    diffs = {
        case: max(
            _max_diff(runs[0][case][k], runs[1][case][k])
            for k in ("params", "factors", "decompositions")
        )
        for case in runs[0]
    }
    ref = E.reference(None)
    vs_one = max(_max_diff(runs[0]["replicate:None"][k], ref[k]) for k in ("params", "factors"))
    same = sum(d == 0.0 for d in diffs.values())
    record_row(
        request.config,
        Row(
            "DDP identical ranks",
            len(diffs),
            same,
            f"max cross-rank difference {max(diffs.values()):g} "
            f"({len(diffs)} runs x {E.STEPS} steps, 2 gloo ranks, different data); "
            f"vs 1 process on the concatenated batch {vs_one:.1e}",
            request.node.nodeid,
        ),
    )
    faults = {
        "decompositions:nan": "nonfinite_estimates",
        "decompositions:fail": "decomposition_failures",
        "replicate:fail": "decomposition_failures",
        "gradients:fail": "decomposition_failures",
    }
    agreed = sum(
        runs[0][c]["counters"][k] == runs[1][c]["counters"][k] == 1 and diffs[c] == 0.0
        for c, k in faults.items()
    )
    record_row(
        request.config,
        Row(
            "DDP fault on one rank",
            len(faults),
            agreed,
            "hangs 0 (spawn bounded by a timeout); NaN estimate on rank 1 / decomposition failure "
            "on the owner rank: same skip on both ranks, ranks bit-identical",
            request.node.nodeid,
        ),
    )
    assert same == len(diffs) and agreed == len(faults) and vs_one < 1e-6


# -- pure helpers (no processes) -----------------------------------------------------------------
def test_greedy_assignment_balances_and_is_deterministic() -> None:
    costs = [
        ("a", layer_cost(785, 1000)),
        ("b", layer_cost(1001, 500)),
        ("c", layer_cost(501, 250)),
        ("d", layer_cost(251, 10)),
    ]
    owner = greedy_assignment(costs, 2)
    assert owner == greedy_assignment(list(costs), 2)
    assert owner["a"] != owner["b"]  # the two big layers go to different ranks
    loads = rank_loads(owner, dict(costs), 2)
    assert max(loads) <= 4 / 3 * sum(loads) / 2 + max(c for _, c in costs)
    assert greedy_assignment(costs, 1) == {n: 0 for n, _ in costs}
    with pytest.raises(ValueError, match="world_size"):
        greedy_assignment(costs, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7])
def test_symmetric_packing_round_trip(n) -> None:
    """d(d+1)/2 numbers travel; unpacking mirrors the upper triangle exactly."""
    m = torch.randn(n, n, dtype=torch.float64)
    packed = pack_symmetric(m)
    assert packed.numel() == n * (n + 1) // 2
    assert torch.equal(unpack_symmetric_(torch.zeros_like(m), packed), m.triu() + m.triu(1).T)
    assert sorted(packed.tolist()) == sorted(m[tuple(torch.triu_indices(n, n))].tolist())


def test_distribute_option_validated() -> None:
    with pytest.raises(ValueError, match="Invalid distribute='everything'"):
        KFACPreconditioner(nn.Linear(2, 2), distribute="everything")


def test_single_process_sends_nothing() -> None:
    pre = KFACPreconditioner(nn.Linear(3, 2))
    assert pre.distributed.communication_bytes()["factor_update"] == 0
    assert pre.distributed.communication_bytes(world_size=2)["factor_update"] == (10 + 3 + 3) * 4
