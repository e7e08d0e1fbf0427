"""The benchmark suite: CPU time to a common target loss, K-FAC defaults against SGD and Adam.

    python -m benchmarks suite [--out DIR] [--budget S] [--jobs J] [--problems ...]
                               [--methods ...] [--variant NAME=key=value,...] [--smoke]

Problems: benchmarks/suite_problems.py (deep autoencoders with sigmoid / tanh / ReLU units and
default or sparse initialization, an MLP and a CNN classifier, a small transformer language
model; batch sizes 32 to 256). Methods (``METHODS``): SGD with momentum 0.9, Adam, and K-FAC with
the defaults of ``KFACPreconditioner(model)`` (= ``KFACCallback()``) on SGD with momentum 0.9;
``--variant`` adds K-FAC runs with other options (e.g. ``--variant old=damping_mode=absolute``).

Protocol (stated in every output):

- Clock: CPU time of the training thread (``time.thread_time()``, ``torch.set_num_threads(1)``)
  around each training step (batch, forward, backward, K-FAC, optimizer); the full-data loss is
  evaluated outside the clock at ``EVAL_POINTS`` evenly spaced CPU times. Each run trains for a
  fixed CPU budget (``--budget`` seconds); a non-finite loss ends it (counted as diverged).
- Learning rate: each method's own grid (``GRIDS``; K-FAC's base SGD uses SGD's grid, since it
  is the same optimizer) is run with seed 0; the value with the lowest mean log training loss
  over the budget (the area under the log-loss curve) is kept and run with seeds 1 and 2. A
  seed is the initialization and the batch order; every method sees the same ones.
- Target per problem: ``L_init^f * L_fo^(1-f)`` with ``f = TARGET_FRACTION`` (0.2), ``L_init``
  the median initial loss and ``L_fo`` the lower of SGD's and Adam's median (over seeds) lowest
  loss at their tuned rates: the level the best first-order method gets to within the budget,
  20% of the way back (in log scale) toward the initial loss.
- Table: per method the median over the 3 seeds of the CPU seconds and steps to the first
  evaluation at or below the target (a seed that never reaches it counts as infinitely slow, so
  the median is "not reached" when 2 of 3 miss), the seeds reached, and the ratio to the faster
  of SGD and Adam. A K-FAC method "wins" a problem when that ratio is below 1.

``--smoke`` replaces the CPU budget by a fixed number of steps (an evaluation every 3 steps,
grids of two values, two problems), so its losses and steps are deterministic
(tests/test_benchmark_suite.py); its times are still measured and not asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from benchmarks import common
from benchmarks.suite_problems import PROBLEMS, load_data
from lightning_kfac import KFACPreconditioner

NAME = "suite"
SEEDS = (0, 1, 2)
EVAL_POINTS = 30
TARGET_FRACTION = 0.2
MOMENTUM = 0.9
GRIDS: dict[str, list[float]] = {"sgd": [0.03, 0.1, 0.3], "adam": [1e-3, 3e-3, 1e-2]}
# method -> (base optimizer, K-FAC options or None); {} = the defaults of KFACConfig
METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd", "kfac": None},
    "adam": {"optimizer": "adam", "kfac": None},
    "kfac": {"optimizer": "sgd", "kfac": {}},
}
FIRST_ORDER = ("sgd", "adam")
SMOKE_STEPS = 12
SMOKE_EVAL_EVERY = 3
SMOKE_PROBLEMS = ("ae_sigmoid_default", "lm_b16")
COLUMNS = [
    "problem",
    "method",
    "lr",
    "time_to_target_s",
    "steps_to_target",
    "reached",
    "final_loss",
    "target",
    "x_best_first_order",
    "diverged",
]

_DATA: dict[str, torch.Tensor] | None = None


def _data() -> dict[str, torch.Tensor]:
    global _DATA
    if _DATA is None:
        _DATA = load_data()
    return _DATA


def train(
    problem: str,
    method: dict[str, Any],
    lr: float,
    seed: int,
    *,
    budget_s: float,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """One run: train for ``budget_s`` CPU seconds (or ``max_steps`` steps, evaluating every
    ``SMOKE_EVAL_EVERY`` steps); return the curve ``times`` / ``steps`` / ``losses``."""
    torch.set_num_threads(1)
    spec = PROBLEMS[problem]
    model, x, y, loss_fn = spec.build(seed, _data())
    if method["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    pre = None
    if method["kfac"] is not None:
        pre = KFACPreconditioner(model, **method["kfac"])
    n, batch = x.shape[0], spec.batch
    order = torch.Generator().manual_seed(1000 + seed)

    x_eval, y_eval = (x, y) if not spec.eval_rows else (x[: spec.eval_rows], y[: spec.eval_rows])

    def full_loss() -> float:
        model.train(False)  # K-FAC captures only training forwards
        with torch.no_grad():
            value = float(loss_fn(model(x_eval), y_eval))
        model.train(True)
        return value if math.isfinite(value) else math.inf

    times, steps, losses = [0.0], [0], [full_loss()]
    clock, step, pos, perm = 0.0, 0, n, None
    tick = budget_s / EVAL_POINTS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below (the preconditioner's counters)
        while (max_steps is None and clock < budget_s) or (
            max_steps is not None and step < max_steps
        ):
            start = time.thread_time()
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=order), 0
            idx = perm[pos : pos + batch]
            pos += batch
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            if pre is not None:
                pre.step(opt)
            opt.step()
            clock += time.thread_time() - start
            step += 1
            if (
                step % SMOKE_EVAL_EVERY == 0
                if max_steps is not None
                else clock >= tick * len(times) or clock >= budget_s
            ):
                times.append(clock)
                steps.append(step)
                losses.append(full_loss())
                if math.isinf(losses[-1]):
                    break
    counters = dict(pre.counters) if pre is not None else {}
    if pre is not None:
        pre.remove()
    return {
        "problem": problem,
        "method": method["name"],
        "lr": lr,
        "seed": seed,
        "times": times,
        "steps": steps,
        "losses": losses,
        "counters": counters,
        "diverged": math.isinf(losses[-1]),
    }


def _train_task(args) -> dict[str, Any]:
    problem, method, lr, seed, budget, max_steps = args
    return train(problem, method, lr, seed, budget_s=budget, max_steps=max_steps)


def score(run: dict[str, Any], points: int) -> float:
    """Mean log loss over the run's ``points`` evaluations (missing ones after a divergence:
    +inf): the area under the log-loss curve, used to pick a learning rate."""
    logs = [math.log(max(v, 1e-300)) if math.isfinite(v) else math.inf for v in run["losses"]]
    logs += [math.inf] * max(0, points + 1 - len(logs))
    return sum(logs) / len(logs)


def first_reach(run: dict[str, Any], target: float):
    """(CPU seconds, steps) at the first evaluation with loss <= target; (inf, inf) if none."""
    for t, s, loss in zip(run["times"], run["steps"], run["losses"]):
        if loss <= target:
            return t, s
    return math.inf, math.inf


def target_loss(
    initial: float, first_order_best: float, fraction: float = TARGET_FRACTION
) -> float:
    """``initial^f * best^(1-f)``: ``f`` of the way (in log scale) from the
    best toward the start."""
    return math.exp(fraction * math.log(initial) + (1 - fraction) * math.log(first_order_best))


def summarize(problem: str, chosen: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Table rows of one problem from each method's runs (3 seeds) at its chosen rate."""
    initial = common.median([r["losses"][0] for runs in chosen.values() for r in runs])
    lowest = {m: common.median([min(r["losses"]) for r in runs]) for m, runs in chosen.items()}
    baselines = [m for m in FIRST_ORDER if m in chosen] or list(chosen)
    target = target_loss(initial, min(lowest[m] for m in baselines))
    rows = []
    for m, runs in chosen.items():
        reach = [first_reach(r, target) for r in runs]
        rows.append(
            {
                "problem": problem,
                "method": m,
                "lr": runs[0]["lr"],
                "time_to_target_s": common.median([t for t, _ in reach]),
                "steps_to_target": common.median([s for _, s in reach]),
                "reached": f"{sum(math.isfinite(t) for t, _ in reach)}/{len(runs)}",
                "final_loss": common.median([r["losses"][-1] for r in runs]),
                "lowest_loss": lowest[m],
                "initial_loss": initial,
                "target": target,
                "diverged": sum(r["diverged"] for r in runs),
            }
        )
    best = min(r["time_to_target_s"] for r in rows if r["method"] in baselines)
    for row in rows:
        t = row["time_to_target_s"]
        row["x_best_first_order"] = (
            t / best
            if math.isfinite(best) and best > 0
            else (0.0 if math.isfinite(t) else math.inf)
        )
    return rows


def wins(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """K-FAC method -> the problems where it beats the faster of SGD and Adam to the target."""
    out: dict[str, list[str]] = {}
    for row in rows:
        if row["method"] not in FIRST_ORDER:
            out.setdefault(row["method"], [])
            if row["x_best_first_order"] < 1.0:
                out[row["method"]].append(row["problem"])
    return out


def markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The Markdown table (problem, method, lr, time and steps to target, seeds reached, ...)."""

    def cell(row, c):
        v = row[c]
        if c in ("time_to_target_s", "steps_to_target") and not math.isfinite(v):
            return "not reached"
        if c == "steps_to_target":
            return f"{v:.0f}"
        return common.fmt(v) if isinstance(v, float) else str(v)

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    lines.append("")
    for method, problems in wins(rows).items():
        total = len({r["problem"] for r in rows})
        lines.append(
            f"- `{method}` is faster to the target than the best of SGD and Adam on "
            f"{len(problems)} of {total} problems ({', '.join(problems) or 'none'})."
        )
    return "\n".join(lines) + "\n"


def plot(problem: str, chosen: dict[str, list[dict[str, Any]]], target: float, out: str) -> str:
    """Loss against CPU seconds, every seed of every method at its chosen rate; the target."""
    fig, axes = common.new_figure(width=6.0, height=4.2)
    ax = axes[0]
    colors = [
        "tab:blue",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:orange",
        "tab:brown",
        "tab:pink",
        "tab:gray",
        "tab:olive",
        "tab:cyan",
    ]
    for i, (method, runs) in enumerate(chosen.items()):
        for j, run in enumerate(runs):
            finite = [(t, v) for t, v in zip(run["times"], run["losses"]) if math.isfinite(v)]
            if finite:
                ax.plot(
                    *zip(*finite),
                    color=colors[i % len(colors)],
                    lw=1,
                    alpha=0.8,
                    label=f"{method} lr={run['lr']:g}" if j == 0 else None,
                )
    ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("CPU seconds of the training thread (evaluation excluded)")
    ax.set_ylabel("training loss (full data)")
    ax.set_title(f"{problem} (3 seeds per method)")
    ax.legend(fontsize=7)
    return common.save_figure(fig, out, f"{NAME}_{problem}")


def _parse_variant(text: str) -> dict[str, Any]:
    """``NAME=key=value,key=value`` -> a K-FAC method (values: numbers, true/false/none, text)."""
    name, _, body = text.partition("=")
    if not name or name in FIRST_ORDER:
        raise ValueError(f"Invalid --variant={text!r}: must be NAME=key=value,... with a new NAME.")
    options: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"Invalid --variant item {item!r}: must be key=value.")
        low = raw.lower()
        value: Any = {"none": None, "null": None, "true": True, "false": False}.get(low, raw)
        if value is raw:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    pass
        options[key] = value
    return {"name": name, "optimizer": "sgd", "kfac": options}


def _map(tasks: list[tuple], jobs: int) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [_train_task(t) for t in tasks]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_train_task, tasks))


def run(
    out: str = common.DEFAULT_OUT,
    budget: float = 3.0,
    jobs: int = 1,
    problems: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    variants: Sequence[str] = (),
    smoke: bool = False,
) -> dict[str, Any]:
    """Tune each method's rate on seed 0, rerun the chosen rate on seeds 1-2, write the table
    (``suite.md``), the JSON and one plot per problem to ``out``."""
    torch.set_num_threads(1)
    specs = {m: dict(METHODS[m], name=m) for m in (methods or METHODS)}
    for text in variants:
        v = _parse_variant(text)
        specs[v["name"]] = v
    problems = list(problems or (SMOKE_PROBLEMS if smoke else PROBLEMS))
    grids = {
        m: (GRIDS[s["optimizer"]][:2] if smoke else GRIDS[s["optimizer"]]) for m, s in specs.items()
    }
    max_steps = SMOKE_STEPS if smoke else None
    points = SMOKE_STEPS // SMOKE_EVAL_EVERY if smoke else EVAL_POINTS
    wall = time.perf_counter()
    tuning = _map(
        [
            (p, specs[m], lr, SEEDS[0], budget, max_steps)
            for p in problems
            for m in specs
            for lr in grids[m]
        ],
        jobs,
    )
    chosen_lr = {}
    for p in problems:
        for m in specs:
            mine = [r for r in tuning if r["problem"] == p and r["method"] == m]
            chosen_lr[p, m] = min(mine, key=lambda r: score(r, points))["lr"]
    rest = _map(
        [
            (p, specs[m], chosen_lr[p, m], s, budget, max_steps)
            for p in problems
            for m in specs
            for s in SEEDS[1:]
        ],
        jobs,
    )
    rows, pngs = [], []
    for p in problems:
        chosen = {
            m: [
                r
                for r in tuning + rest
                if r["problem"] == p and r["method"] == m and r["lr"] == chosen_lr[p, m]
            ]
            for m in specs
        }
        chosen = {m: sorted(runs, key=lambda r: r["seed"]) for m, runs in chosen.items()}
        mine = summarize(p, chosen)
        rows += mine
        pngs.append(plot(p, chosen, mine[0]["target"], out))
    run_length = f"smoke: {SMOKE_STEPS} steps" if smoke else f"{budget:g} CPU s"
    header = (
        f"Benchmark suite ({run_length} "
        f"per run, 1 thread, seeds {list(SEEDS)}, medians; target = L_init^{TARGET_FRACTION} "
        f"x L_first_order^{1 - TARGET_FRACTION:g}; rates tuned on seed 0 from {grids}; "
        f"K-FAC options: { {m: s['kfac'] for m, s in specs.items() if s['kfac'] is not None} })"
    )
    text = markdown(rows, header)
    print(text, flush=True)
    os.makedirs(out, exist_ok=True)
    md_path = os.path.join(out, f"{NAME}.md")
    with open(md_path, "w") as f:
        f.write(text)
    payload = {
        "benchmark": NAME,
        "smoke": smoke,
        "machine": common.machine_info(),
        "budget_s": budget,
        "max_steps": max_steps,
        "seeds": list(SEEDS),
        "eval_points": points,
        "target_fraction": TARGET_FRACTION,
        "grids": grids,
        "methods": specs,
        "chosen_lr": {f"{p}/{m}": v for (p, m), v in chosen_lr.items()},
        "columns": COLUMNS,
        "rows": rows,
        "wins": wins(rows),
        "runs": tuning + rest,
        "wall_s": time.perf_counter() - wall,
        "markdown": md_path,
        "pngs": pngs,
    }
    payload["json"] = common.write_json(out, NAME, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks suite", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    parser.add_argument("--budget", type=float, default=3.0, help="CPU seconds per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=None)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="an extra K-FAC method: NAME=key=value,... (KFACConfig options)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_STEPS} steps per run, 2 problems, 2 rates (deterministic)",
    )
    args = parser.parse_args(argv)
    return run(
        out=args.out,
        budget=args.budget,
        jobs=args.jobs,
        problems=args.problems,
        methods=args.methods,
        variants=args.variant,
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
