"""Seed-notes diagnostics during training: ``KFACConfig(diagnostics_every_n_steps=N)``.

Every N optimizer steps (steps t with ``t % N == 0`` on the K-FAC clock, step 0 included) the
callback logs, for every preconditioned layer, the Kronecker approximation error of that step's
batch and the norm of the mean output gradient (``lightning_kfac.diagnostics``; Martens & Grosse
2015, sec. 3):

    kfac_diag/<layer>/kronecker_error       ||M - A (x) G||_F / ||M||_F of the batch,
                                            M = E_n[(a_n a_n^T) (x) (g_n g_n^T)]
    kfac_diag/<layer>/kronecker_error_population   its unbiased population estimate (Linear, B >= 4)
    kfac_diag/<layer>/kronecker_error_std   standard error (only when the probe method was used)
    kfac_diag/<layer>/mean_grad_norm        ||E[g]|| (zero in expectation under the true Fisher)
    kfac_diag/<layer>/mean_grad_ratio       ||E[g]|| / sqrt(E||g||^2), in [0, 1]

through ``logger.log_metrics(..., step=t)`` of every Trainer logger, on global rank zero only (the
loggers write on rank zero anyway); without a logger nothing is installed. ``g`` is the gradient
of the user's own loss (the empirical Fisher's ``g``, also with ``fisher_type="mc"``), with the
engine's per-example scale (``N x`` autograd's gradient for a mean loss, divided by the AMP loss
scale and Lightning's 1/k accumulation factor). The error method is ``diagnostics``' "auto"
(exact dense / Gram where cheap, else 64 Gaussian probes from a fixed-seed generator of its own).

How the rows are obtained: *captured from the real training step*, not from a re-evaluation.
On a diagnostic step only, ``start`` installs a forward hook on each preconditioned module that
keeps its input rows ``a`` and registers a tensor hook on its output that keeps the output
gradient rows ``g`` of the user's backward (ignored while the MC Fisher back-propagates its
sampled loss); after the optimizer step, ``end`` (from ``on_train_batch_end``) removes the hooks,
computes the statistics and logs them. Why not re-run ``training_step`` as adaptive damping does:

- no extra forward/backward, and no side effects on user state that ``training_step`` mutates
  (torchmetrics states, counters), which a re-run would update twice;
- it measures exactly the rows that formed the preconditioned gradient: the parameters before
  the update, the same dropout masks, every micro-batch of ``accumulate_grad_batches``, and it
  works under manual optimization (a re-run would step the optimizers again);
- the hooks only read: parameters, gradients, factors and every RNG stream are untouched, so a
  run with diagnostics is bit-identical to one without (tested).

Off (None) costs one ``is None`` test per hook; on, the non-diagnostic steps cost one modulo.
A diagnostic step keeps that batch's rows in float64 until the step ends (for conv layers the
unfolded patches: ``B T x C k^2`` values per layer). ``nn.Embedding`` blocks (diagonal ``A``) are
not diagnosed. A layer whose rows are not finite (an AMP overflow step) is left out of that log.

Example:
    >>> trainer = Trainer(logger=CSVLogger("logs"),
    ...                   callbacks=[KFACCallback(diagnostics_every_n_steps=50)])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.core.capture import _is_transformed
from lightning_kfac.diagnostics import LayerRows, layer_statistics

__all__ = ["LOGGED_STATS", "DiagnosticsRecorder"]

#: The statistics of :func:`layer_statistics` that are logged (when present).
LOGGED_STATS = (
    "kronecker_error",
    "kronecker_error_population",
    "kronecker_error_std",
    "mean_grad_norm",
    "mean_grad_ratio",
)
PREFIX = "kfac_diag"


def _metrics(result: dict[str, dict[str, float]]) -> dict[str, float]:
    metrics = {}
    for layer, stats in result.items():
        for key in LOGGED_STATS:
            if key in stats and not (key == "kronecker_error_std" and not stats["probes"]):
                metrics[f"{PREFIX}/{layer}/{key}"] = float(stats[key])
    return metrics


class DiagnosticsRecorder:
    """Captures one diagnostic step's rows from the training passes and logs their statistics.

    Args:
        pre: the callback's ``KFACPreconditioner`` (its layers, ``grad_scale`` and MC flag).
        every_n_steps: N; a step t is diagnosed when ``t % N == 0``.
        loss_reduction: "mean" (``g_n = N x`` autograd's gradient) or "sum".

    Attributes:
        last: ``(t, layer -> statistics)`` of the latest diagnosed step, or None.
    """

    def __init__(self, pre: Any, every_n_steps: int, loss_reduction: str = "mean"):
        self.pre = pre
        self.every = int(every_n_steps)
        self.mean = str(loss_reduction) == "mean"
        self.blocks = {
            name: block
            for name, block in pre.layers.items()  # one plain 2-D W~ each
            if not block.kind.diagonal_a and block.kind.groups == 1 and block.kind.name != "Shared"
        }
        self.last: tuple[int, dict[str, dict[str, float]]] | None = None
        self._step: int | None = None
        self._handles: list[Any] = []
        self._a: dict[str, list[Tensor]] = {}
        self._g: dict[str, dict[int, tuple[Tensor, float, int]]] = {}

    @classmethod
    def for_fit(cls, config: Any, pre: Any, trainer: Any) -> DiagnosticsRecorder | None:
        """A recorder when diagnostics are on and this rank has a logger to write to; else None."""
        every = config.diagnostics_every_n_steps
        if every is None or not trainer.loggers or not trainer.is_global_zero:
            return None
        return cls(pre, every, getattr(config.loss_reduction, "value", config.loss_reduction))

    # -- the step --------------------------------------------------------------------------------
    def start(self, t: int) -> None:
        """At a training batch's start (clock t): arm the hooks when t is a diagnostic step."""
        if self._step == t:
            return  # the same optimizer step continues (gradient accumulation, manual batches)
        self.remove()
        if t % self.every:
            return
        self._step = t
        for name, block in self.blocks.items():
            self._a[name], self._g[name] = [], {}
            self._handles.append(
                block.kind.module.register_forward_hook(
                    self._forward_hook(name, block), with_kwargs=True
                )
            )

    def end(self, trainer: Any) -> dict[str, dict[str, float]] | None:
        """At a training batch's end: once the armed step has stepped, compute and log."""
        t = self._step
        if t is None or self.pre.steps <= t:
            return None  # not armed, or the step's micro-batches are not complete yet
        rows = self._rows()
        self.remove()
        result = layer_statistics(rows)
        self.last = (t, result)
        metrics = _metrics(result)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=t)
        return result

    def remove(self) -> None:
        """Remove the hooks and drop the captured rows."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._a, self._g, self._step = [], {}, {}, None

    # -- hooks -----------------------------------------------------------------------------------
    def _forward_hook(self, name: str, block: Any) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if not (module.training and torch.is_grad_enabled()) or not isinstance(output, Tensor):
                return
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor) or _is_transformed(x):
                return
            rows, _ = block.kind.input_rows(x.detach())
            slot = len(self._a[name])
            self._a[name].append(rows.to(torch.float64))
            if output.requires_grad:
                output.register_hook(  # type: ignore[no-untyped-call]  # torch leaves it untyped
                    self._grad_hook(name, block, slot, self._step)
                )
            return

        return hook

    def _grad_hook(
        self, name: str, block: Any, slot: int, step: int | None
    ) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self.pre.capture.sampling or self._step != step:
                return  # the MC Fisher's sampled backward, or a finished step's graph
            g_rows, _, examples = block.kind.grad_rows(grad.detach())
            scale = (examples if self.mean else 1.0) / self.pre.grad_scale
            self._g[name][slot] = (g_rows.to(torch.float64), scale, examples)  # last one wins
            return

        return hook

    def _rows(self) -> dict[str, LayerRows]:
        """Each layer's rows over the forwards whose gradient arrived (finite layers only)."""
        out = {}
        for name in self.blocks:
            got = self._g.get(name) or {}
            slots = sorted(got)
            if not slots:
                continue
            a = torch.cat([self._a[name][s] for s in slots])
            g = torch.cat([got[s][0] * got[s][1] for s in slots])
            examples = sum(got[s][2] for s in slots)
            if a.shape[0] != g.shape[0] or a.shape[0] % examples:
                continue  # calls with different row counts per example: not one block
            if not (torch.isfinite(a).all() and torch.isfinite(g).all()):
                continue
            out[name] = LayerRows(a=a, g=g, num_examples=examples)
        return out
