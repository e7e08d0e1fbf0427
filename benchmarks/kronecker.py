"""Benchmark 4: how good is the Kronecker approximation, per layer (``lightning_kfac.diagnostics``).

For the two digits problems of ``time_to_target`` (same models, seed 0), on the full training
set (1797 examples, so the figures are exact, not probed), at initialization and after K-FAC+SGD
training, for the empirical Fisher (the true labels / pixels) and the true Fisher (labels
sampled from the model: categorical for the classifier, Bernoulli pixels for the autoencoder):

- ``kronecker_error``: ``||E[(a a^T) (x) (g g^T)] - A (x) G||_F / ||E[(a a^T) (x) (g g^T)]||_F``,
  the relative error of K-FAC's block on the training set (a sum of 3rd/4th-order
  cumulants); ``population_error``: the unbiased estimate of the same for the distribution the
  training set is drawn from (no small-sample bias; see ``lightning_kfac.diagnostics``);
- ``mean_grad_ratio``: ``||E[g]|| / sqrt(E||g||^2)``, zero in expectation for the true Fisher.

    python -m benchmarks.kronecker [--tiny] [--out bench_results]
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import common
from benchmarks import time_to_target as ttt
from lightning_kfac import KFACPreconditioner
from lightning_kfac.diagnostics import diagnose, sampled_nll

NAME = "kronecker"
COLUMNS = [
    "problem",
    "stage",
    "fisher",
    "layer",
    "d_in",
    "d_out",
    "kronecker_error",
    "population_error",
    "mean_grad_ratio",
    "examples",
]
LIKELIHOOD = {"digits_autoencoder": "bernoulli", "digits_mlp": "categorical"}
KL_CLIP = {"digits_autoencoder": 1e-2, "digits_mlp": 1e-3}


def _diagnose(problem: str, model, x, y, loss_fn, stage: str) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    fishers = {
        "empirical": lambda out: loss_fn(out, y),
        "true (sampled)": sampled_nll(LIKELIHOOD[problem], generator=gen),
    }
    modules = dict(model.named_modules())
    for fisher, fn in fishers.items():
        for layer, stats in diagnose(model, x, fn).items():
            weight = modules[layer].weight
            rows.append(
                {
                    "problem": problem,
                    "stage": stage,
                    "fisher": fisher,
                    "layer": layer,
                    "d_in": weight.shape[1] + (modules[layer].bias is not None),
                    "d_out": weight.shape[0],
                    "kronecker_error": stats["kronecker_error"],
                    "population_error": stats["kronecker_error_population"],
                    "mean_grad_ratio": stats["mean_grad_ratio"],
                    "examples": stats["num_examples"],
                }
            )
    return rows


def run_problem(problem: str, data: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    model, x, y, loss_fn = ttt.make_problem(problem, data, seed=0)
    rows = _diagnose(problem, model, x, y, loss_fn, "init")
    opt = torch.optim.SGD(model.parameters(), lr=ttt.KFAC_LR, momentum=0.9)
    pre = KFACPreconditioner(model, kl_clip=KL_CLIP[problem], **ttt.KFAC_OPTIONS)
    gen = torch.Generator().manual_seed(1)
    batch = ttt.BATCH[problem]
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        pre.step(opt)
        opt.step()
    pre.remove()
    return rows + _diagnose(problem, model, x, y, loss_fn, f"after {steps} K-FAC steps")


def _plot(rows: list[dict[str, Any]], out: str) -> str:
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = common.new_figure(ncols=len(problems), width=6.0)
    for ax, problem in zip(axes, problems):
        sel = [r for r in rows if r["problem"] == problem]
        layers = list(dict.fromkeys(r["layer"] for r in sel))
        groups = list(dict.fromkeys((r["stage"], r["fisher"]) for r in sel))
        width = 0.8 / len(groups)
        for j, (stage, fisher) in enumerate(groups):
            vals = [
                next(
                    r["kronecker_error"]
                    for r in sel
                    if r["layer"] == layer and r["stage"] == stage and r["fisher"] == fisher
                )
                for layer in layers
            ]
            ax.bar(
                [i + j * width for i in range(len(layers))], vals, width, label=f"{stage}, {fisher}"
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative Frobenius error of A (x) G")
        ax.set_title(problem)
        ax.legend(fontsize=7)
    return common.save_figure(fig, out, NAME)


def run(
    tiny: bool = False, out: str = common.DEFAULT_OUT, threads: int | None = None
) -> dict[str, Any]:
    threads = common.set_threads(tiny, threads)
    data = ttt.load_data()
    if tiny:
        data = {k: v[:128] for k, v in data.items()}
    steps = 10 if tiny else 300
    rows = []
    for problem in ("digits_autoencoder", "digits_mlp"):
        rows += run_problem(problem, data, steps)
    title = f"kronecker ({'tiny' if tiny else 'full'}; exact per-layer errors on the training set)"
    print(common.format_table(rows, COLUMNS, title), flush=True)
    payload = {
        "benchmark": NAME,
        "tiny": tiny,
        "machine": common.machine_info(),
        "steps": steps,
        "columns": COLUMNS,
        "rows": rows,
    }
    payload["json"] = common.write_json(out, NAME, payload)
    payload["png"] = _plot(rows, out)
    return payload


def main(argv: list[str] | None = None) -> None:
    common.cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
