"""`make demo`: the digits deep autoencoder trained with and without K-FAC, side by side.

    python examples/demo.py                       # 3,000 optimizer steps per run
    python examples/demo.py --budget 6000         # a longer look
    python examples/demo.py --clock thread --budget 10   # 10 CPU seconds of the training thread
    python examples/demo.py optimizer=adam        # any Hydra override of conf/ applies to both runs

Both runs use the same composed config (``experiment=autoencoder`` + the overrides), hence the same
optimizer, learning rate, seed, initialization and batch order; the only difference is the
``KFACCallback`` (``kfac=off`` for the baseline). Each run gets the same budget, by default in
optimizer steps: the losses and the steps to the target are then the same on any load (torch on
one thread, ``--threads 1``, is deterministic). Time is measured as CPU time of the training
thread (``time.thread_time()``, from the first training step, so K-FAC's own cost counts), which
does not count the time other processes hold the core, as wall-clock time does (it still grows
somewhat under load: shared caches). The table gives the final training loss, test metrics,
steps, CPU seconds, steps per CPU second, the steps and CPU seconds to a common target loss, and
wall seconds for reference. ``demo_results/`` gets ``demo.png`` (loss against CPU time and
against steps), ``curves.csv`` (every step of both runs) and ``summary.md`` (the table). After
the K-FAC run, the Kronecker-factorization diagnostics (per-layer Kronecker error and ``||E[g]||``)
of the trained model on a training batch are printed and drawn to ``diagnostics.png``
(examples/demo_diagnostics.py).

The "final training loss" is the mean over the last ``--window`` steps; the common target is the
larger of the two final losses (so both runs reach it) unless ``--target`` is given; a run reaches
it at the first step where the trailing ``--window``-step mean is at or below it.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from examples.demo_diagnostics import diagnose_trained, format_diagnostics, plot_diagnostics  # noqa: E402
from examples.train import CONF_DIR, run  # noqa: E402  (also registers the kfac schema)


class BudgetRecorder(pl.Callback):
    """Records ``(training-thread CPU seconds, wall seconds, step, loss)`` after every training step
    (clocks started at the first step) and stops training once ``budget`` units of ``clock`` have
    passed: ``steps`` (optimizer steps), ``thread`` (CPU seconds of the training thread) or
    ``wall`` (wall-clock seconds).

    The CPU clock is ``time.thread_time()`` of the thread that runs the training loop (Lightning
    calls the hooks on it): with one torch thread that is all the training work, and it does not
    count the time other processes hold the core, as the wall clock does.
    """

    def __init__(self, budget: float, clock: str = "steps"):
        if clock not in CLOCKS:
            raise ValueError(f"Invalid clock={clock!r}: must be one of {sorted(CLOCKS)}")
        self.budget, self.clock = float(budget), clock
        self.times: list[float] = []
        self.wall: list[float] = []
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._t0: float | None = None
        self._wall0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._wall0 = time.thread_time(), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.times.append(time.thread_time() - self._t0)
        self.wall.append(time.perf_counter() - self._wall0)
        self.steps.append(trainer.global_step)
        self.losses.append(float(loss))
        spent = {"steps": self.steps[-1], "thread": self.times[-1], "wall": self.wall[-1]}
        if spent[self.clock] >= self.budget:
            trainer.should_stop = True


#: --clock: what the budget counts (the time columns are always training-thread CPU seconds).
CLOCKS = {
    "steps": "optimizer steps",
    "thread": "s of training-thread CPU time",
    "wall": "s of wall-clock time",
}


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def summarize(rec: BudgetRecorder, window: int, target: float) -> dict[str, float | None]:
    """Final loss, CPU and wall time, steps per CPU second and the first (CPU time, step) where
    the smoothed loss <= target."""
    smooth = trailing_mean(rec.losses, window)
    hit = next((i for i, v in enumerate(smooth) if v <= target), None)
    spent = rec.times[-1] if rec.times else 0.0
    return {
        "final_loss": smooth[-1] if smooth else float("nan"),
        "steps": rec.steps[-1] if rec.steps else 0,
        "cpu_s": spent,
        "wall_s": rec.wall[-1] if rec.wall else 0.0,
        "steps_per_s": (rec.steps[-1] / spent) if spent > 0 else float("nan"),
        "time_to_target_s": rec.times[hit] if hit is not None else None,
        "steps_to_target": rec.steps[hit] if hit is not None else None,
    }


def compose_config(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def format_table(rows: dict[str, dict], target: float, metric_names: Sequence[str]) -> str:
    """The results table; time columns in CPU seconds of the training thread (``cpu s``), with
    wall-clock seconds last, for reference (they follow the machine's load)."""

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    header = [
        "run",
        "final train loss",
        *metric_names,
        "steps",
        "cpu s",
        "steps/cpu s",
        f"steps to loss<={target:.3g}",
        f"cpu s to loss<={target:.3g}",
        "wall s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [
            name,
            fmt(r["final_loss"], ".3f"),
            *[fmt(r["test"].get(m), ".4g") for m in metric_names],
            str(r["steps"]),
            fmt(r["cpu_s"], ".1f"),
            fmt(r["steps_per_s"], ".0f"),
            fmt(r["steps_to_target"], "d"),
            fmt(r["time_to_target_s"], ".1f"),
            fmt(r["wall_s"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    recorders: dict[str, BudgetRecorder],
    window: int,
    target: float,
    path: Path,
    floor: float | None = None,
) -> Path:
    """Loss against training-thread CPU time and against steps, linear axes zoomed on the
    interesting range (from the floor, if given, to the mean-image plateau; the
    first steps lie above it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    finals = []
    for name, rec in recorders.items():
        smooth = trailing_mean(rec.losses, window)
        finals.append(min(smooth))
        axes[0].plot(rec.times, smooth, label=name)
        axes[1].plot(rec.steps, smooth, label=name)
    low = floor if floor is not None else min(finals)
    for ax, xlabel in zip(axes, ("training-thread CPU seconds", "optimizer steps")):
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"common target {target:.3g}")
        if floor is not None:
            ax.axhline(
                floor,
                color="black",
                ls="--",
                lw=0.8,
                label=f"lowest possible {floor:.3g} (pixel entropy)",
            )
        ax.set(xlabel=xlabel, ylim=(low - 0.5, max(30.0, target + 2)))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"training loss ({window}-step mean)")
    axes[0].legend()
    fig.suptitle(
        "Digits deep autoencoder (Martens & Grosse 2015 setting): K-FAC vs the same optimizer alone"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bernoulli_entropy_floor(datamodule) -> float | None:
    """The autoencoder's lowest possible training loss: the mean over training images of the
    summed binary entropies of the pixel intensities (BCE(p, x) >= H(x), equality at p = x)."""
    train_set = getattr(datamodule, "train_set", None)
    if train_set is None:
        return None
    x = train_set.tensors[0].double().clamp(1e-12, 1 - 1e-12)
    return float(-(x * x.log() + (1 - x) * (1 - x).log()).sum(1).mean())


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", type=float, default=3000, help="units of --clock per run (default 3000 steps)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="steps",
        help="what the budget counts: steps (default: the same work for both "
        "runs whatever the machine's load), thread (CPU seconds of the "
        "training thread) or wall (wall-clock seconds, which follow the load)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="also stop each run after this many steps (-1: budget only)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=20,
        help="steps averaged for the final and smoothed loss (default 20)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="common target loss (default: the larger final loss)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, as conf/train.yaml: fastest for these "
        "small layers, immune to oversubscription when other processes share "
        "the cores, and all the work on the clocked thread; 0 leaves torch's "
        "setting)",
    )
    parser.add_argument(
        "--csv-logger",
        action="store_true",
        help="also write a CSVLogger per run (off by default: each self.log call "
        "costs Lightning ~0.3 ms, and the callback logs ten kfac/* values "
        "per step, which would time logging rather than K-FAC)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "demo_results",
        help="output directory (default demo_results/)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides applied to both runs, e.g. optimizer.lr=0.05"
    )
    args = parser.parse_args(argv)

    base = [
        "experiment=autoencoder",
        "trainer.max_epochs=-1",
        f"trainer.max_steps={args.max_steps}",
        "trainer.enable_checkpointing=false",
        "plot=false",
        f"threads={args.threads if args.threads > 0 else 'null'}",
        *args.overrides,
    ]
    arms = {"K-FAC": compose_config(base), "no K-FAC": compose_config([*base, "kfac=off"])}
    if arms["K-FAC"].kfac is None:
        parser.error("the overrides switch K-FAC off in both runs (drop kfac=off)")
    if args.threads != 1:
        print(
            f"note: the cpu s columns count the training thread only; with --threads "
            f"{args.threads} torch also computes on other threads",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)

    recorders: dict[str, BudgetRecorder] = {}
    results: dict[str, dict] = {}
    budget = f"{args.budget:g} {CLOCKS[args.clock]}"
    for name, cfg in arms.items():
        print(f"\n=== {name}: training for {budget} ===", flush=True)
        recorders[name] = BudgetRecorder(args.budget, args.clock)
        run_dir = args.out / name.replace(" ", "_").replace("-", "").lower()
        res = run(cfg, run_dir, extra_callbacks=[recorders[name]], csv_logger=args.csv_logger)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
        floor = (
            bernoulli_entropy_floor(res.datamodule) if "Autoencoder" in cfg.model._target_ else None
        )
        results[name] = {
            "test": res.test_metrics,
            "preconditioned_layers": len(res.kfac.factors()) if res.kfac else 0,
        }
        if res.kfac is not None:  # how Kronecker-factored is the trained net's Fisher?
            results[name]["diagnostics"] = diagnose_trained(
                res.model, res.datamodule, list(res.kfac.factors())
            )

    finals = [trailing_mean(r.losses, args.window)[-1] for r in recorders.values()]
    target = args.target if args.target is not None else max(finals)
    for name, rec in recorders.items():
        results[name].update(summarize(rec, args.window, target), target=target)
    metric_names = sorted({m for r in results.values() for m in r["test"]})
    table = format_table(results, target, metric_names)

    with open(args.out / "curves.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run", "cpu_s", "wall_s", "step", "loss"])
        for name, rec in recorders.items():
            writer.writerows(
                [name, t, w, s, loss]
                for t, w, s, loss in zip(rec.times, rec.wall, rec.steps, rec.losses)
            )
    png = plot(recorders, args.window, target, args.out / "demo.png", floor)
    optimizer = arms["K-FAC"].optimizer
    heading = (
        f"Same optimizer ({optimizer._target_.rsplit('.', 1)[-1]}, lr={optimizer.lr}), "
        f"seed {arms['K-FAC'].seed}, {budget} each, torch threads: "
        f"{args.threads if args.threads > 0 else 'default'}; cpu s = CPU seconds of the "
        "training thread."
    )
    if floor is not None:
        heading += f" Lowest possible training loss (pixel entropy): {floor:.2f}."
    (args.out / "summary.md").write_text(heading + "\n\n" + table + "\n")
    print("\n" + heading + "\n\n" + table)
    print(f"\nplot: {png}\ncurves: {args.out / 'curves.csv'}")
    diag = results["K-FAC"].get("diagnostics")
    if diag:
        text = (
            f"Diagnostics of the trained K-FAC model on a training batch:\n\n"
            f"{format_diagnostics(diag)}\n"
        )
        with open(args.out / "summary.md", "a") as fh:
            fh.write("\n" + text)
        diag_png = plot_diagnostics(diag, args.out / "diagnostics.png")
        print("\n" + text + f"\ndiagnostics: {diag_png}")
    return results


if __name__ == "__main__":
    main()
