"""Benchmark 1: time per training step of plain SGD and K-FAC, against the FLOP lower bound.

Variants, all interleaved in one process (round-robin blocks of steps, so drift in the machine's
speed hits every variant alike), each on its own copy of the same initial model:

- ``sgd``: plain SGD (momentum 0.9) - the reference;
- ``<method>/every``: K-FAC, factors and decompositions every step (median of timed steps);
- ``<method>/10-100``: factors every 10 steps, decompositions every 100, amortized: the mean over
  whole decomposition cycles (the timed window starts at a decomposition step, t = 100).

for ``method`` in eigen and inverse. Models: MLP 784-1000-500-250-10 (batch 128), the M&G deep
autoencoder 784-1000-500-250-30-mirror (batch 256, Bernoulli cross-entropy), a CNN on random
3x32x32 images (batch 128). ``x_sgd`` is the step time over plain SGD's; ``x_bound`` the step
time over the FLOP lower bound of the same variant (see ``common.py``), from rates measured in
this run.

    python -m benchmarks.step_overhead [--tiny] [--out bench_results]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common, models
from lightning_kfac import KFACPreconditioner

NAME = "step_overhead"
COLUMNS = [
    "model",
    "variant",
    "step_ms",
    "median_ms",
    "fwd_bwd_ms",
    "kfac_ms",
    "x_sgd",
    "bound_ms",
    "x_bound",
    "factor_MB",
    "state_MB",
    "steps",
]
METHODS = ("eigen", "inverse")


def _problems(tiny: bool) -> list[dict[str, Any]]:
    """(name, model factory, batch, loss) for each benchmark model."""
    gen = torch.Generator().manual_seed(0)
    if tiny:
        specs = [
            ("mlp", lambda: models.mlp((64, 48, 32, 10)), (16, 64), "ce"),
            ("autoencoder", lambda: models.autoencoder((64, 48, 32, 8)), (32, 64), "bce"),
            ("cnn", lambda: models.cnn((3, 4, 8), image=8), (8, 3, 8, 8), "ce"),
        ]
    else:
        specs = [
            ("mlp", lambda: models.mlp(), (128, 784), "ce"),
            ("autoencoder", lambda: models.autoencoder(), (256, 784), "bce"),
            ("cnn", lambda: models.cnn(), (128, 3, 32, 32), "ce"),
        ]
    problems = []
    for name, factory, shape, loss in specs:
        if loss == "bce":
            x = torch.rand(*shape, generator=gen)
            y = x
        else:
            x = torch.randn(*shape, generator=gen)
            y = torch.randint(0, 10, (shape[0],), generator=gen)
        problems.append({"name": name, "factory": factory, "x": x, "y": y, "loss": loss})
    return problems


def _loss_fn(kind: str) -> Callable:
    if kind == "bce":  # M&G: Bernoulli cross-entropy summed over pixels, mean over the batch
        return lambda out, y: (
            F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0]
        )
    return F.cross_entropy


class Variant:
    """One model copy + optimizer (+ preconditioner) with per-step timings by part."""

    def __init__(
        self,
        label: str,
        base: nn.Module,
        x,
        y,
        loss: Callable,
        method: str | None,
        factor_every: int = 1,
        inv_every: int = 1,
    ):
        self.label, self.method = label, method
        self.factor_every, self.inv_every = factor_every, inv_every
        self.model = copy.deepcopy(base)
        self.x, self.y, self.loss = x, y, loss
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.pre = None
        if method is not None:
            self.pre = KFACPreconditioner(
                self.model,
                damping=1e-2,
                compute_method=method,
                factor_update_steps=factor_every,
                inv_update_steps=inv_every,
            )
        self.times: dict[str, list[float]] = {"total": [], "fwd_bwd": [], "kfac": [], "opt": []}

    def step(self, record: bool = True) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x), self.y).backward()
        t1 = time.perf_counter()
        if self.pre is not None:
            self.pre.step(self.opt)
        t2 = time.perf_counter()
        self.opt.step()
        t3 = time.perf_counter()
        if record:
            for key, value in (
                ("total", t3 - t0),
                ("fwd_bwd", t1 - t0),
                ("kfac", t2 - t1),
                ("opt", t3 - t2),
            ):
                self.times[key].append(value)

    @property
    def amortized(self) -> bool:
        return self.pre is not None and self.inv_every > 1


def _schedule(tiny: bool) -> dict[str, int]:
    if tiny:
        return {
            "rounds": 4,
            "sgd": 20,
            "every": 20,
            "amortized": 40,
            "warmup": 2,
            "factor_every": 2,
            "inv_every": 20,
        }
    return {
        "rounds": 10,
        "sgd": 100,
        "every": 20,
        "amortized": 200,
        "warmup": 3,
        "factor_every": 10,
        "inv_every": 100,
    }


def run_problem(
    problem: dict[str, Any], rates: common.Rates, sched: dict[str, int]
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    base = problem["factory"]()
    x, y, loss = problem["x"], problem["y"], _loss_fn(problem["loss"])
    shapes = common.layer_shapes(base, lambda: base(x))
    variants = [Variant("sgd", base, x, y, loss, None)]
    for method in METHODS:
        variants.append(Variant(f"{method}/every", base, x, y, loss, method))
        variants.append(
            Variant(
                f"{method}/{sched['factor_every']}-{sched['inv_every']}",
                base,
                x,
                y,
                loss,
                method,
                sched["factor_every"],
                sched["inv_every"],
            )
        )
    for v in variants:  # warm-up (allocations, first decomposition), then align the clock
        for _ in range(sched["warmup"]):
            v.step(record=False)
        if v.amortized:
            v.pre.set_step(v.inv_every)  # the timed window covers whole decomposition cycles
    totals = {
        v.label: sched["sgd"]
        if v.pre is None
        else sched["amortized"]
        if v.amortized
        else sched["every"]
        for v in variants
    }
    for r in range(sched["rounds"]):
        for v in variants:
            quotient, remainder = divmod(totals[v.label], sched["rounds"])
            block = quotient + (1 if r < remainder else 0)
            for _ in range(block):
                v.step()
    rows = []
    sgd_ms = None
    for v in variants:
        t = {k: [1e3 * s for s in vals] for k, vals in v.times.items()}
        step_ms = sum(t["total"]) / len(t["total"]) if v.amortized else common.median(t["total"])
        if v.pre is None:
            sgd_ms = step_ms
        bound = common.flop_bound(
            shapes, rates, method=v.method, factor_every=v.factor_every, inv_every=v.inv_every
        )
        row = {
            "model": problem["name"],
            "variant": v.label,
            "step_ms": step_ms,
            "median_ms": common.median(t["total"]),
            "fwd_bwd_ms": common.median(t["fwd_bwd"]),
            "kfac_ms": sum(t["kfac"]) / len(t["kfac"]),
            "x_sgd": step_ms / sgd_ms,
            "bound_ms": 1e3 * bound["total"],
            "x_bound": step_ms / (1e3 * bound["total"]),
            "factor_MB": (common.factor_bytes(shapes) / 2**20) if v.pre else 0.0,
            "state_MB": (v.pre.memory_bytes() / 2**20) if v.pre else 0.0,
            "steps": len(t["total"]),
            "bound_parts_ms": {k: 1e3 * val for k, val in bound.items()},
            "counters": dict(v.pre.counters) if v.pre else {},
        }
        rows.append(row)
    for v in variants:
        if v.pre is not None:
            v.pre.remove()
    return rows


def _plot(rows: list[dict[str, Any]], out: str) -> str:
    fig, axes = common.new_figure(ncols=2, width=6.0)
    names = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    labels = [r["variant"] for r in rows if r["model"] == names[0]]
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        for ax, key in zip(axes, ("x_sgd", "x_bound")):
            vals = [
                next(r[key] for r in rows if r["model"] == m and r["variant"] == label)
                for m in names
            ]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=label)
    for ax, title in zip(axes, ("step time / plain SGD", "step time / FLOP lower bound")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    return common.save_figure(fig, out, NAME)


def run(
    tiny: bool = False, out: str = common.DEFAULT_OUT, threads: int | None = None
) -> dict[str, Any]:
    """Run the benchmark; print the table; write ``<out>/step_overhead.{json,png}``."""
    threads = common.set_threads(tiny, threads)
    rates = common.measure_rates(256, 128, min_time=0.05) if tiny else common.measure_rates()
    sched = _schedule(tiny)
    rows = []
    for problem in _problems(tiny):
        rows += run_problem(problem, rates, sched)
    title = (
        f"step_overhead ({'tiny' if tiny else 'full'}; {threads} threads; matmul "
        f"{rates.matmul / 1e9:.0f} GFLOP/s, eigh {rates.eigh / 1e9:.0f}, inverse "
        f"{rates.inverse / 1e9:.0f}; load {common.load_average():.1f}; times in ms)"
    )
    print(common.format_table(rows, COLUMNS, title), flush=True)
    payload = {
        "benchmark": NAME,
        "tiny": tiny,
        "machine": common.machine_info(),
        "rates": rates.as_dict(),
        "schedule": sched,
        "columns": COLUMNS,
        "rows": rows,
    }
    payload["json"] = common.write_json(out, NAME, payload)
    payload["png"] = _plot(rows, out)
    return payload


def main(argv=None) -> None:
    common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
