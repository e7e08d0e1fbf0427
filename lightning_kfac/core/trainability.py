"""Trainability that changes during a fit: frozen-for-now layers, layers leaving the optimizer.

A layer whose weight is frozen when K-FAC registers it (Lightning's ``BackboneFinetuning``
freezes the backbone in ``setup``) is registered anyway. While its weight does not require a
gradient it is not captured, not updated, not decomposed and its gradients are not touched. Once
trainable and in the optimizer's param groups again it is captured from the next factor-update
step and decomposed in the step its first factors arrive (``KFACPreconditioner.step``), so it is
preconditioned from its next factor update on instead of waiting for the next decomposition
step (the same holds for any layer whose first factors come late). "First factors" (``A`` was
None) is the same on every rank, so the decision is collective-safe under DDP.

A layer whose bias changes trainability changes the size of ``A`` (the trailing 1 of ``a``): its
running factors restart from the next batch estimate and it is preconditioned again from the
next decomposition step.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kfac.core.blocks import KFACBlock


def is_trainable(block: KFACBlock) -> bool:
    """True while the layer's weight requires a gradient."""
    return bool(block.kind.weight.requires_grad)


def restart_if_reshaped(block: KFACBlock, a_hat: Tensor, g_hat: Tensor) -> bool:
    """Forget the running factors when the batch estimates' shapes no longer match them (a bias
    became trainable or frozen); True when that happened."""
    if block.A is None or block.G is None:  # nothing accumulated yet
        return False
    if block.A.shape == a_hat.shape and block.G.shape == g_hat.shape:
        return False
    block.A, block.G, block.decomposition = None, None, None
    return True
