"""Benchmark 2: wall-clock time (and steps) to a common target training loss on digits.

Problems (scikit-learn's 8x8 digits, 1797 images, 64 pixels):

- ``digits_autoencoder``: 64-128-64-32-8-32-64-128-64 logistic autoencoder with a linear code
  layer, Martens & Grosse (2015, sec. 13) sparse initialization (15 nonzero N(0,1) incoming
  weights per unit, zero biases), Bernoulli cross-entropy summed over pixels (inputs / 16 in
  [0, 1]), mean over the batch;
- ``digits_mlp``: 64-128-64-10 tanh classifier on standardized pixels, cross-entropy.

Methods, each with a small grid of its step-size knob and 3 seeds (seed = initialization and
batch order), run for the same wall-clock budget: K-FAC on SGD with momentum 0.9, SGD with
Nesterov momentum 0.9, Adam. For SGD and Adam the knob is the learning rate; for K-FAC it is the
KL-clip bound ``c`` at learning rate 1, because whenever the clip is active the step is
``lr x nu x P`` with ``lr x nu = sqrt(c / |P . grad|)``, independent of lr (in a pilot, lr 0.03 to
1 under ``kl_clip=1e-2`` ended within 2% of each other). The training loss on the full set is
evaluated every few steps (evaluation time is excluded from the clock). The target is the loss
every method reaches at its best setting,
``target = max(floor, 1.05 x max_method min_setting median_seed(lowest loss))``, with a floor for
the classifier (0.01 nats: it memorizes digits, so the adaptive level would be ~3e-4); each
method's best setting is the one with the smallest median time to the target. With an odd
number of seeds this median is finite for every method: at its best setting a majority of seeds
gets below target/1.05. ``time_max_s`` and ``steps`` are over the seeds that reached the target
(``reached``).

    python -m benchmarks.time_to_target [--tiny] [--out bench_results]
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common, models
from lightning_kfac import KFACPreconditioner

NAME = "time_to_target"
COLUMNS = [
    "problem",
    "method",
    "knob",
    "best",
    "time_s",
    "time_min_s",
    "time_max_s",
    "steps",
    "ms_per_step",
    "final_loss",
    "target",
    "x_best_baseline",
    "reached",
]
TARGET_SLACK = 1.05

# problem -> method -> grid of the method's knob (KNOB); the middle value is the --tiny one
GRIDS: dict[str, dict[str, list[float]]] = {
    "digits_autoencoder": {
        "kfac+sgd": [1e-3, 3e-3, 1e-2],
        "sgd-nesterov": [0.03, 0.1, 0.3],
        "adam": [3e-3, 1e-2, 3e-2],
    },
    "digits_mlp": {
        "kfac+sgd": [1e-4, 3e-4, 1e-3, 3e-3],
        "sgd-nesterov": [0.1, 0.3, 1.0, 3.0],
        "adam": [1e-2, 3e-2, 1e-1],
    },
}
KNOB = {"kfac+sgd": "kl_clip", "sgd-nesterov": "lr", "adam": "lr"}
KFAC_LR = 1.0
# tuned under the original conventions (absolute damping, first update = batch estimate), kept so
# that the README's figures reproduce; the defaults' own measurements are benchmarks/suite.py's
KFAC_OPTIONS: dict[str, Any] = {
    "damping": 1e-2,
    "factor_update_steps": 10,
    "inv_update_steps": 50,
    "damping_mode": "absolute",
    "factor_init": "batch",
}
BATCH = {"digits_autoencoder": 256, "digits_mlp": 256}
TARGET_FLOOR = {"digits_autoencoder": 0.0, "digits_mlp": 0.01}
EVAL_EVERY = {"digits_autoencoder": 5, "digits_mlp": 2}
TINY_STEPS = {"digits_autoencoder": 12, "digits_mlp": 12}  # --tiny: steps per run, not seconds


def load_data() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    std = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    return {"pixels": X / 16.0, "standardized": std, "labels": torch.tensor(y)}


def make_problem(name: str, data: dict[str, Any], seed: int):
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


def train(
    problem: str,
    method: str,
    setting: float,
    seed: int,
    data: dict[str, Any],
    budget_s: float,
    eval_every: int = 5,
    kfac_options: dict[str, Any] | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train for ``budget_s`` seconds of (non-evaluation) wall-clock; return the loss curve.

    ``setting`` is the method's knob (``KNOB``); ``kfac_options`` overrides ``KFAC_OPTIONS``.
    ``max_steps``: train for exactly that many steps instead (``budget_s`` is ignored), so the
    curve of losses and steps does not depend on the machine's load (``--tiny``).
    """
    model, x, y, loss_fn = make_problem(problem, data, seed)
    pre = None
    if method == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=setting)
    elif method == "sgd-nesterov":
        opt = torch.optim.SGD(model.parameters(), lr=setting, momentum=0.9, nesterov=True)
    elif method == "kfac+sgd":
        opt = torch.optim.SGD(model.parameters(), lr=KFAC_LR, momentum=0.9)
        options = dict(KFAC_OPTIONS if kfac_options is None else kfac_options)
        options.setdefault("kl_clip", setting)
        pre = KFACPreconditioner(model, **options)
    else:
        raise ValueError(f"Invalid method={method!r}: must be one of {sorted(KNOB)}.")
    batch, n = BATCH[problem], x.shape[0]
    order_gen = torch.Generator().manual_seed(1000 + seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    times, losses, steps = [0.0], [full_loss()], [0]
    clock, step, perm, pos = 0.0, 0, torch.randperm(n, generator=order_gen), 0
    while (clock < budget_s) if max_steps is None else (step < max_steps):
        start = time.perf_counter()
        for _ in range(eval_every if max_steps is None else min(eval_every, max_steps - step)):
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=order_gen), 0
            idx = perm[pos : pos + batch]
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
    return {
        "problem": problem,
        "method": method,
        "setting": setting,
        "seed": seed,
        "times": times,
        "losses": losses,
        "steps": steps,
    }


def first_reach(run: dict[str, Any], target: float):
    """(time, steps) of the first evaluation at or below ``target``; (inf, None) if never."""
    for t, loss, s in zip(run["times"], run["losses"], run["steps"]):
        if loss <= target:
            return t, s
    return math.inf, None


def summarize(
    runs: list[dict[str, Any]], problem: str, grid: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """Pick the target and each method's best learning rate; one table row per method."""
    mine = [r for r in runs if r["problem"] == problem]
    methods = list(grid)
    best_loss = {}
    for m in methods:
        per_setting = []
        for value in grid[m]:
            lows = [min(r["losses"]) for r in mine if r["method"] == m and r["setting"] == value]
            per_setting.append(common.median(lows))
        best_loss[m] = min(per_setting)
    target = max(TARGET_FLOOR[problem], TARGET_SLACK * max(best_loss.values()))
    rows = []
    for m in methods:
        best = None
        for value in grid[m]:
            seeds = [r for r in mine if r["method"] == m and r["setting"] == value]
            reach = [first_reach(r, target) for r in seeds]
            med = common.median([t for t, _ in reach])
            key = (med, common.median([min(r["losses"]) for r in seeds]))
            if best is None or key < best[0]:
                best = (key, value, seeds, reach)
        _, value, seeds, reach = best
        times = [t for t, _ in reach]
        ok = [(t, s) for t, s in reach if s is not None]  # non-empty: see the docstring
        total_steps = sum(r["steps"][-1] for r in seeds)
        total_time = sum(r["times"][-1] for r in seeds)
        rows.append(
            {
                "problem": problem,
                "method": m,
                "knob": KNOB[m],
                "best": value,
                "time_s": common.median(times),
                "time_min_s": min(times),
                "time_max_s": max(t for t, _ in ok),
                "steps": common.median([s for _, s in ok]),
                "ms_per_step": 1e3 * total_time / max(total_steps, 1),
                "final_loss": common.median([r["losses"][-1] for r in seeds]),
                "target": target,
                "reached": f"{len(ok)}/{len(seeds)}",
            }
        )
    baselines = [r["time_s"] for r in rows if r["method"] != "kfac+sgd"]
    for row in rows:
        row["x_best_baseline"] = row["time_s"] / min(baselines) if min(baselines) > 0 else math.nan
    return rows


def _plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], out: str) -> str:
    problems = sorted({r["problem"] for r in rows}, key=[r["problem"] for r in rows].index)
    fig, axes = common.new_figure(ncols=len(problems), width=5.5)
    colors = {"kfac+sgd": "tab:red", "sgd-nesterov": "tab:blue", "adam": "tab:green"}
    for ax, problem in zip(axes, problems):
        for row in (r for r in rows if r["problem"] == problem):
            best = [
                r
                for r in runs
                if r["problem"] == problem
                and r["method"] == row["method"]
                and r["setting"] == row["best"]
            ]
            for i, run in enumerate(best):
                ax.plot(
                    run["times"],
                    run["losses"],
                    color=colors.get(row["method"]),
                    lw=1,
                    alpha=0.8,
                    label=(f"{row['method']} {row['knob']}={row['best']:g}" if i == 0 else None),
                )
        ax.axhline(
            rows[[r["problem"] for r in rows].index(problem)]["target"],
            color="k",
            ls="--",
            lw=0.8,
            label="target",
        )
        ax.set_yscale("log")
        ax.set_xlabel("wall-clock seconds (evaluation excluded)")
        ax.set_ylabel("training loss")
        ax.set_title(problem)
        ax.legend(fontsize=7)
    return common.save_figure(fig, out, NAME)


def run(
    tiny: bool = False, out: str = common.DEFAULT_OUT, threads: int | None = None
) -> dict[str, Any]:
    """Run every (problem, method, setting, seed) for the same budget, interleaved."""
    threads = common.set_threads(tiny, threads)
    data = load_data()
    budget = (
        {"digits_autoencoder": 0.1, "digits_mlp": 0.05}
        if tiny
        else {"digits_autoencoder": 6.0, "digits_mlp": 1.5}
    )
    # --tiny (the CI smoke run): a step budget, so which method reaches the target, and when in
    # steps, is the same on an idle and on a loaded machine (a 0.05 s budget gave K-FAC 2 steps
    # under load, the target rose above every initial loss and x_best_baseline became nan).
    budget_steps = TINY_STEPS if tiny else None
    seeds = [0, 1, 2]
    grids = {p: {m: (v[1:2] if tiny else v) for m, v in g.items()} for p, g in GRIDS.items()}
    runs = []
    for seed in seeds:  # interleave problems, methods and learning rates within each seed
        for problem, grid in grids.items():
            for i in range(max(len(v) for v in grid.values())):
                for method, values in grid.items():
                    if i < len(values):
                        runs.append(
                            train(
                                problem,
                                method,
                                values[i],
                                seed,
                                data,
                                budget[problem],
                                eval_every=1 if tiny else EVAL_EVERY[problem],
                                max_steps=budget_steps and budget_steps[problem],
                            )
                        )
    rows = []
    for problem, grid in grids.items():
        rows += summarize(runs, problem, grid)
    per_run = f"{budget_steps} steps" if tiny else f"{budget} s"
    title = (
        f"time_to_target ({'tiny' if tiny else 'full'}; {threads} threads; load "
        f"{common.load_average():.1f}; budget per run {per_run}; seeds {seeds})"
    )
    print(common.format_table(rows, COLUMNS, title), flush=True)
    payload = {
        "benchmark": NAME,
        "tiny": tiny,
        "machine": common.machine_info(),
        "budget_s": None if tiny else budget,
        "budget_steps": budget_steps,
        "grids": grids,
        "knob": KNOB,
        "kfac_lr": KFAC_LR,
        "kfac_options": KFAC_OPTIONS,
        "batch": BATCH,
        "target_floor": TARGET_FLOOR,
        "target_slack": TARGET_SLACK,
        "columns": COLUMNS,
        "rows": rows,
        "runs": runs,
    }
    payload["json"] = common.write_json(out, NAME, payload)
    payload["png"] = _plot(runs, rows, out)
    return payload


def main(argv: list[str] | None = None) -> None:
    common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
