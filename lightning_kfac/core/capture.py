"""Hooks that capture layer inputs ``a`` and output gradients ``g`` in training passes only.

One forward hook per module (it sees both the input and the output): it adds ``sum a a^T`` to
the block's accumulator and registers a tensor hook on the output, which adds ``sum g g^T`` when
backward reaches it. Tensor hooks on outputs, not module full-backward hooks: those break with
in-place activations (``ReLU(inplace=True)``) after the layer.

Per-example scale (docs/conventions.md): with a mean-reduced loss over N examples autograd delivers
``(1/N) dl_n/ds_n``, so ``g_n = N * grad / grad_scale``, where ``grad_scale`` is whatever the
loss was multiplied by before backward (AMP loss scale times 1/accumulation steps).

A block whose weight several modules hold (tied weights, core/sharing.py) has one hook per
holder; a holder whose ``W~`` is the transpose of the block's feeds its input rows to G and its
gradient rows to A (``Route``).

Nothing but the running sums is kept: captured tensors are released when the hook returns.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.layers import LayerKind
from lightning_kfac.core.sharing import uses_of
from lightning_kfac.core.trainability import is_trainable


def _is_transformed(x: Tensor) -> bool:
    """True for tensors wrapped by a torch.func transform (vmap, grad, jvp)."""
    functorch = getattr(torch._C, "_functorch", None)
    check = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


class Route:
    """Where one forward's rows go: the block, the holder's kind, whether the holder's ``W~`` is
    the block's transpose, and what its ``grad_rows`` needs from the forward (``grad_context``)."""

    __slots__ = ("block", "kind", "flipped", "context")

    def __init__(self, block: KFACBlock, kind: Optional[LayerKind] = None, flipped: bool = False,
                 context: Any = None):
        self.block = block
        self.kind = block.kind if kind is None else kind
        self.flipped = flipped
        self.context = context

    @property
    def name(self) -> str:
        return self.block.name

    def grad_rows(self, grad: Tensor):
        if self.context is None:
            return self.kind.grad_rows(grad)
        return self.kind.grad_rows(grad, self.context)

    def add_input(self, rows: Tensor, divisor: int) -> None:
        if self.flipped:
            self.block.add_g(rows, divisor, 1.0)
        else:
            self.block.add_a(rows, divisor)

    def add_grad(self, rows: Tensor, divisor: int, scale: float) -> None:
        if self.flipped:
            self.block.add_a(rows, divisor, scale)
        else:
            self.block.add_g(rows, divisor, scale)


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
        self._handles: Dict[str, List[RemovableHandle]] = {}

    def install(self) -> None:
        for name, block in self.blocks.items():
            if name not in self._handles:
                self._handles[name] = [
                    use.module.register_forward_hook(
                        self._make_forward_hook(block, use.kind, use.flipped), with_kwargs=True)
                    for use in uses_of(block.kind)]

    def remove(self, names: List[str] | None = None) -> None:
        for name in list(self._handles) if names is None else names:
            for handle in self._handles.pop(name, ()):
                handle.remove()

    @property
    def num_hooks(self) -> int:
        return sum(len(handles) for handles in self._handles.values())

    def _make_forward_hook(self, block: KFACBlock, kind: Optional[LayerKind] = None,
                           flipped: bool = False):
        kind = block.kind if kind is None else kind

        def hook(module, args, kwargs, output):
            capturing, keep_rows = block.capturing, block.row_limit > 0
            if not ((capturing or keep_rows) and module.training and torch.is_grad_enabled()):
                return None
            if not is_trainable(block):
                return None  # frozen for now (core/trainability.py)
            if not isinstance(output, Tensor):
                return None
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if not isinstance(x, Tensor) or _is_transformed(x):
                return None  # a torch.func (vmap/grad) pass, not a training forward
            x = x.detach()
            rows, divisor = kind.input_rows(x)
            route = Route(block, kind, flipped, kind.grad_context(x))
            if capturing:
                block.seen = True
                if divisor > 0:  # e.g. an all-padding embedding batch adds nothing
                    route.add_input(rows, divisor)
            pair = rows if (capturing and self.pair_sink is not None
                            and block.method.needs_pairs) else None
            if keep_rows:
                keep_rows = self._keep_a_rows(block, rows)
            if not output.requires_grad:
                return None
            empirical = capturing and self.output_sink is None
            if capturing and self.output_sink is not None:
                self.output_sink(route, output, pair)
            if empirical or keep_rows:
                output.register_hook(self._make_grad_hook(route, empirical, keep_rows, pair))
            return None
        # Under torch.compile the hook runs eagerly (a graph break), on the real tensors: the
        # accumulators and the output's tensor hook are Python side effects (docs/compile.md).
        return torch.compiler.disable(hook)

    @staticmethod
    def _keep_a_rows(block: KFACBlock, rows: Tensor) -> bool:
        """Keep a micro-batch's input rows for the low-rank path while they stay few enough."""
        block.kept_rows += rows.shape[0]
        if block.kept_rows > block.row_limit:
            block.a_rows, block.g_rows = [], []  # too many rows this step: full path
            return False
        block.a_rows.append(rows)
        return True

    def _make_grad_hook(self, route: Route, empirical: bool, keep_rows: bool,
                        pair: Tensor | None = None):
        block = route.block

        def hook(grad: Tensor) -> None:
            if empirical:
                self.add_output_grad(route, grad, a_rows=pair)
            if keep_rows and not self.sampling and block.kept_rows <= block.row_limit:
                block.g_rows.append(grad.detach().reshape(-1, grad.shape[-1]))
        return hook

    def add_output_grad(self, target: KFACBlock | Route, grad: Tensor, per_example: bool = False,
                        a_rows: Tensor | None = None, loss_terms: int | None = None) -> None:
        """Add ``sum g g^T`` for a gradient w.r.t. the block's output.

        ``per_example=True`` means ``grad`` is the gradient of a *summed* loss (e.g. the sampled
        loss of ``fisher_type="mc"``): no AMP / accumulation scale to undo. ``loss_terms``: the
        loss it stands for is the mean over that many terms, so ``g`` is scaled by
        ``examples / loss_terms``, as the user's gradient of a mean loss is (N x its 1/N).
        ``target``: the block, or the ``Route`` of the forward that produced the output.
        ``a_rows``: the same forward's input rows, handed on to ``pair_sink`` (EKFAC).
        """
        route = target if isinstance(target, Route) else Route(target)
        block = route.block
        rows, divisor, examples = route.grad_rows(grad.detach())
        if per_example:
            scale = 1.0 if loss_terms is None or loss_terms == examples else examples / loss_terms
        else:
            scale = (examples if self.mean_reduction else 1.0) / self.grad_scale
        if divisor > 0:
            route.add_grad(rows, divisor, scale)
        if a_rows is not None and self.pair_sink is not None:
            self.pair_sink(block, a_rows, rows, scale, examples)
