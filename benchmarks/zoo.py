"""The model zoo table: ``python -m benchmarks.zoo [--steps N] [--models NAME ...] [--out DIR]``.

For every model of ``benchmarks/zoo_models.py`` (GPT-2, BERT, Llama from ``transformers``;
ResNet- and MobileNet-style CNNs), trains ``--steps`` steps with and without
``KFACPreconditioner`` (the callback's engine, default options) from the same initialization on
the same batches (SGD with momentum 0.9) and reports:

- the share of trainable parameters the engine preconditions (``pre.coverage()``) and its layers;
- the final loss (mean of the last 3 training losses) without and with K-FAC;
- the step-time ratio K-FAC / plain: median over steps, and of the first step (factors and the
  first decomposition), on the CPU-time clock of the training thread (``time.thread_time``,
  torch limited to one thread so that the clock sees all of the work);
- the peak memory: the increase of the process's peak resident set size over training, each run
  in its own subprocess (``ru_maxrss`` after training minus before the first step).

Prints a Markdown table (the README's zoo table) and writes ``DIR/zoo.json``. Coverage reflects
what the engine supports at the time it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks.zoo_models import ZOO, build

DEFAULTS = dict(steps=20, batch_size=16, lr=0.05, momentum=0.9)


def train(
    name: str,
    kfac: bool,
    steps: int,
    batch_size: int,
    lr: float = DEFAULTS["lr"],
    momentum: float = DEFAULTS["momentum"],
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run: losses, per-step thread CPU seconds, coverage (K-FAC only), RSS peak increase."""
    from lightning_kfac import KFACPreconditioner

    model, batches, loss_fn = build(name, steps, batch_size, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    pre = None
    result: dict[str, Any] = {"model": name, "kfac": kfac}
    if kfac:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre = KFACPreconditioner(model, **(options or {}))
        result["coverage"] = pre.coverage()
        result["layers"] = len(pre.layers)
        result["warnings"] = [str(w.message).splitlines()[0] for w in caught]
    rss_before = _max_rss_mib()
    losses, times = [], []
    for batch in batches:
        start = time.thread_time()
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        if pre is not None:
            pre.step(optimizer)
        optimizer.step()
        times.append(time.thread_time() - start)
        losses.append(float(loss.detach()))
    if pre is not None:
        pre.remove()
        result["layers_after"] = len(pre.layers)  # layers dropped during training are gone
    result.update(
        losses=losses,
        step_seconds=times,
        peak_rss_increase_mib=_max_rss_mib() - rss_before,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return result


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_isolated(
    name: str, kfac: bool, steps: int, batch_size: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``train`` in a fresh one-thread subprocess (its own peak RSS)."""
    code = (
        "import json, torch; torch.set_num_threads(1); from benchmarks.zoo import train; "
        f"print(json.dumps(train({name!r}, {kfac}, {steps}, {batch_size}, "
        f"options=json.loads({json.dumps(options or {})!r}))))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"zoo run {name} (kfac={kfac}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def final_loss(run: dict[str, Any]) -> float:
    return float(statistics.mean(run["losses"][-3:]))


def row(plain: dict[str, Any], kfac: dict[str, Any]) -> dict[str, Any]:
    cov = kfac["coverage"]
    return {
        "model": plain["model"],
        "trainable": plain["trainable"],
        "covered": cov["covered"],
        "coverage_pct": 100.0 * cov["share"],
        "layers": kfac["layers"],
        "loss_plain": final_loss(plain),
        "loss_kfac": final_loss(kfac),
        "median_step_ratio": statistics.median(kfac["step_seconds"])
        / statistics.median(plain["step_seconds"]),
        "first_step_ratio": kfac["step_seconds"][0] / plain["step_seconds"][0],
        "median_step_ms_plain": 1e3 * statistics.median(plain["step_seconds"]),
        "peak_mib_plain": plain["peak_rss_increase_mib"],
        "peak_mib_kfac": kfac["peak_rss_increase_mib"],
    }


def markdown(
    rows: list[dict[str, Any]], steps: int, batch_size: int, options: dict[str, Any] | None = None
) -> str:
    head = (
        "| model | trainable params | preconditioned | K-FAC layers | loss after "
        f"{steps} steps: plain / K-FAC | step time K-FAC / plain: median (first) | "
        "plain step (ms) | peak memory plain / K-FAC (MiB) |"
    )
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trainable']:,} | {r['coverage_pct']:.1f}% | {r['layers']} | "
            f"{r['loss_plain']:.3f} / {r['loss_kfac']:.3f} | {r['median_step_ratio']:.2f}x "
            f"({r['first_step_ratio']:.1f}x) | {r['median_step_ms_plain']:.0f} | "
            f"{r['peak_mib_plain']:.0f} / {r['peak_mib_kfac']:.0f} |"
        )
    lines.append(
        f"\nBatch {batch_size}, SGD (lr {DEFAULTS['lr']}, momentum "
        f"{DEFAULTS['momentum']}), K-FAC options {options or 'default'}, one thread, CPU time of "
        "the training thread; peak memory = increase of the peak RSS during training."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.zoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--models", nargs="+", choices=sorted(ZOO), default=list(ZOO))
    parser.add_argument("--out", default="bench_results")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a KFACConfig option for the K-FAC runs, VALUE as JSON "
        "(e.g. --option damping=0.01); repeatable",
    )
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Invalid --option={item!r}: must be KEY=VALUE (VALUE as JSON).")
        options[key] = json.loads(value)
    if args.steps < 3:
        raise ValueError(f"Invalid --steps={args.steps}: must be >= 3 (final loss: last 3 steps).")
    rows = []
    for name in args.models:
        plain = run_isolated(name, False, args.steps, args.batch_size)
        kfac = run_isolated(name, True, args.steps, args.batch_size, options)
        rows.append(row(plain, kfac))
        for message in kfac.get("warnings", []):
            print(f"[{name}] {message}", file=sys.stderr)
    table = markdown(rows, args.steps, args.batch_size, options)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "zoo.json")
    with open(path, "w") as f:
        json.dump(
            {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "options": options,
                "rows": rows,
                "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "load_average_1min": os.getloadavg()[0],
            },
            f,
            indent=1,
        )
    return rows


if __name__ == "__main__":
    main()
