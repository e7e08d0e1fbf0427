"""Predicted memory and refresh time of the K-FAC state, from the layers' factor structures.

Memory (numbers of elements x element size, per layer ``i`` with sides of structures s_A, s_G,
core/factors.py):

- held between steps ``H_i``: running factors ``F_i`` (d^2 per dense side, d per diagonal side)
  plus the decomposition in use ``D_i`` (eigen: ``Q`` and ``e``; inverse: the damped inverses;
  EKFAC: eigen plus the g_dim x a_dim scaling). ``held_bytes`` is exactly what the engine keeps.
- the peak of a step is the largest of four phases (``F = sum F_i``, ``D = sum D_i``):

  - capture (forward/backward of a factor-update step): ``F + D`` held, the accumulators ``F``,
    and one micro-batch's outer product (d^2 for the widest dense side);
  - factor update: ``F + D`` held, all batch estimates ``F`` (they are all-reduced together) and
    one more estimate while its accumulator is freed (``max_i F_i``);
  - decomposition: ``F + D`` held (the old decomposition lives until the new one replaces it),
    plus one layer's new decomposition and its workspace (eigen: symmetrised copy, eigh's
    working copy and LAPACK workspace: ~3 d^2 besides the result for the widest dense side,
    eigen or inverse);
  - preconditioning: ``F + D`` held, every layer's preconditioned gradient (g_dim x a_dim) and
    its ``[W b]`` copy (layers with a bias) until the KL clip is known, plus the temporaries of
    one layer's product (eigen: 1 + one per dense side, in units of g_dim x a_dim; inverse: 1).

  During ``step()`` the undo record (core/transaction.py) adds ``2 F``: the captured
  accumulators and a copy of the factors the step updates.

  Not included: tensors proportional to the batch (the captured rows, their float32 copies,
  EKFAC's kept rows), which the model's own activations already exceed.

Refresh time: one eigendecomposition (or Cholesky inverse) of a dense d x d side costs
``rate * d^3``; the rate is measured once per process, device and dtype on a 256 x 256 matrix
(CPU: process CPU time summed over threads, steadier than wall time on a shared machine; CUDA:
synchronized wall time). A diagonal side costs O(d) (nothing, at this resolution). On the 2-core
development machine the d^3 law from d = 256 is within ~2x of measured eighs up to d = 4096
(CPU seconds: 0.014 at 256, 3.3 at 2048, 36 at 4096).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_kfac.core.methods import Method

if TYPE_CHECKING:
    from lightning_kfac.core.blocks import KFACBlock
    from lightning_kfac.core.factors import FactorStructure

_CALIBRATION_DIM = 256


def _item(block: KFACBlock) -> int:
    return torch.empty((), dtype=block.dtype).element_size()


def _method(block: KFACBlock) -> Method:
    return block.method  # core/methods: the cost model of the block's compute method


def factor_numel(block: KFACBlock) -> int:
    return block.a_structure.numel() + block.g_structure.numel()


def decomposition_numel(block: KFACBlock) -> int:
    return _method(block).held_numel(block.a_structure, block.g_structure)


def held_bytes(block: KFACBlock) -> int:
    """Bytes of the running factors and the decomposition in use (between steps); EKFAC also
    keeps a float64 count of the scaling estimates since its last refresh (core/ekfac.py)."""
    counter = _method(block).extra_held_bytes
    return (factor_numel(block) + decomposition_numel(block)) * _item(block) + counter


def _grad_numel(block: KFACBlock) -> int:
    return block.a_structure.groups * block.g_structure.dim * block.a_structure.dim


def _product_numel(block: KFACBlock) -> int:
    """g_dim x a_dim tensors alive at the peak of one layer's product, the result included:
    eigen / EKFAC: the rotated gradient, the denominator, the divided one, one per side rotated
    back (dense sides only); inverse: ``G_inv grad`` and the result."""
    return _method(block).product_numel(block.a_structure, block.g_structure)


@dataclass
class Footprint:
    """Predicted bytes: ``held`` between steps and the ``peak`` of a step, with its phases."""

    held: int
    peak: int
    phases: dict[str, int]


def footprint(blocks: Iterable[KFACBlock]) -> Footprint:
    """The memory model of the module docstring for a set of blocks."""
    blocks = list(blocks)
    F = sum(factor_numel(b) * _item(b) for b in blocks)
    D = sum(decomposition_numel(b) * _item(b) for b in blocks)
    held = F + D
    if not blocks:
        return Footprint(0, 0, {})
    capture = max(
        max(b.a_structure.capture_transient_numel(), b.g_structure.capture_transient_numel())
        * _item(b)
        for b in blocks
    )
    capture += sum(_grad_numel(b) * _item(b) for b in blocks if _method(b).needs_pairs)
    one_estimate = max(max(b.a_structure.numel(), b.g_structure.numel()) * _item(b) for b in blocks)
    decompose = max(
        (
            decomposition_numel(b)
            + max(
                b.a_structure.decompose_transient_numel(_method(b).name),
                b.g_structure.decompose_transient_numel(_method(b).name),
            )
        )
        * _item(b)
        for b in blocks
    )
    buffers = sum((1 + int(b.kind.has_bias)) * _grad_numel(b) * _item(b) for b in blocks)
    product = max(max(_product_numel(b) - 1, 1) * _grad_numel(b) * _item(b) for b in blocks)
    # the step's undo record (core/transaction.py) keeps the captured accumulators and a copy of
    # the factors it updates until the step completes: 2 F during every phase of ``step()``
    undo = 2 * F
    phases = {
        "capture": held + F + capture,
        "factor update": held + undo + F + one_estimate,
        "decomposition": held + undo + decompose,
        "preconditioning": held + undo + buffers + product,
    }
    return Footprint(held, max(phases.values()), phases)


def layer_peak_share(block: KFACBlock) -> int:
    """One layer's own contribution to the peak (for naming the layers that do not fit)."""
    return footprint([block]).peak


def _no_sync() -> None:
    """Nothing to wait for on the CPU."""


# -- refresh time ----------------------------------------------------------------------------------
@functools.cache
def _seconds_per_cube(kernel: Callable[[Tensor], None], device: str, dtype: torch.dtype) -> float:
    """Seconds per d^3 of one dense decomposition, measured at d = 256 (median of 3)."""
    d = _CALIBRATION_DIM
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, d, generator=gen, dtype=dtype).to(device)
    m = x @ x.T / d
    cuda = device.startswith("cuda")
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else _no_sync
    clock = time.perf_counter if cuda else time.process_time  # CPU: all threads' CPU time
    times = []
    for _ in range(4):  # the first run pays one-off library loading: dropped
        sync()
        start = clock()
        kernel(m)
        sync()
        times.append(clock() - start)
    return statistics.median(times[1:]) / d**3


def refresh_seconds(block: KFACBlock) -> float:
    """Predicted seconds of one decomposition of this layer (dense sides only: ``rate * d^3``)."""
    method = _method(block)
    device = str(block.kind.module.weight.device)
    cubes = sum(s.groups * s.dim**3 for s in (block.a_structure, block.g_structure) if s.has_basis)
    if cubes == 0:
        return 0.0
    # cached per kernel: methods that run the same one (eigen, EKFAC) share one calibration
    return _seconds_per_cube(method.decompose_side, device, block.dtype) * cubes


def describe_side(structure: FactorStructure, reason: str) -> tuple[str, str]:
    """``("64x64", "dense")`` / ``("32000", "diagonal (> max_dense_dim)")`` for the summary; a
    grouped side reads ``"8 x 9x9"`` (one factor per group)."""
    d = structure.dim
    shape = f"{d}x{d}" if structure.has_basis else str(d)
    if structure.groups > 1:
        shape = f"{structure.groups} x {shape}"
    return shape, structure.name + (f" ({reason})" if reason else "")
