"""Where a K-FAC step's time goes:
``python -m benchmarks.profile_step [--method inverse] [--steps 60]``.

Profiles (cProfile, sorted by own time) the engine on the step-overhead MLP (784-1000-500-250-10,
batch 128, default clocks: factors every 10 steps, decompositions every 100) after three warm-up
steps, and prints the top entries. A diagnostic for reading the step-overhead table, not a timing
benchmark: profiling itself slows the Python parts.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
    parser.add_argument("--method", choices=["eigen", "inverse", "ekfac"], default="inverse")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    sizes = [784, 1000, 500, 250, 10]
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre = KFACPreconditioner(model, compute_method=args.method)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        opt.step()

    for _ in range(3):
        step()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
