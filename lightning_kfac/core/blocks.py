"""KFACBlock: one preconditioned layer's factors, accumulators and decomposition.

Accumulators hold the row sums ``sum a a^T`` and ``sum g g^T`` (and their divisors) of every
captured micro-batch since the last factor update; ``batch_estimates()`` turns them into
``A^ = sum a a^T / div_A`` and ``G^ = sum g g^T / div_G``. Running averages
``A <- decay A + (1 - decay) A^`` (Martens & Grosse 2015, sec. 5); what they start from is
``factor_init``: ``batch`` sets ``A = A^`` at the first update (no bias toward zero or identity),
``identity`` starts from ``I`` and ``scaled_identity`` from ``(tr A^/dim) I`` and blends the first
estimate in like any later one (so early steps are damped toward a scaled first-order step).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from lightning_kfac.core.layers import LayerKind, accumulate_outer


def _isotropic(estimate: Tensor, init: str) -> Tensor:
    """``I`` (``identity``) or ``(tr X/dim X) I`` (``scaled_identity``) shaped like ``estimate``
    (a 1-D estimate is a diagonal factor: a vector of ones; a 3-D one a stack of blocks)."""
    diag = estimate if estimate.dim() == 1 else estimate.diagonal(dim1=-2, dim2=-1)
    scale = float(diag.mean()) if init == "scaled_identity" and diag.numel() else 1.0
    ones = torch.full_like(diag, scale)
    return ones if estimate.dim() == 1 else torch.diag_embed(ones)  # (groups x) d x d


class KFACBlock:
    """State of one layer. ``A``/``G`` are None until the first factor update."""

    def __init__(self, name: str, kind: LayerKind, dtype: torch.dtype, *, damping: float,
                 compute_method: str, factor_update_steps: int, inv_update_steps: int):
        self.name = name
        self.kind = kind
        self.dtype = dtype
        self.damping = damping
        self.compute_method = compute_method
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.capturing = False  # switched by the preconditioner's factor clock
        self.failures = 0  # consecutive failed decompositions
        self.row_limit = 0  # > 0: keep this step's a/g rows for low-rank preconditioning
        self.clear_rows()
        self.A: Optional[Tensor] = None
        self.G: Optional[Tensor] = None
        self.decomposition: Dict[str, Tensor] = {}
        self.seen = False  # the forward hook fired at least once in a training forward
        self.reset_accumulators()

    def clear_rows(self) -> None:
        """Drop the rows kept for the low-rank path (core/lowrank.py)."""
        self.a_rows: list = []
        self.g_rows: list = []
        self.kept_rows = 0

    # -- accumulation --------------------------------------------------------------------------
    def reset_accumulators(self) -> None:
        self.a_sum: Optional[Tensor] = None
        self.a_div = 0
        self.g_sum: Optional[Tensor] = None
        self.g_div = 0

    def add_a(self, rows: Tensor, divisor: int, scale: float = 1.0) -> None:
        """Add ``scale^2 sum a a^T`` of dense, per-group or one-hot index rows (layers.py)."""
        # Hooks run inside the forward's autocast region: keep the outer products in self.dtype.
        with torch.autocast(rows.device.type, enabled=False):
            self.a_sum = accumulate_outer(self.a_sum, rows, self.kind.a_dim(),
                                          self.kind.diagonal_a, self.dtype, scale)
        self.a_div += divisor

    def add_g(self, rows: Tensor, divisor: int, scale: float) -> None:
        with torch.autocast(rows.device.type, enabled=False):
            self.g_sum = accumulate_outer(self.g_sum, rows, self.kind.g_dim(), False,
                                          self.dtype, scale)
        self.g_div += divisor

    def has_estimates(self) -> bool:
        return self.a_sum is not None and self.g_sum is not None

    def batch_estimates(self) -> Tuple[Tensor, Tensor]:
        """``(A^, G^)``; zeros when nothing was captured (the caller checks ``has_estimates``)."""
        device = self.kind.weight.device
        if not self.has_estimates():
            a_shape, g_shape = self.kind.factor_shapes()
            return (torch.zeros(a_shape, dtype=self.dtype, device=device),
                    torch.zeros(g_shape, dtype=self.dtype, device=device))
        return self.a_sum / self.a_div, self.g_sum / self.g_div

    # -- running averages ----------------------------------------------------------------------
    def update_factors(self, a_hat: Tensor, g_hat: Tensor, decay: float,
                       init: str = "batch") -> None:
        """Running averages; ``init`` (``factor_init``) sets what the first update starts from."""
        if self.A is None:
            if init == "batch":
                self.A, self.G = a_hat.clone(), g_hat.clone()
                return
            self.A, self.G = _isotropic(a_hat, init), _isotropic(g_hat, init)
        self.A.mul_(decay).add_(a_hat, alpha=1.0 - decay)
        self.G.mul_(decay).add_(g_hat, alpha=1.0 - decay)

    def dense_fisher(self) -> Tensor:
        """``A (x) G`` as a dense matrix (for tests and diagnostics; small layers only)."""
        A = torch.diag(self.A) if self.A.dim() == 1 else self.A
        if A.dim() == 3:  # grouped convolution: block-diagonal over groups (vec per group)
            return torch.block_diag(*[torch.kron(a, g) for a, g in zip(A, self.G)])
        return torch.kron(A, self.G)

    def memory_bytes(self) -> int:
        """Bytes held by the running factors and the decomposition."""
        tensors = [t for t in (self.A, self.G) if t is not None] + list(self.decomposition.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"damping": self.damping, "failures": self.failures}
        if self.A is not None:
            state["A"], state["G"] = self.A.clone(), self.G.clone()
        state["decomposition"] = {k: v.clone() for k, v in self.decomposition.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        device = self.kind.weight.device
        # "damping" is saved for inspection only: a layer's damping is configuration (damping,
        # layer_overrides); its adaptation over time is the preconditioner's DampingControl state.
        if "A" in state:
            self.A = state["A"].to(device=device, dtype=self.dtype).clone()
            self.G = state["G"].to(device=device, dtype=self.dtype).clone()
        self.decomposition = {k: v.to(device).clone()
                              for k, v in state.get("decomposition", {}).items()}
        self.failures = int(state.get("failures", 0))  # consecutive decomposition failures
