"""Factor structure registry: name -> class, the names ``layer_overrides`` accepts.

Adding a structure is one new file with a ``FactorStructure`` subclass (core/factors.py documents
the interface; core/isotropic.py is the smallest example) and one line in ``STRUCTURES`` below.
"""

from __future__ import annotations

from lightning_kfac.core.factors import DenseFactor, DiagonalFactor, FactorStructure
from lightning_kfac.core.isotropic import IsotropicFactor

STRUCTURES: dict[str, type[FactorStructure]] = {
    DenseFactor.name: DenseFactor,
    DiagonalFactor.name: DiagonalFactor,
    IsotropicFactor.name: IsotropicFactor,
}


def make_structure(
    name: str, dim: int, groups: int = 1, *, option: str = "factor structure"
) -> FactorStructure:
    """A structure of dimension ``dim`` (``groups`` stacked) by its registered name."""
    try:
        cls = STRUCTURES[name]
    except KeyError:
        raise ValueError(
            f"Invalid {option}={name!r}: must be one of {sorted(STRUCTURES)} "
            "(core/structure_registry.py)."
        ) from None
    return cls(dim, groups)
