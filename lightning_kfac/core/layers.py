"""Per-module-type helpers: layer inputs/output gradients -> rows, and grad <-> ``[W b]``.

Tensor layout (CONTRACT.md, "The mathematics"):

- Linear, weight ``W`` (out x in), bias ``b``: ``W~ = [W b]`` is (out x (in+1)). An input of shape
  (..., in) gives ``N = prod(...)`` rows ``a_n`` (with a trailing 1 when there is a bias); the
  output gradient (..., out) gives ``N`` rows ``g_n``. Every leading position is an example
  ("KFAC-expand"): ``A^ = (1/N) sum_n a a^T``, ``G^ = (1/N) sum_n g g^T``.
- Embedding (a Linear layer on one-hot inputs, ``s = W^T e_i``): in the Linear layout the weight is
  ``W^T`` (embedding_dim x num_embeddings), so ``grad W~ = weight.grad^T``, no bias. Every index
  position is an example; ``A^ = (1/N) sum_n e_{i_n} e_{i_n}^T`` is diagonal (token counts / N)
  and is kept as its diagonal, a vector (``LayerKind.diagonal_a``), ``G^`` as for Linear.
- ConvNd (KFC, Grosse & Martens 2016, sec. 3): the input patch at output location t of example n,
  ``a_{n,t}`` (in_channels * prod(kernel) (+1)), in the same order as ``W.view(out, -1)``;
  ``A^ = (1/B) sum_{n,t} a a^T``, ``G^ = (1/(B T)) sum_{n,t} g g^T``.

A kind reports, for one captured tensor, the rows and the divisor that turns the row sum into the
batch estimate, plus the number of examples (the ``N`` of a mean-reduced loss, used to rescale
autograd's gradient to per-example gradients).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerKind:
    """Base class: how one module type maps to K-FAC rows and back."""

    name = "layer"
    diagonal_a = False  # True: A is kept as its diagonal, a vector (nn.Embedding)

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def has_bias(self) -> bool:
        bias = getattr(self.module, "bias", None)
        return bias is not None and bias.requires_grad

    @property
    def params(self) -> Tuple[Tensor, ...]:
        return (self.module.weight, self.module.bias) if self.has_bias else (self.module.weight,)

    def a_dim(self) -> int:
        raise NotImplementedError

    def g_dim(self) -> int:
        return self.module.weight.shape[0]

    def input_rows(self, x: Tensor) -> Tuple[Tensor, int]:
        """Rows ``a`` (R x a_dim) and the divisor of ``sum a a^T`` (rows, or B for conv)."""
        raise NotImplementedError

    def grad_rows(self, g: Tensor) -> Tuple[Tensor, int, int]:
        """Rows ``g`` (R x g_dim), the divisor of ``sum g g^T`` and the example count N."""
        raise NotImplementedError

    def a_outer(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """``sum_n a_n a_n^T`` of the rows from ``input_rows`` (its diagonal when diagonal_a)."""
        rows = rows.to(dtype)
        return rows.T @ rows

    def as_matrix(self, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Weight- and bias-shaped tensors (e.g. a parameter step) in the ``W~`` layout."""
        matrix = weight.reshape(weight.shape[0], -1)
        if self.has_bias:
            bias = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device) \
                if bias is None else bias
            matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
        return matrix

    def _append_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    def grad_matrix(self) -> Optional[Tensor]:
        """``grad W~`` as a (g_dim x a_dim) matrix, or None when the weight has no gradient."""
        weight = self.module.weight
        if weight.grad is None:
            return None
        grad = weight.grad.reshape(weight.shape[0], -1)
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            grad = torch.cat([grad, bias_grad.reshape(-1, 1)], dim=1)
        return grad

    def set_grad(self, matrix: Tensor) -> None:
        """Write a (g_dim x a_dim) matrix back into ``weight.grad`` (and ``bias.grad``)."""
        weight = self.module.weight
        w_cols = matrix.shape[1] - (1 if self.has_bias else 0)
        weight.grad.copy_(matrix[:, :w_cols].reshape(weight.shape))
        if self.has_bias:
            bias = self.module.bias
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad.copy_(matrix[:, w_cols].reshape(bias.shape))


class LinearKind(LayerKind):
    """``nn.Linear`` on inputs of any number of leading dimensions (each position is an example)."""

    name = "Linear"

    def a_dim(self) -> int:
        return self.module.in_features + (1 if self.has_bias else 0)

    def input_rows(self, x: Tensor) -> Tuple[Tensor, int]:
        rows = x.reshape(-1, x.shape[-1])
        return self._append_ones(rows), rows.shape[0]

    def grad_rows(self, g: Tensor) -> Tuple[Tensor, int, int]:
        rows = g.reshape(-1, g.shape[-1])
        return rows, rows.shape[0], rows.shape[0]


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d`` with groups=1: patches via unfold (KFC)."""

    name = "Conv"

    def a_dim(self) -> int:
        weight = self.module.weight
        return weight[0].numel() + (1 if self.has_bias else 0)

    def _patches(self, x: Tensor) -> Tensor:
        """(B, C_in * prod(kernel), T) patches, in the order of ``weight.view(out, -1)``."""
        conv = self.module
        nd = x.dim() - 2
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0,) * nd
        if nd in (1, 2) and not isinstance(padding, str):
            def as2d(v):
                return (1, v[0]) if nd == 1 else tuple(v)
            x4 = x.unsqueeze(2) if nd == 1 else x
            pad = (0, padding[0]) if nd == 1 else tuple(padding)
            return F.unfold(x4, kernel_size=as2d(conv.kernel_size), dilation=as2d(conv.dilation),
                            padding=pad, stride=as2d(conv.stride))
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

    def input_rows(self, x: Tensor) -> Tuple[Tensor, int]:
        patches = self._patches(x)  # B x D x T
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._append_ones(rows), x.shape[0]

    def grad_rows(self, g: Tensor) -> Tuple[Tensor, int, int]:
        batch, channels = g.shape[0], g.shape[1]
        rows = g.reshape(batch, channels, -1).transpose(1, 2).reshape(-1, channels)
        return rows, rows.shape[0], batch


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: rows are the flattened indices, ``A`` is the vector of token counts / N."""

    name = "Embedding"
    diagonal_a = True

    def a_dim(self) -> int:
        return self.module.num_embeddings

    def g_dim(self) -> int:
        return self.module.embedding_dim

    def input_rows(self, x: Tensor) -> Tuple[Tensor, int]:
        rows = x.reshape(-1)
        return rows, rows.shape[0]

    def a_outer(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.bincount(rows.long(), minlength=self.a_dim()).to(dtype)

    grad_rows = LinearKind.grad_rows  # every index position is an example, as for Linear

    def as_matrix(self, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return weight.T

    def grad_matrix(self) -> Optional[Tensor]:
        grad = self.module.weight.grad
        return None if grad is None else grad.T

    def set_grad(self, matrix: Tensor) -> None:
        self.module.weight.grad.copy_(matrix.T)


def _embedding_refusal(module: nn.Embedding) -> str:
    if module.sparse:
        return "nn.Embedding(sparse=True): sparse gradients are not supported"
    if module.padding_idx is not None:
        return ("nn.Embedding(padding_idx=...) is not supported (padding positions would enter "
                "the factors while their gradient is masked)")
    if module.scale_grad_by_freq:
        return ("nn.Embedding(scale_grad_by_freq=True) is not supported (its gradient is not "
                "sum_n g_n a_n^T)")
    return ""


def make_kind(module: nn.Module) -> Tuple[Optional[LayerKind], str]:
    """Return ``(kind, "")`` for a supported module, else ``(None, reason)``."""
    if isinstance(module, nn.Linear):
        return LinearKind(module), ""
    if isinstance(module, nn.Embedding):
        reason = _embedding_refusal(module)
        return (None, reason) if reason else (EmbeddingKind(module), "")
    if isinstance(module, _CONV_TYPES):
        if module.groups != 1:
            return None, f"grouped convolution (groups={module.groups}) is not supported"
        return ConvKind(module), ""
    return None, f"{type(module).__name__} is not a supported layer type"
