"""KFACBlock: one preconditioned layer's factors, accumulators and decomposition.

Accumulators hold the row sums ``sum a a^T`` and ``sum g g^T`` (and their divisors) of every
captured micro-batch since the last factor update; ``batch_estimates()`` turns them into
``A^ = sum a a^T / div_A`` and ``G^ = sum g g^T / div_G``. Running averages
``A <- decay A + (1 - decay) A^`` (Martens & Grosse 2015, sec. 5); what they start from is
``factor_init``: ``batch`` sets ``A = A^`` at the first update (no bias toward zero or identity),
``identity`` starts from ``I`` and ``scaled_identity`` from ``(tr A^/dim) I`` and blends the first
estimate in like any later one (so early steps are damped toward a scaled first-order step).

Each side has a factor structure (core/factors.py: dense, or diagonal for nn.Embedding's A and for
sides wider than ``max_dense_dim``); ``A``, ``G``, their accumulators and batch estimates are
stored in it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_kfac.core.factors import DenseFactor, DiagonalFactor, FactorStructure
from lightning_kfac.core.layers import LayerKind
from lightning_kfac.core.methods import Decomposition, method_for, method_of_state
from lightning_kfac.core.structure_registry import make_structure


def natural_structures(
    kind: LayerKind, max_dense_dim: int, a_name: str | None = None, g_name: str | None = None
) -> tuple[FactorStructure, FactorStructure]:
    """``(A side, G side)``: dense up to ``max_dense_dim``, diagonal above; a kind whose A is
    diagonal by construction (nn.Embedding's one-hot inputs) keeps A diagonal at any size.
    ``a_name`` / ``g_name`` (``layer_overrides``' ``a_structure`` / ``g_structure``) choose a
    registered structure (core/structure_registry.py) instead."""
    groups = int(getattr(kind, "groups", 1))
    diagonal_a = bool(getattr(kind, "diagonal_a", False))

    def side(dim: int, diagonal: bool, name: str | None, option: str) -> FactorStructure:
        if name is not None:
            chosen = make_structure(name, dim, groups, option=option)
            if diagonal and chosen.has_basis:
                raise ValueError(
                    f"Invalid {option}={name!r} for {type(kind.module).__name__}: "
                    "its A is diagonal by construction (one-hot inputs); allowed: "
                    "structures without a basis ('diagonal', 'isotropic')."
                )
            return chosen
        return (
            DiagonalFactor(dim, groups)
            if diagonal or dim > max_dense_dim
            else DenseFactor(dim, groups)
        )

    return (
        side(kind.a_dim(), diagonal_a, a_name, "layer_overrides.a_structure"),
        side(kind.g_dim(), False, g_name, "layer_overrides.g_structure"),
    )


class KFACBlock:
    """State of one layer. ``A``/``G`` are None until the first factor update."""

    def __init__(
        self,
        name: str,
        kind: LayerKind,
        dtype: torch.dtype,
        *,
        damping: float,
        compute_method: str,
        factor_update_steps: int,
        inv_update_steps: int,
        max_dense_dim: int | None = None,
        a_structure: str | None = None,
        g_structure: str | None = None,
    ):
        self.name = name
        self.kind = kind
        self.dtype = dtype
        self.damping = damping
        self.method = method_for(compute_method)  # core/methods: chosen once, here
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        limit = max(kind.a_dim(), kind.g_dim()) if max_dense_dim is None else max_dense_dim
        self.max_dense_dim = limit
        self.a_structure, self.g_structure = natural_structures(
            kind, limit, a_structure, g_structure
        )
        # why a side is diagonal, for the summary ("" for nn.Embedding's A: exact, not a choice)
        chosen = {"A": a_structure, "G": g_structure}
        self.structure_reason = {
            side: (
                "layer_overrides"
                if chosen[side] is not None
                else f"> max_dense_dim={limit}"
                if not structure.has_basis
                and structure.dim > limit
                and not (side == "A" and getattr(kind, "diagonal_a", False))
                else ""
            )
            for side, structure in (("A", self.a_structure), ("G", self.g_structure))
        }
        self.capturing = False  # switched by the preconditioner's factor clock
        self.failures = 0  # consecutive failed decompositions
        self.row_limit = 0  # > 0: keep this step's a/g rows for low-rank preconditioning
        self.clear_rows()
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.decomposition: Decomposition | None = None  # the one in use (None: none yet)
        self.seen = False  # the forward hook fired at least once in a training forward
        self.reset_accumulators()

    @property
    def compute_method(self) -> str:
        """The registered name of the layer's compute method (for summaries and messages)."""
        return self.method.name

    def clear_rows(self) -> None:
        """Drop the rows kept for the low-rank path (core/lowrank.py)."""
        self.a_rows: list[Tensor] = []
        self.g_rows: list[Tensor] = []
        self.kept_rows = 0

    # -- accumulation --------------------------------------------------------------------------
    def reset_accumulators(self) -> None:
        self.a_sum: Tensor | None = None
        self.a_div = 0
        self.g_sum: Tensor | None = None
        self.g_div = 0

    def add_a(self, rows: Tensor, divisor: int, scale: float = 1.0) -> None:
        """Add ``scale^2 sum a a^T`` of dense, per-group or one-hot index rows (layers.py)."""
        # Hooks run inside the forward's autocast region: keep the outer products in self.dtype.
        with torch.autocast(rows.device.type, enabled=False):
            self.a_sum = self.a_structure.accumulate(self.a_sum, rows, self.dtype, scale)
        self.a_div += divisor

    def add_g(self, rows: Tensor, divisor: int, scale: float) -> None:
        with torch.autocast(rows.device.type, enabled=False):
            self.g_sum = self.g_structure.accumulate(self.g_sum, rows, self.dtype, scale)
        self.g_div += divisor

    def has_estimates(self) -> bool:
        return self.a_sum is not None and self.g_sum is not None

    def batch_estimates(self) -> tuple[Tensor, Tensor]:
        """``(A^, G^)``; zeros when nothing was captured (the caller checks ``has_estimates``)."""
        device = self.kind.weight.device
        if self.a_sum is None or self.g_sum is None:  # not has_estimates()
            return (
                self.a_structure.zeros(self.dtype, device),
                self.g_structure.zeros(self.dtype, device),
            )
        return self.a_sum / self.a_div, self.g_sum / self.g_div

    # -- running averages ----------------------------------------------------------------------
    def update_factors(
        self, a_hat: Tensor, g_hat: Tensor, decay: float, init: str = "batch"
    ) -> None:
        """Running averages; ``init`` (``factor_init``) sets what the first update starts from."""
        if self.A is None or self.G is None:  # set together: both None before the first update
            if init == "batch":
                self.A, self.G = a_hat.clone(), g_hat.clone()
                return
            self.A = self.a_structure.isotropic(a_hat, init)
            self.G = self.g_structure.isotropic(g_hat, init)
        self.A.mul_(decay).add_(a_hat, alpha=1.0 - decay)
        self.G.mul_(decay).add_(g_hat, alpha=1.0 - decay)

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        """``(A, G)`` as dense matrices (copies); a diagonal side becomes ``diag(F)``."""
        if self.A is None or self.G is None:
            raise RuntimeError(f"K-FAC: layer {self.name!r} has no running factors yet")
        return self.a_structure.to_matrix(self.A), self.g_structure.to_matrix(self.G)

    def set_structures(self, a_structure: FactorStructure, g_structure: FactorStructure) -> None:
        """Change the sides' structures (before any factor exists: nothing is converted)."""
        if self.A is not None or self.a_sum is not None or self.g_sum is not None:
            raise RuntimeError(
                f"K-FAC: layer {self.name!r} already has factors; its factor "
                "structure can only be chosen before the first capture."
            )
        self.a_structure, self.g_structure = a_structure, g_structure

    def memory_bytes(self) -> int:
        """Bytes held by the running factors and the decomposition."""
        tensors = [t for t in (self.A, self.G) if t is not None]
        if self.decomposition is not None:
            tensors += self.decomposition.tensors()
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "damping": self.damping,
            "failures": self.failures,
            "structures": (self.a_structure.name, self.g_structure.name),
        }
        if self.A is not None and self.G is not None:  # set together
            state["A"], state["G"] = self.A.clone(), self.G.clone()
        dec = self.decomposition
        state["decomposition"] = (
            {} if dec is None else {k: v.clone() for k, v in dec.to_state().items()}
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.kind.weight.device
        # "damping" is saved for inspection only: a layer's damping is configuration (damping,
        # layer_overrides); its adaptation over time is the preconditioner's DampingControl state.
        saved = tuple(state.get("structures", (self.a_structure.name, self.g_structure.name)))
        here = (self.a_structure.name, self.g_structure.name)
        if saved != here:
            raise ValueError(
                f"K-FAC state of layer {self.name!r} has factor structures (A, G) = {saved}, "
                f"this run chose {here}: set max_dense_dim / memory_budget_gib as in the run "
                "that saved it."
            )
        if "A" in state:
            self.A = state["A"].to(device=device, dtype=self.dtype).clone()
            self.G = state["G"].to(device=device, dtype=self.dtype).clone()
        # read with the type of the method that saved it (a changed compute_method is
        # recomputed by the engine right after loading: core/state_checks.py)
        saved_dec = {k: v.to(device).clone() for k, v in state.get("decomposition", {}).items()}
        method = method_of_state(saved_dec)
        self.decomposition = None if method is None else method.from_state(saved_dec)
        self.failures = int(state.get("failures", 0))  # consecutive decomposition failures
