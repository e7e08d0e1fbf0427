"""Shared benchmark plumbing: threads, timing, machine rates, FLOP models, tables, JSON + PNG.

Every benchmark writes ``<out>/<name>.json`` (machine info, settings, rows) and ``<out>/<name>.png``
and prints its table as plain text. Timings are CPU wall-clock (``time.perf_counter``).

FLOP model of one K-FAC layer with ``d_in`` = a_dim (input features, +1 for a bias; conv: patch
size), ``d_out`` = g_dim and ``R`` rows per step (batch for Linear, batch x locations for conv):

- forward + backward: ``2 R d_in d_out`` each for the forward, the weight gradient and the input
  gradient (``6 B params`` for an MLP; the first layer needs no input gradient: 4);
- factor estimates ``A^, G^``: ``2 R (d_in^2 + d_out^2)``;
- preconditioning: 2 (inverse) or 4 (eigen) matmuls of a (d_out x d_in) matrix by a square
  factor: ``(2 or 4) d_in d_out (d_in + d_out)``;
- decompositions: ``9 d^3`` per factor (eigh, at the measured eigh rate) or ``d^3`` (Cholesky
  inverse, at the measured inverse rate).

The rates are measured in the same process just before a benchmark (a large matmul, eigh and
Cholesky inverse), so ``time / bound`` does not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_OUT = "bench_results"


def set_threads(tiny: bool = False, threads: int | None = None) -> int:
    """Use every core of the machine (``torch.set_num_threads(os.cpu_count())``) by default.

    ``tiny`` runs use one thread: their matrices are too small to gain from more, and a single
    thread is far less sensitive to other processes sharing the cores (smoke tests only).
    ``threads`` overrides both: on a machine shared with other jobs (load average above the core
    count) OpenMP's thread barriers can make multi-threaded steps 10-100x slower, so one thread
    is the fairer measurement there; the count used is recorded in every JSON.
    """
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"Invalid threads={threads!r}: must be an integer >= 1 or None.")
    count = threads if threads is not None else 1 if tiny else (os.cpu_count() or 1)
    torch.set_num_threads(count)
    return count


def cli(run, doc: str, argv=None) -> None:
    """The command line every benchmark module shares: ``--tiny``, ``--out``, ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    run(tiny=args.tiny, out=args.out, threads=args.threads)


def add_common_args(parser) -> None:
    """``--tiny``, ``--out`` and ``--threads``, shared by every benchmark's command line."""
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: every core; 1 with --tiny)",
    )


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def time_median(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, min_time: float = 0.0
) -> float:
    """Median wall-clock seconds of ``fn()`` over at least ``repeats`` calls (and at least
    ``min_time`` seconds in all), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def load_average() -> float:
    """1-minute load average (other processes sharing the cores make timings noisy)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


# ------------------------------------------------------------------------------------------------
# machine rates


@dataclass
class Rates:
    """Measured rates: flop/s of a square fp32 matmul (2 d^3 flops), of eigh (counted as 9 d^3)
    and of the damped Cholesky inverse (counted as d^3)."""

    matmul: float
    eigh: float
    inverse: float
    sizes: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "matmul_gflops": self.matmul / 1e9,
            "eigh_gflops": self.eigh / 1e9,
            "inverse_gflops": self.inverse / 1e9,
            "sizes": self.sizes,
        }


def _spd(d: int, gen: torch.Generator) -> Tensor:
    x = torch.randn(d, 2 * d, generator=gen)
    return x @ x.T / (2 * d) + 1e-3 * torch.eye(d)


def measure_rates(
    matmul_size: int = 2048, decomp_size: int = 1024, repeats: int = 5, min_time: float = 0.2
) -> Rates:
    """Time a large matmul, eigh and Cholesky inverse (the engine's ops) in float32."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(matmul_size, matmul_size, generator=gen)
    b = torch.randn(matmul_size, matmul_size, generator=gen)
    time_median(lambda: a @ b, 1, warmup=0, min_time=1.5 * min_time)  # wake threads / clocks
    t_mm = time_median(lambda: a @ b, repeats, min_time=min_time)
    s = _spd(decomp_size, gen)
    t_eigh = time_median(lambda: torch.linalg.eigh(s), repeats, min_time=min_time)

    def inv():
        chol, _ = torch.linalg.cholesky_ex(s)
        return torch.cholesky_inverse(chol)

    t_inv = time_median(inv, repeats, min_time=min_time)
    d = decomp_size
    return Rates(
        matmul=2 * matmul_size**3 / t_mm,
        eigh=9 * d**3 / t_eigh,
        inverse=d**3 / t_inv,
        sizes={"matmul": matmul_size, "decomposition": d},
    )


# ------------------------------------------------------------------------------------------------
# layer shapes and the FLOP lower bound


@dataclass
class LayerShape:
    name: str
    d_in: int  # a_dim: input features (+1 for bias); conv: C_in * prod(kernel) (+1)
    d_out: int  # g_dim
    rows: int  # rows per step: batch (Linear) or batch x output locations (conv)
    weight_cols: int  # weight columns without the bias (MACs per row per output)
    needs_input_grad: bool


def layer_shapes(model: nn.Module, run_forward: Callable[[], Any]) -> list[LayerShape]:
    """Shapes of every Linear / Conv layer seen in one forward pass (in call order)."""
    shapes: list[LayerShape] = []
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue

        def hook(mod, args, out, name=name):
            w = mod.weight
            cols = w[0].numel()
            rows = (
                out.numel() // out.shape[1]
                if not isinstance(mod, nn.Linear)
                else out.numel() // out.shape[-1]
            )
            bias = 1 if mod.bias is not None else 0
            shapes.append(
                LayerShape(name, cols + bias, w.shape[0], rows, cols, bool(args[0].requires_grad))
            )

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    # under no_grad nothing requires grad: only the first layer's input is data
    for i, s in enumerate(shapes):
        s.needs_input_grad = i > 0
    return shapes


def flop_bound(
    shapes: Sequence[LayerShape],
    rates: Rates,
    *,
    method: str | None,
    factor_every: int = 1,
    inv_every: int = 1,
) -> dict[str, float]:
    """Lower-bound seconds per step, by part: fwd_bwd, factors, precondition, decompositions.

    ``method=None`` is the plain optimizer (forward + backward only). Factor and decomposition
    costs are amortized over their clocks (``/factor_every``, ``/inv_every``).
    """
    fwd_bwd = sum(
        2 * s.rows * s.weight_cols * s.d_out * (3 if s.needs_input_grad else 2) for s in shapes
    )
    out = {
        "fwd_bwd": fwd_bwd / rates.matmul,
        "factors": 0.0,
        "precondition": 0.0,
        "decompositions": 0.0,
    }
    if method is not None:
        factors = sum(2 * s.rows * (s.d_in**2 + s.d_out**2) for s in shapes)
        matmuls = 4 if method == "eigen" else 2
        precond = sum(matmuls * s.d_in * s.d_out * (s.d_in + s.d_out) for s in shapes)
        cubes = sum(s.d_in**3 + s.d_out**3 for s in shapes)
        decomp = 9 * cubes / rates.eigh if method == "eigen" else cubes / rates.inverse
        out["factors"] = factors / rates.matmul / factor_every
        out["precondition"] = precond / rates.matmul
        out["decompositions"] = decomp / inv_every
    out["total"] = sum(out.values())
    return out


def factor_bytes(shapes: Sequence[LayerShape], bytes_per: int = 4) -> int:
    """Memory of the running factors: ``sum (d_in^2 + d_out^2) x bytes``."""
    return sum((s.d_in**2 + s.d_out**2) * bytes_per for s in shapes)


# ------------------------------------------------------------------------------------------------
# output


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 0.01:
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """A plain-text table, one line per row, columns padded to their widest entry."""
    cells = [[c for c in columns]] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for j, row in enumerate(cells):
        lines.append(
            "  ".join(cell.rjust(w) if j else cell.ljust(w) for cell, w in zip(row, widths))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return path


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_figure(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x) (the fitted scaling exponent)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
