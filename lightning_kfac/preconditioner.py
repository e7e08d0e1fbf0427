"""KFACPreconditioner: the Lightning-free K-FAC engine (Martens & Grosse 2015).

Usage in a plain PyTorch loop::

    pre = KFACPreconditioner(model)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step(optimizer)     # replaces weight.grad / bias.grad by (F + damping I)^-1 grad
        optimizer.step()

At optimizer step t (0-based): factors are updated when ``t % factor_update_steps == 0``,
decompositions recomputed when ``t % inv_update_steps == 0``, in that order, then the gradient is
preconditioned with the decompositions in use and KL-clipped (docs/conventions.md, "Clocks").

This class is the orchestrator (the clocks, the public API, the state); the steps themselves
live in core/: factor_step.py (batch estimates -> all-reduce -> running averages),
decomposition_step.py (refreshes and their damping), precondition_step.py (which layers, their
gradients and P), kl_clip.py (the KL clip and the write-back). ``KFACOptimizer`` (the optimizer
wrapper) lives in optimizer_wrapper.py and is re-exported here.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.config import KFACConfig
from lightning_kfac.core import (
    coverage,
    decomposition_step,
    factor_step,
    kl_clip,
    precondition_step,
    stagger,
    state_checks,
)
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.budget import apply_memory_budget
from lightning_kfac.core.capture import Capture
from lightning_kfac.core.damping import DampingControl, Loss, model_device
from lightning_kfac.core.discovery import discover
from lightning_kfac.core.distributed import Communicator, default_communicator
from lightning_kfac.core.ekfac import EKFACScaling
from lightning_kfac.core.kaisa import DistributedWork
from lightning_kfac.core.mc import MCFisher
from lightning_kfac.core.methods import Decomposition
from lightning_kfac.core.optim_check import check_optimizer
from lightning_kfac.core.refresh import RefreshMonitor
from lightning_kfac.core.state_checks import STATE_VERSION
from lightning_kfac.core.transaction import StepParts, StepUndo, discard_captured
from lightning_kfac.optimizer_wrapper import KFACOptimizer
from lightning_kfac.step_rule import QuadraticStepRule
from lightning_kfac.summary import format_summary

__all__ = ["KFACOptimizer", "KFACPreconditioner"]  # KFACOptimizer: optimizer_wrapper.py

_COUNTERS = (
    "factor_updates",
    "decompositions",
    "nonfinite_estimates",
    "nonfinite_gradients",
    "decomposition_failures",
    "dropped_layers",
    "decomposition_retries",
)


def _unwrap(model: nn.Module) -> nn.Module:
    wrapped = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrapped):
        model = model.module
    return model


class KFACPreconditioner:
    """K-FAC for a ``torch.nn.Module``: capture hooks, running factors, damped preconditioning.

    Args:
        model: the model whose Linear / Conv1d / Conv2d / Conv3d layers are preconditioned.
        config: a ``KFACConfig`` or a mapping of its options; keywords override it.
        optimizer: default optimizer for ``step()`` (lr for the KL clip, which params to touch).
        communicator: collectives across ranks; by default torch.distributed when initialized.
        **options: any ``KFACConfig`` option (``damping=1e-2``, ``compute_method="inverse"``...).
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        communicator: Communicator | None = None,
        **options: Any,
    ):
        self.config = KFACConfig.from_any(config, **options)
        check_optimizer(optimizer)  # closure-based (LBFGS) refused, before any hook is installed
        self.model = _unwrap(model)
        self.blocks, self.skipped = discover(self.model, self.config)
        demoted = apply_memory_budget(self.blocks, self.config.memory_budget_gib)  # or refuse
        if demoted:
            warnings.warn(
                f"K-FAC: to fit memory_budget_gib={self.config.memory_budget_gib:g}, "
                f"these factor sides are kept diagonal: {demoted} (raise "
                "memory_budget_gib to keep them dense).",
                RuntimeWarning,
                stacklevel=2,
            )
        for message in coverage.registration_messages(self.model, self.blocks, self.skipped):
            warnings.warn(message, coverage.KFACCoverageWarning, stacklevel=2)
        self._first_interval = coverage.FirstIntervalCheck()  # never silently off (coverage.py)
        # Who decomposes and who preconditions under DDP (config.distribute; KAISA's
        # assignment); it holds the communicator (``comm``).
        self.distributed = DistributedWork(
            communicator if communicator is not None else default_communicator(),
            self.config.distribute,
            self.config.damping_mode == "relative",
            self.blocks,
        )
        self.refresh = RefreshMonitor()  # retries counted + logged, slow refreshes reported
        self._offsets: dict[str, int] | None = None  # stagger_refresh (core/stagger.py)
        self.capture = Capture(self.blocks, mean_reduction=self.config.loss_reduction == "mean")
        self.mc: MCFisher | None = None  # fisher_type="mc" (core/mc.py)
        if self.config.fisher_type == "mc":
            self.mc = MCFisher(self.model, self.capture, self.config, rank=self.comm.rank)
        self.ekfac: EKFACScaling | None = None  # compute_method="ekfac" (core/ekfac.py)
        if any(b.method.needs_pairs for b in self.blocks.values()):
            self.ekfac = EKFACScaling()  # its refresh_due set follows the clock (_set_capture)
            self.capture.pair_sink = self.ekfac.add_pair
        self.capture.install()
        # rank-R path (core/lowrank.py); not under DDP (the gradient is then the ranks' average)
        precondition_step.enable_low_rank(
            self.blocks.values(), self.config.low_rank and self.comm.world_size == 1
        )
        self.optimizer = optimizer
        self.steps = 0
        # schedule / LM rule (core/damping.py)
        self.damping_control = DampingControl(self.config, self.comm)
        self.counters: dict[str, int] = {k: 0 for k in _COUNTERS}
        self.last_stats: dict[str, float] = {}
        self._warned: set[str] = set()
        self._undecomposed = set(self.blocks)  # no decomposition yet: next update makes one
        self.undoable = False  # keep each step's StepUndo until commit_step (core/transaction.py)
        self._undo: StepUndo | None = None
        self._parts = StepParts(
            self.blocks, self.counters, self.damping_control, self.mc, self.ekfac
        )  # what a step changes, for StepUndo
        # step_rule="quadratic" (step_rule.py): alpha, mu from the exact quadratic model.
        self.step_rule: QuadraticStepRule | None = None
        if self.config.step_rule == "quadratic":
            self.step_rule = QuadraticStepRule(
                self.model, self.config, self.comm, self.damping_control, self.counters
            )
        self._set_capture()

    # -- public API ------------------------------------------------------------------------------
    @property
    def comm(self) -> Communicator:
        """Collectives across ranks (settable: a communicator set later is used from then on)."""
        return self.distributed.comm

    @comm.setter
    def comm(self, value: Communicator) -> None:
        self.distributed.comm = value

    @property
    def layers(self) -> dict[str, KFACBlock]:
        """Qualified module name -> block, for every preconditioned layer.

        The public name of the engine's block dictionary: ``pre.layers is pre.blocks`` (the same
        dict object; ``blocks`` is the engine's internal name for it). Layers dropped because
        their hooks never fired leave both at once."""
        return self.blocks

    @property
    def grad_scale(self) -> float:
        """What the loss was multiplied by before the current backward (AMP scale x 1/k)."""
        return self.capture.grad_scale

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"Invalid grad_scale={value!r}: must be a finite number > 0.")
        self.capture.grad_scale = value

    @property
    def damping(self) -> float:
        """The current global damping (``damping`` moved by the schedule or the LM rule)."""
        return self.damping_control.value

    @property
    def adaptation_pending(self) -> bool:
        """True after an adaptation step's ``step()`` until ``update_damping`` is called."""
        return self.damping_control.pending is not None

    def update_damping(self, loss_before: Loss, loss_after: Loss) -> float | None:
        """Levenberg-Marquardt damping update (``adaptive_damping=True``; M&G 2015, sec. 6.5).

        Call it after ``optimizer.step()`` on every step; it acts only after the adaptation steps
        (every ``adaptive_damping_interval``-th) and returns rho there, None elsewhere.
        ``loss_before`` is the loss at the old parameters, ``loss_after`` the loss at the new
        ones on the same batch: numbers, scalar tensors or closures (evaluated under no_grad,
        only on adaptation steps)::

            loss = loss_fn(model(x), y); loss.backward(); pre.step(opt); opt.step()
            pre.update_damping(loss, lambda: loss_fn(model(x), y))
        """
        return self.damping_control.adapt(loss_before, loss_after, model_device(self.model))

    def set_step(self, step: int) -> None:
        """Set the optimizer-step clock t (e.g. ``trainer.global_step``); switches capture."""
        self.steps = int(step)
        self._set_capture()

    def mc_backward(self, output: Tensor | None = None) -> None:
        """``fisher_type="mc"``: G from labels sampled from the model's predictive distribution.

        Call it after the forward and BEFORE ``loss.backward()`` (the graph must be alive)::

            out = model(x); pre.mc_backward(); loss_fn(out, y).backward(); pre.step(opt)

        On factor-update steps it samples ``y~ ~ p(y|f(x))`` (``likelihood``), back-propagates
        ``sum_n -log p(y~_n|f(x_n))`` to the captured layer outputs only (parameter ``.grad`` is
        untouched) and adds the per-example ``g g^T`` to G; on other steps it does nothing. ``f(x)``
        is the model's forward output (or ``output_module``'s), or ``output`` when given. With
        ``KFACCallback`` it is called automatically in ``on_before_backward``. See core/mc.py.
        """
        if self.mc is None:
            raise ValueError(
                f"Invalid fisher_type={self.config.fisher_type.value!r} for "
                "mc_backward(): it needs fisher_type='mc'."
            )
        self.mc.backward(output)

    def step(
        self, optimizer: torch.optim.Optimizer | None = None, closure: Any | None = None
    ) -> None:
        """Update factors / decompositions on their clocks, then precondition the gradients.

        ``step_rule="quadratic"`` (step_rule.py) needs ``closure`` (re-computes the batch loss):
        then this call also moves the preconditioned parameters by ``alpha Delta + mu delta_0``
        and sets their ``.grad`` to None; ``closure`` is ignored otherwise.

        Atomic: an exception (or KeyboardInterrupt) inside leaves the K-FAC state as it was
        before the call (core/transaction.py); with ``undoable=True`` the step can also be undone
        afterwards with ``abort_step`` until ``commit_step``.
        """
        if self.step_rule is not None:  # step_rule="quadratic": the rule's step around ours
            return self._quadratic_step(optimizer, closure)
        self._atomic_step(optimizer)

    def _quadratic_step(self, optimizer: torch.optim.Optimizer | None, closure: Any | None) -> None:
        """``step_rule="quadratic"`` (step_rule.py): the rule prepares, this engine preconditions,
        the rule chooses alpha and mu and moves the preconditioned parameters."""
        rule = self.step_rule
        assert rule is not None
        start = time.perf_counter()
        t = self.steps
        pending = rule.prepare(
            optimizer, closure, precondition_step.stepped_blocks(self.blocks.values(), optimizer)
        )
        self._atomic_step(optimizer)
        stats = rule.finish(pending, t, self.blocks.values())
        if stats is None:
            return
        self.last_stats.update(stats)
        self.last_stats["damping"] = self.damping_control.value
        self.last_stats["time_ms"] = 1e3 * (time.perf_counter() - start)  # the engine's and ours

    def _atomic_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The step itself; an exception inside restores the state (core/transaction.py)."""
        start = time.perf_counter()
        optimizer = optimizer if optimizer is not None else self.optimizer
        check_optimizer(optimizer)
        t = self.steps
        undo = StepUndo(self._parts, t, self._undecomposed)
        try:
            self._step(optimizer, t, undo)
        except BaseException:
            self._restore(undo, keep_captured=True)
            raise
        if self.undoable:
            kept = self._undo
            self._undo = kept.merge(undo) if kept is not None and kept.t == t else undo
        self.last_stats["time_ms"] = 1e3 * (time.perf_counter() - start)
        self.last_stats["layers"] = float(len(self.blocks))
        self.last_stats["damping"] = self.damping_control.value

    def commit_step(self) -> None:
        """The optimizer step of the last ``step()`` happened: forget its undo information."""
        self._undo = None

    def abort_step(self, step: int | None = None) -> bool:
        """Forget the step in progress: what was captured for it, its MC draws and, when
        ``step()`` already ran at clock ``step`` with ``undoable=True``, everything it changed.

        Call it when the optimizer step never ran (an exception between ``pre.step()`` and
        ``optimizer.step()``), so that repeating the step does not apply its factor update
        twice. Returns True when a ``step()`` was undone.
        """
        undo, self._undo = self._undo, None
        if undo is not None and step is not None and undo.t == int(step):
            self._restore(undo)
            return True
        discard_captured(self._parts)
        if self.mc is not None:
            self.mc.rewind(self.mc.step_start_rng())
        return False

    def _restore(self, undo: StepUndo, keep_captured: bool = False) -> None:
        """Put the engine back to where it was before ``undo``'s step (core/transaction.py)."""
        self._undecomposed = undo.restore(keep_captured)
        self.set_step(undo.t)

    def _step(self, optimizer: torch.optim.Optimizer | None, t: int, undo: StepUndo) -> None:
        self.damping_control.at_step(t)
        if self.mc is not None:
            self.mc.finish_step(any(b.kind.weight.grad is not None for b in self.blocks.values()))
        active = precondition_step.stepped_blocks(self.blocks.values(), optimizer)
        first = {b.name for b in active if b.A is None}  # rank-consistent (factors all-reduced)
        factors_due = [b for b in active if t % b.factor_update_steps == 0]
        undo.save_blocks(self.blocks.values(), factors_due)
        factors_start = time.perf_counter()
        self._update_factors(factors_due)
        decompose_start = time.perf_counter()
        # also decomposed at once: a block whose first factors came late (it was frozen)
        first_now = first if t >= self.config.warmup_steps else set()
        self._update_decompositions(
            [
                b
                for b in active
                if b.A is not None and (self._decomposition_due(b, t) or b.name in first_now)
            ]
        )
        if self.ekfac is not None:
            factor_step.update_ekfac_scaling(
                self.ekfac,
                self.blocks.values(),
                t,
                self.config.factor_decay,
                self.comm,
                self._nonfinite,
            )
        precondition_start = time.perf_counter()
        if t >= self.config.warmup_steps:
            if self.damping_control.due(t):
                self.damping_control.snapshot(self.blocks.values(), self.model, optimizer, t)
            self._precondition(optimizer)
        else:
            self.last_stats = dict(kl_clip.NO_CLIP)
        for block in active:
            block.clear_rows()
        late = self._first_interval.late(
            t, [b for b in active if b.name in self.blocks], self.config.warmup_steps
        )
        if late:
            warnings.warn(
                coverage.late_message(self.model, late, t),
                coverage.KFACCoverageWarning,
                stacklevel=2,
            )
        self.steps = t + 1
        self._set_capture()
        end = time.perf_counter()
        # Host time of each phase (on a GPU, of the kernel launches unless something syncs);
        # step() adds the total, the layer count and the damping.
        self.last_stats["time_factors_ms"] = 1e3 * (decompose_start - factors_start)
        self.last_stats["time_decompose_ms"] = 1e3 * (precondition_start - decompose_start)
        self.last_stats["time_precondition_ms"] = 1e3 * (end - precondition_start)

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Name -> ``(A, G)``: detached copies of the running factors of every updated layer."""
        # A diagonal side (nn.Embedding's A, a wide side) is returned as the matrix diag(F):
        # dense up to 4096 rows, a sparse COO matrix above (core/factors.py, DENSE_VIEW_LIMIT).
        return {name: b.factor_matrices() for name, b in self.blocks.items() if b.A is not None}

    def remove(self) -> None:
        """Take every hook off the model (the factors stay available)."""
        self.capture.remove()
        if self.mc is not None:
            self.mc.remove()

    def wrap(self, optimizer: torch.optim.Optimizer) -> KFACOptimizer:
        """An optimizer-like object whose ``step()`` preconditions, then steps ``optimizer``."""
        check_optimizer(optimizer)
        self.optimizer = optimizer
        return KFACOptimizer(self, optimizer)

    def summary(self) -> str:
        """Registration summary: covered modules, skipped modules and why, parameter share."""
        return format_summary(self.model, self.blocks, self.skipped)

    def coverage(self) -> dict[str, float]:
        """``{"covered", "trainable", "share"}``: trainable parameters of the preconditioned
        layers (frozen-for-now ones excluded), all trainable parameters, and their ratio."""
        return coverage.coverage(self.model, self.blocks)

    def memory_bytes(self) -> int:
        """Bytes held by running factors and decompositions."""
        return sum(b.memory_bytes() for b in self.blocks.values())

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-identical resume needs; tensors and Python primitives only."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "steps": self.steps,
            "counters": dict(self.counters),
            "config": self.config.to_dict(),
            "layers": {name: b.state_dict() for name, b in self.blocks.items()},
            "damping": self.damping_control.state_dict(),
            **({"mc": self.mc.state_dict()} if self.mc is not None else {}),
            **({"step_rule": self.step_rule.state_dict()} if self.step_rule is not None else {}),
        }
        self.distributed.complete_state(
            state["layers"]
        )  # distribute="gradients": collective gather
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; every saved layer must exist here (no silent partial load).

        Checked before anything changes (core/state_checks.py): the state's version, and every
        layer's factor and decomposition shapes (a ``ValueError`` names the layer). Tensors are
        cast to this run's dtypes. Decompositions saved under other options (``compute_method``,
        ``damping_mode``, an inverse's damping) are recomputed from the restored factors, with a
        warning naming the option, so the current options act from the first resumed step; with
        unchanged options the resume is bit-identical.
        """
        state_checks.check_version(state)
        layers = state.get("layers", {})
        missing = sorted(set(layers) - set(self.blocks))
        if missing:
            raise ValueError(
                f"K-FAC state has layers {missing} that this model does not precondition "
                f"(preconditioned here: {sorted(self.blocks)}). Was the checkpoint made with "
                "another model or other skip_layers?"
            )
        for name, block_state in layers.items():
            state_checks.check_layer(name, self.blocks[name], block_state)
        stale = state_checks.stale_decompositions(self.blocks, self.config, state)
        self.steps = int(state.get("steps", 0))
        if "damping" in state:
            self.damping_control.load_state_dict(state["damping"])
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        for name, block_state in layers.items():
            self.blocks[name].load_state_dict(
                state_checks.cast_layer(self.blocks[name], block_state)
            )
        self._undecomposed = {name for name, b in self.blocks.items() if not b.decomposition}
        if self.mc is not None and "mc" in state:
            self.mc.load_state_dict(state["mc"])
        if self.step_rule is not None and "step_rule" in state:
            self.step_rule.load_state_dict(state["step_rule"])
        self._undo = None
        discard_captured(self._parts)
        self._set_capture()
        if stale:
            self._recompute_stale(stale)

    def _recompute_stale(self, stale: dict[str, str]) -> None:
        """Decompose again, from the restored factors, the layers whose options changed."""
        warnings.warn(
            "K-FAC: options changed since the state was saved ("
            + "; ".join(f"{name}: {why}" for name, why in sorted(stale.items()))
            + "); these decompositions are recomputed from the restored factors.",
            UserWarning,
            stacklevel=3,
        )
        blocks = [self.blocks[name] for name in self.blocks if name in stale]
        for block in blocks:
            block.decomposition = None
            self._undecomposed.add(block.name)  # a success takes it out again
        self.damping_control.at_step(self.steps)
        self._update_decompositions([b for b in blocks if b.A is not None])
        self._track_refreshes()

    # -- internals -------------------------------------------------------------------------------
    def _set_capture(self) -> None:
        for block in self.blocks.values():
            block.capturing = self.steps % block.factor_update_steps == 0
        self._track_refreshes()

    def _track_refreshes(self) -> None:
        """EKFAC: tell the scaling which blocks refresh their eigenbasis at the current clock."""
        if self.ekfac is not None:
            self.ekfac.refresh_due = frozenset(
                b.name for b in self.blocks.values() if self._decomposition_due(b, self.steps)
            )

    def _nonfinite(self, counter: str, key: str, message: str) -> None:
        """Count a non-finite event; raise (``nonfinite="raise"``) or warn once per layer."""
        self.counters[counter] += 1
        if self.config.nonfinite == "raise":
            raise FloatingPointError(message)
        self._warn_once(key, message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _update_factors(self, due: list[KFACBlock]) -> None:
        """The factor step (core/factor_step.py); layers that never ran anywhere are dropped."""
        dropped = factor_step.update_factors(
            due,
            self.comm,
            self.config.factor_decay,
            str(self.config.factor_init),
            self.steps,
            self.counters,
            self._nonfinite,
        )
        if dropped:
            self._drop(dropped)

    def _drop(self, names: list[str]) -> None:
        """Forget layers whose hooks never fired in a training forward (e.g. MHA's out_proj)."""
        self.capture.remove(names)
        message = coverage.dropped_message(self.model, [self.blocks[n] for n in names])
        for name in names:
            block = self.blocks.pop(name)
            self._undecomposed.discard(name)
            self.skipped.append(factor_step.skipped_unseen(block))
        self.counters["dropped_layers"] += len(names)
        warnings.warn(message, coverage.KFACCoverageWarning, stacklevel=3)

    def _decompose(self, block: KFACBlock) -> Decomposition:
        """One layer's decomposition (core/decomposition_step.py)."""
        relative = self.config.damping_mode == "relative"
        return decomposition_step.decompose(block, self.damping_control, relative)

    def _effective_damping(self, block: KFACBlock) -> float:
        """The absolute damping the block's decomposition in use is applied with."""
        return decomposition_step.effective_damping(block, self.damping_control.multiplier)

    def _decomposition_due(self, block: KFACBlock, t: int) -> bool:
        """On the block's clock, and once at the end of warm-up (t == warmup_steps > 0), so the
        first preconditioned step uses the warmed-up factors, not those of step 0; and on the
        first factor-update step of a block with no decomposition in use yet (e.g. K-FAC added
        when resuming a run without K-FAC state), unless its last decomposition failed.
        ``stagger_refresh``: the block's own offset clock (core/stagger.py) instead of
        ``t % inv_update_steps``."""
        if t == self.config.warmup_steps > 0:
            return True
        if self.config.stagger_refresh:
            if self._offsets is None:
                self._offsets = stagger.refresh_offsets(
                    self.blocks.values(),
                    self.config.factor_update_steps,
                    self.config.inv_update_steps,
                )
            if stagger.due(self._offsets.get(block.name, 0), block.inv_update_steps, t):
                return True
        elif t % block.inv_update_steps == 0:
            return True
        return (
            block.name in self._undecomposed
            and block.failures == 0
            and t % block.factor_update_steps == 0
        )

    def _update_decompositions(self, due: list[KFACBlock]) -> None:
        """A decomposition refresh of ``due`` (core/decomposition_step.py)."""
        decomposition_step.update_decompositions(
            due,
            self.distributed,
            self.refresh,
            self._decompose,
            self.steps,
            self.counters,
            self._undecomposed,
            self.config.max_decomposition_failures,
            self._warn_once,
        )

    def _precondition_block(self, block: KFACBlock, grad: Tensor) -> Tensor:
        dec, method = block.decomposition, block.method
        assert dec is not None  # _precondition skips blocks without a decomposition
        rows = precondition_step.low_rank_rows(block, grad, self.counters)
        damping = 0.0 if method.damping_in_decomposition else self._effective_damping(block)
        return method.precondition(grad, dec, damping, block.a_structure, block.g_structure, rows)

    def _precondition(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Precondition, exchange (distribute="gradients"), KL-clip and write back the gradients."""
        lr_of = precondition_step.learning_rates(optimizer)
        work = precondition_step.gradient_work(
            self.blocks.values(), lr_of, self._precondition_block
        )
        work = self.distributed.exchange_gradients(work, lr_of)  # distribute="gradients": owners' P
        self.last_stats = kl_clip.clip_and_apply(
            work, self.config.kl_clip, self.steps, self._nonfinite
        )  # sets the gradients
