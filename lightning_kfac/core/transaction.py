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

from typing import Any, Dict, Optional, Tuple

from torch import Tensor

_UNCHANGED = object()
FAULT_COUNTERS = ("nonfinite_estimates", "nonfinite_gradients", "decomposition_failures",
                  "overflow_steps", "dropped_layers")


def _clone(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clone()


class StepUndo:
    """What ``step()`` at clock ``t`` may change, saved before the change.

    Args:
        pre: the ``KFACPreconditioner``.
        t: the step's clock value.
    """

    def __init__(self, pre: Any, t: int):
        self.t = t
        self.counters = dict(pre.counters)
        control = pre.damping_control
        self.damping = (control.value, control.last_rho, control.adaptations, control.pending)
        self.undecomposed = set(pre._undecomposed)
        self.mc_rng = pre.mc.step_start_rng() if pre.mc is not None else None
        self.blocks: Dict[str, Tuple[Any, Any, Any, int]] = {}  # A, G, decomposition, failures
        # What was captured for step t (the step consumes it): back in place after an exception
        # inside step(), so that step() can be retried on the same backward.
        self.captured = {name: (b.a_sum, b.a_div, b.g_sum, b.g_div, b.a_rows, b.g_rows,
                                b.kept_rows) for name, b in pre.blocks.items()}
        mc = pre.mc
        self.mc_kept = (mc._kept, mc._output, mc.calls, mc._rng_mark) if mc is not None else None
        self.ekfac_acc = dict(pre.ekfac._acc) if pre.ekfac is not None else None

    def save_blocks(self, blocks, factors_due) -> None:
        """Save each block's state before this step touches it (first save wins)."""
        due = {id(b) for b in factors_due}
        for block in blocks:
            if block.name in self.blocks:
                continue
            updated = id(block) in due
            dec = block.decomposition
            if dec is not None:  # EKFAC's scaling changes in place on factor-update steps
                dec = dec.snapshot() if self.t % block.factor_update_steps == 0 else dec.copy()
            self.blocks[block.name] = (_clone(block.A) if updated else _UNCHANGED,
                                       _clone(block.G) if updated else _UNCHANGED,
                                       dec, block.failures)

    def merge(self, later: "StepUndo") -> "StepUndo":
        """Another ``step()`` at the same t (manual optimization, one per optimizer)."""
        for name, saved in later.blocks.items():
            self.blocks.setdefault(name, saved)
        return self

    def restore(self, pre: Any, keep_captured: bool = False) -> None:
        """Put the engine back to where it was before step t.

        ``keep_captured``: put back what was captured for step t (an exception inside
        ``step()``: retrying it uses the same backward); otherwise forget it and rewind the MC
        generator to the step's first draw (the step's batch will be run again).

        Fault counters (non-finite estimates, failed decompositions, dropped layers...) keep
        counting what happened; progress counters (factor updates, decompositions) roll back.
        """
        faults = {k: v for k, v in pre.counters.items() if k in FAULT_COUNTERS}
        pre.counters.clear()
        pre.counters.update(self.counters)
        pre.counters.update(faults)
        control = pre.damping_control
        control.value, control.last_rho, control.adaptations, control.pending = self.damping
        pre._undecomposed = set(self.undecomposed) & set(pre.blocks)
        for name, (A, G, dec, failures) in self.blocks.items():
            block = pre.blocks.get(name)
            if block is None:
                continue
            if A is not _UNCHANGED:
                block.A, block.G = A, G
            block.decomposition = dec
            block.failures = failures
        discard_captured(pre)
        if keep_captured:
            self._put_back_captured(pre)
        elif pre.mc is not None:
            pre.mc.rewind(self.mc_rng)
        pre.set_step(self.t)

    def _put_back_captured(self, pre: Any) -> None:
        for name, saved in self.captured.items():
            block = pre.blocks.get(name)
            if block is not None:
                (block.a_sum, block.a_div, block.g_sum, block.g_div, block.a_rows, block.g_rows,
                 block.kept_rows) = saved
        if self.mc_kept is not None:
            mc = pre.mc
            mc._kept, mc._output, mc.calls, mc._rng_mark = self.mc_kept
        if self.ekfac_acc is not None:
            pre.ekfac._acc.update(self.ekfac_acc)


def discard_captured(pre: Any) -> None:
    """Drop everything captured for the step in progress (statistics, rows, MC outputs)."""
    for block in pre.blocks.values():
        block.reset_accumulators()
        block.clear_rows()
    if pre.mc is not None:
        pre.mc.discard()
        pre.mc.calls = 0
    if pre.ekfac is not None:
        pre.ekfac.discard()
