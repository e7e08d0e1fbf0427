"""Cost of K-FAC on a ResNet-18-style CNN (benchmarks/resnet.py), one CPU thread.

What a user pays, relative to a plain SGD step of the same network and batch (CPU time of the
training thread, ``time.thread_time``; medians):

- ``first refresh``: the decompositions of every layer at step 0 (``_update_decompositions``);
- ``amortized``: the mean step with the default clocks (factors every 10 steps, decompositions
  every 100), from the medians of the three kinds of step: preconditioning only (90 of 100
  steps), factor update (9 of 100) and factor update + refresh (1 of 100; the refresh at t = 100,
  with averaged factors, not the step-0 one):
  ``(90 * precond + 9 * factor + (factor + refresh_100)) / 100``;
- ``retries``: float64 retries of failed float32 decompositions (``counters``);
- ``largest staggered refresh``: with ``stagger_refresh=True`` the layers refresh at
  cost-balanced offsets (core/stagger.py); this is the largest per-step sum of the layers'
  measured decomposition times (CPU, refresh at t = 100) over those offsets, i.e. the longest
  refresh stall a staggered run has after t = 0.

Steps are driven with ``set_step`` (0, 1-3, 10, 11-13, 20, 100) so that the 100-step cycle costs
8 steps, not 100. ``--no-deflate`` turns off the split of exactly-zero factor rows/columns
(core/linalg.py) to show what it saves.

    python -m benchmarks.cnn_cost [--batch 32 128] [--methods eigen inverse] [--stem imagenet]
        [--max-dense-dim 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.resnet import STEMS, resnet18
from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import linalg, stagger

PLAIN_STEPS = 5
SCHEDULE = [0, 1, 2, 3, 10, 11, 12, 13, 20, 100]  # set_step clock values


def _batch(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(
        0, 10, (batch,), generator=gen
    )


def _plain_step_seconds(batch: int, stem: str) -> float:
    torch.manual_seed(0)
    model = resnet18(stem=stem)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(PLAIN_STEPS + 1):
        x, y = _batch(batch, i)
        start = time.thread_time()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.thread_time() - start)
    return statistics.median(times[1:])


def _kfac_costs(
    batch: int, stem: str, method: str, max_dense_dim: int | None = None
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = resnet18(stem=stem)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    extra = {} if max_dense_dim is None else {"max_dense_dim": max_dense_dim}
    pre = KFACPreconditioner(model, compute_method=method, **extra)  # default clocks 10 / 100
    refresh: dict[int, float] = {}
    update = pre._update_decompositions

    def timed_update(due):
        start = time.thread_time()
        update(due)
        if due:
            refresh[pre.steps] = time.thread_time() - start

    pre._update_decompositions = timed_update
    step_time: dict[int, float] = {}
    for i, t in enumerate(SCHEDULE):
        pre.set_step(t)
        x, y = _batch(batch, 100 + i)
        start = time.thread_time()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        opt.step()
        step_time[t] = time.thread_time() - start
        print(f"  [{stem} b{batch} {method}] t={t}: {step_time[t]:.2f} s", flush=True)
    precond = statistics.median([step_time[t] for t in (1, 2, 3, 11, 12, 13)])
    factor = statistics.median([step_time[t] for t in (10, 20)])
    amortized = (90 * precond + 9 * factor + factor + refresh.get(100, 0.0)) / 100
    cpu = pre.refresh.layer_cpu_seconds  # per layer, the refresh at t = 100
    slowest = sorted(cpu.items(), key=lambda kv: -kv[1])[:3]
    offsets = stagger.refresh_offsets(
        pre.blocks.values(), pre.config.factor_update_steps, pre.config.inv_update_steps
    )
    per_slot: dict[int, float] = {}
    for name, seconds in cpu.items():
        per_slot[offsets[name]] = per_slot.get(offsets[name], 0.0) + seconds
    return {
        "first_refresh_s": refresh.get(0, 0.0),
        "first_step_s": step_time[0],
        "precond_s": precond,
        "factor_s": factor,
        "refresh100_s": refresh.get(100, 0.0),
        "amortized_s": amortized,
        "retries": pre.counters["decomposition_retries"],
        "stagger_max_s": max(per_slot.values()) if per_slot else 0.0,
        "slowest_layers": ", ".join(f"{n} {s:.2f}s" for n, s in slowest),
    }


def run(
    batches: list[int],
    methods: list[str],
    stem: str,
    deflate: bool = True,
    max_dense_dim: int | None = None,
) -> list[dict]:
    torch.set_num_threads(1)
    if not deflate:
        linalg.support = lambda matrix: None  # the dense path on every factor
    rows = []
    for batch in batches:
        plain = _plain_step_seconds(batch, stem)
        print(f"plain step, batch {batch}: {plain:.3f} s", flush=True)
        for method in methods:
            c = _kfac_costs(batch, stem, method, max_dense_dim)
            rows.append({"batch": batch, "method": method, "plain_s": plain, **c})
    print(table(rows, stem, deflate, max_dense_dim))
    return rows


def table(rows: list[dict], stem: str, deflate: bool, max_dense_dim: int | None = None) -> str:
    dense = "default" if max_dense_dim is None else str(max_dense_dim)
    head = (
        f"ResNet-18 ({stem} stem), 32x32, 1 thread, thread CPU time, deflation "
        f"{'on' if deflate else 'off'}, max_dense_dim {dense}\n\n"
        "| batch | method | plain step | first refresh | first refresh / plain | "
        "precond step / plain | factor step / plain | refresh t=100 | "
        "largest staggered refresh | amortized / plain | retries | "
        "slowest layers (refresh t=100) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in rows:
        p = r["plain_s"]
        lines.append(
            f"| {r['batch']} | {r['method']} | {p:.3f} s | {r['first_refresh_s']:.2f} s | "
            f"{r['first_refresh_s'] / p:.1f} | {r['precond_s'] / p:.2f} | "
            f"{r['factor_s'] / p:.2f} | "
            f"{r['refresh100_s']:.2f} s | {r['stagger_max_s']:.2f} s | "
            f"{r['amortized_s'] / p:.2f} | {r['retries']} | "
            f"{r['slowest_layers']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cnn_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument(
        "--methods", nargs="+", default=["eigen", "inverse"], choices=["eigen", "inverse", "ekfac"]
    )
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    parser.add_argument(
        "--no-deflate",
        action="store_true",
        help="decompose every factor densely (the behaviour before deflation)",
    )
    parser.add_argument(
        "--max-dense-dim",
        type=int,
        default=None,
        help="factor sides wider than this are diagonal (default: the "
        "engine's max_dense_dim); 8192 keeps every ResNet-18 factor dense",
    )
    args = parser.parse_args(argv)
    return run(
        args.batch,
        args.methods,
        args.stem,
        deflate=not args.no_deflate,
        max_dense_dim=args.max_dense_dim,
    )


if __name__ == "__main__":
    main()
