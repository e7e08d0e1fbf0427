"""Distributed K-FAC communication: bytes per factor update / decomposition refresh / step, and
(``--time``) measured times of the three ``distribute`` modes with 2 gloo ranks on this machine.

Bytes are the payload each rank hands to collectives (``core/kaisa.communication_bytes``; the
communicator's counter gives the same figure, see tests/core/test_distributed.py), for every layer
due at once, in the factor dtype (float32):

- ``factor_update``: upper triangles of every ``A^``, ``G^`` (+3 flags a layer), one all-reduce;
  ``full_matrices`` is what sending whole matrices would cost;
- ``refresh``: a decomposition refresh (flags; plus the eigendecompositions when
  ``distribute="decompositions"``);
- ``per_step``: ``distribute="gradients"`` broadcasts every preconditioned gradient every step;
- ``per_step_amortized``: factor_update / 10 + refresh / 100 + per_step (the default clocks);
- ``dec_mem_rank``: decomposition bytes held by the busiest rank (memory side of the trade-off).

``--time`` spawns 2 processes (gloo, 1 thread each) and measures, per mode, the wall time of one
decomposition refresh (max over ranks) and of one preconditioning of all gradients, for both
transports (one broadcast per source rank vs one all-reduce of zero-filled buffers), and the
factor all-reduce with triangles vs full matrices.

    python -m benchmarks.communication [--time] [--models mlp autoencoder cnn] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import models
from lightning_kfac import KFACPreconditioner
from lightning_kfac.core.kaisa import FACTOR_FLAGS

MODES = ("replicate", "decompositions", "gradients")
MB = 1e6


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return models.mlp()
    if name == "autoencoder":
        return models.autoencoder()
    if name == "cnn":
        return models.cnn()
    raise ValueError(f"Invalid model={name!r}: must be one of 'mlp', 'autoencoder', 'cnn'.")


def batch(name: str, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    x = torch.rand(n, 784, generator=gen)
    return x, (x if name == "autoencoder" else torch.randint(0, 10, (n,), generator=gen))


def loss_fn(name: str, out, y):
    if name == "autoencoder":
        return F.binary_cross_entropy_with_logits(out, y)
    return F.cross_entropy(out, y)


def byte_rows(names: list[str], world: int = 2) -> list[dict]:
    rows = []
    for name in names:
        model = build(name)
        for mode in MODES:
            pre = KFACPreconditioner(model, distribute=mode)
            fig = pre.distributed.communication_bytes(world_size=world)
            full = sum(
                (b.kind.a_dim() ** 2 + b.kind.g_dim() ** 2 + FACTOR_FLAGS) * 4
                for b in pre.blocks.values()
            )
            amortized = (
                fig["factor_update"] / 10 + fig["decomposition_refresh"] / 100 + fig["per_step"]
            )
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "params": models.count_params(model),
                    "factor_update": fig["factor_update"],
                    "full_matrices": full,
                    "refresh": fig["decomposition_refresh"],
                    "per_step": fig["per_step"],
                    "per_step_amortized": amortized,
                    "dec_mem_rank": fig["decomposition_memory_per_rank"],
                }
            )
            pre.remove()
    return rows


def print_table(rows: list[dict], columns: list[str], scale: dict[str, float]) -> None:
    widths = {c: max(len(c), 12) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            if c in scale and isinstance(v, (int, float)):
                v = f"{v / scale[c]:.3f}"
            cells.append(str(v).rjust(widths[c]))
        print("  ".join(cells))


# -- timing with 2 gloo ranks ----------------------------------------------------------------------
def _max_over_ranks(seconds: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time_once(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    return _max_over_ranks(time.perf_counter() - start)


def _setup(name: str, mode: str, rank: int):
    model = build(name)
    ddp = nn.parallel.DistributedDataParallel(model)
    pre = KFACPreconditioner(
        ddp, distribute=mode, factor_update_steps=1, inv_update_steps=1, kl_clip=None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(name, 64, seed=rank)
    loss_fn(name, ddp(x), y).backward()
    pre.step(opt)
    raw = [(p, p.grad.clone()) for p in model.parameters()]
    blocks = list(pre.blocks.values())

    def precondition():
        for p, g in raw:
            p.grad.copy_(g)
        pre._precondition(opt)

    return pre, blocks, precondition


def _time_worker(
    rank: int, world: int, init_file: str, out: str, names: list[str], repeats: int
) -> None:
    """Per model: the three modes (x transports) measured interleaved, ``repeats`` rounds."""
    import torch.distributed as dist

    from lightning_kfac.core.distributed import all_reduce_factors_

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = []
    for name in names:
        variants = [
            (m, t)
            for m in MODES
            for t in (("broadcast",) if m == "replicate" else ("broadcast", "all_reduce"))
        ]
        setups = {m: _setup(name, m, rank) for m in MODES}
        times = {v: ([], []) for v in variants}
        pre0, blocks0, _ = setups["replicate"]
        flags = torch.zeros(FACTOR_FLAGS * len(blocks0))
        est = [torch.zeros(b.kind.a_dim(), b.kind.a_dim()) for b in blocks0]
        est += [torch.zeros(b.kind.g_dim(), b.kind.g_dim()) for b in blocks0]
        factor = {"triangles": [], "full": []}
        for _ in range(repeats):
            for mode, transport in variants:
                pre, blocks, precondition = setups[mode]
                pre.distributed.transport = transport
                times[(mode, transport)][0].append(
                    _time_once(lambda: pre._update_decompositions(blocks))
                )
                for _ in range(3):
                    times[(mode, transport)][1].append(_time_once(precondition))
            for _ in range(3):
                factor["triangles"].append(
                    _time_once(lambda: all_reduce_factors_(pre0.comm, flags, est))
                )
                factor["full"].append(_time_once(lambda: pre0.comm.all_reduce_sum_([flags, *est])))
        for (mode, transport), (ref, pc) in times.items():
            refresh, step = statistics.median(ref), statistics.median(pc)
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "transport": transport,
                    "refresh_s": refresh,
                    "precondition_s": step,
                    "amortized_ms": 1e3 * (refresh / 100 + step),
                }
            )
        for kind, values in factor.items():
            rows.append(
                {
                    "model": name,
                    "mode": "factor all-reduce",
                    "transport": kind,
                    "refresh_s": float("nan"),
                    "precondition_s": statistics.median(values),
                    "amortized_ms": float("nan"),
                }
            )
        for pre, _, _ in setups.values():
            pre.remove()
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def time_rows(names: list[str], repeats: int, world: int = 2) -> list[dict]:
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(
                target=_time_worker,
                args=(r, world, os.path.join(tmp, "store"), out, names, repeats),
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"timing ranks failed: exit codes {[p.exitcode for p in procs]}")
        return torch.load(out)


def main(argv=None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.communication", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "autoencoder", "cnn"])
    parser.add_argument("--time", action="store_true", help="also time the modes with 2 gloo ranks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = byte_rows(args.models)
    print("Payload per rank, 2 ranks, float32 factors (MB = 1e6 bytes):")
    print_table(
        rows,
        [
            "model",
            "mode",
            "params",
            "factor_update",
            "full_matrices",
            "refresh",
            "per_step",
            "per_step_amortized",
            "dec_mem_rank",
        ],
        {
            k: MB
            for k in (
                "factor_update",
                "full_matrices",
                "refresh",
                "per_step",
                "per_step_amortized",
                "dec_mem_rank",
            )
        },
    )
    result = {"bytes": rows}
    if args.time:
        timed = time_rows(args.models, args.repeats)
        print(
            f"\nMeasured, 2 gloo ranks x 1 thread, median of {args.repeats} "
            f"(load average {os.getloadavg()[0]:.1f}); amortized = refresh/100 + precondition:"
        )
        print_table(
            timed,
            ["model", "mode", "transport", "refresh_s", "precondition_s", "amortized_ms"],
            {"refresh_s": 1.0, "precondition_s": 1.0, "amortized_ms": 1.0},
        )
        result["times"] = timed
    return result


if __name__ == "__main__":
    main()
