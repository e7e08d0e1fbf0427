"""Lightning rows: fit twice / no leak, eval is silent, the Lightning matrix, and the resume sweep
through real checkpoints (including a crash in the middle of gradient accumulation).

Must hold (docs/reliability.md): hook handles per module constant during fit and zero after every
fit, validate, test, predict and crash, and nothing captured kept by the engine; no factor update
outside training (sanity check, validation, predict, ``no_grad`` and eval-mode forwards inside
``training_step``, a ``training_step`` returning None); every cell of the matrix works or raises
``MisconfigurationException`` naming the reason; a run resumed from the checkpoint of any step of
an inverse interval, or after a crash mid-accumulation, ends ``torch.equal`` to the
uninterrupted run. FSDP needs a GPU and DeepSpeed is not installed here: their refusal is
checked on the strategy objects (``check_strategy`` is what ``on_fit_start`` runs first).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_kfac import KFACCallback
from lightning_kfac.integrations.lightning.callback import check_strategy
from lightning_kfac.summary import predicted_memory_bytes
from tests.reliability.test_memory import held_bytes
from tests.reliability.test_resume import mismatches
from tests.support.lightning import MLP, Recorder, count_hooks, loader, make_dataset, make_trainer

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

CLOCKS = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=2)
LAYERS = {"net.0", "net.2"}


def _per_module_hooks(module) -> dict[str, int]:
    return {
        n: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for n, m in module.named_modules()
    }


class Crashing(MLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("injected crash")
        return super().training_step(batch, batch_idx)


def test_fit_twice_no_leak(tmp_path, reliability_row) -> None:
    data = loader(make_dataset(4 * 8), 8)
    model = MLP()
    callback = KFACCallback(**CLOCKS)
    during = Recorder(lambda trainer, module: _per_module_hooks(module))
    events: list[str] = []
    leaked = 0

    def after(event: str, target) -> None:
        nonlocal leaked
        events.append(event)
        leaked += count_hooks(target)

    make_trainer(tmp_path, max_epochs=1, callbacks=[callback, during]).fit(model, data)
    after("fit 1", model)
    held_after_fit = held_bytes(callback.preconditioner)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[callback, during])
    trainer.fit(model, data)
    after("fit 2", model)
    trainer.validate(model, data, verbose=False)
    after("validate", model)
    trainer.test(model, data, verbose=False)
    after("test", model)
    trainer.predict(model, data)
    after("predict", model)
    crashing = Crashing()
    with pytest.raises(RuntimeError, match="injected crash"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(crashing, data)
    after("crash", crashing)
    first = during.records[0]
    assert sum(first.values()) == len(LAYERS)  # one capture hook per preconditioned layer
    assert all(r == first for r in during.records) and len(during.records) == 8
    assert leaked == 0, f"hooks left after {events}"
    assert held_after_fit == predicted_memory_bytes(callback.preconditioner.layers)
    reliability_row(
        "fit twice, no leak",
        len(events),
        len(events) - (leaked > 0),
        f"leaked hooks {leaked} after {len(events)} lifecycle events",
    )


class Noisy(MLP):
    """Extra forwards that must not be captured; training_step returns None at batch 2."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        with torch.no_grad():
            self(x)
        self.eval()
        self(x)  # eval-mode forward with grad enabled
        self.train()
        if batch_idx == 2:
            self(x)  # a training forward whose backward never happens
            return None
        return super().training_step(batch, batch_idx)


class Quiet(MLP):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 2 else super().training_step(batch, batch_idx)


def test_eval_is_silent(tmp_path, reliability_row) -> None:
    data = make_dataset(6 * 8)
    quiet, noisy = Quiet(), Noisy()
    cb_quiet, cb_noisy = KFACCallback(**CLOCKS), KFACCallback(**CLOCKS)
    make_trainer(tmp_path, max_steps=6, callbacks=[cb_quiet]).fit(quiet, loader(data, 8))
    in_val: list[int] = []

    class ValProbe(pl.Callback):
        def on_validation_start(self, trainer, module):
            self.before = dict(cb_noisy.preconditioner.counters)

        def on_validation_end(self, trainer, module):
            in_val.append(
                cb_noisy.preconditioner.counters["factor_updates"] - self.before["factor_updates"]
            )

    trainer = make_trainer(
        tmp_path,
        max_steps=6,
        callbacks=[cb_noisy, ValProbe()],
        num_sanity_val_steps=2,
        limit_val_batches=2,
        val_check_interval=2,
    )
    trainer.fit(noisy, loader(data, 8), loader(data, 8))
    outside = sum(in_val)
    quiet_f, noisy_f = cb_quiet.factors(), cb_noisy.factors()
    equal = all(torch.equal(quiet_f[n][i], noisy_f[n][i]) for n in LAYERS for i in range(2))
    before = dict(cb_noisy.preconditioner.counters)
    trainer.validate(noisy, loader(data, 8), verbose=False)
    trainer.test(noisy, loader(data, 8), verbose=False)
    trainer.predict(noisy, loader(data, 8))
    outside += cb_noisy.preconditioner.counters["factor_updates"] - before["factor_updates"]
    after_f = cb_noisy.factors()
    unchanged = all(torch.equal(noisy_f[n][i], after_f[n][i]) for n in LAYERS for i in range(2))
    assert len(in_val) >= 3  # the sanity check and two in-fit validations ran
    assert equal and unchanged and outside == 0
    assert cb_noisy.preconditioner.counters["factor_updates"] == 5 * len(LAYERS)  # 6 - None step
    reliability_row(
        "eval is silent",
        8,
        8 if (equal and unchanged) else 0,
        f"updates outside training {outside}",
    )


class ManualTwo(MLP):
    """Manual optimization with one optimizer per layer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        loss = self.loss(batch)
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]


class WithLBFGS(MLP):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1)


def _cells(tmp_path) -> dict[str, Callable[[], None]]:
    data = make_dataset(4 * 8)

    def fast_dev_run():
        cb, model = KFACCallback(**CLOCKS), MLP()
        trainer = make_trainer(tmp_path, fast_dev_run=True, callbacks=[cb])
        trainer.fit(model, loader(data, 8), loader(data, 8))
        assert trainer.global_step == 1 and set(cb.factors()) == LAYERS
        assert count_hooks(model) == 0

    def no_validation():
        cb = KFACCallback(**CLOCKS)
        trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[cb])
        trainer.fit(MLP(), loader(data, 8), loader(data, 8))
        assert cb.preconditioner.steps == trainer.global_step == 4

    def endless_epochs_max_steps():
        cb = KFACCallback(**CLOCKS)
        trainer = make_trainer(tmp_path, max_epochs=-1, max_steps=7, callbacks=[cb])
        trainer.fit(MLP(), loader(data, 8))
        assert cb.preconditioner.steps == trainer.global_step == 7

    def manual_optimization():
        cb, model = KFACCallback(**CLOCKS), ManualTwo()
        before = [p.detach().clone() for p in model.parameters()]
        make_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, loader(data, 8))
        assert set(cb.factors()) == LAYERS and cb.preconditioner.steps == 4
        assert all(
            not torch.equal(p, q) and torch.isfinite(p).all()
            for p, q in zip(model.parameters(), before)
        )

    def two_instances_disjoint():
        cbs = [
            KFACCallback(**CLOCKS, skip_layers=["^net\\.2$"]),
            KFACCallback(**dict(CLOCKS, skip_layers=["^net\\.0$"], damping=3e-2)),
        ]
        make_trainer(tmp_path, max_steps=2, callbacks=cbs).fit(MLP(), loader(data, 8))
        assert set(cbs[0].factors()) == {"net.0"} and set(cbs[1].factors()) == {"net.2"}

    def two_instances_same_layers():
        cbs = [KFACCallback(**CLOCKS), KFACCallback(**dict(CLOCKS, damping=3e-2))]
        model = MLP()
        with pytest.raises(MisconfigurationException, match=r"net\.0"):
            make_trainer(tmp_path, max_steps=2, callbacks=cbs).fit(model, loader(data, 8))
        assert count_hooks(model) == 0

    def fsdp_refused():
        with pytest.raises(MisconfigurationException, match="FSDP"):
            check_strategy(FSDPStrategy())

    def deepspeed_refused():  # DeepSpeed is not installed: an uninitialised instance
        with pytest.raises(MisconfigurationException, match="DeepSpeed"):
            check_strategy(object.__new__(DeepSpeedStrategy))

    def lbfgs_refused_at_fit_start():
        model = WithLBFGS()
        trainer = make_trainer(tmp_path, max_steps=2, callbacks=[KFACCallback(**CLOCKS)])
        with pytest.raises(MisconfigurationException, match="LBFGS"):
            trainer.fit(model, loader(data, 8))
        assert trainer.global_step == 0 and count_hooks(model) == 0

    return {
        f.__name__: f
        for f in (
            fast_dev_run,
            no_validation,
            endless_epochs_max_steps,
            manual_optimization,
            two_instances_disjoint,
            two_instances_same_layers,
            fsdp_refused,
            deepspeed_refused,
            lbfgs_refused_at_fit_start,
        )
    }


def test_lightning_matrix(tmp_path, reliability_row) -> None:
    failures = {}
    cells = _cells(tmp_path)
    for name, cell in cells.items():
        try:
            cell()
        except (Exception, pytest.fail.Exception) as err:  # collect every cell's outcome
            failures[name] = f"{type(err).__name__}: {str(err)[:200]}"
    passing = len(cells) - len(failures)
    reliability_row(
        "Lightning matrix", len(cells), passing, f"cells passing {passing}/{len(cells)}"
    )
    assert not failures, failures


# -- resume sweep through Lightning checkpoints ----------------------------------------------------
ACCUMULATE, TOTAL = 2, 12
RESUME_KFAC = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=4, kl_clip=1e-2)


class CrashMidAccumulation(MLP):
    """Raises on the second micro-batch of optimizer step ``crash_step`` (after one backward)."""

    def __init__(self, crash_step: int):
        super().__init__(optimizer="momentum")
        self.crash_step = crash_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_step and batch_idx % ACCUMULATE == 1:
            raise RuntimeError("injected crash mid-accumulation")
        return super().training_step(batch, batch_idx)


def _resume_trainer(tmp_path, callback, ckpt_dir=None):
    callbacks = [callback]
    if ckpt_dir is not None:
        # saved at the batch end that completes each step (= each epoch's last batch)
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1
            )
        )
    return make_trainer(
        tmp_path,
        max_steps=TOTAL,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
    )


def _final(model, callback) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "kfac": callback.preconditioner.state_dict(),
    }


def test_resume_sweep_through_checkpoints(tmp_path, reliability_row) -> None:
    """One optimizer step per epoch (2 micro-batches), checkpoints at every epoch end."""
    data = loader(make_dataset(ACCUMULATE * 8), 8)
    ckpt = tmp_path / "ckpt"
    model, callback = MLP(optimizer="momentum"), KFACCallback(**RESUME_KFAC)
    _resume_trainer(tmp_path, callback, ckpt).fit(model, data)
    reference = _final(model, callback)
    tried, failures = 0, {}
    for step in (4, 5, 6, 7):  # 4 decomposes; 5-7 reuse its decomposition
        tried += 1
        fresh, cb = MLP(optimizer="momentum", seed=99), KFACCallback(**RESUME_KFAC)
        _resume_trainer(tmp_path, cb).fit(fresh, data, ckpt_path=str(ckpt / f"step={step}.ckpt"))
        bad = mismatches(_final(fresh, cb), reference)
        if bad:
            failures[f"step {step}"] = bad[:4]
    # a crash in the middle of step 6's accumulation; resume in-process with the same objects
    tried += 1
    crash_dir = tmp_path / "crash"
    crashing, cb = CrashMidAccumulation(crash_step=6), KFACCallback(**RESUME_KFAC)
    with pytest.raises(RuntimeError, match="mid-accumulation"):
        _resume_trainer(tmp_path, cb, crash_dir).fit(crashing, data)
    crashing.crash_step = -1
    _resume_trainer(tmp_path, cb).fit(crashing, data, ckpt_path=str(crash_dir / "step=6.ckpt"))
    bad = mismatches(_final(crashing, cb), reference)
    if bad:
        failures["mid-accumulation"] = bad[:4]
    passing = tried - len(failures)
    reliability_row(
        "resume sweep",
        tried,
        passing,
        f"Lightning checkpoints incl. mid-accumulation: {passing}/{tried}",
    )
    assert not failures, failures


class HugeInput(MLP):
    """float32; at ``bad_steps`` one example is scaled by 1e20: ``a a^T`` of net.0 overflows
    while the loss and every gradient stay finite (tanh saturates)."""

    def __init__(self, bad_steps):
        super().__init__(dtype=torch.float32)
        self.bad_steps = set(bad_steps)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step in self.bad_steps:
            x = x.clone()
            x[0] *= 1e20
        return self.loss((x, y))


def test_nonfinite_counted_in_callback_state_and_logs(tmp_path, reliability_row) -> None:
    from pytorch_lightning.loggers import CSVLogger

    bad = [2, 5, 6]
    model, callback = HugeInput(bad), KFACCallback(**CLOCKS)
    trainer = make_trainer(
        tmp_path,
        max_steps=8,
        callbacks=[callback],
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path / "logs"),
    )
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model, loader(make_dataset(8 * 8, dtype=torch.float32), 8))
    warned = [
        w for w in records if "non-finite factor estimate for layer 'net.0'" in str(w.message)
    ]
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][callback.state_key]
    logged = float(trainer.logged_metrics["kfac/nonfinite_estimates"])
    finite = all(torch.isfinite(p).all() for p in model.parameters()) and all(
        torch.isfinite(t).all() for pair in callback.factors().values() for t in pair
    )
    assert finite and len(warned) == 1
    assert callback.preconditioner.counters["nonfinite_estimates"] == len(bad)
    assert state["counters"]["nonfinite_estimates"] == len(bad) and logged == len(bad)
    reliability_row(
        "non-finite gradients",
        len(bad),
        len(bad) if finite else 0,
        "Lightning: counted in checkpoint state and kfac/nonfinite_estimates log",
    )
