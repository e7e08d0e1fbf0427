"""The demo's diagnostics: how Kronecker-factored is the trained network's Fisher, per layer?

After the K-FAC run, ``examples/demo.py`` calls :func:`diagnose_trained` on the first training
batch of the trained model (``lightning_kfac.diagnostics.diagnose``; Martens &
Grosse 2015 sec. 3), prints :func:`format_diagnostics` and draws :func:`plot_diagnostics`:

- Kronecker error ``||M - A (x) G||_F / ||M||_F`` with ``M = E_n[(a_n a_n^T) (x) (g_n g_n^T)]``,
  of the batch (biased toward 1 when the batch is small against the layer) and the unbiased
  population estimate (``kronecker_error_population``);
- ``||E[g]||`` and ``||E[g]|| / sqrt(E||g||^2)``: the empirical Fisher's ``g`` (training targets)
  is not centred, unlike the true Fisher's (``E_y[g] = 0``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.diagnostics import diagnose


def batch_loss(model: nn.Module, batch: Sequence[Tensor]) -> tuple[Tensor, Callable]:
    """``(inputs, loss_fn)``: the model's own training loss on ``batch`` (examples/models.py)."""
    x, y = batch
    if type(model).__name__ == "DeepAutoencoder":  # BCE summed over pixels, mean over images
        return (
            x,
            lambda logits: (
                F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()
            ),
        )
    return x, lambda logits: F.cross_entropy(logits, y)


def diagnose_trained(model: nn.Module, datamodule, layers: Sequence[str]) -> dict[str, dict]:
    """Diagnostics of ``layers`` on the first training batch (the loader has its own seed)."""
    batch = next(iter(datamodule.train_dataloader()))
    inputs, loss_fn = batch_loss(model, batch)
    with torch.enable_grad():
        return diagnose(model.train(), inputs, loss_fn, layers=list(layers))


def format_diagnostics(stats: dict[str, dict]) -> str:
    """A markdown table: one row per layer."""
    lines = [
        "| layer | examples | Kronecker error (batch) | Kronecker error (population) "
        "| method | ‖E[g]‖ | ‖E[g]‖ / rms(g) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        pop = s.get("kronecker_error_population")
        err = f"{s['kronecker_error']:.3f}"
        if s["probes"]:
            err += f" ± {s['kronecker_error_std']:.3f}"
        lines.append(
            f"| {name} | {int(s['num_examples'])} | {err} | "
            f"{'n/a' if pop is None else format(pop, '.3f')} | "
            f"{'probe' if s['probes'] else 'exact'} | {s['mean_grad_norm']:.4g} | "
            f"{s['mean_grad_ratio']:.3f} |"
        )
    return "\n".join(lines)


def plot_diagnostics(stats: dict[str, dict], path: Path, title: str = "") -> Path:
    """Two bar charts per layer: Kronecker error (batch and population) and ``||E[g]||``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    pos = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.4
    axes[0].bar(
        [p - width / 2 for p in pos],
        [stats[n]["kronecker_error"] for n in names],
        width,
        label="this batch",
    )
    axes[0].bar(
        [p + width / 2 for p in pos],
        [stats[n].get("kronecker_error_population", float("nan")) for n in names],
        width,
        label="population (unbiased)",
    )
    axes[0].set(
        ylabel="||M - A⊗G||_F / ||M||_F", ylim=(0, 1.05), title="Kronecker approximation error"
    )
    axes[0].legend()
    axes[1].bar(pos, [stats[n]["mean_grad_norm"] for n in names], color="tab:green")
    axes[1].set(
        ylabel="||E[g]||", yscale="log", title="mean output gradient (0 under the true Fisher)"
    )
    for ax in axes:
        ax.set_xticks(pos, names, rotation=45, ha="right")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "Per-layer K-FAC diagnostics on a training batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
