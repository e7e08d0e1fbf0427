"""Refit and resume through real Lightning Trainers: what state a fit starts from.

Must hold: only a fit resumed from a checkpoint restores K-FAC state (``validate`` /
``test`` / ``predict`` with ``ckpt_path`` leave nothing for the next ``fit`` of a reused
callback); K-FAC added when resuming a checkpoint without K-FAC state decomposes at its first
factor update; a checkpoint saved under other options (``compute_method``, ``damping``) resumes
with the new options acting from the first step, or an error names the option (never a KeyError);
an exception between the K-FAC step and ``optimizer.step()`` followed by a second ``fit`` on the
same objects ends ``torch.equal`` to an uninterrupted run on the same batches.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_kfac import KFACCallback
from tests.support.lightning import (
    MLP,
    assert_factors_equal,
    assert_params_equal,
    hand_loop,
    loader,
    make_dataset,
    make_trainer,
)

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

CLOCKS = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=2, kl_clip=1e-2)
LAYERS = 2  # MLP: net.0, net.2


def _checkpoint(tmp_path, steps: int, callbacks) -> tuple[str, MLP]:
    model = MLP()
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    trainer.fit(model, loader(make_dataset(4 * 8), 8))
    path = str(tmp_path / f"saved-{steps}.ckpt")
    trainer.save_checkpoint(path)
    return path, model


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_eval_with_ckpt_path_leaves_no_state_for_the_next_fit(
    tmp_path, entry, reliability_row
) -> None:
    """A reused callback: ``<entry>(ckpt_path=...)`` then ``fit`` without ckpt_path starts from
    empty factors, like a fresh callback (also on a wider model the state could not fit)."""
    data = loader(make_dataset(4 * 8), 8)
    callback = KFACCallback(**CLOCKS)
    path, _ = _checkpoint(tmp_path, 4, [callback])
    model = MLP(seed=1)
    getattr(make_trainer(tmp_path, callbacks=[callback]), entry)(model, data, ckpt_path=path)
    reference = copy.deepcopy(model)  # the weights the checkpoint loaded
    make_trainer(tmp_path, max_steps=4, callbacks=[callback]).fit(model, data)
    fresh = KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=4, callbacks=[fresh]).fit(reference, data)
    updates = callback.preconditioner.counters["factor_updates"]
    same = updates == 4 * LAYERS
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), fresh.factors())

    wider = MLP(hidden=16)  # a checkpoint state of width 8 cannot describe it
    getattr(make_trainer(tmp_path, callbacks=[callback]), entry)(MLP(), data, ckpt_path=path)
    make_trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(wider, data)
    wider_ok = callback.preconditioner.counters["factor_updates"] == 2 * LAYERS
    # ... while a fit from the checkpoint still restores it: 4 saved steps + 2 more
    make_trainer(tmp_path, max_steps=6, callbacks=[callback]).fit(MLP(), data, ckpt_path=path)
    restored = callback.preconditioner.counters["factor_updates"]
    reliability_row(
        "refit after validate/test",
        3,
        int(same) + int(wider_ok) + int(restored == 6 * LAYERS),
        f"{entry}(ckpt_path) then fit: factor updates {updates} (fresh run {4 * LAYERS})",
    )
    assert same and wider_ok
    assert restored == 6 * LAYERS


def test_kfac_added_on_resume_decomposes_at_its_first_factor_update(
    tmp_path, reliability_row
) -> None:
    """Resume at step 3 a run saved without K-FAC (factor every 2, inverse every 100): step 4
    updates the factors and decomposes, so steps 4.. are preconditioned."""
    path, _ = _checkpoint(tmp_path, 3, [])
    data = loader(make_dataset(4 * 8), 8)
    options = dict(damping=1e-2, factor_update_steps=2, inv_update_steps=100, kl_clip=None)
    callback, plain = KFACCallback(**options), MLP()
    with_kfac = MLP()
    make_trainer(tmp_path, max_steps=6, callbacks=[callback]).fit(with_kfac, data, ckpt_path=path)
    make_trainer(tmp_path, max_steps=6).fit(plain, data, ckpt_path=path)
    counters = callback.preconditioner.counters
    changed = any(not torch.equal(p, q) for p, q in zip(with_kfac.parameters(), plain.parameters()))
    reliability_row(
        "add-K-FAC resume",
        1,
        int(counters["decompositions"] == LAYERS and changed),
        f"decompositions after resume {counters['decompositions']} "
        f"(factor updates {counters['factor_updates']})",
    )
    assert counters["factor_updates"] == 1 * LAYERS  # step 4 (steps 3 and 5 are off the clock)
    assert counters["decompositions"] == LAYERS
    assert changed, "the resumed run with K-FAC equals the run without it"


@pytest.mark.parametrize(
    "new",
    [
        dict(compute_method="inverse"),
        dict(compute_method="ekfac"),
        dict(compute_method="eigen", damping_mode="relative"),
    ],
)
def test_lightning_resume_with_another_method(tmp_path, new, reliability_row) -> None:
    """An eigen checkpoint resumed with another method or damping mode: the decompositions are
    recomputed at load (a warning names the option); the run continues with finite weights.
    Resumed at step 3, which reuses the step-2 decomposition (no KeyError 'A_inv' / 'scale')."""
    path, _ = _checkpoint(tmp_path, 3, [KFACCallback(**CLOCKS)])
    callback, model = KFACCallback(**dict(CLOCKS, **new)), MLP()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, max_steps=7, callbacks=[callback]).fit(
            model, loader(make_dataset(4 * 8), 8), ckpt_path=path
        )
    option = next(iter(new)) if "damping_mode" not in new else "damping_mode"
    named = [str(w.message) for w in caught if "recomputed from the restored" in str(w.message)]
    ok = (
        bool(named)
        and option in named[0]
        and all(torch.isfinite(p).all() for p in model.parameters())
    )
    reliability_row("option change on resume", 1, int(ok), "")
    assert named and option in named[0], [str(w.message) for w in caught]
    assert callback.preconditioner.steps == 7
    assert all(torch.isfinite(p).all() for p in model.parameters())


class InterruptOnce(pl.Callback):
    """Raises in ``on_before_optimizer_step`` at ``global_step == at`` (after K-FAC's step, which
    runs first in the callback list, and before ``optimizer.step()``), once."""

    def __init__(self, at: int):
        self.at, self.fired = at, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at and not self.fired:
            self.fired = True
            raise RuntimeError("interrupted")


class BatchLog(pl.Callback):
    """The batch index of every completed training batch."""

    def __init__(self):
        self.done: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.done.append(batch_idx)


@pytest.mark.parametrize("at", [2, 3])  # 2: a decomposition step; 3: a factor-only step
def test_interrupted_step_refit_equals_uninterrupted(tmp_path, at, reliability_row) -> None:
    """Interrupt step ``at`` between the K-FAC step and ``optimizer.step()``; ``fit`` again on the
    same trainer, model and callback: params and factors ``torch.equal`` to a hand-written loop
    over the batches of the completed steps, counters equal (no factor update counted twice)."""
    dataset = make_dataset(5 * 8)
    data = loader(dataset, 8)
    callback, log, model = KFACCallback(**CLOCKS), BatchLog(), MLP()  # SGD: a refit makes a
    # new optimizer (configure_optimizers), so a stateful one would differ for that reason alone
    reference = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[callback, InterruptOnce(at), log])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(model, data)
    assert trainer.global_step == at
    trainer.fit(model, data)
    batches = [dataset[i * 8 : (i + 1) * 8] for i in log.done]
    pre = hand_loop(reference, batches, steps=len(batches), **CLOCKS)
    counters = callback.preconditioner.counters
    updates = counters["factor_updates"]
    equal = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    reliability_row(
        "interrupted step",
        1,
        int(equal and counters == pre.counters),
        f"interrupt at step {at}: factor updates {updates} (uninterrupted "
        f"{pre.counters['factor_updates']})",
    )
    assert len(batches) == 8 and trainer.global_step == 8
    assert counters == pre.counters
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), pre.factors())
