"""Benchmark 3: cost of factor updates, decompositions and preconditioning vs width and batch.

One ``Linear(d, d)`` layer (with bias: ``A`` is (d+1) x (d+1), ``G`` d x d) under the plain
PyTorch engine. The step clock selects what a step does (``factor_update_steps=2``,
``inv_update_steps=4``): ``t = 4k`` updates factors and decomposes, ``t = 4k + 2`` updates
factors only, odd ``t`` only preconditions; a "plain" step is the same forward/backward without
capture or ``pre.step``. Medians over interleaved repetitions, then differences:

- factors = (factor step) - (precondition step): the capture hooks' ``sum a a^T``, ``sum g g^T``
  plus the running average; expected O(N d^2) -> exponent 2 in width, 1 in batch;
- decomposition = (decomposition step) - (factor step): eigh (eigen) or Cholesky inverse
  (inverse) of both factors; O(d^3) -> 3 in width, 0 in batch;
- precondition = (precondition step) - (plain step): 4 (eigen) or 2 (inverse) d^3 matmuls plus
  the KL clip; O(d^3) -> 3 in width, 0 in batch.

Exponents are least-squares slopes in log-log, over every size (``exponent``) and over the
three largest (``exponent_top3``: closer to the asymptote, where fixed per-call overheads no
longer dominate). Differences below timer noise are clamped to 1e-4 ms (flagged in ``clamped``).

    python -m benchmarks.scaling [--tiny] [--out bench_results]
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from benchmarks import common
from lightning_kfac import KFACPreconditioner

NAME = "scaling"
COLUMNS = [
    "sweep",
    "width",
    "batch",
    "method",
    "plain_ms",
    "factors_ms",
    "decomposition_ms",
    "precondition_ms",
    "clamped",
]
FIT_COLUMNS = ["sweep", "method", "component", "exponent", "exponent_top3", "expected"]
COMPONENTS = ("factors", "decomposition", "precondition")
EXPECTED = {
    "width": {"factors": 2, "decomposition": 3, "precondition": 3},
    "batch": {"factors": 1, "decomposition": 0, "precondition": 0},
}
_CLOCK = {"plain": 1, "precondition": 1, "factors": 2, "decomposition": 0}  # t mod 4
_FLOOR_MS = 1e-4


def measure(width: int, batch: int, method: str, reps: int, min_time: float) -> dict[str, Any]:
    """Median step time of each step type and the component costs (ms)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width))
    x = torch.randn(batch, width)
    pre = KFACPreconditioner(
        model, compute_method=method, damping=1e-2, factor_update_steps=2, inv_update_steps=4
    )

    def step(kind: str, k: int) -> float:
        pre.set_step(4 * k + _CLOCK[kind])
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        if kind != "plain":
            pre.step()
        return time.perf_counter() - start

    kinds = ("decomposition", "factors", "precondition", "plain")  # first: a decomposition exists
    for k in range(2):
        for kind in kinds:
            step(kind, k)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    k = 2
    while k - 2 < reps or sum(times["decomposition"]) + sum(times["plain"]) < min_time:
        for kind in kinds:
            times[kind].append(step(kind, k))
        k += 1
    pre.remove()
    med = {kind: 1e3 * common.median(v) for kind, v in times.items()}
    raw = {
        "factors": med["factors"] - med["precondition"],
        "decomposition": med["decomposition"] - med["factors"],
        "precondition": med["precondition"] - med["plain"],
    }
    row = {
        "width": width,
        "batch": batch,
        "method": method,
        "plain_ms": med["plain"],
        "reps": len(times["plain"]),
    }
    clamped = []
    for comp, value in raw.items():
        if value < _FLOOR_MS:
            clamped.append(comp)
        row[f"{comp}_ms"] = max(value, _FLOOR_MS)
    row["clamped"] = ",".join(clamped) or "-"
    return row


def fit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fits = []
    for sweep in ("width", "batch"):
        for method in sorted({r["method"] for r in rows}):
            sel = [r for r in rows if r["sweep"] == sweep and r["method"] == method]
            for comp in COMPONENTS:
                xs, ys = [r[sweep] for r in sel], [r[f"{comp}_ms"] for r in sel]
                fits.append(
                    {
                        "sweep": sweep,
                        "method": method,
                        "component": comp,
                        "exponent": common.loglog_slope(xs, ys),
                        "exponent_top3": common.loglog_slope(xs[-3:], ys[-3:]),
                        "expected": EXPECTED[sweep][comp],
                    }
                )
    return fits


def _plot(rows: list[dict[str, Any]], out: str) -> str:
    fig, axes = common.new_figure(ncols=2, width=5.5)
    styles = {"eigen": "-", "inverse": "--"}
    colors = {"factors": "tab:blue", "decomposition": "tab:red", "precondition": "tab:green"}
    for ax, sweep in zip(axes, ("width", "batch")):
        for method in ("eigen", "inverse"):
            sel = [r for r in rows if r["sweep"] == sweep and r["method"] == method]
            for comp in COMPONENTS:
                ax.plot(
                    [r[sweep] for r in sel],
                    [r[f"{comp}_ms"] for r in sel],
                    styles[method],
                    color=colors[comp],
                    marker="o",
                    ms=3,
                    label=f"{comp} ({method})",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("layer width d" if sweep == "width" else "batch size N")
        ax.set_ylabel("ms per step")
        ax.set_title(f"cost vs {sweep}")
    axes[0].legend(fontsize=7)
    return common.save_figure(fig, out, NAME)


def run(
    tiny: bool = False, out: str = common.DEFAULT_OUT, threads: int | None = None
) -> dict[str, Any]:
    threads = common.set_threads(tiny, threads)
    if tiny:
        widths, batches = [32, 64, 128], [16, 32, 64]
        fixed_width, fixed_batch, reps, min_time = 64, 32, 5, 0.0
    else:
        widths, batches = [128, 256, 512, 1024, 2048], [32, 64, 128, 256, 512, 1024, 2048]
        fixed_width, fixed_batch, reps, min_time = 512, 128, 20, 0.5
    rows = []
    for method in ("eigen", "inverse"):
        for width in widths:
            rows.append({"sweep": "width", **measure(width, fixed_batch, method, reps, min_time)})
        for batch in batches:
            rows.append({"sweep": "batch", **measure(fixed_width, batch, method, reps, min_time)})
    fits = fit(rows)
    title = (
        f"scaling ({'tiny' if tiny else 'full'}; {threads} threads; load "
        f"{common.load_average():.1f}; ms per step; width sweep at batch {fixed_batch}, "
        f"batch sweep at width {fixed_width})"
    )
    print(common.format_table(rows, COLUMNS, title), flush=True)
    print(common.format_table(fits, FIT_COLUMNS, "fitted log-log exponents"), flush=True)
    payload = {
        "benchmark": NAME,
        "tiny": tiny,
        "machine": common.machine_info(),
        "columns": COLUMNS,
        "rows": rows,
        "fit_columns": FIT_COLUMNS,
        "fits": fits,
    }
    payload["json"] = common.write_json(out, NAME, payload)
    payload["png"] = _plot(rows, out)
    return payload


def main(argv: list[str] | None = None) -> None:
    common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
