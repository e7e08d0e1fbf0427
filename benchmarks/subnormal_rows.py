"""Subnormal output-gradient rows and the rank-R path: ``python -m benchmarks.subnormal_rows``.

    python -m benchmarks.subnormal_rows micro [--rounds 5] [--fraction 0.4]
    python -m benchmarks.subnormal_rows long [--steps 300] [--methods eigen inverse]

Once a fixed batch is fit, many per-example output gradients underflow: a quarter to a half of
the rows the low-rank path keeps (``block.g_rows``) are subnormal floats, and x86 matmuls on
subnormal operands run tens of times slower. ``core/lowrank.stack_rows`` flushes them to zero.

``micro``: the second Linear of the step-overhead MLP (d_A = 1001, d_G = 500, R = 128 rows, a
``--fraction`` of the output-gradient entries subnormal). Interleaved rounds in one process, one
thread, thread CPU time, of ``gradient_matches`` + ``rotated_gradient`` on the raw rows ("before":
the plain concatenation) and on ``stack_rows``' output ("after", the flush included); and of the
other products of a step that see such rows (factor accumulation ``Gm^T Gm``, EKFAC's rotation
``Gm Q_G``), raw and flushed.

``long``: the MLP 784-1000-500-250-10 (ReLU), batch 128, one fixed batch, SGD lr 1e-3 momentum
0.9, default clocks, low-rank path on, trained ``--steps`` steps. Per method, four copies train
in lock-step (same seed): ``raw`` (every flush disabled), ``rank-R`` (only the rank-R rows
flushed, ``lowrank.stack_rows``: the engine before the full-path and accumulation flushes),
``flush`` (the engine as is: also the full-path gradient copy and the rows before factor
accumulation, ``linalg.cast_without_subnormals``) and ``ftz`` (every flush disabled,
``torch.set_flush_denormal(True)`` around that copy's whole step: the hardware flush, a
user-side option, the floor any fix can reach). Printed: engine CPU ms per step (``pre.step``
only), percentiles over all steps and over the steps after the batch is fit, and the share of
subnormal entries in the kept rows at the end.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import linalg, lowrank


def subnormal_share(rows: Tensor) -> float:
    """Share of entries with ``0 < |x| < tiny``."""
    mag = rows.abs()
    return float(((mag > 0) & (mag < torch.finfo(rows.dtype).tiny)).float().mean())


def synthetic_layer(
    rows: int, d_a: int, d_g: int, fraction: float, seed: int = 0
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(a_rows, g_rows, eigenbases)`` as a fit ReLU layer's; a ``fraction`` of g subnormal."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(rows, d_a - 1, generator=gen))
    a = torch.cat([a, torch.ones(rows, 1)], 1)
    g = torch.randn(rows, d_g, generator=gen) * 1e-4
    tiny = torch.finfo(torch.float32).tiny
    under = torch.rand(rows, d_g, generator=gen) < fraction
    g = torch.where(under, torch.randn(rows, d_g, generator=gen) * tiny * 1e-3, g)
    qa = torch.linalg.qr(torch.randn(d_a, d_a, generator=gen))[0]
    qg = torch.linalg.qr(torch.randn(d_g, d_g, generator=gen))[0]
    return a, g, {"QA": qa, "QG": qg}


def _cpu_ms(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return 1e3 * (time.thread_time() - start)


def micro(rounds: int, fraction: float) -> None:
    torch.set_num_threads(1)
    a, g, dec = synthetic_layer(128, 1001, 500, fraction)
    grad = g.T @ a  # what autograd would deliver (computed once, on the raw rows)
    raw = (torch.cat([a]), torch.cat([g]))
    flushed = lowrank.stack_rows([a], [g], torch.float32)
    assert flushed is not None
    print(
        f"R = 128, d_A = 1001, d_G = 500: raw g rows {subnormal_share(raw[1]):.1%} subnormal, "
        f"after stack_rows {subnormal_share(flushed[1]):.1%}"
    )
    assert lowrank.gradient_matches(grad, *raw) and lowrank.gradient_matches(grad, *flushed)

    def low_rank(pair: tuple[Tensor, Tensor] | None) -> None:
        assert pair is not None
        lowrank.gradient_matches(grad, *pair)
        lowrank.rotated_gradient(dec, *pair)

    cases: dict[str, Callable[[], object]] = {
        "stack_rows + gradient_matches + rotated_gradient, before (raw rows)": lambda: low_rank(
            (torch.cat([a]), torch.cat([g]))
        ),
        "stack_rows + gradient_matches + rotated_gradient, after (flushed)": lambda: low_rank(
            lowrank.stack_rows([a], [g], torch.float32)
        ),
        "factor accumulation Gm^T Gm, raw": lambda: raw[1].T @ raw[1],
        "factor accumulation Gm^T Gm, flushed": lambda: flushed[1].T @ flushed[1],
        "EKFAC rotation Gm Q_G, raw": lambda: raw[1] @ dec["QG"],
        "EKFAC rotation Gm Q_G, flushed": lambda: flushed[1] @ dec["QG"],
        "full path Q_G^T grad Q_A (grad holds no subnormals)": lambda: (
            dec["QG"].T @ grad @ dec["QA"]
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            times[name].append(_cpu_ms(cases[name]))
    print(f"median of {rounds} interleaved rounds, 1 thread, thread CPU ms")
    print("| operation | ms (median) | min | max |")
    print("| --- | --- | --- | --- |")
    for name, ms in times.items():
        print(f"| {name} | {statistics.median(ms):.2f} | {min(ms):.2f} | {max(ms):.2f} |")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    sizes = [784, 1000, 500, 250, 10]
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _percentiles(ms: list[float]) -> str:
    if not ms:
        return "- | - | -"
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return f"{statistics.median(ms):.1f} | {q[8]:.1f} | {max(ms):.1f}"


class _Copy:
    """One training copy of the long run: its model, optimizer, engine and measurements."""

    def __init__(self, method: str) -> None:
        self.model = _mlp(0)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.pre = KFACPreconditioner(self.model, compute_method=method, low_rank=True)
        self.engine: list[float] = []
        self.whole: list[float] = []
        self.loss = self.rows_share = self.grad_share = 0.0

    def step(self, x: Tensor, y: Tensor) -> None:
        start = time.thread_time()
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        backward_done = time.thread_time()
        kept = [r.flatten() for b in self.pre.blocks.values() for r in b.g_rows]
        self.rows_share = subnormal_share(torch.cat(kept)) if kept else 0.0
        grads = [p.grad.flatten() for p in self.model.parameters() if p.grad is not None]
        self.grad_share = subnormal_share(torch.cat(grads))
        pause = time.thread_time()  # the two shares are not timed
        self.engine.append(_cpu_ms(lambda: self.pre.step(self.opt)))
        self.opt.step()
        self.whole.append(1e3 * (time.thread_time() - pause + backward_done - start))
        self.loss = float(loss.detach())


def _no_flush(rows: Tensor) -> Tensor:
    return rows


def _cast_only(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype)


def long_run(steps: int, methods: list[str], fit_after: int) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    flush, cast = lowrank.flush_subnormals, linalg.cast_without_subnormals
    variants = ["raw", "rank-R", "flush", "ftz"]
    print(
        f"MLP 784-1000-500-250-10, batch 128 (one fixed batch), {steps} steps, 1 thread, "
        f"thread CPU ms per step; engine = pre.step only; 'fit' = steps {fit_after}..{steps - 1}"
    )
    print(
        "| method | variant | engine median | p90 | max | fit: engine median | p90 | max "
        "| fit: whole step median | low-rank layer-steps | subnormal share, kept g rows / "
        "weight gradients (last step) | final loss |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in methods:
        copies = {v: _Copy(method) for v in variants}
        try:
            for _ in range(steps):
                for v, copy in copies.items():
                    lowrank.flush_subnormals = flush if v in ("rank-R", "flush") else _no_flush
                    linalg.cast_without_subnormals = cast if v == "flush" else _cast_only
                    ftz = v == "ftz" and torch.set_flush_denormal(True)
                    try:
                        copy.step(x, y)
                    finally:
                        if ftz:
                            torch.set_flush_denormal(False)
        finally:
            lowrank.flush_subnormals, linalg.cast_without_subnormals = flush, cast
        for v, c in copies.items():
            print(
                f"| {method} | {v} | {_percentiles(c.engine)} | "
                f"{_percentiles(c.engine[fit_after:])} | "
                f"{statistics.median(c.whole[fit_after:] or c.whole):.1f} | "
                f"{c.pre.counters.get('low_rank_steps', 0)} | {c.rows_share:.1%} / "
                f"{c.grad_share:.1%} | {c.loss:.2e} |"
            )
            c.pre.remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.subnormal_rows")
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--fraction", type=float, default=0.4)
    lr = sub.add_parser("long")
    lr.add_argument("--steps", type=int, default=300)
    lr.add_argument("--methods", nargs="+", default=["eigen", "inverse"])
    lr.add_argument("--fit-after", type=int, default=120)
    args = parser.parse_args(argv)
    if args.mode == "micro":
        micro(args.rounds, args.fraction)
    else:
        long_run(args.steps, args.methods, args.fit_after)


if __name__ == "__main__":
    main()
