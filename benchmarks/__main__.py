"""Run every benchmark: ``python -m benchmarks [--tiny] [--out DIR] [--only NAME ...]``.

``python -m benchmarks suite [...]`` runs the time-to-target suite instead (benchmarks/suite.py).

Each benchmark prints a plain-text table and writes ``DIR/<name>.json`` and ``DIR/<name>.png``
(default ``bench_results/``). ``--tiny`` runs small sizes for a smoke test (well under a minute).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks import common, kronecker, scaling, step_overhead, time_to_target

BENCHMARKS = {
    "step_overhead": step_overhead,
    "time_to_target": time_to_target,
    "scaling": scaling,
    "kronecker": kronecker,
}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["suite"]:
        from benchmarks import suite

        return {"suite": suite.main(argv[1:])}
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    common.add_common_args(parser)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        default=None,
        help="run only these benchmarks",
    )
    args = parser.parse_args(argv)
    results = {}
    for name, module in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        results[name] = module.run(tiny=args.tiny, out=args.out, threads=args.threads)
        print(
            f"[{name}: {time.perf_counter() - start:.1f} s; wrote {results[name]['json']} and "
            f"{results[name]['png']}]\n",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
