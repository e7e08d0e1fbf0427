"""The paper's deep autoencoder from one preset: ``kfac=martens2015`` against tuned plain SGD.

Martens & Grosse (2015, sec. 13) train deep autoencoders with K-FAC whose step size and momentum
come from the exact quadratic model (sec. 7) and whose damping follows the Levenberg-Marquardt
rule (sec. 6.5): no learning rate to tune. Here that setting is the preset ``conf/kfac/
martens2015.yaml`` (``step_rule: quadratic``) on the digits autoencoder of
``conf/experiment/autoencoder.yaml`` (64-128-64-32-16-32-64-128-64, logistic units, sparse
initialization, Bernoulli loss summed over pixels, batches of 100), composed by Hydra exactly as
``python examples/train.py experiment=autoencoder kfac=martens2015`` does. The baseline is the
same experiment with ``kfac=off`` (SGD, momentum 0.9) at each learning rate of a grid; the best
is the one with the lowest final loss.

Protocol: one CPU thread; every run gets the same CPU-time budget (``time.process_time`` of the
training batches, from batch start to batch end, which includes K-FAC's work in
``on_before_optimizer_step``); every ``eval_every`` steps the loss on the whole training split
(1,437 images) is evaluated outside the clock. Writes ``martens2015.json`` (curves) and
``martens2015.png`` (full-training-set loss against CPU seconds, all runs).

    python -m benchmarks.martens2015 [--budget 60] [--seeds 0 1 2] [--out bench_results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SGD_LRS = [0.01, 0.03, 0.1, 0.3]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_kfac.integrations.hydra import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hydra_compose(config_name="train", overrides=overrides)


def _clock_callback(budget_s: float, eval_every: int, train_x: torch.Tensor):
    import pytorch_lightning as pl

    class CPUClock(pl.Callback):
        """CPU time of the training batches; stops the fit when the budget is spent."""

        def __init__(self):
            self.cpu, self.curve, self._t0 = 0.0, [], 0.0

        def _evaluate(self, module, step):
            with torch.no_grad():
                logits = module(train_x)
                loss = F.binary_cross_entropy_with_logits(logits, train_x, reduction="none")
            self.curve.append((step, self.cpu, float(loss.sum(1).mean())))

        def on_train_start(self, trainer, module):
            self._evaluate(module, 0)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._t0 = time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.cpu += time.process_time() - self._t0
            step = trainer.global_step
            done = self.cpu >= budget_s
            if step % eval_every == 0 or done:
                self._evaluate(module, step)
                if not math.isfinite(self.curve[-1][2]):
                    done = True
            if done:
                trainer.should_stop = True

    return CPUClock()


def train(overrides: list[str], budget_s: float, eval_every: int, seed: int) -> dict[str, Any]:
    """One run of the composed experiment; its curve (step, cpu_s, full-train loss)."""
    from hydra.utils import instantiate

    from examples.train import build

    cfg = compose(
        [
            "experiment=autoencoder",
            f"seed={seed}",
            "threads=1",
            "trainer.max_epochs=100000",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "trainer.enable_checkpointing=false",
            *overrides,
        ]
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    train_x = torch.stack([datamodule.train_set[i][0] for i in range(len(datamodule.train_set))])
    clock = _clock_callback(budget_s, eval_every, train_x)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "martens2015_runs"
    datamodule, model, trainer, kfac = build(cfg, out, extra_callbacks=[clock], csv_logger=False)
    trainer.fit(model, datamodule=datamodule)
    stats = {}
    if kfac is not None:
        pre = kfac.preconditioner
        stats = {
            "damping": pre.damping,
            **{k: pre.counters.get(k, 0) for k in ("step_rule_steps", "step_rule_skipped")},
        }
    return {
        "overrides": overrides,
        "seed": seed,
        "curve": clock.curve,
        "steps": trainer.global_step,
        "final_loss": clock.curve[-1][2],
        "kfac": stats,
    }


def run(
    budget_s: float = 60.0,
    seeds: list[int] | None = None,
    out: str = "bench_results",
    lrs: list[float] | None = None,
    eval_every: int = 10,
    kfac_overrides: list[str] | None = None,
) -> dict[str, Any]:
    seeds = seeds or [0]
    lrs = SGD_LRS if lrs is None else lrs
    extra = list(kfac_overrides or [])
    plan = []
    for seed in seeds:
        plan.append((" ".join(["kfac=martens2015", *extra]), ["kfac=martens2015", *extra], seed))
        plan += [(f"sgd lr={lr:g}", ["kfac=off", f"optimizer.lr={lr}"], seed) for lr in lrs]
    Path(out).mkdir(parents=True, exist_ok=True)
    json_path = Path(out) / "martens2015.json"
    runs = []
    for label, overrides, seed in plan:
        run_ = {"method": label, **train(overrides, budget_s, eval_every, seed)}
        runs.append(run_)
        print(
            f"{run_['method']:>18} seed {run_['seed']}: {run_['steps']:5d} steps in "
            f"{run_['curve'][-1][1]:6.1f} CPU s, full-train loss {run_['final_loss']:.3f} "
            f"{run_['kfac'] or ''}",
            flush=True,
        )
        payload = {
            "budget_s": budget_s,
            "seeds": seeds,
            "lrs": lrs,
            "runs": runs,
            "torch_threads": 1,
        }
        json_path.write_text(json.dumps(payload, indent=1))  # after every run
    png = _plot(runs, Path(out) / "martens2015.png", budget_s)
    return {"json": str(json_path), "png": str(png), "runs": runs}


def _plot(runs: list[dict[str, Any]], path: Path, budget_s: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run_ in runs:
        xs = [c[1] for c in run_["curve"]]
        ys = [c[2] for c in run_["curve"]]
        kfac = run_["method"].startswith("kfac")
        ax.plot(
            xs,
            ys,
            lw=2.0 if kfac else 1.0,
            color="C3" if kfac else None,
            label=f"{run_['method']} (seed {run_['seed']})",
        )
    ax.set(
        xlabel="CPU seconds (1 thread, training batches only)",
        ylabel="training-set loss (BCE summed over pixels)",
        yscale="log",
        title=f"digits deep autoencoder, {budget_s:g} CPU s per run",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.martens2015", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--budget", type=float, default=60.0, help="CPU seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="*",
        default=SGD_LRS,
        help="SGD learning-rate grid (none: K-FAC only)",
    )
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default="bench_results")
    parser.add_argument(
        "--kfac",
        nargs="*",
        default=[],
        help="extra overrides of the K-FAC run (e.g. kfac.min_damping=0.1)",
    )
    args = parser.parse_args(argv)
    result = run(args.budget, args.seeds, args.out, args.lrs, args.eval_every, args.kfac)
    print(f"wrote {result['json']} and {result['png']}")


if __name__ == "__main__":
    main()
