"""Weight sharing: one K-FAC block for a weight used by several modules (tied weights).

The rule ("KFAC-expand" over uses). A weight ``W`` held by modules ``m_1, ..., m_U`` (e.g. GPT-2's
``wte`` embedding and ``lm_head``) is ONE block, in the ``W~`` orientation of the first holder in
``named_modules`` order. Every use (every call of every holder) contributes its rows in that
orientation, and each side pools the rows of all uses:

    A = (1/R_A) sum_{uses u} sum_r a^u_r a^u_r^T,    G = (1/R_G) sum_u sum_r g^u_r g^u_r^T,

with ``R_A``, ``R_G`` the summed divisors of the uses (rows, or B for conv rows). A holder whose
own ``W~`` is the transpose of the block's (``transposed`` differs: an ``nn.Embedding`` tied to a
``nn.Linear`` head) contributes flipped: its input rows go to the block's G side and its
(per-example scaled) output-gradient rows to the A side. For the tied embedding/head in the
embedding's orientation (``W~ = weight^T``, dim x vocab): the vocabulary side A gets the
embedding's one-hot index rows (token counts on the diagonal) and the head's output-gradient
rows; the hidden side G gets the embedding's output-gradient rows and the head's input rows.

This is the usual K-FAC treatment of one layer called several times (every call adds rows),
extended to calls through different modules: the gradient ``sum_u sum_r g^u_r (a^u_r)^T`` of
the shared weight is exactly the sum of the uses' row products, and its Fisher block is
approximated by ``A (x) G`` of the pooled rows.

Biases: a bias held by every holder (the same Parameter) and no flipped use is part of ``W~``;
otherwise each holder's own bias keeps its raw gradient (listed as skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_kfac.core.layers import LayerKind


@dataclass
class Use:
    """One holder of a block's weight: its module, its own kind, and whether its ``W~`` is the
    transpose of the block's (its input rows then feed G and its gradient rows feed A)."""

    name: str
    module: nn.Module
    kind: LayerKind
    flipped: bool = False


class SharedKind(LayerKind):
    """A weight held by several modules: the first holder's layout, every holder's rows."""

    name = "Shared"

    def __init__(self, uses: list[Use]):
        self.uses = uses
        self.base = uses[0].kind
        super().__init__(self.base.module, use_bias=self.base.use_bias)
        self.transposed = self.base.transposed
        # A is a diagonal only when every use feeds it one-hot index rows (tied embeddings).
        self.diagonal_a = all(u.kind.diagonal_a and not u.flipped for u in uses)
        self.type_name = "+".join(dict.fromkeys(type(u.module).__name__ for u in uses))

    @property
    def has_bias(self) -> bool:
        return self.base.has_bias

    @property
    def params(self) -> tuple[Tensor, ...]:
        return self.base.params

    def a_dim(self) -> int:
        return self.base.a_dim()

    def g_dim(self) -> int:
        return self.base.g_dim()

    # the first holder's rows (for diagnostics that look at one module's rows)
    def input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        return self.base.input_rows(x)

    def grad_rows(self, g: Tensor, *context: Any) -> tuple[Tensor, int, int]:
        return self.base.grad_rows(g, *context)

    def grad_context(self, x: Tensor) -> Any:
        return self.base.grad_context(x)

    def as_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self.base.as_matrix(weight, bias)

    def grad_matrix(self) -> Tensor | None:
        return self.base.grad_matrix()

    def set_grad(self, matrix: Tensor) -> None:
        self.base.set_grad(matrix)


def uses_of(kind: LayerKind) -> list[Use]:
    """The uses a block's hooks capture: every holder of a shared weight, else the module."""
    return list(kind.uses) if isinstance(kind, SharedKind) else [Use("", kind.module, kind)]


def share(holders: list[tuple[str, nn.Module, LayerKind]]) -> tuple[SharedKind | None, str]:
    """A ``SharedKind`` for the ``(name, module, kind)`` holders of one weight, or a refusal."""
    kinds = [k for _, _, k in holders]
    if any(k.groups > 1 for k in kinds):
        return None, "a weight shared by grouped convolutions is not supported"
    if any(k.weight.dim() != kinds[0].weight.dim() for k in kinds):
        return None, "the holders of the shared weight use it with different layouts"
    biases = [getattr(m, "bias", None) for _, m, _ in holders]
    flipped = [k.transposed != kinds[0].transposed for k in kinds]
    same_bias = (
        not any(flipped) and all(k.has_bias for k in kinds) and all(b is biases[0] for b in biases)
    )
    for kind in kinds:
        kind.use_bias = same_bias  # a bias not held by every holder keeps its raw gradient
    uses = [Use(name, module, kind, flip) for (name, module, kind), flip in zip(holders, flipped)]
    base = uses[0].kind
    for use in uses[1:]:
        dims = (use.kind.g_dim(), use.kind.a_dim())
        if use.flipped:
            dims = dims[::-1]
        if dims != (base.g_dim(), base.a_dim()):
            return None, (
                f"{use.name!r} uses the shared weight with factor sizes {dims}, "
                f"{uses[0].name!r} with {(base.g_dim(), base.a_dim())}"
            )
    return SharedKind(uses), ""
