"""Benchmark 2: wall-clock time (and steps) to a common target training loss on digits.

Problems (scikit-learn's 8x8 digits, 1797 images, 64 pixels):

- ``digits_autoencoder``: 64-128-64-32-8-32-64-128-64 logistic autoencoder with a linear code
  layer, Martens & Grosse (2015, sec. 13) sparse initialization (15 nonzero N(0,1) incoming
  weights per unit, zero biases), Bernoulli cross-entropy summed over pixels (inputs / 16 in
  [0, 1]), mean over the batch;
- ``digits_mlp``: 64-128-64-10 tanh classifier on standardized pixels, cross-entropy.

Methods, each with a small learning-rate grid and 3 seeds (seed = initialization and batch
order), run for the same wall-clock budget: K-FAC on SGD with momentum, SGD with Nesterov momentum,
Adam. The training loss on the full training set is evaluated every few steps (evaluation time
is excluded from the clock). The target is the loss every method reaches with its best learning
rate: ``target = 1.05 x max_method min_lr median_seed(lowest loss)``; each method's best learning
rate is the one with the smallest median time to the target. With an odd number of seeds this
median is finite for every method: at its best rate a majority of seeds gets below target/1.05.
``time_max_s`` and ``steps`` are over the seeds that reached the target (``reached``).

    python -m benchmarks.time_to_target [--tiny] [--out bench_results]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common, models
from lightning_kfac import KFACPreconditioner

NAME = "time_to_target"
COLUMNS = ["problem", "method", "best_lr", "time_s", "time_min_s", "time_max_s", "steps",
           "ms_per_step", "final_loss", "target", "x_best_baseline", "reached"]
TARGET_SLACK = 1.05

# method -> learning-rate grid (per problem) and K-FAC options
GRIDS: Dict[str, Dict[str, List[float]]] = {
    "digits_autoencoder": {"kfac+sgd": [0.03, 0.1, 0.3], "sgd-nesterov": [0.003, 0.01, 0.03],
                           "adam": [1e-3, 3e-3, 1e-2]},
    "digits_mlp": {"kfac+sgd": [0.03, 0.1, 0.3], "sgd-nesterov": [0.03, 0.1, 0.3],
                   "adam": [1e-3, 3e-3, 1e-2]},
}
KFAC_OPTIONS: Dict[str, Dict[str, Any]] = {
    "digits_autoencoder": {"damping": 1e-2, "kl_clip": 1e-2, "factor_update_steps": 1,
                           "inv_update_steps": 10},
    "digits_mlp": {"damping": 1e-2, "kl_clip": 1e-2, "factor_update_steps": 1,
                   "inv_update_steps": 10},
}
BATCH = {"digits_autoencoder": 256, "digits_mlp": 256}


def load_data() -> Dict[str, Any]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    std = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    return {"pixels": X / 16.0, "standardized": std, "labels": torch.tensor(y)}


def make_problem(name: str, data: Dict[str, Any], seed: int):
    """(model, inputs, targets, loss_fn) of a problem, initialized from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "digits_autoencoder":
        model = models.autoencoder((64, 128, 64, 32, 8), sparse_init=True, generator=gen)
        x = data["pixels"]

        def loss_fn(out, target):
            return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / out.shape[0]

        return model, x, x, loss_fn
    if name == "digits_mlp":
        model = models.mlp((64, 128, 64, 10), act=nn.Tanh)
        return model, data["standardized"], data["labels"], F.cross_entropy
    raise ValueError(f"Invalid problem={name!r}: must be one of {sorted(GRIDS)}.")


def train(problem: str, method: str, lr: float, seed: int, data: Dict[str, Any], budget_s: float,
          eval_every: int = 5) -> Dict[str, Any]:
    """Train for ``budget_s`` seconds of (non-evaluation) wall-clock; return the loss curve."""
    model, x, y, loss_fn = make_problem(problem, data, seed)
    if method == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                              nesterov=method == "sgd-nesterov")
    pre = KFACPreconditioner(model, **KFAC_OPTIONS[problem]) if method == "kfac+sgd" else None
    batch, n = BATCH[problem], x.shape[0]
    order_gen = torch.Generator().manual_seed(1000 + seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    times, losses, steps = [0.0], [full_loss()], [0]
    clock, step, perm, pos = 0.0, 0, torch.randperm(n, generator=order_gen), 0
    while clock < budget_s:
        start = time.perf_counter()
        for _ in range(eval_every):
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=order_gen), 0
            idx = perm[pos:pos + batch]
            pos += batch
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            if pre is not None:
                pre.step(opt)
            opt.step()
            step += 1
        clock += time.perf_counter() - start
        value = full_loss()
        times.append(clock)
        losses.append(value if math.isfinite(value) else float("inf"))
        steps.append(step)
        if not math.isfinite(value):
            break
    if pre is not None:
        pre.remove()
    return {"problem": problem, "method": method, "lr": lr, "seed": seed, "times": times,
            "losses": losses, "steps": steps}


def first_reach(run: Dict[str, Any], target: float):
    """(time, steps) of the first evaluation at or below ``target``; (inf, None) if never."""
    for t, loss, s in zip(run["times"], run["losses"], run["steps"]):
        if loss <= target:
            return t, s
    return math.inf, None


def summarize(runs: List[Dict[str, Any]], problem: str,
              grid: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    """Pick the target and each method's best learning rate; one table row per method."""
    mine = [r for r in runs if r["problem"] == problem]
    methods = list(grid)
    best_loss = {}
    for m in methods:
        per_lr = []
        for lr in grid[m]:
            lows = [min(r["losses"]) for r in mine if r["method"] == m and r["lr"] == lr]
            per_lr.append(common.median(lows))
        best_loss[m] = min(per_lr)
    target = TARGET_SLACK * max(best_loss.values())
    rows = []
    for m in methods:
        best = None
        for lr in grid[m]:
            seeds = [r for r in mine if r["method"] == m and r["lr"] == lr]
            reach = [first_reach(r, target) for r in seeds]
            med = common.median([t for t, _ in reach])
            key = (med, common.median([min(r["losses"]) for r in seeds]))
            if best is None or key < best[0]:
                best = (key, lr, seeds, reach)
        _, lr, seeds, reach = best
        times = [t for t, _ in reach]
        ok = [(t, s) for t, s in reach if s is not None]  # non-empty: see the docstring
        total_steps = sum(r["steps"][-1] for r in seeds)
        total_time = sum(r["times"][-1] for r in seeds)
        rows.append({"problem": problem, "method": m, "best_lr": lr,
                     "time_s": common.median(times), "time_min_s": min(times),
                     "time_max_s": max(t for t, _ in ok),
                     "steps": common.median([s for _, s in ok]),
                     "ms_per_step": 1e3 * total_time / max(total_steps, 1),
                     "final_loss": common.median([r["losses"][-1] for r in seeds]),
                     "target": target, "reached": f"{len(ok)}/{len(seeds)}"})
    baselines = [r["time_s"] for r in rows if r["method"] != "kfac+sgd"]
    for row in rows:
        row["x_best_baseline"] = row["time_s"] / min(baselines) if min(baselines) > 0 else math.nan
    return rows


def _plot(runs: List[Dict[str, Any]], rows: List[Dict[str, Any]], out: str) -> str:
    problems = sorted({r["problem"] for r in rows}, key=[r["problem"] for r in rows].index)
    fig, axes = common.new_figure(ncols=len(problems), width=5.5)
    colors = {"kfac+sgd": "tab:red", "sgd-nesterov": "tab:blue", "adam": "tab:green"}
    for ax, problem in zip(axes, problems):
        for row in (r for r in rows if r["problem"] == problem):
            for i, run in enumerate(r for r in runs if r["problem"] == problem
                                    and r["method"] == row["method"] and r["lr"] == row["best_lr"]):
                ax.plot(run["times"], run["losses"], color=colors.get(row["method"]), lw=1,
                        alpha=0.8, label=f"{row['method']} lr={row['best_lr']:g}" if i == 0 else None)
        ax.axhline(rows[[r["problem"] for r in rows].index(problem)]["target"], color="k", ls="--",
                   lw=0.8, label="target")
        ax.set_yscale("log")
        ax.set_xlabel("wall-clock seconds (evaluation excluded)")
        ax.set_ylabel("training loss")
        ax.set_title(problem)
        ax.legend(fontsize=7)
    return common.save_figure(fig, out, NAME)


def run(tiny: bool = False, out: str = common.DEFAULT_OUT) -> Dict[str, Any]:
    """Run every (problem, method, lr, seed) for the same budget, interleaved; table + JSON + PNG."""
    threads = common.set_threads(tiny)
    data = load_data()
    budget = {"digits_autoencoder": 0.1, "digits_mlp": 0.05} if tiny else \
        {"digits_autoencoder": 8.0, "digits_mlp": 4.0}
    seeds = [0, 1, 2]
    grids = {p: {m: (lrs[1:2] if tiny else lrs) for m, lrs in g.items()} for p, g in GRIDS.items()}
    runs = []
    for seed in seeds:  # interleave problems, methods and learning rates within each seed
        for problem, grid in grids.items():
            for i in range(max(len(v) for v in grid.values())):
                for method, lrs in grid.items():
                    if i < len(lrs):
                        runs.append(train(problem, method, lrs[i], seed, data, budget[problem],
                                          eval_every=1 if tiny else 5))
    rows = []
    for problem, grid in grids.items():
        rows += summarize(runs, problem, grid)
    title = (f"time_to_target ({'tiny' if tiny else 'full'}; {threads} threads; load "
             f"{common.load_average():.1f}; budget per run {budget} s; seeds {seeds})")
    print(common.format_table(rows, COLUMNS, title), flush=True)
    payload = {"benchmark": NAME, "tiny": tiny, "machine": common.machine_info(),
               "budget_s": budget, "grids": grids, "kfac_options": KFAC_OPTIONS, "batch": BATCH,
               "target_slack": TARGET_SLACK, "columns": COLUMNS, "rows": rows, "runs": runs}
    payload["json"] = common.write_json(out, NAME, payload)
    payload["png"] = _plot(runs, rows, out)
    return payload


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="short budgets, one lr per method")
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    run(tiny=args.tiny, out=args.out)


if __name__ == "__main__":
    main()
