"""Before/after step cost of two source trees, interleaved: ``python -m benchmarks.ab_step``.

    python -m benchmarks.ab_step --trees /path/before /path/after [--methods inverse eigen]
        [--rounds 5] [--steps 40] [--low-rank both] [--sizes 2048-2048] [--batch 128]

Each round runs, for every (method, low_rank, tree), one fresh subprocess with that tree first on
``PYTHONPATH`` (so it imports that tree's ``lightning_kfac``), one torch thread, on the
step-overhead MLP 784-1000-500-250-10 at batch 128 (``--sizes``, ``--batch``) with the default
clocks (factors every 10
steps, decompositions every 100). A subprocess times ``--steps`` K-FAC steps after three warm-up
steps, and a plain SGD step of the same model, with the CPU-time clock of its thread
(``time.thread_time``: other processes on a shared machine do not count). Rounds alternate the
trees, so drift in the machine's speed hits both alike. SGD with lr 1e-3 and momentum 0.9 as
in ``step_overhead``. Read the median step: K-FAC fits the fixed batch within about 15 steps,
after which many per-example output-gradient rows are subnormal floats and the low-rank path's
products on them get up to 50x slower on x86 (docs/cnn_cost.md), which swamps the means.
Printed: per variant, the median over
rounds of (mean engine ms per step, the median step's engine ms: a preconditioning-only step
under these clocks, mean whole step / plain SGD step). A tree is a directory holding a
``lightning_kfac`` package (e.g. ``git archive <commit> lightning_kfac | tar -x -C <dir>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import torch, torch.nn.functional as F
from torch import nn
from lightning_kfac import KFACPreconditioner
method, low_rank, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
sizes = [int(n) for n in sys.argv[4].split("-")]
batch = int(sys.argv[5])
torch.set_num_threads(1)
torch.manual_seed(0)
layers = []
for d_in, d_out in zip(sizes[:-1], sizes[1:]):
    layers += [nn.Linear(d_in, d_out), nn.ReLU()]
model = nn.Sequential(*layers[:-1])
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # as step_overhead
pre = KFACPreconditioner(model, compute_method=method, low_rank=low_rank)
x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
def step(use_pre):
    t0 = time.thread_time()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    t1 = time.thread_time()
    if use_pre:
        pre.step(opt)
    t2 = time.thread_time()
    opt.step()
    return time.thread_time() - t0, t2 - t1
for _ in range(3):
    step(True)
pre.set_step(100)  # the timed window starts at a decomposition step
kfac = [step(True) for _ in range(steps)]
pre.remove()
plain = [step(False)[0] for _ in range(steps)]
print(json.dumps({"step": sum(k[0] for k in kfac) / steps,
                  "engine": sum(k[1] for k in kfac) / steps,
                  "engine_median": sorted(k[1] for k in kfac)[steps // 2],
                  "plain": sorted(plain)[len(plain) // 2],
                  "low_rank_steps": pre.counters.get("low_rank_steps", 0)}))
"""


def _run_child(
    tree: str, method: str, low_rank: bool, steps: int, sizes: str, batch: int
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            method,
            "1" if low_rank else "0",
            str(steps),
            sizes,
            str(batch),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.abspath(tree),
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_step")
    parser.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--methods", nargs="+", default=["inverse", "eigen"])
    parser.add_argument("--low-rank", choices=["on", "off", "both"], default="on")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--sizes",
        default="784-1000-500-250-10",
        help="layer widths of the ReLU MLP (e.g. 2048-2048: one wide Linear)",
    )
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    flags = {"on": [True], "off": [False], "both": [True, False]}[args.low_rank]
    keys: list[tuple[str, bool, str]] = [
        (m, f, t) for m in args.methods for f in flags for t in args.trees
    ]
    results: dict[tuple[str, bool, str], list[dict[str, float]]] = {k: [] for k in keys}
    for r in range(args.rounds):
        order = keys if r % 2 == 0 else list(reversed(keys))
        for key in order:
            results[key].append(
                _run_child(key[2], key[0], key[1], args.steps, args.sizes, args.batch)
            )
    print(
        f"MLP {args.sizes}, batch {args.batch}, 1 thread, thread CPU time, clocks 10/100, "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps"
    )
    print(
        "| method | low_rank | tree | engine ms/step (mean) | engine ms (median step) "
        "| step / plain SGD | low-rank layer-steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (method, flag, tree), runs in results.items():
        engine = statistics.median(1e3 * run["engine"] for run in runs)
        typical = statistics.median(1e3 * run["engine_median"] for run in runs)
        ratio = statistics.median(run["step"] / run["plain"] for run in runs)
        print(
            f"| {method} | {flag} | {tree} | {engine:.2f} | {typical:.2f} | {ratio:.2f} | "
            f"{int(runs[0]['low_rank_steps'])} |"
        )


if __name__ == "__main__":
    main()
