"""The engine's per-step checks, old against new, side by side:
``python -m benchmarks.check_costs``.

Times (one thread, ``time.thread_time``, interleaved repetitions, medians in ms) the checks that
a K-FAC step runs besides its matmuls, on the shapes where they cost most:

- the low-rank exactness check ``lowrank.gradient_matches`` at R = 128 rows against a
  1000 x 785 (the step-overhead MLP's first layer) and a 2048 x 2049 gradient (the scaling
  benchmark's widest Linear): the single random probe it used first (``single_probe``: cheap,
  but it let L2 penalties up to ~1e-5 through), the entrywise check as it was (``entrywise_v1``:
  the whole residual matrix, then a full ``nonzero`` scan) and the current blockwise one; next
  to them the rank-R product it guards and the full product it replaces (inverse method);
- the finiteness test ``torch.isfinite(t).all()`` against ``linalg.all_finite`` (one
  ``aminmax`` pass) on a 1000 x 785 gradient and a 2304- and a 4608-wide factor;
- the step statistics of ``_precondition`` per layer as they were (``isfinite`` + three sums
  with temporaries) and as they are (``<P, g>`` as before, the two norms by ``dot``, finiteness
  from ``|P|^2``).

The old versions are reproduced here verbatim (they are gone from the engine) so that both run
in one process on the same data.

    python -m benchmarks.check_costs [--repeats 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_kfac.core import linalg, lowrank


def single_probe(grad: Tensor, am: Tensor, gm: Tensor) -> bool:
    """The first low-rank check: one random probe (Freivalds), tolerance scaled by sqrt(R + d)."""
    v = torch.randn(grad.shape[1], 1, dtype=grad.dtype)
    lhs, rhs = grad @ v, gm.T @ (am @ v)
    eps = torch.finfo(grad.dtype).eps
    scale = float((gm.abs().T @ (am.abs() @ v.abs())).max())
    tol = 64.0 * eps * math.sqrt(am.shape[0] + am.shape[1]) * max(scale, 1e-30)
    return bool(torch.isfinite(lhs).all()) and float((lhs - rhs).abs().max()) <= tol


def entrywise_v1(grad: Tensor, am: Tensor, gm: Tensor) -> bool:
    """The entrywise check before this round: whole residual matrix, full ``nonzero`` scan."""
    finfo = torch.finfo(grad.dtype)
    c = (am.shape[0] + 2) * finfo.eps
    quick = c * (1.0 - c)
    residual = torch.addmm(grad, gm.T, am, alpha=-1.0).abs_()
    excess = residual.sub_(grad.abs(), alpha=quick)
    worst = float(excess.max())
    if not math.isfinite(worst):
        return False
    if worst <= finfo.tiny:
        return True
    rows, cols = (excess > finfo.tiny).nonzero(as_tuple=True)
    if rows.numel() * am.shape[0] > excess.numel():
        return False
    gap = excess[rows, cols] + quick * grad[rows, cols].abs()
    bound = (gm[:, rows].abs() * am[:, cols].abs()).sum(0)
    return bool((gap <= bound.mul_(c).add_(finfo.tiny)).all())


def stats_v1(p: Tensor, g: Tensor) -> list[float]:
    """The step statistics before this round (one layer)."""
    return torch.stack(
        [
            torch.isfinite(p).all().double(),
            (p * g).sum().double(),
            g.square().sum().double(),
            p.square().sum().double(),
        ]
    ).tolist()


def stats_v2(p: Tensor, g: Tensor) -> list[float]:
    """The step statistics now (one layer): finiteness from |P|^2, norms by dot."""
    row = torch.stack(
        [
            (p * g).sum().double(),
            torch.dot(g.reshape(-1), g.reshape(-1)).double(),
            torch.dot(p.reshape(-1), p.reshape(-1)).double(),
        ]
    ).tolist()
    finite = math.isfinite(row[2]) or bool(torch.isfinite(p).all())
    return [float(finite), *row]


def _layer(rows: int, d_out: int, d_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad, am, gm) as autograd gives a Linear layer's: weight by a product, bias by a sum."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in - 1, generator=gen)
    g = torch.randn(rows, d_out, generator=gen) * (torch.rand(rows, d_out, generator=gen) < 0.5)
    grad = torch.cat([g.T @ x, g.sum(0, keepdim=True).T], 1)
    return grad, torch.cat([x, torch.ones(rows, 1)], 1), g


def _time(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median thread-CPU ms of each function, the functions interleaved in every repetition."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            samples[name].append(1e3 * (time.thread_time() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def _check_row(d_out: int, d_in: int, repeats: int) -> str:
    grad, am, gm = _layer(128, d_out, d_in)
    gen = torch.Generator().manual_seed(1)
    g_inv, a_inv = torch.randn(d_out, d_out, generator=gen), torch.randn(d_in, d_in, generator=gen)
    assert lowrank.gradient_matches(grad, am, gm) and entrywise_v1(grad, am, gm)
    ms = _time(
        {
            "probe": lambda: single_probe(grad, am, gm),
            "v1": lambda: entrywise_v1(grad, am, gm),
            "now": lambda: lowrank.gradient_matches(grad, am, gm),
            "rank_r": lambda: (g_inv @ gm.T) @ (am @ a_inv),
            "full": lambda: (g_inv @ grad) @ a_inv,
        },
        repeats,
    )
    return (
        f"| 128 | {d_out} x {d_in} | {ms['probe']:.1f} | {ms['v1']:.1f} | {ms['now']:.1f} "
        f"| {ms['rank_r']:.1f} | {ms['full']:.1f} |"
    )


def _finite_row(rows: int, cols: int, repeats: int) -> str:
    gen = torch.Generator().manual_seed(2)
    t, u = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    assert linalg.all_finite(t) and stats_v1(t, u)[0] == stats_v2(t, u)[0] == 1.0
    ms = _time(
        {
            "isfinite": lambda: bool(torch.isfinite(t).all()),
            "aminmax": lambda: linalg.all_finite(t),
            "s1": lambda: stats_v1(t, u),
            "s2": lambda: stats_v2(t, u),
        },
        repeats,
    )
    return (
        f"| {rows} x {cols} | {ms['isfinite']:.1f} | {ms['aminmax']:.1f} "
        f"| {ms['s1']:.1f} | {ms['s2']:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_costs")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("thread CPU ms, median of", args.repeats, "interleaved repetitions, 1 thread\n")
    print(
        "| R | gradient | single_probe | entrywise_v1 | gradient_matches (now) "
        "| rank-R product | full product |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d_out, d_in in ((1000, 785), (2048, 2049)):
        print(_check_row(d_out, d_in, args.repeats))
    print("\n| tensor | isfinite(t).all() | linalg.all_finite | stats before | stats now |")
    print("| --- | --- | --- | --- | --- |")
    for rows, cols in ((1000, 785), (2304, 2304), (4608, 4608)):
        print(_finite_row(rows, cols, args.repeats))


if __name__ == "__main__":
    main()
