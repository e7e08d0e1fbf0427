"""Which torch thread count to use for the digits examples: time K-FAC and plain steps per count.

    python examples/threads.py                    # threads 1 and the machine's default, 2 repeats
    python examples/threads.py --threads 1 2 4 --steps 300

For each thread count (interleaved, ``--repeats`` times) it trains the ``make demo`` task
(``experiment=autoencoder``, the same config examples/train.py composes) for ``--steps`` steps
with and without K-FAC, and prints the median wall-clock and process-CPU milliseconds per step
(the first ``--warmup`` steps excluded). Wall time is what a user waits; process CPU time (all
threads) is what the machine pays. Run it on the machine you train on, under its usual load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from examples.demo import compose_config  # noqa: E402
from examples.train import build  # noqa: E402


class StepTimer(pl.Callback):
    """Wall and process-CPU seconds of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.warmup:
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)


def time_run(threads: int, kfac: bool, steps: int, warmup: int, out: Path) -> dict[str, float]:
    overrides = [
        "experiment=autoencoder",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "test=false",
        "plot=false",
        f"threads={threads}",
    ]
    cfg = compose_config(overrides if kfac else [*overrides, "kfac=off"])
    timer = StepTimer(warmup)
    datamodule, model, trainer, _ = build(cfg, out, extra_callbacks=[timer], csv_logger=False)
    trainer.fit(model, datamodule=datamodule)
    return {
        "wall_ms": 1e3 * statistics.median(timer.wall),
        "cpu_ms": 1e3 * statistics.median(timer.cpu),
    }


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="thread counts to compare (default: 1 and torch's default)",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "threads")
    args = parser.parse_args(argv)
    default = torch.get_num_threads()
    samples: dict[tuple, list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for threads in args.threads:
            for kfac in (True, False):
                result = time_run(threads, kfac, args.steps, args.warmup, args.out)
                samples.setdefault((threads, kfac), []).append(result)
    table: dict[int, dict[str, dict[str, float]]] = {}
    print(
        f"\ntorch default threads here: {default}; median ms per step over "
        f"{args.repeats} x {args.steps - args.warmup} steps"
    )
    print("| threads | K-FAC wall ms | K-FAC cpu ms | no K-FAC wall ms | no K-FAC cpu ms |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        row = {
            name: {
                key: statistics.median(s[key] for s in samples[(threads, kfac)])
                for key in ("wall_ms", "cpu_ms")
            }
            for name, kfac in (("kfac", True), ("plain", False))
        }
        table[threads] = row
        print(
            f"| {threads} | {row['kfac']['wall_ms']:.2f} | {row['kfac']['cpu_ms']:.2f} | "
            f"{row['plain']['wall_ms']:.2f} | {row['plain']['cpu_ms']:.2f} |"
        )
    return table


if __name__ == "__main__":
    main()
