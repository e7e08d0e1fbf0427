"""Wide layers with the defaults: first-step time and peak memory of K-FAC against plain steps.

Models: a transformers Llama (vocabulary 32000, width 64, 2 layers; batch 4 x 64 tokens) and a
``Linear(64, 50000)`` head (batch 64), both with ``KFACPreconditioner()`` defaults
(``max_dense_dim=2048``, ``memory_budget_gib=2``: the 32000 / 50000-wide sides are diagonal).
Each model runs in a fresh process (tests/support/peak_memory.py): the same batches without and
with K-FAC, per-step CPU time (``time.process_time``, all threads), resident-set peaks around
forward/backward and around the rest of the step.

Columns: ``plain_ms`` median plain step; ``first_ms`` the first K-FAC step (capture, factor
update, decomposition, preconditioning); ``x_first`` their ratio (the target is <= 10);
``kfac_ms`` median later K-FAC step; ``plain_MiB`` the plain run's peak above its start;
``extra_MiB`` what K-FAC adds at its peak; ``pred_MiB`` the summary's predicted peak;
``pred/meas`` their ratio (target within 25%).

    PYTHONPATH=. python -m benchmarks.wide_layers [--steps 5]
"""

from __future__ import annotations

import argparse

from tests.support.peak_memory import measure

MIB = 2**20
CASES = {
    "llama-32000": dict(model="llama", vocab=32000, batch=4, seq=64),
    "linear-64x50000": dict(model="head", d_in=64, d_out=50000, batch=64),
}
COLUMNS = [
    "model",
    "plain_ms",
    "first_ms",
    "x_first",
    "kfac_ms",
    "plain_MiB",
    "extra_MiB",
    "pred_MiB",
    "pred/meas",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, spec in CASES.items():
        r = measure(dict(spec, steps=args.steps, options={}))
        rows.append(
            [
                name,
                f"{1e3 * r['cpu_plain']:.0f}",
                f"{1e3 * r['cpu_first']:.0f}",
                f"{r['cpu_first'] / r['cpu_plain']:.1f}",
                f"{1e3 * r['cpu_kfac']:.0f}",
                f"{r['plain'] / MIB:.1f}",
                f"{r['extra'] / MIB:.1f}",
                f"{r['predicted'] / MIB:.1f}",
                f"{r['predicted'] / max(r['extra'], 1):.2f}",
            ]
        )
    widths = [max(len(str(row[i])) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for row in [COLUMNS, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
