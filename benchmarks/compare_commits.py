"""Per-step engine time of two trees (two commits), measured interleaved in one run.

Each tree gets one worker subprocess running ``benchmarks/step_time_probe.py --serve`` (of THIS
tree, passed by path; it imports only the public API, so it runs against any commit) with
``PYTHONPATH`` set to that tree. The driver asks the two workers for single training steps in
turn, A B B A A B ..., so a drift in the machine's speed (other jobs, frequency) hits both trees
alike. Reported per model/method: the median CPU time per step of each tree over all timed
steps, the ratio B/A, and the min/max of the per-round ratios (median of B's steps in round r
over A's), which shows the noise: two identical trees give ratios around 1.00 within it.

A tree is a directory holding ``lightning_kfac/`` or a git revision, checked out for the run with
``git worktree add --detach`` in a temporary directory and removed afterwards:

    python -m benchmarks.compare_commits 5b84710 . [--rounds 6] [--steps 5] \
        [--models mlp cnn] [--methods eigen inverse]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

PROBE = Path(__file__).resolve().with_name("step_time_probe.py")


def resolve_tree(spec: str, stack: ExitStack) -> tuple[Path, str]:
    """(directory, label) of a tree: a directory as is, or a git revision checked out detached."""
    path = Path(spec)
    if (path / "lightning_kfac").is_dir():
        return path.resolve(), spec
    repo = Path(__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", spec],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kfac-tree-"))) / rev
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(tmp), rev], check=True
    )
    stack.callback(
        subprocess.run,
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(tmp)],
        check=False,
    )
    return tmp, f"{spec} ({rev})"


class Worker:
    """A probe subprocess in ``--serve`` mode importing ``tree``'s package: steps on request."""

    def __init__(self, tree: Path, threads: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, str(PROBE), "--serve", "--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        imported = Path(json.loads(self._read())["lightning_kfac"]).resolve()
        if tree not in imported.parents:
            self.close()
            raise RuntimeError(f"the probe for {tree} imported lightning_kfac from {imported}")

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the probe exited (code {self.proc.wait()}); see its stderr above")
        return line

    def step(self, key: str) -> tuple[float, float]:
        """One step of ``key`` (``model/method``): CPU seconds of the step and of ``pre.step``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(key + "\n")
        self.proc.stdin.flush()
        step_s, engine_s = json.loads(self._read())
        return float(step_s), float(engine_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def measure(
    workers: dict[str, Worker], keys: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """``rounds[r][side][key]["step"|"engine"]``: seconds of the timed steps of round r.

    Steps alternate between the trees A B B A A B ... within each round and model/method, so
    both see the same machine state within a fraction of a second."""
    for key in keys:  # builds each trainee (first decomposition, allocations): untimed
        for _ in range(args.warmup):
            for worker in workers.values():
                worker.step(key)
    rounds: list[dict[str, Any]] = []
    start = time.perf_counter()
    for r in range(args.rounds):
        result: dict[str, Any] = {side: {} for side in workers}
        for key in keys:
            for side in workers:
                result[side][key] = {"step": [], "engine": []}
            for i in range(args.steps):
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    step_s, engine_s = workers[side].step(key)
                    result[side][key]["step"].append(step_s)
                    result[side][key]["engine"].append(engine_s)
        rounds.append(result)
        elapsed = time.perf_counter() - start
        print(f"round {r + 1}/{args.rounds} done at {elapsed:.0f} s", file=sys.stderr, flush=True)
    return rounds


def summarize(rounds: list[dict[str, Any]], key: str, part: str) -> dict[str, float]:
    """Pooled medians (ms), their ratio B/A, and the min/max of the per-round ratios."""
    a = [t for r in rounds for t in r["A"][key][part]]
    b = [t for r in rounds for t in r["B"][key][part]]
    per_round = [
        statistics.median(r["B"][key][part]) / statistics.median(r["A"][key][part]) for r in rounds
    ]
    med_a, med_b = statistics.median(a), statistics.median(b)
    return {
        "A_ms": 1e3 * med_a,
        "B_ms": 1e3 * med_b,
        "ratio": med_b / med_a,
        "round_min": min(per_round),
        "round_max": max(per_round),
    }


def table(rounds: list[dict[str, Any]], keys: list[str]) -> str:
    head = (
        f"{'model/method':<16}{'step A ms':>11}{'step B ms':>11}{'B/A':>7}{'rounds':>14}"
        f"{'engine A':>10}{'engine B':>10}{'B/A':>7}{'rounds':>14}"
    )
    lines = [head, "-" * len(head)]
    for key in keys:
        cells = f"{key:<16}"
        for part, width in (("step", 11), ("engine", 10)):
            s = summarize(rounds, key, part)
            spread = f"[{s['round_min']:.3f},{s['round_max']:.3f}]"
            cells += f"{s['A_ms']:>{width}.1f}{s['B_ms']:>{width}.1f}{s['ratio']:>7.3f}{spread:>14}"
        lines.append(cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree_a", help="baseline: a directory or a git revision")
    parser.add_argument("tree_b", help="candidate: a directory or a git revision")
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds (the noise is read off their spread)"
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per tree, model/method and round"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per tree and model/method first"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the probe")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument(
        "--methods", nargs="+", default=["eigen", "inverse"], choices=["eigen", "inverse", "ekfac"]
    )
    parser.add_argument("--json", default=None, help="also write the raw times here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    # a kill (SIGTERM) unwinds like Ctrl-C, so the temporary worktrees are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with ExitStack() as stack:
        (tree_a, label_a), (tree_b, label_b) = (
            resolve_tree(args.tree_a, stack),
            resolve_tree(args.tree_b, stack),
        )
        keys = [f"{m}/{meth}" for m in args.models for meth in args.methods]
        workers = {
            side: Worker(tree, args.threads) for side, tree in (("A", tree_a), ("B", tree_b))
        }
        for worker in workers.values():
            stack.callback(worker.close)
        rounds = measure(workers, keys, args)
    print(
        f"A = {label_a}\nB = {label_b}\n{args.rounds} rounds x {args.steps} steps per tree, "
        f"{args.threads} thread(s); CPU ms per step, medians; 'rounds' = min/max of the "
        f"per-round B/A ratios (the noise)"
    )
    print(table(rounds, keys))
    step_ratios = [summarize(rounds, key, "step")["ratio"] for key in keys]
    print(
        f"geometric mean of the step-time ratios B/A: {statistics.geometric_mean(step_ratios):.3f}"
    )
    payload = {"A": label_a, "B": label_b, "args": vars(args), "rounds": rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
