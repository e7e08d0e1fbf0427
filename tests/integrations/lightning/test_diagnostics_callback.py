"""KFACCallback(diagnostics_every_n_steps=N): per-layer Kronecker error and ||E[g]|| in the logs.

The logged figures are compared with ``lightning_kfac.diagnostics.diagnose`` run by hand on the
same batch and parameters; a run with diagnostics is bit-identical to one without.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_kfac import KFACCallback, KFACConfig
from lightning_kfac.diagnostics import diagnose

LAYERS = ["net.0", "net.3"]


class TinyNet(pl.LightningModule):
    """6 -> 8 (tanh, dropout) -> 3 logits, cross-entropy (the diagnostics' "dense" exact path)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Snapshot(pl.Callback):
    """Parameters and batch at each training batch's start: global_step -> [(state, batch)]."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = copy.deepcopy(pl_module.state_dict())
        self.seen.setdefault(trainer.global_step, []).append((state, [t.clone() for t in batch]))


def loader(n=48, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit(tmp_path, *, steps=5, dropout=0.0, logger=True, accumulate=1, **options):
    pl.seed_everything(0)
    model = TinyNet(dropout)
    cb = KFACCallback(factor_update_steps=1, inv_update_steps=2, damping=1e-2, **options)
    snap = Snapshot()
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(str(tmp_path), name="", version="") if logger else False,
        callbacks=[cb, snap],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, loader())
    return model, cb, snap, trainer


def logged(tmp_path: Path) -> dict:
    """step -> {metric: value} of the kfac_diag/* columns of metrics.csv."""
    out = {}
    with open(tmp_path / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            values = {k: float(v) for k, v in row.items() if k.startswith("kfac_diag/") and v}
            if values:
                out.setdefault(int(row["step"]), {}).update(values)
    return out


def by_hand(state, batch, **kwargs):
    model = TinyNet()
    model.load_state_dict(state)
    x, y = batch
    return diagnose(model.train(), x, lambda out: F.cross_entropy(out, y), layers=LAYERS, **kwargs)


def test_logged_at_every_nth_step_and_equal_to_diagnose_by_hand(tmp_path):
    _, cb, snap, trainer = fit(tmp_path, diagnostics_every_n_steps=2)
    assert trainer.global_step == 5
    logs = logged(tmp_path)
    assert sorted(logs) == [0, 2, 4]  # the K-FAC clock: t % 2 == 0, step 0 included
    for t, metrics in logs.items():
        ((state, batch),) = snap.seen[t]
        expected = by_hand(state, batch, method="dense")  # exact: the full 4-D block
        assert set(expected) == set(LAYERS)
        keys = {
            f"kfac_diag/{layer}/{stat}"
            for layer in LAYERS
            for stat in (
                "kronecker_error",
                "kronecker_error_population",
                "mean_grad_norm",
                "mean_grad_ratio",
            )
        }
        assert set(metrics) == keys  # no std: the exact method has none
        for layer, stats in expected.items():
            for stat in (
                "kronecker_error",
                "kronecker_error_population",
                "mean_grad_norm",
                "mean_grad_ratio",
            ):
                # the same float64 rows as diagnose's own forward/backward: equal, not close
                assert metrics[f"kfac_diag/{layer}/{stat}"] == stats[stat], stat
            assert 0.0 < stats["kronecker_error"] < 1.0 and stats["mean_grad_norm"] > 0.0
    # the same numbers are kept on the recorder
    t, result = cb._diagnostics.last
    assert t == 4
    assert result["net.3"]["kronecker_error"] == logs[4]["kfac_diag/net.3/kronecker_error"]


def test_mc_fisher_and_accumulation_diagnose_the_users_loss_over_every_micro_batch(tmp_path):
    # fisher_type="mc" back-propagates a sampled loss through the same outputs: the recorder
    # must keep the user's gradient; with accumulate_grad_batches=2 both micro-batches count.
    _, _, snap, _ = fit(
        tmp_path, steps=3, accumulate=2, diagnostics_every_n_steps=2, fisher_type="mc"
    )
    logs = logged(tmp_path)
    assert sorted(logs) == [0, 2]
    for t in (0, 2):
        (state, first), (_, second) = snap.seen[t]  # the step's two micro-batches
        batch = [torch.cat([a, b]) for a, b in zip(first, second)]
        expected = by_hand(state, batch, method="dense")
        for layer in LAYERS:
            for stat in ("kronecker_error", "mean_grad_norm"):
                # one 16-row batch vs two 8-row micro-batches: float32 rounding differs
                assert logs[t][f"kfac_diag/{layer}/{stat}"] == pytest.approx(
                    expected[layer][stat], rel=1e-5
                ), (t, layer, stat)


@pytest.mark.parametrize(
    "options", [dict(), dict(fisher_type="mc", accumulate=2)], ids=["empirical", "mc-accumulate"]
)
def test_diagnostics_leave_training_bit_identical(tmp_path, options):
    # dropout draws from the global RNG: any draw by the diagnostics would change the masks
    runs = {}
    for every in (None, 1):
        model, cb, _, _ = fit(
            tmp_path / str(every), steps=4, dropout=0.3, diagnostics_every_n_steps=every, **options
        )
        runs[every] = (model, cb.factors(), torch.get_rng_state())
    (m0, f0, rng0), (m1, f1, rng1) = runs[None], runs[1]
    assert sorted(logged(tmp_path / "1")) == [0, 1, 2, 3]
    assert logged(tmp_path / "None") == {}
    for (n0, p0), (n1, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        assert n0 == n1 and torch.equal(p0, p1), n0
    assert sorted(f0) == sorted(f1) == LAYERS
    for name in LAYERS:
        assert torch.equal(f0[name][0], f1[name][0]) and torch.equal(f0[name][1], f1[name][1])
    assert torch.equal(rng0, rng1)


def test_without_a_logger_nothing_is_installed(tmp_path):
    model, cb, _, _ = fit(tmp_path, steps=2, logger=False, diagnostics_every_n_steps=1)
    assert cb._diagnostics is None
    assert cb.config.diagnostics_every_n_steps == 1
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0  # and the engine's hooks are gone after fit


@pytest.mark.parametrize("value", [0, -3, 1.5, "often", True])
def test_a_bad_value_is_rejected_naming_the_option(value):
    with pytest.raises(
        ValueError,
        match=r"Invalid diagnostics_every_n_steps=.*None \(off\) or an "
        r"integer >= 1",
    ):
        KFACConfig(diagnostics_every_n_steps=value)
    with pytest.raises(MisconfigurationException, match="diagnostics_every_n_steps"):
        KFACCallback(diagnostics_every_n_steps=value)
    assert KFACConfig(diagnostics_every_n_steps=3.0).diagnostics_every_n_steps == 3


class TinyCNN(TinyNet):
    """Conv2d rows (KFC: T output locations per example) next to a Linear head."""

    def __init__(self):
        pl.LightningModule.__init__(self)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x.reshape(-1, 1, 4, 4))).flatten(1))


def test_conv_rows_equal_diagnose_by_hand(tmp_path):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    )
    cb, snap = KFACCallback(diagnostics_every_n_steps=1, factor_update_steps=1), Snapshot()
    pl.Trainer(
        max_steps=2,
        logger=CSVLogger(str(tmp_path), name="", version=""),
        callbacks=[cb, snap],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(TinyCNN(), torch.utils.data.DataLoader(data, 8))
    t, result = cb._diagnostics.last
    ((state, (x, y)),) = snap.seen[t]
    model = TinyCNN()
    model.load_state_dict(state)
    expected = diagnose(model, x, lambda out: F.cross_entropy(out, y), layers=["conv", "head"])
    assert t == 1 and expected["conv"]["rows"] == 8 * 16  # B x T rows for the conv layer
    assert result == expected  # every statistic, bit for bit
