"""Bit-identity check for refactors: train fixed small problems and save (or compare) every
parameter and every K-FAC state tensor.

    python -m benchmarks.reference_runs --save ref.pt      # on the old commit
    python -m benchmarks.reference_runs --compare ref.pt   # on the new one: exit 1 on any bit

Each run is a plain PyTorch loop on one torch thread (deterministic), seeded, over options that
exercise every engine path: eigen / inverse / EKFAC, relative and absolute damping, MC Fisher,
the low-rank path, stagger, warm-up, KL clip, the quadratic step rule, convolutions, an Embedding
(diagonal A), tied weights, and the demo autoencoder under the Lightning callback.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner

STEPS = 24


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 4)
    )


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 4),
    )


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.emb(tokens))))


def _tied(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _Tied()


def _batches(kind: str, n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        if kind == "mlp":
            out.append((torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)))
        elif kind == "cnn":
            out.append(
                (torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
            )
        else:
            tokens = torch.randint(0, 11, (8, 5), generator=g)
            out.append((tokens, torch.randint(1, 11, (8, 5), generator=g)))
    return out


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


CASES: dict[str, tuple[Callable[[int], nn.Module], str, dict[str, Any]]] = {
    "eigen": (_mlp, "mlp", dict(compute_method="eigen", factor_update_steps=2, inv_update_steps=4)),
    "inverse": (
        _mlp,
        "mlp",
        dict(compute_method="inverse", factor_update_steps=2, inv_update_steps=4),
    ),
    "ekfac": (_mlp, "mlp", dict(compute_method="ekfac", factor_update_steps=2, inv_update_steps=6)),
    "relative": (
        _mlp,
        "mlp",
        dict(damping_mode="relative", damping=1e-2, factor_update_steps=1, inv_update_steps=3),
    ),
    "absolute_identity": (
        _mlp,
        "mlp",
        dict(damping_mode="absolute", factor_init="identity", inv_update_steps=5),
    ),
    "mc": (_mlp, "mlp", dict(fisher_type="mc", factor_update_steps=1, inv_update_steps=3)),
    "no_low_rank": (_mlp, "mlp", dict(low_rank=False, factor_update_steps=1, inv_update_steps=2)),
    "stagger_warmup": (
        _mlp,
        "mlp",
        dict(stagger_refresh=True, warmup_steps=3, factor_update_steps=1, inv_update_steps=4),
    ),
    "kl_clip_small": (_mlp, "mlp", dict(kl_clip=1e-6, factor_update_steps=1, inv_update_steps=2)),
    "adaptive_damping": (
        _mlp,
        "mlp",
        dict(
            adaptive_damping=True,
            adaptive_damping_interval=2,
            factor_update_steps=1,
            inv_update_steps=2,
        ),
    ),
    "step_rule": (
        _mlp,
        "mlp",
        dict(
            step_rule="quadratic",
            damping_mode="absolute",
            damping=1e-1,
            factor_update_steps=1,
            inv_update_steps=2,
        ),
    ),
    "cnn_eigen": (_cnn, "cnn", dict(factor_update_steps=1, inv_update_steps=3)),
    "cnn_inverse": (
        _cnn,
        "cnn",
        dict(compute_method="inverse", factor_update_steps=1, inv_update_steps=3),
    ),
    "tied_embedding": (_tied, "tok", dict(factor_update_steps=1, inv_update_steps=3)),
    "tied_embedding_ekfac": (
        _tied,
        "tok",
        dict(compute_method="ekfac", factor_update_steps=1, inv_update_steps=3),
    ),
}


def _flatten(prefix: str, value: Any, out: dict[str, Tensor]) -> None:
    if isinstance(value, Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(f"{prefix}/{i}", item, out)
    elif isinstance(value, (int, float, bool, str)) or value is None:
        out[prefix] = torch.tensor(
            [
                float(
                    zlib.crc32(value.encode())
                    if isinstance(value, str)
                    else (0.0 if value is None else value)
                )
            ],
            dtype=torch.float64,
        )


def run_case(name: str) -> dict[str, Tensor]:
    build, data, options = CASES[name]
    model = build(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=opt, **options)
    out: dict[str, Tensor] = {}
    losses = []
    for x, y in _batches(data, STEPS):
        opt.zero_grad()
        output = model(x)
        if pre.mc is not None:
            pre.mc_backward(output)
        loss = _loss(output, y)
        loss.backward()
        if options.get("step_rule") == "quadratic":
            pre.step(opt, closure=lambda x=x, y=y: _loss(model(x), y))
        else:
            pre.step(opt)
        opt.step()
        if options.get("adaptive_damping"):
            pre.update_damping(loss, lambda x=x, y=y: _loss(model(x), y))
        losses.append(float(loss))
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    for pname, p in model.named_parameters():
        out[f"param/{pname}"] = p.detach().clone()
    state = pre.state_dict()
    state.pop("config", None)
    _flatten("state", state, out)
    return out


def run_demo(steps: int = 60) -> dict[str, Tensor]:
    """The demo's autoencoder under KFACCallback (Lightning), ``steps`` optimizer steps."""
    import tempfile
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from examples.train import CONF_DIR, build

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "train",
            overrides=[
                "experiment=autoencoder",
                f"trainer.max_steps={steps}",
                "test=false",
                "plot=false",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
            ],
        )
    with tempfile.TemporaryDirectory() as tmp:
        datamodule, model, trainer, kfac = build(cfg, Path(tmp), csv_logger=False)
        trainer.fit(model, datamodule=datamodule)
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    state = kfac.preconditioner.state_dict() if kfac.preconditioner is not None else {}
    state.pop("config", None)
    _flatten("state", state, out)
    return out


def run_all(with_demo: bool = True) -> dict[str, dict[str, Tensor]]:
    torch.set_num_threads(1)
    results = {name: run_case(name) for name in CASES}
    if with_demo:
        results["demo_callback"] = run_demo()
    return results


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit, NaN equal to NaN (a missing statistic is saved as NaN)."""
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def compare(old: dict[str, dict[str, Tensor]], new: dict[str, dict[str, Tensor]]) -> list[str]:
    """Every difference, as text; empty when bit-identical."""
    diffs = []
    for case in sorted(set(old) | set(new)):
        a, b = old.get(case), new.get(case)
        if a is None or b is None:
            diffs.append(f"{case}: only in {'new' if a is None else 'old'}")
            continue
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                diffs.append(f"{case}: {key} only in {'new' if key not in a else 'old'}")
            elif a[key].dtype != b[key].dtype or a[key].shape != b[key].shape:
                diffs.append(
                    f"{case}: {key} {a[key].dtype}{tuple(a[key].shape)} vs "
                    f"{b[key].dtype}{tuple(b[key].shape)}"
                )
            elif not _same(a[key], b[key]):
                err = float((a[key].double() - b[key].double()).abs().max())
                diffs.append(f"{case}: {key} differs (max abs {err:.3g})")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the results of this tree to this file")
    group.add_argument("--compare", help="compare this tree's results with this file")
    parser.add_argument("--no-demo", action="store_true", help="skip the Lightning demo run")
    args = parser.parse_args(argv)
    results = run_all(with_demo=not args.no_demo)
    if args.save:
        torch.save(results, args.save)
        n = sum(len(v) for v in results.values())
        print(f"saved {len(results)} runs, {n} tensors to {args.save}")
        return 0
    diffs = compare(torch.load(args.compare), results)
    if diffs:
        print("\n".join(diffs))
        print(f"NOT bit-identical: {len(diffs)} differences")
        return 1
    n = sum(len(v) for v in results.values())
    print(f"bit-identical: {len(results)} runs, {n} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
