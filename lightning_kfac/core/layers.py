"""Per-module-type helpers: layer inputs/output gradients -> rows, and grad <-> ``[W b]``.

Tensor layout (the K-FAC matrix ``W~`` of a layer is always (g_dim x a_dim)):

- Linear, weight ``W`` (out x in), bias ``b``: ``W~ = [W b]`` is (out x (in+1)). An input of shape
  (..., in) gives ``N = prod(...)`` rows ``a_n`` (with a trailing 1 when there is a bias); the
  output gradient (..., out) gives ``N`` rows ``g_n``. Every leading position is an example
  ("KFAC-expand"): ``A^ = (1/N) sum_n a a^T``, ``G^ = (1/N) sum_n g g^T``.
- Transposed Linear (``transformers``' ``Conv1D``, GPT-2): weight (in x out), ``y = x W + b``.
  The same rows as Linear; ``W~ = [W^T b]``, so ``grad W~ = [weight.grad^T  bias.grad]``.
- Embedding (a Linear layer on one-hot inputs, ``s = W^T e_i``): in the Linear layout the weight is
  ``W^T`` (embedding_dim x num_embeddings), so ``grad W~ = weight.grad^T``, no bias. Every index
  position is an example; ``A^ = (1/N) sum_n e_{i_n} e_{i_n}^T`` is diagonal (token counts / N)
  and is kept as its diagonal, a vector (``LayerKind.diagonal_a``), ``G^`` as for Linear.
  With ``padding_idx = p`` the positions holding ``p`` add nothing to the weight's gradient
  (autograd masks them), so they are left out of both factors: with ``N_v`` the number of
  non-padding positions, ``A^ = (1/N_v) sum_{i_n != p} e e^T`` (so ``A[p] = 0``) and
  ``G^ = (1/N_v) sum_{i_n != p} g g^T``; ``g_n`` keeps the scale of the loss's mean over all
  ``N`` positions (``g_n = N x`` autograd's gradient), as for every kind.
- ConvNd (KFC, Grosse & Martens 2016, sec. 3): the input patch at output location t of example n,
  ``a_{n,t}`` (in_channels * prod(kernel) (+1)), in the same order as ``W.view(out, -1)``;
  ``A^ = (1/B) sum_{n,t} a a^T``, ``G^ = (1/(B T)) sum_{n,t} g g^T``.
- Grouped ConvNd (``groups = K > 1``, depthwise when ``K = in_channels``): each group k is its
  own KFC layer. Its weight ``W_k`` (out/K x in/K * prod(kernel), bias entries appended) sees
  only the patches of its own input channels, ``a^k_{n,t}``, and produces only its own output
  channels, ``g^k_{n,t}``: ``A_k = (1/B) sum a^k a^k^T``, ``G_k = (1/(BT)) sum g^k g^k^T``. The
  Fisher approximation is block-diagonal over groups, each block ``A_k (x) G_k``. The factors
  are stacked tensors (K x d x d), decomposed and applied batched over the groups;
  ``grad W~`` is (K x out/K x d_A).

A kind reports, for one captured tensor, the rows and the divisor that turns the row sum into the
batch estimate, plus the number of examples (the ``N`` of a mean-reduced loss, used to rescale
autograd's gradient to per-example gradients). Rows are dense float tensors (R x d), stacked per
group (K x R x d), or integer index rows (R,) standing for one-hot rows (``accumulate_outer``).

New module types: ``register_layer(module_class, kind)`` maps a class to a built-in kind
(``"linear"``, ``"linear_transposed"``, ``"conv"``, ``"embedding"``) or to a ``LayerKind``
subclass (see docs/layers.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.core import linalg

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def accumulate_outer(
    acc: Tensor | None,
    rows: Tensor,
    dim: int,
    diagonal: bool,
    dtype: torch.dtype,
    scale: float = 1.0,
) -> Tensor:
    """``acc + scale^2 sum_r row_r row_r^T`` (its diagonal when ``diagonal``), in ``dtype``.

    ``rows`` are dense (R x dim), stacked per group (K x R x dim: a (K x dim x dim) result), or
    integer indices (R,) standing for one-hot rows ``e_i`` (their outer products are token
    counts on the diagonal, added without forming a dim x dim temporary).

    Dense rows are cast to ``dtype`` and their subnormal entries flushed to 0 before the product
    (``linalg.cast_without_subnormals``; the caller's rows are not written): once a batch is fit,
    many output-gradient rows underflow and ``rows^T rows`` on them runs ~100x slower on x86. A
    flushed entry was below the smallest normal number ``tiny``, so each product entry moves by
    less than ``R tiny max|row entry|``, far below the float32 rounding of the factor.
    """
    if not rows.dtype.is_floating_point:  # one-hot index rows
        counts = torch.bincount(rows.reshape(-1).long(), minlength=dim).to(dtype)
        if scale != 1.0:
            counts.mul_(scale * scale)
        if diagonal:
            return counts if acc is None else acc.add_(counts)
        if acc is None:
            acc = counts.new_zeros(dim, dim)
        acc.diagonal().add_(counts)
        return acc
    rows = linalg.cast_without_subnormals(rows, dtype)
    outer = rows.square().sum(-2) if diagonal else rows.mT @ rows
    if scale != 1.0:
        outer.mul_(scale * scale)
    return outer if acc is None else acc.add_(outer)


class LayerKind:
    """Base class: how one module type maps to K-FAC rows and back.

    A subclass for a new layer type (``register_layer``) implements ``a_dim``, ``g_dim``,
    ``input_rows``, ``grad_rows``, and, when ``W~`` is not ``[weight.view(out, -1) bias]``,
    ``grad_matrix``, ``set_grad`` and ``as_matrix``.
    """

    name = "layer"
    diagonal_a = False  # True: A is kept as its diagonal, a vector (nn.Embedding)
    transposed = False  # True: W~ = weight^T (nn.Embedding, transformers' Conv1D)
    groups = 1  # > 1: factors stacked per group (grouped convolutions)

    def __init__(self, module: nn.Module, *, use_bias: bool = True):
        # duck-typed: torch's layers and registered types alike only need ``weight`` (``bias``)
        self.module: Any = module
        self.use_bias = use_bias  # False: the bias stays out of W~ (kept raw)

    @property
    def weight(self) -> Tensor:
        weight: Tensor = self.module.weight
        return weight

    @property
    def has_bias(self) -> bool:
        bias = getattr(self.module, "bias", None)
        return self.use_bias and isinstance(bias, Tensor) and bias.requires_grad

    @property
    def params(self) -> tuple[Tensor, ...]:
        return (self.module.weight, self.module.bias) if self.has_bias else (self.module.weight,)

    def a_dim(self) -> int:
        raise NotImplementedError

    def g_dim(self) -> int:
        return self.weight.shape[0]

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and G (a vector for a diagonal A; stacked per group when groups > 1)."""
        a, g = self.a_dim(), self.g_dim()
        lead = (self.groups,) if self.groups > 1 else ()
        return (lead + ((a,) if self.diagonal_a else (a, a)), (*lead, g, g))

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Rows ``a`` (R x a_dim) and the divisor of ``sum a a^T`` (rows, or B for conv)."""
        raise NotImplementedError

    def grad_context(self, x: Tensor) -> Any:
        """What ``grad_rows`` needs from the forward (e.g. a padding mask); None by default."""
        return None

    def grad_rows(self, g: Tensor) -> tuple[Tensor, int, int]:
        """Rows ``g`` (R x g_dim), the divisor of ``sum g g^T`` and the example count N."""
        raise NotImplementedError

    def a_outer(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """``sum_n a_n a_n^T`` of the rows from ``input_rows`` (its diagonal when diagonal_a)."""
        return accumulate_outer(None, rows, self.a_dim(), self.diagonal_a, dtype)

    def as_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Weight- and bias-shaped tensors (e.g. a parameter step) in the ``W~`` layout."""
        matrix = weight.T if self.transposed else weight.reshape(weight.shape[0], -1)
        if self.has_bias:
            bias = (
                torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
                if bias is None
                else bias
            )
            matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
        return matrix

    def _append_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones((*rows.shape[:-1], 1))], dim=-1)

    def grad_matrix(self) -> Tensor | None:
        """``grad W~`` as a (g_dim x a_dim) matrix, or None when the weight has no gradient."""
        weight = self.module.weight
        if weight.grad is None:
            return None
        bias_grad = None
        if self.has_bias:
            bias_grad = self.module.bias.grad
            bias_grad = torch.zeros_like(self.module.bias) if bias_grad is None else bias_grad
        return self.as_matrix(weight.grad, bias_grad)

    def set_grad(self, matrix: Tensor) -> None:
        """Write a (g_dim x a_dim) matrix back into ``weight.grad`` (and ``bias.grad``)."""
        weight = self.module.weight
        w_cols = matrix.shape[-1] - (1 if self.has_bias else 0)
        w_part = matrix[..., :w_cols]
        weight.grad.copy_(w_part.T if self.transposed else w_part.reshape(weight.shape))
        if self.has_bias:
            bias = self.module.bias
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad.copy_(matrix[..., w_cols].reshape(bias.shape))


class LinearKind(LayerKind):
    """``nn.Linear`` on inputs of any number of leading dimensions (each position is an example)."""

    name = "Linear"

    def a_dim(self) -> int:
        return self.weight.shape[1] + (1 if self.has_bias else 0)

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        rows = x.reshape(-1, x.shape[-1])
        return self._append_ones(rows), rows.shape[0]

    def grad_rows(self, g: Tensor) -> tuple[Tensor, int, int]:
        rows = g.reshape(-1, g.shape[-1])
        return rows, rows.shape[0], rows.shape[0]


class LinearTransposedKind(LinearKind):
    """A Linear layer storing its weight transposed, (in x out): ``y = x W + b``
    (``transformers.pytorch_utils.Conv1D``, the GPT-2 family). Rows as for Linear."""

    name = "Conv1D"
    transposed = True

    def a_dim(self) -> int:
        return self.weight.shape[0] + (1 if self.has_bias else 0)

    def g_dim(self) -> int:
        return self.weight.shape[1]


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d`` with groups=1: patches via unfold (KFC)."""

    name = "Conv"

    def a_dim(self) -> int:
        return self.weight[0].numel() + (1 if self.has_bias else 0)

    def _patches(self, x: Tensor) -> Tensor:
        """(B, C_in * prod(kernel), T) patches, in the order of ``weight.view(out, -1)``."""
        conv = self.module
        nd = x.dim() - 2
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0,) * nd
        if nd in (1, 2) and not isinstance(padding, str):

            def as2d(v: tuple[int, ...]) -> tuple[int, ...]:
                return (1, v[0]) if nd == 1 else tuple(v)

            x4 = x.unsqueeze(2) if nd == 1 else x
            pad = (0, padding[0]) if nd == 1 else tuple(padding)
            return F.unfold(
                x4,
                kernel_size=as2d(conv.kernel_size),
                dilation=as2d(conv.dilation),
                padding=pad,
                stride=as2d(conv.stride),
            )
        # General case (Conv3d, padding="same"): a grouped convolution with one-hot kernels
        # extracts every patch element as a channel, in (channel, kernel position) order.
        channels, kernel = x.shape[1], tuple(conv.kernel_size)
        k = 1
        for size in kernel:
            k *= size
        eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *kernel)
        weight = eye.repeat(channels, 1, *([1] * nd))
        conv_fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        out = conv_fn(x, weight, None, conv.stride, padding, conv.dilation, groups=channels)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        patches = self._patches(x)  # B x D x T
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._append_ones(rows), x.shape[0]

    def grad_rows(self, g: Tensor) -> tuple[Tensor, int, int]:
        batch, channels = g.shape[0], g.shape[1]
        rows = g.reshape(batch, channels, -1).transpose(1, 2).reshape(-1, channels)
        return rows, rows.shape[0], batch


class GroupedConvKind(ConvKind):
    """``nn.Conv1d/2d/3d`` with groups = K > 1 (depthwise included): one KFC layer per group,
    factors stacked (K x d x d) and handled batched over the groups (see the module docstring)."""

    name = "GroupedConv"

    def __init__(self, module: nn.Module, **kwargs: Any):
        super().__init__(module, **kwargs)
        self.groups: int = self.module.groups

    def a_dim(self) -> int:
        return self.weight[0].numel() + (1 if self.has_bias else 0)  # (C_in/K) * kernel

    def g_dim(self) -> int:
        return self.weight.shape[0] // self.groups

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        patches = self._patches(x)  # B x (C_in * k) x T, channel-major: group k is a slice
        batch, _, locations = patches.shape
        grouped = patches.reshape(batch, self.groups, -1, locations).permute(1, 0, 3, 2)
        d = grouped.shape[-1]
        # one copy into the (K, B, T, d [+1]) layout, the bias column written in place
        rows = patches.new_empty(self.groups, batch, locations, d + (1 if self.has_bias else 0))
        rows[..., :d].copy_(grouped)
        if self.has_bias:
            rows[..., d] = 1.0
        return rows.reshape(self.groups, batch * locations, -1), batch

    def grad_rows(self, g: Tensor) -> tuple[Tensor, int, int]:
        batch = g.shape[0]
        rows = g.reshape(batch, self.groups, self.g_dim(), -1).permute(1, 0, 3, 2)
        rows = rows.reshape(self.groups, -1, self.g_dim())
        return rows, rows.shape[1], batch

    def as_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        matrix = weight.reshape(self.groups, self.g_dim(), -1)
        if self.has_bias:
            bias = (
                torch.zeros(weight.shape[0], dtype=matrix.dtype, device=matrix.device)
                if bias is None
                else bias
            )
            matrix = torch.cat([matrix, bias.reshape(self.groups, -1, 1)], dim=2)
        return matrix


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: rows are the flattened indices, ``A`` is the vector of token counts / N.

    With ``padding_idx``, padding positions are left out of A and G (they add nothing to the
    gradient); ``grad_context`` hands the mask of kept positions from the forward to the backward.
    """

    name = "Embedding"
    diagonal_a = True
    transposed = True

    def a_dim(self) -> int:
        return self.weight.shape[0]

    def g_dim(self) -> int:
        return self.weight.shape[1]

    def _keep(self, x: Tensor) -> Tensor | None:
        padding = getattr(self.module, "padding_idx", None)
        return None if padding is None else x.reshape(-1) != padding

    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        rows = x.reshape(-1)
        keep = self._keep(x)
        if keep is not None:
            rows = rows[keep]
        return rows, rows.shape[0]

    def grad_context(self, x: Tensor) -> Tensor | None:
        return self._keep(x)

    def grad_rows(self, g: Tensor, keep: Tensor | None = None) -> tuple[Tensor, int, int]:
        rows = g.reshape(-1, g.shape[-1])
        examples = rows.shape[0]  # the loss's mean runs over every position
        if keep is not None:
            rows = rows[keep]
        return rows, rows.shape[0], examples


def _embedding_refusal(module: nn.Module) -> str:
    if getattr(module, "sparse", False):
        return "nn.Embedding(sparse=True): sparse gradients are not supported"
    if getattr(module, "scale_grad_by_freq", False):
        return (
            "nn.Embedding(scale_grad_by_freq=True) is not supported (its gradient is not "
            "sum_n g_n a_n^T)"
        )
    return ""


def _conv_kind(module: nn.Module) -> tuple[LayerKind | None, str]:
    grouped = cast(int, module.groups) > 1
    return (GroupedConvKind(module) if grouped else ConvKind(module)), ""


def _embedding_kind(module: nn.Module) -> tuple[LayerKind | None, str]:
    reason = _embedding_refusal(module)
    return (None, reason) if reason else (EmbeddingKind(module), "")


MHA_REASON = (
    "nn.MultiheadAttention applies its projections functionally "
    "(F.multi_head_attention_forward), out of reach of module hooks: its in_proj and "
    "out_proj keep raw gradients (a model can use nn.Linear projections instead)"
)

BUILTIN_KINDS: dict[str, Callable[[nn.Module], tuple[LayerKind | None, str]]] = {
    "linear": lambda m: (LinearKind(m), ""),
    "linear_transposed": lambda m: (LinearTransposedKind(m), ""),
    "conv": _conv_kind,
    "embedding": _embedding_kind,
}
_REGISTRY: dict[type, str | type[LayerKind]] = {}


def register_layer(module_class: type, kind: str | type[LayerKind]) -> None:
    """Precondition every module of ``module_class`` (and its subclasses) as ``kind``.

    ``kind``: one of ``"linear"`` (weight out x in, optional ``bias``), ``"linear_transposed"``
    (weight in x out, ``y = x W + b``), ``"conv"`` (an ``nn.ConvNd``-like module: ``weight``,
    ``bias``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``,
    ``padding_mode``), ``"embedding"`` (weight num x dim, optional ``padding_idx``), or a
    ``LayerKind`` subclass, built as ``kind(module)``. Registered classes take precedence over
    the built-in rules; registering a class again replaces its entry. Affects preconditioners
    created afterwards.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise ValueError(
            f"Invalid module_class={module_class!r} for register_layer: expected a "
            "subclass of torch.nn.Module."
        )
    if isinstance(kind, str):
        if kind not in BUILTIN_KINDS:
            raise ValueError(
                f"Invalid kind={kind!r} for register_layer: allowed are "
                f"{sorted(BUILTIN_KINDS)} or a LayerKind subclass."
            )
    elif not (isinstance(kind, type) and issubclass(kind, LayerKind)):
        raise ValueError(
            f"Invalid kind={kind!r} for register_layer: allowed are "
            f"{sorted(BUILTIN_KINDS)} or a LayerKind subclass."
        )
    _REGISTRY[module_class] = kind


def unregister_layer(module_class: type) -> None:
    """Remove ``module_class`` from the registry (no error when it is absent)."""
    _REGISTRY.pop(module_class, None)


def registered_kind(module: nn.Module) -> str | type[LayerKind] | None:
    """The kind ``register_layer`` gave the module's class (or a base class), else None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D``, recognised without importing transformers."""
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.split(".")[0] == "transformers"
        and isinstance(weight := getattr(module, "weight", None), Tensor)
        and weight.dim() == 2
    )


def make_kind(module: nn.Module) -> tuple[LayerKind | None, str]:
    """Return ``(kind, "")`` for a supported module, else ``(None, reason)``."""
    registered = registered_kind(module)
    if isinstance(registered, str):
        return BUILTIN_KINDS[registered](module)
    if registered is not None:
        return registered(module), ""
    if isinstance(module, nn.Linear):
        return LinearKind(module), ""
    if isinstance(module, nn.Embedding):
        return _embedding_kind(module)
    if isinstance(module, _CONV_TYPES):
        return _conv_kind(module)
    if _is_transformers_conv1d(module):
        return LinearTransposedKind(module), ""
    if isinstance(module, nn.MultiheadAttention):
        return None, MHA_REASON
    return None, (
        f"{type(module).__name__} is not a supported layer type (add it with "
        "lightning_kfac.register_layer)"
    )
