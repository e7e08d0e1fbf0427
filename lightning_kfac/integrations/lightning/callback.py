"""KFACCallback: K-FAC preconditioning for any LightningModule, as one Lightning callback.

A thin adapter that maps Lightning's hooks to the engine (``KFACPreconditioner``, Martens &
Grosse 2015; KFC for convolutions, Grosse & Martens 2016). Only the modules of
``lightning_kfac.integrations.lightning`` import ``pytorch_lightning``.

Hook map (one optimizer step t = ``trainer.global_step`` before the step):

- ``on_fit_start``: refuse FSDP / DeepSpeed / model-parallel, discover the layers of
  ``trainer.lightning_module`` (names without DDP prefixes), install the capture hooks, apply a
  checkpoint's K-FAC state, print the registration summary on rank zero.
- ``on_train_batch_start``: ``pre.set_step(t)``; capture is on only on factor-update steps, so the
  k micro-batches of ``accumulate_grad_batches=k`` feed one estimate.
- ``on_before_backward``: ``pre.grad_scale = loss_scale * (1/k)``: the AMP loss scale (16-mixed)
  times Lightning's ``1/k`` loss normalisation (automatic optimization only), so that captured
  ``g`` is the gradient of the user's own loss; with ``fisher_type="mc"``, ``pre.mc_backward()``.
- ``on_before_optimizer_step``: ``pre.step(optimizer)`` after DDP averaging and AMP unscaling,
  before Lightning's gradient clipping and the optimizer's ``step``; only the optimizer's params.
  With ``step_rule="quadratic"`` (step_rule.py) the engine there moves the preconditioned
  parameters itself by ``alpha Delta + mu delta_0`` (exact quadratic model, re-running
  ``training_step`` on the batch with logging silenced) and sets their ``.grad`` to None, so the
  optimizer, which skips parameters without a gradient, steps only the others.
  A 16-mixed overflow step (non-finite gradients, which the scaler skips) leaves the factors and
  gradients untouched.
- ``on_train_batch_end``: log ``kfac/*`` through ``pl_module.log`` (only when a logger exists,
  or ``prog_bar=True``; Lightning writes them every ``log_every_n_steps``). What K-FAC costs:
  ``kfac/time_ms`` = ``time_factors_ms`` (factor estimates and their all-reduce) +
  ``time_decompose_ms`` (eigendecompositions / inverses, EKFAC scalings) +
  ``time_precondition_ms`` (preconditioning, KL clip) + bookkeeping, host wall time of
  ``pre.step``; ``kfac/step_ms`` the training step's wall time (batch start to batch end, summed
  over accumulated batches); each a mean per optimizer step since the last write (refreshes
  amortized); ``kfac/overhead_share`` = sum time_ms / sum step_ms over them. The capture hooks' time
  inside forward/backward is not in time_ms. On a GPU the times are of kernel launches unless
  something synchronizes.
- ``on_fit_end`` / ``teardown`` / ``on_exception``: remove every hook; ``factors()`` stays
  available.
- ``diagnostics_every_n_steps``: on those steps only, ``diagnostics_callback.py`` records the
  layers' rows during the step (batch start to end) and logs ``kfac_diag/*`` after it.

Manual optimization: ``on_before_optimizer_step`` fires inside each ``opt.step()``. There
``trainer.global_step`` counts the steps of every optimizer, so the K-FAC clock counts training
batches that stepped instead: every optimizer of one batch is preconditioned at the same t, each
with its own params.

Example:
    >>> trainer = Trainer(max_epochs=5, callbacks=[KFACCallback(damping=1e-2)])
    >>> trainer.fit(model)
    >>> A, G = trainer.callbacks[0].factors()["layer"]
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.budget import MemoryBudgetError
from lightning_kfac.core.distributed import Communicator, TorchDistributedCommunicator
from lightning_kfac.core.linalg import all_finite
from lightning_kfac.core.optim_check import check_optimizer
from lightning_kfac.integrations.lightning import cli_errors
from lightning_kfac.integrations.lightning.diagnostics_callback import (
    DiagnosticsRecorder,
)
from lightning_kfac.integrations.lightning.training_step_rerun import (
    adapt_damping,
    lightning_closure,
)
from lightning_kfac.preconditioner import KFACPreconditioner
from lightning_kfac.step_rule import STATS as STEP_RULE_STATS
from lightning_kfac.step_rule import trainer_refusal

# Matched by class name along the MRO, so that the same classes of the unified ``lightning``
# package (``lightning.pytorch.strategies``) are refused too.
_UNSUPPORTED_STRATEGIES = (
    ("FSDPStrategy", "FSDP"),
    ("DeepSpeedStrategy", "DeepSpeed"),
    ("ModelParallelStrategy", "ModelParallel"),
)


def check_strategy(strategy: Any) -> None:
    """Raise ``MisconfigurationException`` for strategies that shard parameters or gradients.

    K-FAC needs each layer's full weight gradient and its full input/output on every rank.
    """
    bases = {cls.__name__ for cls in type(strategy).__mro__}
    for cls_name, label in _UNSUPPORTED_STRATEGIES:
        if cls_name in bases:
            raise MisconfigurationException(
                f"KFACCallback does not support the {label} strategy ({type(strategy).__name__}): "
                "it shards parameters and gradients, while K-FAC needs every layer's full weight "
                "gradient. Use strategy='ddp' (or a single device), or remove KFACCallback."
            )


class KFACCallback(Callback):
    """K-FAC second-order preconditioning for any LightningModule, with no model changes.

    Every ``KFACConfig`` option is a typed keyword of ``__init__`` (its description is generated
    from ``KFACConfig``'s docstring), so IDEs, ``LightningCLI --help`` and jsonargparse see them;
    enum options take their lowercase strings (``compute_method="inverse"``).

    Args:
        config: a ``KFACConfig``, a mapping of its options (e.g. a Hydra ``DictConfig`` or a
            ``LightningCLI`` ``config:`` mapping) or None.
        prog_bar: also show ``kfac/overhead_share`` (K-FAC's share of the step time) in the
            progress bar.
        **options: any ``KFACConfig`` option. A keyword overrides ``config``'s value unless it is
            left at its default, so ``KFACCallback(config={"damping": 1e-2})`` keeps 1e-2 even when
            a CLI passes every keyword at its default.

    Raises:
        MisconfigurationException: an invalid option (same message as ``KFACConfig``'s
            ``ValueError``), an unsupported strategy, or a model without a supported layer.

    Example:
        >>> trainer = Trainer(callbacks=[KFACCallback(damping=1e-3, inv_update_steps=50)])
    """

    def __init__(
        self,
        config: dict[str, Any] | KFACConfig | None = None,
        *,
        damping: float = 1e-3,
        factor_update_steps: int = 10,
        inv_update_steps: int = 100,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        compute_method: Literal["eigen", "inverse", "ekfac"] = "eigen",
        fisher_type: Literal["empirical", "mc"] = "empirical",
        likelihood: Literal["categorical", "bernoulli", "gaussian"] = "categorical",
        output_module: str | None = None,
        mc_samples: int = 1,
        gaussian_variance: float = 1.0,
        skip_layers: list[str] | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        output_reduction: Literal["mean", "sum"] = "mean",
        damping_mode: Literal["absolute", "relative"] = "absolute",
        factor_init: Literal["identity", "batch", "scaled_identity"] = "batch",
        warmup_steps: int = 0,
        damping_schedule: Literal["constant", "exponential", "step"] = "constant",
        damping_decay: float = 0.5,
        damping_step_size: int = 1000,
        adaptive_damping: bool = False,
        adaptive_damping_interval: int = 5,
        adaptive_damping_factor: float | None = None,
        min_damping: float = 0.0,
        max_damping: float | None = None,
        layer_overrides: list[dict[str, Any]] | None = None,
        nonfinite: Literal["skip", "raise"] = "skip",
        max_decomposition_failures: int = 3,
        distribute: Literal["replicate", "decompositions", "gradients"] = "gradients",
        low_rank: bool = True,
        diagnostics_every_n_steps: int | None = None,
        step_rule: Literal["optimizer", "quadratic"] = "optimizer",
        max_dense_dim: int = 2048,
        memory_budget_gib: float | None = 2.0,
        stagger_refresh: bool = False,
        prog_bar: bool = False,
        **options: Any,
    ) -> None:
        given = locals()
        named = {
            name: given[name]
            for name, default in _OPTION_DEFAULTS.items()
            if not _equals_default(given[name], default)
        }
        try:
            self.config = KFACConfig.from_any(config, **named, **options)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        self.prog_bar = bool(prog_bar)
        self._state_key = self._generate_state_key(**self.config.to_dict())
        self.preconditioner: KFACPreconditioner | None = None
        self._pending_state: dict[str, Any] | None = None
        self._stage: str | None = None  # the Trainer entry point running ("fit", "validate"...)
        self._fit_module: pl.LightningModule | None = None
        self._active = False
        self._clock = 0
        self._stepped = False
        self._batch_stats: dict[str, float] = {}
        self._batch_start: float | None = None  # kfac/overhead_share: the step's wall time
        self._step_ms = 0.0
        self._interval_ms: dict[str, float] = {}  # time sums since the last write (amortized)
        self._diagnostics: DiagnosticsRecorder | None = None  # diagnostics_every_n_steps
        self._batch: tuple[Any, int] | None = None  # step_rule="quadratic": the batch to re-run

    # -- identity and state -----------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        """Unique per settings, so two instances with different options coexist in a checkpoint."""
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        """The preconditioner's state (factors, decompositions in use, clock, counters, config).

        Never empty (Lightning does not save an empty state): without a preconditioner yet, the
        stashed checkpoint state or at least the config is returned.
        """
        if self.preconditioner is not None:
            state = self.preconditioner.state_dict()
        elif self._pending_state is not None:
            return dict(self._pending_state)
        else:
            state = {}
        state["config"] = self.config.to_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Stash the state: Lightning calls this before ``on_fit_start`` (no hooks yet).

        Lightning calls it for every entry point given a ``ckpt_path``; only ``fit`` restores
        K-FAC state, so under ``validate`` / ``test`` / ``predict`` the state is ignored (it
        would otherwise leak into the next ``fit`` of a reused callback).
        """
        if self._stage is not None and self._stage != "fit":
            return
        self._pending_state = dict(state_dict)
        if self._active and self.preconditioner is not None:
            self._apply_pending_state()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Adopt the K-FAC state of a checkpoint saved with other options, with a warning.

        The state key encodes the options, so after changing e.g. ``damping`` the key no longer
        matches and Lightning would silently restore nothing. When exactly one unclaimed
        KFACCallback state is in the checkpoint, it is loaded (the current options win).
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or getattr(trainer.state.fn, "value", None) != "fit":
            return
        prefix = type(self).__qualname__ + "{"
        claimed = {cb.state_key for cb in trainer.callbacks}  # type: ignore[attr-defined]
        others = [
            k for k in states if isinstance(k, str) and k.startswith(prefix) and k not in claimed
        ]
        if len(others) == 1 and states[others[0]]:
            rank_zero_warn(
                "KFACCallback: the checkpoint's K-FAC state was saved with other options "
                f"({others[0]}); restoring its factors and clock with the current options "
                f"({self.state_key})."
            )
            self._pending_state = dict(states[others[0]])
        elif others:
            rank_zero_warn(
                f"KFACCallback: the checkpoint holds {len(others)} K-FAC states saved with other "
                "options and none matches this callback's; K-FAC restarts from empty factors."
            )

    # -- fit lifecycle ----------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remember the entry point: Lightning restores checkpoint state after ``setup``."""
        self._stage = str(getattr(stage, "value", stage))  # a TrainerFn ("fit", "validate"...)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer.strategy)
        for optimizer in trainer.optimizers:  # closure-based ones (LBFGS): core/optim_check.py
            try:
                check_optimizer(optimizer)
            except ValueError as err:
                raise MisconfigurationException(f"KFACCallback: {err}") from err
        self._remove_hooks()
        module = trainer.lightning_module
        if self.config.adaptive_damping and not module.automatic_optimization:
            raise MisconfigurationException(
                "KFACCallback(adaptive_damping=True) needs automatic optimization: it re-evaluates "
                "training_step after the optimizer step, which under manual optimization would "
                "step the optimizers again. Use a damping_schedule, or call "
                "callback.preconditioner.update_damping(loss_before, loss_after) yourself."
            )
        if self.config.step_rule == "quadratic" and trainer_refusal(trainer, module):
            raise MisconfigurationException(trainer_refusal(trainer, module))
        previous = self.preconditioner
        communicator = TorchDistributedCommunicator() if trainer.world_size > 1 else Communicator()
        try:
            pre = KFACPreconditioner(module, self.config, communicator=communicator)
        except MemoryBudgetError as err:  # refused before any hook is installed
            raise MisconfigurationException(f"KFACCallback: {err}") from err
        if not pre.layers:
            pre.remove()
            raise MisconfigurationException(
                f"KFACCallback found no layer to precondition in {type(module).__name__}: K-FAC "
                "supports nn.Linear, nn.Conv1d/2d/3d and nn.Embedding with a trainable weight "
                "not matched by "
                f"skip_layers={self.config.skip_layers}. Add such a layer, relax skip_layers, or "
                f"remove KFACCallback.\n{pre.summary()}"
            )
        shared = sorted(set(pre.layers) & _claimed_layers(trainer, self))
        if shared:
            pre.remove()
            raise MisconfigurationException(
                f"KFACCallback: layers {shared} are already preconditioned by another "
                "KFACCallback of this Trainer; preconditioning twice would apply the inverse "
                "Fisher twice. Give each instance disjoint layers (skip_layers) or keep one."
            )
        self.preconditioner = pre
        pre.undoable = True  # on_exception undoes a K-FAC step whose optimizer step never ran
        self._active = True
        self._diagnostics = DiagnosticsRecorder.for_fit(self.config, pre, trainer)  # None if off
        if (
            self._pending_state is None
            and previous is not None
            and self._fit_module is module
            and trainer.global_step > 0
        ):
            # A second fit() on the same trainer continues training: keep the K-FAC state.
            self._pending_state = previous.state_dict()
        self._fit_module = module
        self._apply_pending_state()
        self._clock = trainer.global_step if module.automatic_optimization else pre.steps
        rank_zero_info(f"KFACCallback registration summary:\n{pre.summary()}")
        in_eval = [name for name, block in pre.layers.items() if not block.kind.module.training]
        if in_eval:
            # Lightning (2.2+) does not call model.train() at fit start; capture needs it.
            rank_zero_warn(
                f"KFACCallback: {len(in_eval)} preconditioned module(s) are in eval mode at fit "
                f"start ({', '.join(in_eval[:5])}{', ...' if len(in_eval) > 5 else ''}); K-FAC "
                "only captures training forwards (module.training), so they will be dropped "
                "unless they run in train mode. Call model.train() before fit."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._pending_state = None  # applied at on_fit_start, or not meant for a fit
        self._stage = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Undo the K-FAC step of an optimizer step that never ran, then remove the hooks.

        An exception (or Ctrl+C) between ``pre.step`` and ``optimizer.step()`` leaves
        ``trainer.global_step`` at t, so a later ``fit`` repeats step t: its factor update must
        not be applied twice (core/transaction.py). Under manual optimization only what was
        captured is dropped (several optimizers may have stepped).
        """
        pre = self._live()
        if pre is not None:
            pre.abort_step(trainer.global_step if pl_module.automatic_optimization else None)
        self._remove_hooks()

    # -- clocks and scales ------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pre = self._live()
        if pre is None:
            return
        # Manual optimization: global_step counts every optimizer's steps; use batches that stepped.
        self._clock = trainer.global_step if pl_module.automatic_optimization else pre.steps
        pre.set_step(self._clock)
        self._batch_start = time.perf_counter()
        self._batch = (batch, batch_idx)
        if self._diagnostics is not None:  # diagnostics_callback.py: hooks on diagnostic steps
            self._diagnostics.start(self._clock)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        pre = self._live()
        if pre is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        # Automatic optimization divides the loss by k before backward (AutomaticOptimization's
        # ClosureResult); manual optimization leaves the user's loss alone.
        k = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        pre.grad_scale = loss_scale / k
        if self.config.fisher_type == "mc":
            # G from labels sampled from the model (core/mc.py): after the forward, before the
            # user's backward, while the graph is alive; a no-op off factor-update steps.
            pre.mc_backward()

    # -- preconditioning --------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pre = self._live()
        if pre is None:
            return
        manual = not pl_module.automatic_optimization
        if manual:
            pre.set_step(self._clock)  # every optimizer of this batch steps at the same t
        if getattr(trainer.precision_plugin, "scaler", None) is not None and _has_nonfinite_grad(
            optimizer
        ):
            # The GradScaler skips this optimizer step: keep factors and gradients untouched,
            # and drop what was captured for it.
            for block in pre.layers.values():
                block.reset_accumulators()
            pre.counters["overflow_steps"] = pre.counters.get("overflow_steps", 0) + 1
        else:
            closure = None  # step_rule="quadratic": re-runs training_step on this batch
            if pre.step_rule is not None and self._batch is not None:
                closure = lightning_closure(pl_module, *self._batch)
            pre.step(optimizer, closure=closure)
            self._record_stats(pre.last_stats)
        if manual:
            # Keep capturing at t for the rest of the batch; the clock advances at batch end.
            pre.set_step(self._clock)
            self._stepped = True
        else:
            pre.set_step(self._clock + 1)  # = trainer.global_step after this step

    # -- logging ----------------------------------------------------------------------------------
    def _record_stats(self, stats: Mapping[str, float]) -> None:
        """Merge the engine's per-step statistics over the optimizer steps of one batch."""
        merged = self._batch_stats
        for key in _TIME_KEYS:  # summed over the optimizers of the batch
            merged[f"kfac/{key}"] = merged.get(f"kfac/{key}", 0.0) + float(stats.get(key, 0.0))
        nu = float(stats.get("kl_clip_factor", 1.0))
        merged["kfac/kl_clip_factor"] = min(nu, merged.get("kfac/kl_clip_factor", math.inf))
        merged["kfac/grad_norm_ratio"] = float(stats.get("grad_norm_ratio", 1.0))
        merged["kfac/damping"] = float(stats.get("damping", self.config.damping))
        merged["kfac/layers"] = float(stats.get("layers", 0.0))
        for key in STEP_RULE_STATS:  # step_rule="quadratic": alpha, mu, M(delta), rho (if adapted)
            if key in stats and math.isfinite(stats[key]):
                merged[f"kfac/{key}"] = float(stats[key])

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        pre = self._live()
        if pre is not None:
            pre.commit_step()  # the batch's optimizer step ran: the K-FAC step is final
        self._batch = None
        if pre is not None and self._stepped:
            self._stepped = False
            pre.set_step(self._clock + 1)  # manual optimization: one K-FAC step per batch
        if pre is not None and self._diagnostics is not None:  # after the step: compute, log
            self._diagnostics.end(trainer)
        if pre is not None and pre.adaptation_pending:  # adaptive_damping (training_step_rerun.py)
            rho = adapt_damping(pre, trainer, pl_module, outputs, batch, batch_idx)
            if self._batch_stats and rho is not None:
                self._batch_stats["kfac/rho"] = float(rho)
        stats, self._batch_stats = self._batch_stats, {}
        if pre is not None and self._batch_start is not None:  # the training step's wall time
            self._step_ms += 1e3 * (time.perf_counter() - self._batch_start)
            self._batch_start = None
        if stats:  # this optimizer step's times (step_ms: its batches, with accumulation)
            stats["kfac/step_ms"], self._step_ms = self._step_ms, 0.0
            interval = self._interval_ms
            for key in (*_TIME_KEYS, "step_ms"):
                interval[key] = interval.get(key, 0.0) + stats[f"kfac/{key}"]
            interval["steps"] = interval.get("steps", 0.0) + 1.0
        # Only on the steps Lightning writes (each self.log costs ~0.5 ms: twice a small
        # model's step)
        if (
            not stats
            or not (trainer.loggers or self.prog_bar)
            or trainer.global_step % trainer.log_every_n_steps  # type: ignore[attr-defined]
        ):
            return
        # Times: means per optimizer step since the last write, so that factor and decomposition
        # refreshes (every N / M steps) are amortized into what is logged, not missed or spiked.
        interval, self._interval_ms = self._interval_ms, {}
        for key in (*_TIME_KEYS, "step_ms"):
            stats[f"kfac/{key}"] = interval[key] / interval["steps"]
        stats["kfac/overhead_share"] = (
            min(1.0, interval["time_ms"] / interval["step_ms"]) if interval["step_ms"] > 0 else 0.0
        )
        if pre is not None:  # cumulative fault events (non-finite, failed decompositions, overflow)
            for key in (
                "nonfinite_estimates",
                "nonfinite_gradients",
                "decomposition_failures",
                "decomposition_retries",
                "overflow_steps",
            ):
                stats[f"kfac/{key}"] = float(pre.counters.get(key, 0))
        for name, value in stats.items():
            pl_module.log(
                name,
                value,
                on_step=True,
                on_epoch=False,
                batch_size=1,
                prog_bar=self.prog_bar and name == "kfac/overhead_share",
                logger=bool(trainer.loggers),
            )

    # -- results ----------------------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Qualified module name -> ``(A, G)`` running factors (detached copies); after fit too."""
        if self.preconditioner is None:
            return {}
        return self.preconditioner.factors()

    # -- helpers ----------------------------------------------------------------------------------
    def _live(self) -> KFACPreconditioner | None:
        return self.preconditioner if self._active else None

    def _apply_pending_state(self) -> None:
        if self._pending_state is None or self.preconditioner is None:
            return
        state, self._pending_state = self._pending_state, None
        try:
            self.preconditioner.load_state_dict(state)
        except ValueError as err:
            raise MisconfigurationException(
                f"KFACCallback could not restore its state: {err}"
            ) from err

    def _remove_hooks(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove()
            self.preconditioner.commit_step()  # no undo information kept after fit
        self._active = False
        self._stepped = False
        self._batch_stats = {}
        self._batch_start, self._step_ms, self._interval_ms = None, 0.0, {}
        if self._diagnostics is not None:
            self._diagnostics.remove()


def _claimed_layers(trainer: pl.Trainer, me: KFACCallback) -> set[str]:
    """Layers preconditioned by the other active KFACCallbacks of ``trainer``."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
    return {
        name
        for cb in callbacks
        if isinstance(cb, KFACCallback)
        and cb is not me
        and cb._active
        and cb.preconditioner is not None
        for name in cb.preconditioner.layers
    }


def _has_nonfinite_grad(optimizer: torch.optim.Optimizer) -> bool:
    """True when any gradient of the optimizer's params is inf/NaN (what the GradScaler checks)."""
    grads: list[Tensor] = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    return not all_finite(*grads)  # one aminmax pass per gradient, one host sync


#: The engine's per-step timings (``KFACPreconditioner.last_stats``), logged as ``kfac/<key>``.
_TIME_KEYS = ("time_ms", "time_factors_ms", "time_decompose_ms", "time_precondition_ms")


# -- the typed signature ---------------------------------------------------------------------------
#: Keywords of ``KFACCallback.__init__`` that are the callback's own, not ``KFACConfig`` options.
CALLBACK_ONLY_OPTIONS = ("prog_bar",)
#: The ``KFACConfig`` options of the signature and their defaults
#: (tests/integrations/lightning/test_callback_signature.py checks that they mirror
#: ``KFACConfig``'s fields, types and defaults).
_OPTION_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(KFACCallback.__init__).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in CALLBACK_ONLY_OPTIONS
}


def _equals_default(value: Any, default: Any) -> bool:
    """True when a keyword holds its signature default (it then leaves ``config``'s value).

    Strict on type, so that ``adaptive_damping=0`` or ``mc_samples=True`` still reach
    ``KFACConfig``'s validation instead of passing for the default.
    """
    if default is None or isinstance(default, bool):
        return value is default
    if isinstance(default, str):
        return isinstance(value, str) and value == default  # enum members are str subclasses
    if type(value) not in (int, float):
        return False
    return bool(value == default)


def _init_docstring() -> str:
    """``__init__``'s ``Args:`` section, built from ``KFACConfig``'s ``Attributes:`` (one source
    for the descriptions that IDEs and ``LightningCLI --help`` show)."""
    doc = inspect.getdoc(KFACConfig) or ""
    section = doc.split("Attributes:", 1)[-1]
    lines = [
        "Build the callback; every keyword is a KFACConfig option unless noted.",
        "",
        "Args:",
        "    config: a KFACConfig, a mapping of its options or None; a keyword left at its",
        "        default leaves config's value, any other keyword overrides it.",
    ]
    for line in section.splitlines():
        if re.match(r"^    \w+: ", line) or (line.startswith("        ") and len(lines) > 5):
            lines.append(line)
    lines.append("    prog_bar: (callback only) show kfac/overhead_share in the progress bar.")
    return "\n".join(lines)


KFACCallback.__init__.__doc__ = _init_docstring()
cli_errors.register(KFACCallback)  # LightningCLI: a bad value is one line, not a traceback
