"""One optimizer step of K-FAC as a transaction: saved before it changes anything, undoable.

A K-FAC step at optimizer step t changes the running factors (on factor-update steps), the
decompositions in use (on their clock; the EKFAC scaling in place), the counters, the clock, the
damping state and, with ``fisher_type="mc"``, the sampling generator. When the step is
interrupted (an exception or Ctrl+C inside a long eigendecomposition, or anything between
``pre.step()`` and ``optimizer.step()``), training repeats step t on the next run; applying its
factor update twice would make the run differ from an uninterrupted one. So the engine saves what
step t will change before changing it (``StepUndo``) and restores it when the step does not
complete:

- an exception inside ``step()`` always restores (``step()`` is atomic);
- with ``pre.undoable = True`` (the Lightning callback; ``KFACOptimizer.step``) the saved state
  is kept after ``step()`` until ``commit_step()``, and ``abort_step(t)`` undoes step t when its
  optimizer step never ran.

Cost: a copy of the factors updated at step t (on factor-update steps only) and references to the
decompositions it replaces; nothing is kept between steps unless ``undoable`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.damping import DampingControl
from lightning_kfac.core.methods import Decomposition

if TYPE_CHECKING:
    from lightning_kfac.core.ekfac import EKFACScaling
    from lightning_kfac.core.mc import MCFisher

_UNCHANGED = object()
FAULT_COUNTERS = (
    "nonfinite_estimates",
    "nonfinite_gradients",
    "decomposition_failures",
    "overflow_steps",
    "dropped_layers",
)
_Saved = Tensor | None | object  # a factor, or _UNCHANGED


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


@dataclass(frozen=True)
class StepParts:
    """The engine's state one step changes, by reference (the engine's own objects).

    Attributes:
        blocks: qualified name -> block (the engine's dict: dropped layers leave it).
        counters: the engine's counters (restored in place).
        damping: the damping control (value, last rho, adaptations, pending snapshot).
        mc: the MC Fisher (``fisher_type="mc"``), else None.
        ekfac: the EKFAC scaling (``compute_method="ekfac"``), else None.
    """

    blocks: dict[str, KFACBlock]
    counters: dict[str, int]
    damping: DampingControl
    mc: MCFisher | None = None
    ekfac: EKFACScaling | None = None


class StepUndo:
    """What ``step()`` at clock ``t`` may change, saved before the change.

    Args:
        parts: the engine's state (``StepParts``).
        t: the step's clock value.
        undecomposed: names of the blocks with no decomposition yet.
    """

    def __init__(self, parts: StepParts, t: int, undecomposed: Iterable[str]):
        self.parts = parts
        self.t = t
        self.counters = dict(parts.counters)
        control = parts.damping
        self.damping = (control.value, control.last_rho, control.adaptations, control.pending)
        self.undecomposed = set(undecomposed)
        mc = parts.mc
        self.mc_rng = mc.step_start_rng() if mc is not None else None
        self.blocks: dict[str, tuple[_Saved, _Saved, Decomposition | None, int]] = {}
        # What was captured for step t (the step consumes it): back in place after an exception
        # inside step(), so that step() can be retried on the same backward.
        self.captured = {
            name: (b.a_sum, b.a_div, b.g_sum, b.g_div, b.a_rows, b.g_rows, b.kept_rows)
            for name, b in parts.blocks.items()
        }
        self.mc_kept = mc.captured() if mc is not None else None
        ekfac = parts.ekfac
        self.ekfac_acc = dict(ekfac._acc) if ekfac is not None else None

    def save_blocks(self, blocks: Iterable[KFACBlock], factors_due: list[KFACBlock]) -> None:
        """Save each block's state before this step touches it (first save wins)."""
        due = {id(b) for b in factors_due}
        for block in blocks:
            if block.name in self.blocks:
                continue
            updated = id(block) in due
            dec = block.decomposition
            if dec is not None:  # EKFAC's scaling changes in place on factor-update steps
                dec = dec.snapshot() if self.t % block.factor_update_steps == 0 else dec.copy()
            self.blocks[block.name] = (
                _clone(block.A) if updated else _UNCHANGED,
                _clone(block.G) if updated else _UNCHANGED,
                dec,
                block.failures,
            )

    def merge(self, later: StepUndo) -> StepUndo:
        """Another ``step()`` at the same t (manual optimization, one per optimizer)."""
        for name, saved in later.blocks.items():
            self.blocks.setdefault(name, saved)
        return self

    def restore(self, keep_captured: bool = False) -> set[str]:
        """Put the state back to where it was before step t; returns the names of the blocks
        with no decomposition then (the engine's set; it also sets its clock back to ``t``).

        ``keep_captured``: put back what was captured for step t (an exception inside
        ``step()``: retrying it uses the same backward); otherwise forget it and rewind the MC
        generator to the step's first draw (the step's batch will be run again).

        Fault counters (non-finite estimates, failed decompositions, dropped layers...) keep
        counting what happened; progress counters (factor updates, decompositions) roll back.
        """
        parts = self.parts
        faults = {k: v for k, v in parts.counters.items() if k in FAULT_COUNTERS}
        parts.counters.clear()
        parts.counters.update(self.counters)
        parts.counters.update(faults)
        control = parts.damping
        control.value, control.last_rho, control.adaptations, control.pending = self.damping
        undecomposed = set(self.undecomposed) & set(parts.blocks)
        for name, (A, G, dec, failures) in self.blocks.items():
            block = parts.blocks.get(name)
            if block is None:
                continue
            if A is not _UNCHANGED:
                block.A, block.G = A, G  # type: ignore[assignment]
            block.decomposition = dec
            block.failures = failures
        discard_captured(parts)
        if keep_captured:
            self._put_back_captured()
        elif parts.mc is not None:
            parts.mc.rewind(self.mc_rng)
        return undecomposed

    def _put_back_captured(self) -> None:
        parts = self.parts
        for name, saved in self.captured.items():
            block = parts.blocks.get(name)
            if block is not None:
                (
                    block.a_sum,
                    block.a_div,
                    block.g_sum,
                    block.g_div,
                    block.a_rows,
                    block.g_rows,
                    block.kept_rows,
                ) = saved
        if self.mc_kept is not None and parts.mc is not None:
            parts.mc.put_back(self.mc_kept)
        if self.ekfac_acc is not None and parts.ekfac is not None:
            parts.ekfac._acc.update(self.ekfac_acc)


def discard_captured(parts: StepParts) -> None:
    """Drop everything captured for the step in progress (statistics, rows, MC outputs)."""
    for block in parts.blocks.values():
        block.reset_accumulators()
        block.clear_rows()
    if parts.mc is not None:
        parts.mc.discard()
        parts.mc.calls = 0
    if parts.ekfac is not None:
        parts.ekfac.discard()
