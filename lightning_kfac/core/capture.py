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

The hook mechanics live here once (``install_tap``): which forwards count, the layer input,
its rows, the tensor hook on the output; and the per-example scale of a gradient row
(``output_grad_scale``). Each user plugs in a ``LayerTap`` saying what it does with the rows:
the engine's ``Capture`` (running sums, low-rank rows, the MC Fisher's kept outputs, EKFAC's
row pairs) and ``diagnostics.record_rows`` (raw rows for the Kronecker-error figures).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.layers import LayerKind
from lightning_kfac.core.sharing import uses_of
from lightning_kfac.core.trainability import is_trainable

GradHook = Callable[[Tensor], None]
#: ``output_sink(route, output, a_rows)``: the MC Fisher keeps a layer output (core/mc.py).
OutputSink = Callable[["Route", Tensor, Tensor | None], None]
#: ``pair_sink(block, a_rows, g_rows, scale, examples)``: EKFAC's matched rows (core/ekfac.py).
PairSink = Callable[[KFACBlock, Tensor, Tensor, float, int], None]


def is_transformed(x: Tensor) -> bool:
    """True for tensors wrapped by a torch.func transform (vmap, grad, jvp)."""
    functorch = getattr(torch._C, "_functorch", None)
    check = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


_is_transformed = is_transformed  # the older private name, still imported elsewhere


def training_forward(module: nn.Module) -> bool:
    """A forward that K-FAC captures: the module in training mode, autograd recording."""
    return module.training and torch.is_grad_enabled()


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The layer's input from a forward hook's arguments (first positional, else ``input=``,
    else the first keyword)."""
    return args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))


def output_grad_scale(
    examples: int,
    *,
    mean_reduction: bool,
    grad_scale: float = 1.0,
    per_example: bool = False,
    loss_terms: int | None = None,
) -> float:
    """The factor turning autograd's gradient rows of one layer output into ``g_n``.

    A mean-reduced loss over N examples gives each row ``(1/N) dl_n/ds_n``, and the loss was
    multiplied by ``grad_scale`` (AMP scale x 1/accumulation steps) before backward: so
    ``g_n = N * grad / grad_scale`` (``grad / grad_scale`` for a summed loss). ``per_example``:
    the gradient of a *summed* loss that stands for the user's (the MC Fisher's sampled loss):
    no scale to undo, but ``examples / loss_terms`` when the user's loss is the mean over
    ``loss_terms`` terms (as the user's gradient of a mean loss is N times its 1/N).
    """
    if per_example:
        return 1.0 if loss_terms is None or loss_terms == examples else examples / loss_terms
    return (examples if mean_reduction else 1.0) / grad_scale


class LayerTap(Protocol):
    """What one user of the capture hooks does with the forwards of one module."""

    def wants(self, module: nn.Module) -> bool:
        """Whether this forward counts (checked first, before anything is computed)."""

    def on_forward(self, x: Tensor, rows: Tensor, divisor: int, output: Tensor) -> GradHook | None:
        """The detached input ``x``, its rows (``kind.input_rows``) and the output; returns the
        hook the output's gradient is handed to (registered when the output requires grad)."""


def install_tap(module: nn.Module, kind: LayerKind, tap: LayerTap) -> RemovableHandle:
    """Register the one forward hook every capture user shares on ``module``.

    It skips forwards the tap does not want, non-tensor outputs and torch.func passes (vmap,
    grad: not training forwards); otherwise it computes the input rows once, hands them to the
    tap and registers the returned gradient hook on the output. Tensor hooks on outputs, not
    module full-backward hooks: those break with in-place activations after the layer.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not tap.wants(module) or not isinstance(output, Tensor):
            return None
        x = layer_input(args, kwargs)
        if not isinstance(x, Tensor) or is_transformed(x):
            return None  # a torch.func (vmap/grad) pass, not a training forward
        x = x.detach()
        rows, divisor = kind.input_rows(x)
        grad_hook = tap.on_forward(x, rows, divisor, output)
        if grad_hook is not None and output.requires_grad:
            output.register_hook(grad_hook)  # type: ignore[no-untyped-call]
        return None

    # Under torch.compile the hook runs eagerly (a graph break), on the real tensors: the
    # accumulators and the output's tensor hook are Python side effects (docs/compile.md).
    disabled = torch.compiler.disable(hook)  # type: ignore[no-untyped-call]
    return module.register_forward_hook(disabled, with_kwargs=True)


class Route:
    """Where one forward's rows go: the block, the holder's kind, whether the holder's ``W~`` is
    the block's transpose, and what its ``grad_rows`` needs from the forward (``grad_context``)."""

    __slots__ = ("block", "context", "flipped", "kind")

    def __init__(
        self,
        block: KFACBlock,
        kind: LayerKind | None = None,
        flipped: bool = False,
        context: Any = None,
    ):
        self.block = block
        self.kind = block.kind if kind is None else kind
        self.flipped = flipped
        self.context = context

    @property
    def name(self) -> str:
        return self.block.name

    def grad_rows(self, grad: Tensor) -> tuple[Tensor, int, int]:
        if self.context is None:
            return self.kind.grad_rows(grad)
        return self.kind.grad_rows(grad, self.context)  # type: ignore[call-arg]

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


class _BlockTap:
    """The engine's tap for one holder of one block: running sums, low-rank rows, MC / EKFAC."""

    __slots__ = ("block", "capture", "flipped", "kind")

    def __init__(self, capture: Capture, block: KFACBlock, kind: LayerKind, flipped: bool):
        self.capture = capture
        self.block = block
        self.kind = kind
        self.flipped = flipped

    def wants(self, module: nn.Module) -> bool:
        block = self.block
        return (
            (block.capturing or block.row_limit > 0)
            and training_forward(module)
            and is_trainable(block)
        )  # frozen for now (core/trainability.py)

    def on_forward(self, x: Tensor, rows: Tensor, divisor: int, output: Tensor) -> GradHook | None:
        capture, block, kind = self.capture, self.block, self.kind
        capturing, keep_rows = block.capturing, block.row_limit > 0
        route = Route(block, kind, self.flipped, kind.grad_context(x))
        if capturing:
            block.seen = True
            if divisor > 0:  # e.g. an all-padding embedding batch adds nothing
                route.add_input(rows, divisor)
        pair = (
            rows
            if (capturing and capture.pair_sink is not None and block.method.needs_pairs)
            else None
        )
        if keep_rows:
            keep_rows = capture._keep_a_rows(block, rows)
        if not output.requires_grad:
            return None
        empirical = capturing and capture.output_sink is None
        if capturing and capture.output_sink is not None:
            capture.output_sink(route, output, pair)
        if empirical or keep_rows:
            return capture._make_grad_hook(route, empirical, keep_rows, pair)
        return None


class Capture:
    """Installs and removes the capture hooks of a set of blocks.

    Attributes:
        blocks: the engine's blocks (the same dict object: dropped layers leave both).
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

    def __init__(self, blocks: dict[str, KFACBlock], *, mean_reduction: bool = True):
        self.blocks = blocks
        self.mean_reduction = mean_reduction
        self.grad_scale = 1.0
        self.output_sink: OutputSink | None = None
        self.pair_sink: PairSink | None = None
        self.sampling = False  # True during the MC Fisher's extra backward (core/mc.py)
        self._handles: dict[str, list[RemovableHandle]] = {}

    @property
    def capturing(self) -> bool:
        """True while some block captures (a factor-update step)."""
        return any(block.capturing for block in self.blocks.values())

    def install(self) -> None:
        for name, block in self.blocks.items():
            if name not in self._handles:
                self._handles[name] = [
                    install_tap(use.module, use.kind, _BlockTap(self, block, use.kind, use.flipped))
                    for use in uses_of(block.kind)
                ]

    def remove(self, names: list[str] | None = None) -> None:
        for name in list(self._handles) if names is None else names:
            for handle in self._handles.pop(name, ()):
                handle.remove()

    @staticmethod
    def _keep_a_rows(block: KFACBlock, rows: Tensor) -> bool:
        """Keep a micro-batch's input rows for the low-rank path while they stay few enough."""
        block.kept_rows += rows.shape[0]
        if block.kept_rows > block.row_limit:
            block.a_rows, block.g_rows = [], []  # too many rows this step: full path
            return False
        block.a_rows.append(rows)
        return True

    def _make_grad_hook(
        self, route: Route, empirical: bool, keep_rows: bool, pair: Tensor | None = None
    ) -> GradHook:
        block = route.block

        def hook(grad: Tensor) -> None:
            if empirical:
                self.add_output_grad(route, grad, a_rows=pair)
            if keep_rows and not self.sampling and block.kept_rows <= block.row_limit:
                block.g_rows.append(grad.detach().reshape(-1, grad.shape[-1]))

        return hook

    def add_output_grad(
        self,
        target: KFACBlock | Route,
        grad: Tensor,
        per_example: bool = False,
        a_rows: Tensor | None = None,
        loss_terms: int | None = None,
    ) -> None:
        """Add ``sum g g^T`` for a gradient w.r.t. the block's output.

        ``per_example`` and ``loss_terms``: see ``output_grad_scale`` (the MC Fisher's summed
        sampled loss). ``target``: the block, or the ``Route`` of the forward that produced the
        output. ``a_rows``: the same forward's input rows, handed on to ``pair_sink`` (EKFAC).
        """
        route = target if isinstance(target, Route) else Route(target)
        block = route.block
        rows, divisor, examples = route.grad_rows(grad.detach())
        scale = output_grad_scale(
            examples,
            mean_reduction=self.mean_reduction,
            grad_scale=self.grad_scale,
            per_example=per_example,
            loss_terms=loss_terms,
        )
        if divisor > 0:
            route.add_grad(rows, divisor, scale)
        if a_rows is not None and self.pair_sink is not None:
            self.pair_sink(block, a_rows, rows, scale, examples)
