"""The registration summary: which modules K-FAC preconditions, which it skips and why.

Memory per preconditioned layer: the running factors hold ``(d_A^2 + d_G^2)`` numbers; the
decomposition in use holds as many again (eigen: eigenvectors + eigenvalues; inverse: inverses).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from torch import nn


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def predicted_memory_bytes(blocks: Dict) -> int:
    """Factors + decompositions: ``sum (d_A^2 + d_G^2) * bytes * 2`` (+ eigenvalue vectors)."""
    total = 0
    for block in blocks.values():
        a, g = block.kind.a_dim(), block.kind.g_dim()
        item = 8 if str(block.dtype) == "torch.float64" else 4
        a_numel = a if block.kind.diagonal_a else a * a  # nn.Embedding keeps A's diagonal
        # eigenvalue vectors; EKFAC also keeps its (d_G x d_A) eigenbasis scaling
        extra = {"eigen": a + g, "ekfac": a + g + g * a}.get(block.compute_method, 0)
        total += (2 * (a_numel + g * g) + extra) * item * getattr(block.kind, "groups", 1)
        total += 8 if block.compute_method == "ekfac" else 0  # float64 count of scaling estimates
    return total


def skipped_rows(skipped: List, trainable: int, shown: int = 3) -> List[Tuple[str, ...]]:
    """One row per (type, reason) of the skipped modules, with their count and share of the
    trainable parameters (a ResNet's 20 BatchNorm2d are one row, not 20).

    Columns as in the summary table: modules (the first ``shown`` names, ``+N more``), type,
    A, G, params, status.
    """
    groups: Dict[Tuple[str, str], List] = {}
    for s in skipped:
        groups.setdefault((s.type_name, s.reason), []).append(s)
    rows = []
    for (type_name, reason), members in groups.items():
        names = [m.name or "<root>" for m in members[:shown]]
        if len(members) > shown:
            names.append(f"+{len(members) - shown} more")
        label = ", ".join(names) if len(members) == 1 else \
            f"{len(members)} modules: {', '.join(names)}"
        params = sum(m.num_params for m in members)
        share = 100.0 * params / trainable if trainable else 0.0
        rows.append((label, type_name, "-", "-", f"{params:,}",
                     f"skipped: {reason} ({share:.1f}% of params)"))
    return rows


def format_summary(model: nn.Module, blocks: Dict, skipped: List) -> str:
    """A plain-text table of covered and skipped modules, with the share of parameters covered."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [("module", "type", "A", "G", "params", "status")]
    covered = 0
    for name, block in blocks.items():
        module = block.kind.module
        n = sum(p.numel() for p in block.kind.params)
        frozen = not block.kind.weight.requires_grad  # core/trainability.py
        covered += 0 if frozen else n
        a, g = block.kind.a_dim(), block.kind.g_dim()
        a_shape = f"{a} (diag)" if block.kind.diagonal_a else f"{a}x{a}"
        g_shape, groups = f"{g}x{g}", getattr(block.kind, "groups", 1)
        if groups > 1:  # grouped convolution: one factor pair per group
            a_shape, g_shape = f"{groups} x {a_shape}", f"{groups} x {g_shape}"
        type_name = getattr(block.kind, "type_name", type(module).__name__)
        status = f"K-FAC ({block.compute_method})"
        rows.append((name or "<root>", type_name, a_shape, g_shape, f"{n:,}",
                     f"frozen (for now): {status} once trainable" if frozen else status))
    rows.extend(skipped_rows(skipped, trainable))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    share = 100.0 * covered / trainable if trainable else 0.0
    lines.append(f"K-FAC preconditions {len(blocks)} layers: {covered:,} of {trainable:,} trainable "
                 f"parameters ({share:.1f}%); factor + decomposition memory "
                 f"{_bytes(predicted_memory_bytes(blocks))}.")
    return "\n".join(lines)
