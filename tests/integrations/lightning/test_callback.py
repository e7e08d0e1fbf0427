"""KFACCallback against the engine: equivalence, accumulation, resume, silence, hooks, state.

Every Lightning run here is compared with something computed without it: a hand-written loop
over the same batches with ``KFACPreconditioner`` (bit-identical, ``torch.equal``, float64), one
big batch (accumulation), or an uninterrupted run (resume).
"""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_kfac import KFACCallback, KFACPreconditioner
from lightning_kfac.integrations.lightning.callback import check_strategy
from tests.support.lightning import (
    MLP,
    Recorder,
    assert_factors_equal,
    assert_params_equal,
    clone_module,
    count_hooks,
    hand_loop,
    loader,
    make_dataset,
    make_trainer,
)

CLOCKS = dict(damping=1e-2, factor_update_steps=2, inv_update_steps=4, kl_clip=1e-2)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_equals_hand_written_loop(tmp_path, optimizer):
    """20 Trainer steps == 20 steps of loss.backward(); pre.step(opt); opt.step() (torch.equal)."""
    data = loader(make_dataset(20 * 8), batch_size=8)
    model = MLP(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2)
    reference = clone_module(model)
    callback = KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=20, callbacks=[callback]).fit(model, data)

    pre = hand_loop(reference, data, steps=20, **CLOCKS)
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), pre.factors())
    assert callback.preconditioner.steps == pre.steps == 20
    assert callback.preconditioner.counters == pre.counters
    assert callback.preconditioner.counters["factor_updates"] == 10 * 2  # 2 layers, t = 0,2,..,18


def test_mc_fisher_equals_hand_written_loop(tmp_path):
    """fisher_type="mc": the callback calls pre.mc_backward() after the forward and before the
    backward, as a hand loop does; same RNG stream -> bit-identical parameters and factors."""
    options = dict(CLOCKS, fisher_type="mc")
    data = loader(make_dataset(6 * 8), batch_size=8)
    model = MLP()
    reference = clone_module(model)
    callback = KFACCallback(**options)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[callback])
    torch.manual_seed(1)
    trainer.fit(model, data)

    torch.manual_seed(1)
    pre = KFACPreconditioner(reference, **options)
    opt = torch.optim.SGD(reference.parameters(), lr=reference.lr)
    for batch in data:
        opt.zero_grad()
        x, y = batch
        logits = reference(x)
        pre.mc_backward()
        torch.nn.functional.cross_entropy(logits, y).backward()
        pre.step(opt)
        opt.step()
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), pre.factors())


def test_accumulation_equals_one_big_batch(tmp_path):
    """accumulate_grad_batches=4 of 8 == batches of 32: factors and parameter updates."""
    data = make_dataset(3 * 32)
    options = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=1, kl_clip=1e-2)
    big, small = MLP(), MLP()
    cb_big, cb_small = KFACCallback(**options), KFACCallback(**options)
    make_trainer(tmp_path, max_steps=3, callbacks=[cb_big]).fit(big, loader(data, 32))
    make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=4, callbacks=[cb_small]).fit(
        small, loader(data, 8)
    )

    fa, fb = cb_big.factors(), cb_small.factors()
    assert fa.keys() == fb.keys() == {"net.0", "net.2"}
    for name in fa:
        torch.testing.assert_close(fb[name][0], fa[name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fb[name][1], fa[name][1], rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
    assert cb_small.preconditioner.steps == 3
    # Without undoing Lightning's 1/k loss scaling G would be 16x smaller: the check has teeth.
    g_ratio = fb["net.2"][1].trace() / fa["net.2"][1].trace()
    assert abs(float(g_ratio) - 1.0) < 1e-9


@pytest.mark.parametrize("batches_per_epoch,resume_step", [(5, 5), (3, 6)])
def test_resume_is_bit_identical(tmp_path, batches_per_epoch, resume_step):
    """Checkpoint every step; resume mid inverse interval (inv 4, factor 2): same params/factors.

    Step 5: neither factors nor decompositions are due; step 6: factors due, decomposition from
    step 4 still in use. Resume points sit at epoch ends (a plain DataLoader replays a resumed
    epoch from its first batch, as Lightning 2.x does).
    """
    data = loader(make_dataset(batches_per_epoch * 8), batch_size=8)
    model = MLP(optimizer="adam", lr=1e-2)
    fresh = clone_module(model)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    full = KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=10, callbacks=[full, ckpt], enable_checkpointing=True).fit(
        model, data
    )

    resumed = KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=10, callbacks=[resumed]).fit(
        fresh, data, ckpt_path=str(tmp_path / "ckpt" / f"step={resume_step}.ckpt")
    )
    assert_params_equal(model, fresh)
    assert_factors_equal(full.factors(), resumed.factors())
    assert resumed.preconditioner.steps == full.preconditioner.steps == 10
    assert resumed.preconditioner.counters == full.preconditioner.counters


def test_checkpoint_state_round_trip(tmp_path):
    """The saved state holds factors, decompositions, clock and config; it is never empty."""
    callback = KFACCallback(**CLOCKS)
    assert callback.preconditioner is None and callback.factors() == {}
    assert callback.state_dict()["config"]["damping"] == CLOCKS["damping"]  # before fit: not empty
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[callback])
    trainer.fit(MLP(), loader(make_dataset(24), 8))
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"][callback.state_key]
    assert saved["steps"] == 3 and saved["config"] == callback.config.to_dict()
    assert set(saved["layers"]) == {"net.0", "net.2"}
    torch.testing.assert_close(
        saved["layers"]["net.2"]["G"], callback.factors()["net.2"][1], rtol=0, atol=0
    )
    assert saved["layers"]["net.2"]["decomposition"]


def test_validation_test_predict_change_no_factor(tmp_path):
    """Sanity check and in-fit validation leave factors as a run without them; so do
    trainer.validate/test/predict after fit."""
    data = make_dataset(6 * 8)
    quiet, noisy = MLP(), MLP()
    cb_quiet, cb_noisy = KFACCallback(**CLOCKS), KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=6, callbacks=[cb_quiet]).fit(quiet, loader(data, 8))
    trainer = make_trainer(
        tmp_path,
        max_steps=6,
        callbacks=[cb_noisy],
        num_sanity_val_steps=2,
        limit_val_batches=2,
        val_check_interval=2,
    )
    trainer.fit(noisy, loader(data, 8), loader(data, 8))
    assert trainer.sanity_checking is False and trainer.fit_loop.epoch_loop.val_loop.run
    assert_factors_equal(cb_quiet.factors(), cb_noisy.factors())
    assert_params_equal(quiet, noisy)

    before, counters = cb_noisy.factors(), dict(cb_noisy.preconditioner.counters)
    trainer.validate(noisy, loader(data, 8), verbose=False)
    trainer.test(noisy, loader(data, 8), verbose=False)
    trainer.predict(noisy, loader(data, 8))
    assert_factors_equal(before, cb_noisy.factors())
    assert cb_noisy.preconditioner.counters == counters
    assert count_hooks(noisy) == 0


def test_training_step_returning_none_leaves_params_and_factors(tmp_path):
    """A skipped step (training_step returns None: no backward, grads None) changes neither the
    parameters nor the factors; the clock still advances with trainer.global_step."""

    class Skipping(MLP):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    callback = KFACCallback(damping=1e-2, factor_update_steps=1, inv_update_steps=1)
    snapshots = Recorder(
        lambda trainer, module: (
            callback.factors(),
            {k: v.clone() for k, v in module.state_dict().items()},
        )
    )
    make_trainer(tmp_path, max_steps=3, callbacks=[callback, snapshots]).fit(
        Skipping(), loader(make_dataset(24), 8)
    )
    (f0, p0), (f1, p1), (f2, p2) = snapshots.records
    assert_factors_equal(f0, f1)
    for key in p0:
        assert torch.equal(p0[key], p1[key]) and not torch.equal(p1[key], p2[key])
    assert not torch.equal(f1["net.2"][1], f2["net.2"][1])
    assert callback.preconditioner.steps == 3


def test_hooks_removed_and_fit_twice_continues(tmp_path):
    """Hooks: 0 before, one per layer during, 0 after each fit. A second fit() on the same
    trainer continues: 3 + 3 steps == 6 uninterrupted steps (plain SGD has no optimizer state)."""
    data = loader(make_dataset(3 * 8), 8)
    model, once = MLP(), MLP()
    assert count_hooks(model) == 0
    during = Recorder(lambda trainer, module: count_hooks(module))
    callback = KFACCallback(**CLOCKS)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[callback, during])
    trainer.fit(model, data)
    assert count_hooks(model) == 0
    first = callback.preconditioner
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(model, data)
    assert count_hooks(model) == 0
    assert during.records == [2] * 6
    assert callback.preconditioner is not first and count_hooks(model) == 0

    cb_once = KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=6, callbacks=[cb_once]).fit(once, data)
    assert_params_equal(model, once)
    assert_factors_equal(callback.factors(), cb_once.factors())
    assert callback.preconditioner.steps == 6


def test_new_trainer_starts_fresh_and_exception_removes_hooks(tmp_path):
    """The same callback in a new Trainer starts from empty factors; a crash leaves no hook."""

    class Crashing(MLP):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    data = loader(make_dataset(24), 8)
    callback = KFACCallback(**CLOCKS)
    model = Crashing()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(model, data)
    assert count_hooks(model) == 0 and callback.preconditioner.steps == 2

    fresh_model, reference = MLP(), MLP()
    make_trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(fresh_model, data)
    cb_ref = KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=2, callbacks=[cb_ref]).fit(reference, data)
    assert_factors_equal(callback.factors(), cb_ref.factors())


def test_two_instances_coexist_and_restore_their_own_state(tmp_path):
    """Two callbacks with different options (one per layer) get distinct state keys and each
    resumes from its own checkpoint state."""
    data = loader(make_dataset(2 * 8), 8)
    first = dict(CLOCKS, skip_layers=["^net\\.2$"])
    second = dict(CLOCKS, skip_layers=["^net\\.0$"], damping=3e-2)
    model = MLP()
    fresh = clone_module(model)
    cbs = [KFACCallback(**first), KFACCallback(**second)]
    assert cbs[0].state_key != cbs[1].state_key
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    make_trainer(tmp_path, max_steps=4, callbacks=[*cbs, ckpt], enable_checkpointing=True).fit(
        model, data
    )
    assert set(cbs[0].factors()) == {"net.0"} and set(cbs[1].factors()) == {"net.2"}

    again = [KFACCallback(**first), KFACCallback(**second)]
    make_trainer(tmp_path, max_steps=4, callbacks=again).fit(
        fresh, data, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt")
    )
    for done, resumed in zip(cbs, again):
        assert_factors_equal(done.factors(), resumed.factors())
    assert_params_equal(model, fresh)


def test_resume_with_changed_options_adopts_state_with_warning(tmp_path):
    """A checkpoint saved with other options is restored (clock, factors) with a warning
    instead of silently restarting K-FAC."""
    data = loader(make_dataset(2 * 8), 8)
    saved = KFACCallback(**CLOCKS)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[saved])
    trainer.fit(MLP(), data)
    path = tmp_path / "saved.ckpt"
    trainer.save_checkpoint(path)

    changed = KFACCallback(**dict(CLOCKS, kl_clip=5e-2))
    with pytest.warns(UserWarning, match="saved with other options"):
        make_trainer(tmp_path, max_steps=3, callbacks=[changed]).fit(
            MLP(), data, ckpt_path=str(path)
        )
    assert changed.preconditioner.steps == 3
    assert (
        changed.preconditioner.counters["factor_updates"]
        == saved.preconditioner.counters["factor_updates"] + 2
    )  # step 2 updates both layers


def test_logging_through_the_trainer_logger(tmp_path):
    """kfac/* metrics reach the logger every log_every_n_steps; with huge damping and no KL
    clip the eigen preconditioner divides the gradient by ~damping, so ||P||/||g|| ~ 1/damping."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    options = dict(damping=1e4, kl_clip=None, factor_update_steps=1, inv_update_steps=1)
    callback = KFACCallback(**options)
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        callbacks=[callback],
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="logs"),
    )
    trainer.fit(MLP(), loader(make_dataset(32), 8))
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("kfac/layers")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row in rows:
        assert float(row["kfac/layers"]) == 2
        assert float(row["kfac/damping"]) == 1e4
        assert float(row["kfac/kl_clip_factor"]) == 1.0
        assert abs(float(row["kfac/grad_norm_ratio"]) * 1e4 - 1.0) < 1e-2
        assert float(row["kfac/time_ms"]) >= 0.0

    silent = KFACCallback(**options)
    quiet = make_trainer(tmp_path, max_steps=2, callbacks=[silent])
    quiet.fit(MLP(), loader(make_dataset(16), 8))
    assert not [k for k in quiet.callback_metrics if k.startswith("kfac/")]


def test_kl_clip_factor_is_logged_below_one_when_clipping(tmp_path):
    """A tiny kl_clip makes nu < 1; the logged value equals the engine's own statistic."""
    from pytorch_lightning.loggers import CSVLogger

    callback = KFACCallback(damping=1e-2, kl_clip=1e-8, factor_update_steps=1, inv_update_steps=1)
    seen = Recorder(lambda trainer, module: callback.preconditioner.last_stats["kl_clip_factor"])
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        callbacks=[callback, seen],
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="logs"),
    )
    trainer.fit(MLP(), loader(make_dataset(8), 8))
    assert 0.0 < seen.records[0] < 1.0
    assert float(trainer.logged_metrics["kfac/kl_clip_factor"]) == pytest.approx(seen.records[0])


def test_bad_options_raise_misconfiguration():
    with pytest.raises(MisconfigurationException, match=r"Invalid damping=-1\.0"):
        KFACCallback(damping=-1.0)
    with pytest.raises(MisconfigurationException, match="Invalid factor_update_steps='abc'"):
        KFACCallback(factor_update_steps="abc")
    with pytest.raises(MisconfigurationException, match=r"Invalid option\(s\) \['dampng'\]"):
        KFACCallback(dampng=1e-3)
    with pytest.raises(MisconfigurationException, match="Invalid config="):
        KFACCallback(config=3)
    assert KFACCallback({"damping": 2e-3}, kl_clip=None).config.damping == 2e-3


def test_model_without_supported_layer_raises(tmp_path):
    class NoLayer(MLP):
        """A raw weight used functionally and a LayerNorm: nothing K-FAC can precondition."""

        def __init__(self):
            super().__init__()
            self.net = nn.LayerNorm(6).double()
            self.weight = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))

        def forward(self, x):
            return torch.nn.functional.linear(self.net(x), self.weight)

    model = NoLayer()
    with pytest.raises(MisconfigurationException, match="no layer to precondition"):
        make_trainer(tmp_path, max_steps=1, callbacks=[KFACCallback()]).fit(
            model, loader(make_dataset(8), 8)
        )
    assert count_hooks(model) == 0


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
def test_sharding_strategies_are_refused(strategy):
    """FSDP / model-parallel need CUDA to run a fit, so the check is run on the real strategy
    objects (on_fit_start calls check_strategy(trainer.strategy) first)."""
    with pytest.raises(MisconfigurationException, match="strategy='ddp'"):
        check_strategy(strategy())


def test_summary_is_printed_on_fit_start(tmp_path):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    # rank_zero_info writes to the logger of whichever of pytorch_lightning / lightning.pytorch
    # was imported last (they share lightning_utilities' module-level logger)
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        make_trainer(tmp_path, max_steps=1, callbacks=[KFACCallback()]).fit(
            MLP(), loader(make_dataset(8), 8)
        )
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records if "K-FAC" in r.getMessage())
    assert "net.0" in text and "net.2" in text and "100.0%" in text
