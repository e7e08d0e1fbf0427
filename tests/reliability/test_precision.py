"""Mixed precision under Lightning on CPU: bf16-mixed, and 16-mixed with a CPU GradScaler and
overflows forced at random steps (seed 11).

Must hold (docs/reliability.md, "mixed precision"; Lightning's precision plugins): an overflow step
(inf fp16 gradients, skipped by the scaler) leaves the running factors and the parameters
bit-identical; the loss scale s is undone (G is divided by s^2, so it matches a 32-true run);
factors are kept in float32 under both 16-mixed and bf16-mixed.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from lightning_kfac import KFACCallback
from tests.support import dense as D
from tests.support.lightning import MLP, Recorder, loader, make_dataset, make_trainer

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

KFAC = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=2, kl_clip=1e-2)
STEPS = 12


class Overflowing(MLP):
    """Multiplies the loss by 1e30 at the given steps: fp16 gradients overflow to inf."""

    def __init__(self, bad_steps=()):
        super().__init__(dtype=torch.float32, hidden=16)
        self.bad_steps = set(bad_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e30 if self.global_step in self.bad_steps else loss


def _fit(tmp_path, model, steps: int, **trainer_options):
    callback = KFACCallback(**KFAC)
    snapshots = Recorder(
        lambda trainer, module: (
            callback.factors(),
            {k: v.clone() for k, v in module.state_dict().items()},
        )
    )
    data = loader(make_dataset(STEPS * 16, dtype=torch.float32), 16)
    make_trainer(tmp_path, max_steps=steps, callbacks=[callback, snapshots], **trainer_options).fit(
        model, data
    )
    return callback, snapshots.records


def _max_rel_err(fa, fb) -> float:
    return max(D.rel_err(fa[n][i], fb[n][i]) for n in fa for i in range(2))


def test_fp16_forced_overflow_at_random_steps(tmp_path, reliability_row) -> None:
    gen = torch.Generator().manual_seed(11)
    bad = sorted((1 + torch.randperm(STEPS - 1, generator=gen)[:3]).tolist())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    callback, records = _fit(tmp_path, Overflowing(bad), STEPS, plugins=[plugin])
    survived = 0
    for t in bad:
        (f_prev, p_prev), (f_bad, p_bad) = records[t - 1], records[t]
        same_f = all(torch.equal(f_prev[n][i], f_bad[n][i]) for n in f_prev for i in range(2))
        same_p = all(torch.equal(p_prev[k], p_bad[k]) for k in p_prev)
        survived += int(same_f and same_p)
    counters = callback.preconditioner.counters
    factors = callback.factors()
    assert survived == len(bad)
    assert counters["overflow_steps"] == len(bad) and counters["nonfinite_estimates"] == 0
    assert counters["factor_updates"] == (STEPS - len(bad)) * 2
    assert all(
        t.dtype == torch.float32 and torch.isfinite(t).all()
        for pair in factors.values()
        for t in pair
    )
    # G unscaled: the first step's factors match a 32-true run (scale 65536 would be 4e9 x)
    _, reference = _fit(tmp_path, Overflowing(), 1)
    err = _max_rel_err(records[0][0], reference[0][0])
    assert err < 2e-2
    reliability_row(
        "mixed precision",
        len(bad),
        survived,
        f"overflow steps survived {survived}/{len(bad)} (16-mixed, steps {bad}); "
        f"factors fp32, vs 32-true {err:.1e}",
    )


def test_bf16_mixed_factors_fp32_close_to_full_precision(tmp_path, reliability_row) -> None:
    callback, records = _fit(tmp_path, Overflowing(), 3, precision="bf16-mixed")
    _, reference = _fit(tmp_path, Overflowing(), 3)
    factors = callback.factors()
    err = _max_rel_err(records[-1][0], reference[-1][0])
    assert all(t.dtype == torch.float32 for pair in factors.values() for t in pair)
    assert err < 5e-2
    reliability_row("mixed precision", 0, 0, f"bf16-mixed factors fp32, vs 32-true {err:.1e}")
