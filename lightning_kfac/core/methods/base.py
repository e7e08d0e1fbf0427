"""What a compute method is: one small interface, and its typed decomposition.

A compute method turns a layer's Kronecker factors ``A`` (a_dim x a_dim) and ``G``
(g_dim x g_dim) into a *decomposition* (refreshed every ``inv_update_steps``) and applies that
decomposition to the layer's gradient ``grad W~`` (g_dim x a_dim) at every step. Everything that
depends on the method lives in its class (``core/methods/<name>.py``):

- ``decompose(A, G, sa, sg, damping)``: the decomposition, a dataclass of tensors;
- ``precondition(grad, dec, damping, sa, sg, rows)``: ``P`` from ``grad`` (``rows``: the rank-R
  rows ``(Am, Gm)`` of ``grad = Gm^T Am`` when the low-rank path applies, core/lowrank.py);
- ``damping_in_decomposition``: True when the damping is baked into the decomposition
  (then ``precondition`` ignores its ``damping`` argument and a changed damping needs a new
  decomposition), False when it is applied at every step;
- ``needs_pairs``: True when the method needs each forward's input rows paired with the
  output-gradient rows of the same forward (EKFAC's per-example scaling);
- ``low_rank``: True when ``precondition`` can use the rank-R rows;
- ``layout(...)``: the tensors an owner rank sends to the others (core/kaisa.py), or None when
  the decomposition is never shared.

A decomposition is a dataclass whose field names are the keys of the plain dict saved in a
``state_dict`` (``to_state()`` writes it, ``from_state()`` reads it back: the keys are the
checkpoint format and never change; fields that are None are not written). It also reads like
that dict (``dec["QA"]``, ``"A_support_Q" in dec``, ``dec.get("QA")``), read-only: code that
changes a decomposition sets its fields.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_kfac.core import linalg
from lightning_kfac.core.factors import FactorStructure

#: One transferred tensor: state key, shape, dtype, column-major (see ``column_major``).
LayoutEntry = tuple[str, tuple[int, ...], torch.dtype, bool]
Layout = list[LayoutEntry]
#: The rank-R rows ``(Am, Gm)`` of a Linear layer's gradient ``grad = Gm^T Am`` (core/lowrank.py).
Rows = tuple[Tensor, Tensor]


#: Field metadata of a matrix LAPACK returns column-major (``eigh``'s eigenvectors, the Cholesky
#: inverse): ``field(metadata=COLUMN_MAJOR)``. Receivers of a transfer allocate it
#: column-major too, so that their matmuls see the owner's memory layout and give bit-identical
#: results. Other fields are stored row-major.
COLUMN_MAJOR: Mapping[str, bool] = {"column_major": True}


@dataclasses.dataclass(eq=False, kw_only=True)
class Decomposition(Mapping[str, Tensor]):
    """Base of every typed decomposition (a read-only mapping of its set fields).

    Attributes:
        damping_scale: ``damping_mode="relative"`` only: ``(tr A/dim A)(tr G/dim G)`` of the
            factors it was computed from (a float64 scalar), the scale of the absolute damping.
    """

    damping_scale: Tensor | None = None
    #: Fields changed in place between refreshes (EKFAC's scaling on factor-update steps):
    #: ``snapshot`` clones them, so an undone step (core/transaction.py) restores their values.
    updated_in_place: ClassVar[tuple[str, ...]] = ()

    def to_state(self) -> dict[str, Tensor]:
        """The checkpoint dict: ``{key: tensor}`` for every field that is set."""
        return {
            name: value for name in self.state_keys() if (value := getattr(self, name)) is not None
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> Self:
        """Read ``to_state``'s dict back; unknown keys are refused (a checkpoint of another
        method is detected by ``core/state_checks.py`` before this is called)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise ValueError(
                f"K-FAC: {cls.__name__} has no entries {unknown} (it holds {sorted(names)})."
            )
        return cls(**dict(state))

    @classmethod
    def state_keys(cls) -> tuple[str, ...]:
        """Every key the state of this type may hold, in the order ``to_state`` writes them."""
        return _state_keys(cls)

    @classmethod
    def is_column_major(cls, key: str) -> bool:
        """True when the field ``key`` holds a matrix produced column-major (LAPACK)."""
        for f in dataclasses.fields(cls):
            if f.name == key:
                return bool(f.metadata.get("column_major", False))
        raise KeyError(key)

    # -- read-only mapping view: the set fields, in ``to_state`` order -------------------------
    def __getitem__(self, key: str) -> Tensor:
        value = getattr(self, key, None)  # only fields hold tensors
        if not isinstance(value, Tensor):
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_state())

    def __len__(self) -> int:
        return len(self.to_state())

    def __bool__(self) -> bool:
        return True  # a decomposition in use (``block.decomposition`` is None when there is none)

    def tensors(self) -> list[Tensor]:
        """Every tensor held (for memory accounting)."""
        return list(self.to_state().values())

    def copy(self) -> Self:
        """A shallow copy: the same tensors, in a new object."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def snapshot(self) -> Self:
        """A shallow copy with the ``updated_in_place`` fields cloned (what undo keeps)."""
        copy = self.copy()
        for name in self.updated_in_place:
            value = getattr(self, name)
            if value is not None:
                setattr(copy, name, value.clone())
        return copy

    def cloned(self) -> Self:
        """A deep copy: every tensor cloned."""
        return type(self).from_state({k: v.clone() for k, v in self.to_state().items()})

    def to(self, device: torch.device) -> Self:
        """A copy with every tensor moved to ``device`` (and cloned)."""
        return type(self).from_state({k: v.to(device).clone() for k, v in self.to_state().items()})


@functools.cache
def _state_keys(cls: type[Decomposition]) -> tuple[str, ...]:
    names = [f.name for f in dataclasses.fields(cls)]
    # damping_scale (declared first, in the base) is written last, as it always was
    return tuple(
        [n for n in names if n != "damping_scale"] + [n for n in names if n == "damping_scale"]
    )


def layout_entry(
    cls: type[Decomposition], key: str, shape: tuple[int, ...], dtype: torch.dtype
) -> LayoutEntry:
    """One transfer entry; column-major only for a matrix the type declares column-major."""
    return (key, tuple(shape), dtype, cls.is_column_major(key) and len(shape) == 2)


class Method(ABC):
    """One compute method (eigen, inverse, ekfac...). Stateless: one instance per name.

    Class attributes:
        name: the ``compute_method`` value that selects it.
        decomposition_type: the dataclass its ``decompose`` returns.
        damping_in_decomposition: the damping is baked into the decomposition.
        needs_pairs: the capture must pair each forward's input rows with its gradient rows.
        low_rank: ``precondition`` can use the rank-R rows of a Linear layer's gradient.
    """

    name: ClassVar[str]
    decomposition_type: ClassVar[type[Decomposition]]
    damping_in_decomposition: ClassVar[bool] = False
    needs_pairs: ClassVar[bool] = False
    low_rank: ClassVar[bool] = False

    @abstractmethod
    def decompose(
        self, A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure, damping: float
    ) -> Decomposition:
        """The decomposition of ``A (x) G``; ``damping`` is used only when
        ``damping_in_decomposition`` (the layer's absolute damping at this step)."""

    @abstractmethod
    def precondition(
        self,
        grad: Tensor,
        dec: Decomposition,
        damping: float,
        sa: FactorStructure,
        sg: FactorStructure,
        rows: Rows | None = None,
    ) -> Tensor:
        """``P`` for ``grad`` (g_dim x a_dim). ``damping`` is the absolute damping in use (unused
        when ``damping_in_decomposition``); ``rows`` as in the module docstring."""

    def layout(
        self, sa: FactorStructure, sg: FactorStructure, dtype: torch.dtype, relative: bool
    ) -> Layout | None:
        """The tensors an owner sends (core/kaisa.py), or None: never shared (the default)."""
        return None

    # -- cost model (core/footprint.py, the summary); the defaults are the eigen method's -------
    #: Bytes held besides the decomposition's tensors of the method's element size (EKFAC: its
    #: float64 estimate count).
    extra_held_bytes: ClassVar[int] = 0

    def held_numel(self, sa: FactorStructure, sg: FactorStructure) -> int:
        """Elements of a decomposition of sides ``sa``, ``sg`` (in the factor dtype)."""
        return sa.eigen_numel() + sg.eigen_numel()

    def product_numel(self, sa: FactorStructure, sg: FactorStructure) -> int:
        """g_dim x a_dim tensors alive at the peak of one ``precondition``, the result included
        (eigen: the rotated gradient, the denominator, the divided one, one per side rotated
        back, dense sides only)."""
        return 2 + int(sa.has_basis) + int(sg.has_basis)

    @staticmethod
    def decompose_side(matrix: Tensor) -> None:
        """The dense kernel a refresh runs on one side (timed to predict refresh times)."""
        linalg.eigh_psd(matrix)

    def state_type(self, state: Mapping[str, Tensor]) -> type[Decomposition]:
        """The type to read a saved decomposition of this method with."""
        return self.decomposition_type

    def from_state(self, state: Mapping[str, Tensor]) -> Decomposition:
        return self.state_type(state).from_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def with_damping_scale(layout: Layout, relative: bool) -> Layout:
    """``layout`` plus the relative damping's float64 scale when ``relative``."""
    if relative:
        return [*layout, ("damping_scale", (), torch.float64, False)]
    return layout
