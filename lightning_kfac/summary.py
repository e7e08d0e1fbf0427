"""The registration summary: which modules K-FAC preconditions, which it skips and why.

Per preconditioned layer: each side's factor structure (core/factors.py; ``64x64 dense``,
``32000 diagonal``, with the reason a side is diagonal), the bytes held between steps (running
factors + decomposition in use) and the predicted time of one refresh of its decomposition.
The last line gives the totals and the predicted peak memory of a step, with the transients of
capture, decomposition and preconditioning (core/footprint.py).
"""

from __future__ import annotations

from torch import nn

from lightning_kfac.core.footprint import describe_side, footprint, held_bytes, refresh_seconds


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _seconds(t: float) -> str:
    return "<1 ms" if t < 1e-3 else (f"{1e3 * t:.0f} ms" if t < 1 else f"{t:.1f} s")


def predicted_memory_bytes(blocks: dict) -> int:
    """Bytes held between steps: running factors + decompositions in use (each side in its
    structure: d^2 dense, d diagonal; eigenvalue vectors; EKFAC's g_dim x a_dim scaling)."""
    return sum(held_bytes(block) for block in blocks.values())


def predicted_peak_bytes(blocks: dict) -> int:
    """Predicted peak bytes of a K-FAC step (core/footprint.py)."""
    return footprint(blocks.values()).peak


def skipped_rows(skipped: list, trainable: int, shown: int = 3) -> list[tuple[str, ...]]:
    """One row per (type, reason) of the skipped modules, with their count and share of the
    trainable parameters (a ResNet's 20 BatchNorm2d are one row, not 20).

    Columns as in the summary table: modules (the first ``shown`` names, ``+N more``), type,
    A, G, params, status.
    """
    groups: dict[tuple[str, str], list] = {}
    for s in skipped:
        groups.setdefault((s.type_name, s.reason), []).append(s)
    rows: list[tuple[str, ...]] = []
    for (type_name, reason), members in groups.items():
        names = [m.name or "<root>" for m in members[:shown]]
        if len(members) > shown:
            names.append(f"+{len(members) - shown} more")
        label = (
            ", ".join(names) if len(members) == 1 else f"{len(members)} modules: {', '.join(names)}"
        )
        params = sum(m.num_params for m in members)
        share = 100.0 * params / trainable if trainable else 0.0
        rows.append(
            (
                label,
                type_name,
                "-",
                "-",
                f"{params:,}",
                f"skipped: {reason} ({share:.1f}% of params)",
            )
        )
    return rows


def format_summary(model: nn.Module, blocks: dict, skipped: list) -> str:
    """A plain-text table of covered and skipped modules, with the share of parameters covered."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows: list[tuple[str, ...]] = [
        ("module", "type", "A", "G", "params", "memory", "refresh", "status")
    ]
    covered, refresh = 0, 0.0
    for name, block in blocks.items():
        module = block.kind.module
        n = sum(p.numel() for p in block.kind.params)
        frozen = not block.kind.weight.requires_grad  # core/trainability.py
        covered += 0 if frozen else n
        sides = [
            " ".join(describe_side(structure, block.structure_reason[side]))
            for side, structure in (("A", block.a_structure), ("G", block.g_structure))
        ]
        seconds = refresh_seconds(block)
        refresh += seconds
        method = block.method.name
        type_name = getattr(block.kind, "type_name", type(module).__name__)
        status = f"K-FAC ({method})"
        rows.append(
            (
                name or "<root>",
                type_name,
                sides[0],
                sides[1],
                f"{n:,}",
                _bytes(held_bytes(block)),
                _seconds(seconds),
                f"frozen (for now): {status} once trainable" if frozen else status,
            )
        )
    # skipped rows have no memory / refresh columns
    rows.extend((*r[:5], "-", "-", *r[5:]) for r in skipped_rows(skipped, trainable))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    share = 100.0 * covered / trainable if trainable else 0.0
    peak = footprint(blocks.values())
    lines.append(
        f"K-FAC preconditions {len(blocks)} layers: {covered:,} of {trainable:,} trainable "
        f"parameters ({share:.1f}%); factor + decomposition memory "
        f"{_bytes(predicted_memory_bytes(blocks))}, predicted peak {_bytes(peak.peak)} "
        f"(capture, decomposition and preconditioning temporaries included); one refresh "
        f"of every decomposition ~{_seconds(refresh)}."
    )
    return "\n".join(lines)
