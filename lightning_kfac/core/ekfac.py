"""EKFAC: K-FAC with the scaling re-estimated in the Kronecker eigenbasis (George et al. 2018).

"Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis", sec. 3-4. With
``A = Q_A diag(e_A) Q_A^T`` and ``G = Q_G diag(e_G) Q_G^T`` (refreshed every ``inv_update_steps``),
K-FAC's Fisher block is ``(Q_A (x) Q_G) diag(vec(e_G e_A^T)) (Q_A (x) Q_G)^T``. EKFAC keeps the
eigenbasis but replaces the diagonal by the second moment of the per-example gradients in it:

    s = E_n[(Q_G^T dW~_n Q_A)^2]        (elementwise, g_dim x a_dim)
    P = Q_G [(Q_G^T grad Q_A) / (s + damping)] Q_A^T

- Per-example gradients: for Linear every row is an example (docs/conventions.md, KFAC-expand), so
  ``dW~_n = g_n a_n^T`` and ``(Q_G^T g_n a_n^T Q_A)^2 = (Q_G^T g_n)^2 ((Q_A^T a_n)^2)^T``: the sum
  over rows is one matmul of squared rotated rows. For convolutions ``dW~_n = sum_t g_{n,t}
  a_{n,t}^T`` (the sum over output locations, as in the paper, sec. 4), averaged over the B
  examples.
- Clocks (paper, Algorithm 1): a refresh computes new eigenbases, and the scaling is then
  re-estimated IN THE NEW BASIS from the refresh step's own per-example gradients: the first
  batch estimate ``s^`` after a refresh replaces the scaling outright (``s = s^``; an old scaling
  is a diagonal in another basis and K-FAC's ``e_G e_A^T`` would pin EKFAC to K-FAC), and every
  later factor-update step averages, ``s <- decay s + (1 - decay) s^``. Until the first estimate
  (a refresh off the factor clock, e.g. at the end of warm-up with no rows captured) the scaling
  is K-FAC's ``e_G e_A^T`` in the new basis. Since a refresh step decomposes before its gradients
  can be rotated, the rows captured on such a step are kept until ``update`` and rotated in the
  new basis; on other factor-update steps they are rotated as soon as the backward delivers them
  and only the (g_dim x a_dim) sum is kept.
- ``s`` lives in the block's decomposition (``EKFACDecomposition.scale``, with
  ``scale_updates``: the number of estimates averaged into it in this basis,
  core/methods/ekfac.py), so state_dict / resume keep it.
- nn.Embedding (diagonal A, no ``Q_A``: the basis is the identity): ``dW~_n = g_n e_{i_n}^T``, so
  the squared rotated gradient lands in column ``i_n`` (an index_add over the token ids).
- A diagonal side (core/factors.py) has the identity as basis: its rows enter unrotated.
"""

from __future__ import annotations

from collections.abc import Set

import torch
from torch import Tensor

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.distributed import Communicator
from lightning_kfac.core.layers import ConvKind
from lightning_kfac.core.methods.ekfac import (
    EKFACDecomposition,
    ekfac_decomposition,
    precondition_ekfac,
)

__all__ = ["EKFACScaling", "ekfac_decomposition", "precondition_ekfac", "squared_rotated_sum"]


class _Acc:
    """Scaling sums of one block between two updates."""

    __slots__ = ("basis", "count", "raw", "rotated")

    def __init__(self) -> None:
        self.rotated: Tensor | None = None  # sum of squared rotated per-example grads
        self.count = 0  # examples in ``rotated``
        self.basis: Tensor | None = None  # the e_G of the decomposition ``rotated`` used
        self.raw: list[tuple[Tensor, Tensor, int]] = []  # (a rows, scaled g rows, examples)


def squared_rotated_sum(
    block: KFACBlock,
    a_rows: Tensor,
    g_rows: Tensor,
    examples: int,
    QA: Tensor | None,
    QG: Tensor | None,
) -> Tensor:
    """``sum_n (Q_G^T dW~_n Q_A)^2`` over the examples of one captured tensor (a diagonal side's
    basis is the identity: its rows are used as they are)."""
    g = block.g_structure.right_rotate(g_rows.to(block.dtype), QG)
    if getattr(block.kind, "diagonal_a", False):  # nn.Embedding: a_rows are the token ids
        out = g.new_zeros(g.shape[1], block.kind.a_dim())
        return out.index_add_(1, a_rows.long(), g.square().T)
    a = block.a_structure.right_rotate(a_rows.to(block.dtype), QA)
    if isinstance(block.kind, ConvKind):
        a = a.reshape(examples, -1, a.shape[1])
        g = g.reshape(examples, -1, g.shape[1])
        return (g.transpose(1, 2) @ a).square().sum(0)
    return g.square().T @ a.square()


class EKFACScaling:
    """Collects matched ``(a, g)`` rows of EKFAC blocks and maintains their scaling ``s``.

    Attributes:
        refresh_due: names of the blocks whose eigenbasis the current step will recompute
            (their rows are then kept and rotated in ``update``, after the refresh); the engine
            sets it whenever its clock moves.
    """

    def __init__(self, refresh_due: Set[str] = frozenset()):
        self.refresh_due: Set[str] = refresh_due
        self._acc: dict[str, _Acc] = {}

    def add_pair(
        self, block: KFACBlock, a_rows: Tensor, g_rows: Tensor, scale: float, examples: int
    ) -> None:
        """Capture's ``pair_sink``: rows of one forward's input and of its output gradient."""
        if not block.method.needs_pairs:
            return
        acc = self._acc.setdefault(block.name, _Acc())
        g_rows = g_rows.to(block.dtype)
        if scale != 1.0:
            g_rows = g_rows * scale
        if not block.kind.diagonal_a:
            a_rows = a_rows.to(block.dtype)
        dec = block.decomposition
        if block.name in self.refresh_due or not isinstance(dec, EKFACDecomposition):
            acc.raw.append((a_rows, g_rows, examples))
            return
        if acc.basis is not None and acc.basis is not dec["eG"]:
            acc.rotated, acc.count = None, 0
        part = squared_rotated_sum(block, a_rows, g_rows, examples, dec.get("QA"), dec.get("QG"))
        acc.rotated = part if acc.rotated is None else acc.rotated.add_(part)
        acc.count += examples
        acc.basis = dec["eG"]  # identifies the decomposition the sum was rotated in

    def discard(self) -> None:
        self._acc.clear()

    def update(self, due: list[KFACBlock], decay: float, comm: Communicator) -> list[str]:
        """Batch estimates ``s^`` -> all-reduce -> running average of ``dec.scale``.

        Returns the names of blocks whose estimate was not finite (their scaling is kept).
        """
        due = [
            b
            for b in due
            if b.method.needs_pairs and isinstance(b.decomposition, EKFACDecomposition)
        ]
        sums: list[Tensor] = []
        counts = torch.zeros(len(due), dtype=torch.float64)
        for i, block in enumerate(due):
            dec, acc = block.decomposition, self._acc.get(block.name)
            assert dec is not None  # filtered above
            total = torch.zeros_like(dec["scale"])
            if acc is not None:
                if acc.rotated is not None and acc.basis is dec["eG"]:
                    total.add_(acc.rotated)
                    counts[i] += acc.count
                for a_rows, g_rows, examples in acc.raw:
                    total.add_(
                        squared_rotated_sum(
                            block, a_rows, g_rows, examples, dec.get("QA"), dec.get("QG")
                        )
                    )
                    counts[i] += examples
            sums.append(total)
        self._acc.clear()
        if comm.world_size > 1 and due:
            comm.all_reduce_sum_([counts, *sums])
        bad = []
        for block, total, count in zip(due, sums, counts.tolist()):
            if count == 0:
                continue
            s_hat = total / count
            if not bool(torch.isfinite(s_hat).all()):
                bad.append(block.name)
                continue
            dec = block.decomposition
            assert isinstance(dec, EKFACDecomposition) and dec.scale is not None
            if dec.scale_updates is None:  # a state saved before the count existed
                dec.scale_updates = torch.ones((), dtype=torch.float64)
            updates = dec.scale_updates
            if float(updates) == 0:  # first estimate in a new basis: it replaces e_G e_A^T
                dec.scale = s_hat.to(dec.scale.dtype)
            else:
                dec.scale.mul_(decay).add_(s_hat, alpha=1.0 - decay)
            updates.add_(1.0)
        return bad
