"""Hooks that capture layer inputs ``a`` and output gradients ``g`` in training passes only.

One forward hook per module (it sees both the input and the output): it adds ``sum a a^T`` to
the block's accumulator and registers a tensor hook on the output, which adds ``sum g g^T`` when
backward reaches it. Tensor hooks on outputs, not module full-backward hooks: those break with
in-place activations (``ReLU(inplace=True)``) after the layer.

Per-example scale (CONTRACT.md): with a mean-reduced loss over N examples autograd delivers
``(1/N) dl_n/ds_n``, so ``g_n = N * grad / grad_scale``, where ``grad_scale`` is whatever the
loss was multiplied by before backward (AMP loss scale times 1/accumulation steps).

Nothing but the running sums is kept: captured tensors are released when the hook returns.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_kfac.core.blocks import KFACBlock


def _is_transformed(x: Tensor) -> bool:
    """True for tensors wrapped by a torch.func transform (vmap, grad, jvp)."""
    functorch = getattr(torch._C, "_functorch", None)
    check = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


class Capture:
    """Installs and removes the capture hooks of a set of blocks.

    Attributes:
        grad_scale: multiplier applied to the loss before the current backward (default 1).
        mean_reduction: True when the loss is a mean over examples (scale g by N).
        output_sink: when set (``fisher_type="mc"``), the forward hook hands each captured output
            to it instead of registering the empirical tensor hook.
        pair_sink: when set (``compute_method="ekfac"``, core/ekfac.py), a forward's input rows
            of an ekfac block are kept and handed with its output-gradient rows to
            ``pair_sink(block, a_rows, g_rows, scale, examples)``.
        sampling: True while the MC Fisher back-propagates its sampled loss; tensor hooks that
            fire then (e.g. the low-rank rows) must not take those gradients for the user's.
    """

    def __init__(self, blocks: Dict[str, KFACBlock], *, mean_reduction: bool = True):
        self.blocks = blocks
        self.mean_reduction = mean_reduction
        self.grad_scale = 1.0
        self.output_sink: Callable[..., None] | None = None
        self.pair_sink: Callable[..., None] | None = None
        self.sampling = False  # True during the MC Fisher's extra backward (core/mc.py)
        self._handles: Dict[str, RemovableHandle] = {}

    def install(self) -> None:
        for name, block in self.blocks.items():
            if name not in self._handles:
                self._handles[name] = block.kind.module.register_forward_hook(
                    self._make_forward_hook(block), with_kwargs=True)

    def remove(self, names: List[str] | None = None) -> None:
        for name in list(self._handles) if names is None else names:
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def _make_forward_hook(self, block: KFACBlock):
        def hook(module, args, kwargs, output):
            capturing, keep_rows = block.capturing, block.row_limit > 0
            if not ((capturing or keep_rows) and module.training and torch.is_grad_enabled()):
                return None
            if not isinstance(output, Tensor):
                return None
            x = args[0] if args else kwargs.get("input")
            if _is_transformed(x):
                return None  # a torch.func (vmap/grad) pass, not a training forward
            rows, divisor = block.kind.input_rows(x.detach())
            if capturing:
                block.seen = True
                block.add_a(rows, divisor)
            pair = rows if (capturing and self.pair_sink is not None
                            and block.compute_method == "ekfac") else None
            if keep_rows:
                keep_rows = self._keep_a_rows(block, rows)
            if not output.requires_grad:
                return None
            empirical = capturing and self.output_sink is None
            if capturing and self.output_sink is not None:
                self.output_sink(block, output, pair)
            if empirical or keep_rows:
                output.register_hook(self._make_grad_hook(block, empirical, keep_rows, pair))
            return None
        return hook

    @staticmethod
    def _keep_a_rows(block: KFACBlock, rows: Tensor) -> bool:
        """Keep a micro-batch's input rows for the low-rank path while they stay few enough."""
        block.kept_rows += rows.shape[0]
        if block.kept_rows > block.row_limit:
            block.a_rows, block.g_rows = [], []  # too many rows this step: full path
            return False
        block.a_rows.append(rows)
        return True

    def _make_grad_hook(self, block: KFACBlock, empirical: bool, keep_rows: bool,
                        pair: Tensor | None = None):
        def hook(grad: Tensor) -> None:
            if empirical:
                self.add_output_grad(block, grad, a_rows=pair)
            if keep_rows and not self.sampling and block.kept_rows <= block.row_limit:
                block.g_rows.append(grad.detach().reshape(-1, grad.shape[-1]))
        return hook

    def add_output_grad(self, block: KFACBlock, grad: Tensor, per_example: bool = False,
                        a_rows: Tensor | None = None, loss_terms: int | None = None) -> None:
        """Add ``sum g g^T`` for a gradient w.r.t. the block's output.

        ``per_example=True`` means ``grad`` is the gradient of a *summed* loss (e.g. the sampled
        loss of ``fisher_type="mc"``): no AMP / accumulation scale to undo. ``loss_terms``: the
        loss it stands for is the mean over that many terms, so ``g`` is scaled by
        ``examples / loss_terms``, as the user's gradient of a mean loss is (N x its 1/N).
        ``a_rows``: the same forward's input rows, handed on to ``pair_sink`` (EKFAC).
        """
        rows, divisor, examples = block.kind.grad_rows(grad.detach())
        if per_example:
            scale = 1.0 if loss_terms is None or loss_terms == examples else examples / loss_terms
        else:
            scale = (examples if self.mean_reduction else 1.0) / self.grad_scale
        block.add_g(rows, divisor, scale)
        if a_rows is not None and self.pair_sink is not None:
            self.pair_sink(block, a_rows, rows, scale, examples)
