"""KFACCallback under Lightning DDP (CPU, gloo, 2 ranks): identical ranks, equivalence to one
process on the concatenated batches, checkpoints moving between DDP and a single process, and
plain ``strategy="ddp"`` from a standalone script (tests/ddp_scripts/lightning_ddp.py).

Callback state does not come back from forked/spawned ranks (Lightning 2.x behaviour), so each rank
writes what it holds at ``on_fit_end`` to ``tmp_path`` (``RankDump``) and the test compares files.
The per-rank batches: ``RankSlice`` gives rank r the examples r, r + 2, r + 4, ... (Lightning's
own DistributedSampler shuffles here, so ``use_distributed_sampler=False``); the single-process
reference reads the same examples as batches of 8 made of rank 0's 4 then rank 1's 4 (DDP
averages the two ranks' mean-loss gradients: the mean over 8).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DeepSpeedStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_kfac.integrations.lightning.callback import KFACCallback, check_strategy
from tests.support.compare import nested_equal
from tests.support.lightning import MLP, make_dataset, make_trainer

OPTIONS = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=3, kl_clip=1e-2)
N, BATCH, STEPS = 32, 4, 10
ROOT = Path(__file__).resolve().parents[3]


class RankSlice(Sampler):
    """Examples ``rank, rank + world, ...`` of the current process group
    (all when there is none)."""

    def __init__(self, n: int):
        self.n = n

    def _slice(self) -> range:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return range(dist.get_rank(), self.n, dist.get_world_size())
        return range(self.n)

    def __iter__(self):
        return iter(self._slice())

    def __len__(self) -> int:
        return len(self._slice())


def rank_loader(dataset, batch: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=RankSlice(len(dataset)))


class RankDump(Callback):
    """At ``on_fit_end`` (every rank): save params, factors and the K-FAC state of this rank;
    optionally ``trainer.save_checkpoint`` (collective; rank 0 writes)."""

    def __init__(self, out_dir, checkpoint=None):
        self.out_dir, self.checkpoint = str(out_dir), checkpoint

    def on_fit_end(self, trainer, pl_module):
        kfac = next(cb for cb in trainer.callbacks if isinstance(cb, KFACCallback))
        state = kfac.preconditioner.state_dict()  # collective with distribute="gradients"
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "factors": kfac.factors(),
                "state": state,
                "names": [n for n, _ in pl_module.named_modules()],
            },
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )
        if self.checkpoint:
            trainer.save_checkpoint(self.checkpoint)


def _fit(
    out_dir,
    strategy,
    devices,
    max_steps,
    ckpt_path=None,
    checkpoint=None,
    batch=BATCH,
    dataset=None,
    **options,
):
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(
        out_dir,
        strategy=strategy,
        devices=devices,
        max_steps=max_steps,
        use_distributed_sampler=False,
        callbacks=[KFACCallback(**OPTIONS, **options), RankDump(out_dir, checkpoint)],
    )
    trainer.fit(MLP(), rank_loader(dataset or make_dataset(N), batch), ckpt_path=ckpt_path)
    return [torch.load(p, weights_only=False) for p in sorted(out_dir.glob("rank*.pt"))]


def _concatenated() -> TensorDataset:
    """Examples in the order [rank 0's batch 0, rank 1's batch 0, rank 0's batch 1, ...]."""
    x, y = make_dataset(N).tensors
    order = [
        r + 2 * (BATCH * k + j)
        for k in range(N // (2 * BATCH))
        for r in range(2)
        for j in range(BATCH)
    ]
    return TensorDataset(x[order], y[order])


_equal = nested_equal


def _max_diff(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(_max_diff(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return float((a - b).abs().max())


def _layers(dump):
    return {n: (s["A"], s["G"], s["decomposition"]) for n, s in dump["state"]["layers"].items()}


@pytest.mark.parametrize(
    "strategy,distribute",
    [
        ("ddp_fork", "gradients"),
        ("ddp_fork", "decompositions"),
        pytest.param("ddp_spawn", "gradients", marks=pytest.mark.slow),
    ],
)  # spawn: ~6 s a fit
def test_ddp_ranks_identical_and_equal_to_one_process(tmp_path, strategy, distribute):
    """10 steps, different data per rank: both ranks bit-identical; = 1 process x 8 within 1e-6."""
    ranks = _fit(tmp_path / "ddp", strategy, 2, STEPS, distribute=distribute)
    assert len(ranks) == 2
    for key in ("params", "factors"):
        assert _equal(ranks[0][key], ranks[1][key]), key
    assert _equal(_layers(ranks[0]), _layers(ranks[1]))
    assert ranks[0]["state"]["steps"] == STEPS
    (single,) = _fit(
        tmp_path / "single",
        "auto",
        1,
        STEPS,
        batch=2 * BATCH,
        dataset=_concatenated(),
        distribute=distribute,
    )
    assert _max_diff(ranks[0]["factors"], single["factors"]) < 1e-6
    assert _max_diff(ranks[0]["params"], single["params"]) < 1e-6
    # every layer's decomposition is in the (gathered) state, and equals the single process's
    for name, (_, _, dec) in _layers(ranks[0]).items():
        ref = single["state"]["layers"][name]["decomposition"]
        assert dec.keys() == ref.keys() and dec
        # eigenvectors are defined up to sign: compare the reconstructed factors instead
        for q, e in (("QA", "eA"), ("QG", "eG")):
            got = dec[q] @ torch.diag(dec[e]) @ dec[q].T
            want = ref[q] @ torch.diag(ref[e]) @ ref[q].T
            assert float((got - want).abs().max()) < 1e-6


def test_checkpoint_ddp_to_single_and_back(tmp_path):
    """A DDP checkpoint restores every factor and decomposition in one process, and vice versa;
    names have no ``module.`` prefix."""
    ddp_ckpt = str(tmp_path / "ddp.ckpt")
    ranks = _fit(tmp_path / "ddp", "ddp_fork", 2, 6, checkpoint=ddp_ckpt)
    saved = torch.load(ddp_ckpt, weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("KFACCallback")]
    layers = saved["callbacks"][key]["layers"]
    assert set(layers) == {"net.0", "net.2"} and set(layers) <= set(ranks[0]["names"])
    assert all(s["decomposition"] and "A" in s for s in layers.values())
    # DDP -> 1 process (max_steps reached: nothing trains, the restored state is what it holds)
    (single,) = _fit(
        tmp_path / "single",
        "auto",
        1,
        6,
        ckpt_path=ddp_ckpt,
        checkpoint=str(tmp_path / "single.ckpt"),
    )
    assert _equal(_layers(single), _layers(ranks[0]))
    assert _equal(single["params"], ranks[0]["params"]) and single["state"]["steps"] == 6
    # 1 process -> DDP: each rank restores the same factors and decompositions
    back = _fit(tmp_path / "back", "ddp_fork", 2, 6, ckpt_path=str(tmp_path / "single.ckpt"))
    for dump in back:
        assert _equal(_layers(dump), _layers(single)) and dump["state"]["steps"] == 6


def test_deepspeed_is_refused():
    """DeepSpeed shards gradients: refused with MisconfigurationException. Neither DeepSpeed nor
    CUDA (FSDP) runs here, so the check runs on the strategy class itself (FSDP and
    model-parallel instances are covered in test_callback.py)."""
    with pytest.raises(MisconfigurationException, match="DeepSpeed"):
        check_strategy(object.__new__(DeepSpeedStrategy))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two Python processes started by Lightning's script launcher (~15-30 s here)
@pytest.mark.parametrize("nodes", [1, 2])
def test_plain_ddp_strategy_from_a_script(tmp_path, nodes):
    """``strategy="ddp"``, 1 node x 2 devices (the launcher re-runs the script) or 2 "nodes" x 1
    device (``num_nodes=2``, two launches with NODE_RANK 0/1): ranks identical, = 1 process x 8."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    script = ROOT / "tests" / "ddp_scripts" / "lightning_ddp.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(STEPS), str(nodes)],
            env=dict(env, NODE_RANK=str(node)),
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(nodes)
    ]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the ddp script hung for 300 s")
        assert proc.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert _equal(ranks[0]["params"], ranks[1]["params"])
    assert _equal(ranks[0]["factors"], ranks[1]["factors"])
    assert _equal(_layers(ranks[0]), _layers(ranks[1]))
    (single,) = _fit(
        tmp_path / "single", "auto", 1, STEPS, batch=2 * BATCH, dataset=_concatenated()
    )
    assert _max_diff(ranks[0]["params"], single["params"]) < 1e-6
    assert _max_diff(ranks[0]["factors"], single["factors"]) < 1e-6
