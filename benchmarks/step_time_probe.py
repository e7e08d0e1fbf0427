"""Per-step CPU time of the K-FAC engine on fixed models, for one tree (run by path).

``benchmarks/compare_commits.py`` runs this file as a subprocess once per measurement, with
``PYTHONPATH`` set to the tree under test, so each run imports that tree's ``lightning_kfac``. To
work against any commit (including ones older than this file) it imports nothing from
``benchmarks/`` and uses only the public engine API: ``KFACPreconditioner(model, damping=...,
compute_method=..., factor_update_steps=..., inv_update_steps=...)``, ``pre.step(opt)``,
``pre.remove()``.

Models (the step_overhead benchmark's MLP and CNN): MLP 784-1000-500-250-10 on a batch of 128;
CNN conv 3->32 - pool - conv 32->64 - pool to 4x4 - linear on 128 images 3x32x32. Each step is
forward, backward, ``pre.step``, SGD step; the factors and the decompositions are refreshed every
step (the engine's most expensive setting). Times are CPU seconds of the process
(``time.process_time``), so a machine shared with other jobs slows the wall clock but much less
the measurement.

    PYTHONPATH=<tree> python benchmarks/step_time_probe.py --steps 5 --models mlp cnn \
        --methods eigen inverse

prints one JSON line: ``{"lightning_kfac": <path of the imported package>, "times": {"<model>/
<method>": {"step": [...], "engine": [...]}}}`` (seconds per timed step). With ``--serve`` it
steps on request instead (one step per stdin line; see ``serve``), which the driver uses to
interleave the two trees step by step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lightning_kfac
from lightning_kfac import KFACPreconditioner

MODELS = ("mlp", "cnn")
METHODS = ("eigen", "inverse", "ekfac")


def build(model: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (seeded) and one fixed batch (inputs, class labels)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if model == "mlp":
        sizes = (784, 1000, 500, 250, 10)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        x = torch.randn(128, 784, generator=gen)
        return nn.Sequential(*layers), x, torch.randint(0, 10, (128,), generator=gen)
    if model == "cnn":
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 10),
        )
        x = torch.randn(128, 3, 32, 32, generator=gen)
        return net, x, torch.randint(0, 10, (128,), generator=gen)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


class Trainee:
    """One model, its SGD optimizer and a K-FAC preconditioner refreshing everything every step."""

    def __init__(self, model: str, method: str) -> None:
        self.net, self.x, self.y = build(model)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9)
        self.pre = KFACPreconditioner(
            self.net, damping=1e-2, compute_method=method, factor_update_steps=1, inv_update_steps=1
        )
        self.loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy

    def step(self) -> tuple[float, float]:
        """One training step; CPU seconds of the whole step and of its ``pre.step`` part."""
        t0 = time.process_time()
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.net(self.x), self.y).backward()
        t1 = time.process_time()
        self.pre.step(self.opt)
        t2 = time.process_time()
        self.opt.step()
        t3 = time.process_time()
        return t3 - t0, t2 - t1


def measure(model: str, method: str, steps: int, warmup: int) -> dict[str, list[float]]:
    """CPU seconds of each of ``steps`` timed steps: whole step and the ``pre.step`` part."""
    trainee = Trainee(model, method)
    times: dict[str, list[float]] = {"step": [], "engine": []}
    for i in range(warmup + steps):
        step_s, engine_s = trainee.step()
        if i >= warmup:
            times["step"].append(step_s)
            times["engine"].append(engine_s)
    trainee.pre.remove()
    return times


def serve() -> None:
    """Step on request: each stdin line ``<model>/<method>`` runs one step of that trainee (built
    on first use) and answers one JSON line ``[step_s, engine_s]``; the first line written is
    ``{"lightning_kfac": <path>}``. Lets a driver interleave two trees step by step."""
    print(json.dumps({"lightning_kfac": lightning_kfac.__file__}), flush=True)
    trainees: dict[str, Trainee] = {}
    for line in sys.stdin:
        key = line.strip()
        if not key:
            break
        if key not in trainees:
            model, method = key.split("/")
            trainees[key] = Trainee(model, method)
        print(json.dumps(trainees[key].step()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model/method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=["eigen", "inverse"], choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--serve", action="store_true", help="step on request (see serve())")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.serve:
        serve()
        return
    times = {
        f"{m}/{meth}": measure(m, meth, args.steps, args.warmup)
        for m in args.models
        for meth in args.methods
    }
    print(json.dumps({"lightning_kfac": lightning_kfac.__file__, "times": times}), flush=True)


if __name__ == "__main__":
    main()
