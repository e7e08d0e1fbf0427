"""Train any of the digits examples from the Hydra config tree in ``conf/``, with or without K-FAC.

    python examples/train.py                                   # digits autoencoder + K-FAC defaults
    python examples/train.py kfac.kl_clip=1e-2 trainer.max_epochs=3  # the best kl_clip here
    python examples/train.py kfac=off                          # the baseline: no callback
    python examples/train.py experiment=classifier kfac=kaisa kfac.damping=3e-2  # README: 3e-2
    python examples/train.py -m kfac.damping=1e-3,1e-2         # a sweep, outputs in multirun/

K-FAC is one callback built from ``cfg.kfac`` (``_target_: lightning_kfac.KFACCallback``, checked
against the schema that :mod:`lightning_kfac.integrations.hydra` registers); the model code does not
change. Each run writes to Hydra's output directory: ``metrics.csv`` (CSVLogger: ``train/loss``
every step, test metrics), ``loss.png`` (training loss against step), ``checkpoints/`` (with the
callback's state) and ``.hydra/config.yaml`` (the composed config).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if (
    str(ROOT) not in sys.path
):  # run from a clone without `pip install -e .`: `examples.*` importable
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightning_kfac.integrations.hydra import register_configs  # noqa: E402

# the kfac_schema node that conf/kfac/default.yaml extends (the presets extend default)
register_configs()
CONF_DIR = ROOT / "conf"


@dataclasses.dataclass
class RunResult:
    """What one training run produced (returned by :func:`run`)."""

    trainer: Any
    model: Any
    datamodule: Any
    kfac: Any | None  # the KFACCallback, None with kfac=off
    test_metrics: dict[str, float]
    output_dir: Path
    metrics_csv: Path | None  # None under fast_dev_run (Lightning disables loggers)
    plot: Path | None


def build_kfac_callback(cfg: DictConfig) -> Any | None:
    """The KFACCallback described by ``cfg.kfac``, or None when K-FAC is off (``kfac: null``)."""
    if cfg.get("kfac") is None:
        return None
    return instantiate(cfg.kfac)


def build(
    cfg: DictConfig,
    output_dir: Path,
    extra_callbacks: list[Any] | None = None,
    csv_logger: bool = True,
):
    """Instantiate (datamodule, model, trainer, kfac_callback) from a composed config."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import CSVLogger

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    kfac = build_kfac_callback(cfg)
    callbacks = ([kfac] if kfac is not None else []) + list(extra_callbacks or [])
    # name="" and version="" put metrics.csv, hparams.yaml and checkpoints/ straight in output_dir
    logger = CSVLogger(save_dir=str(output_dir), name="", version="") if csv_logger else False
    trainer = instantiate(
        cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(output_dir)
    )
    return datamodule, model, trainer, kfac


def plot_losses(metrics_csv: Path, out_png: Path, title: str) -> Path | None:
    """Plot ``train/loss`` against step from a CSVLogger file; returns the PNG path."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
    if not losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=1.2)
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (``[]`` outside a Hydra app, e.g. compose)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def plot_title(model_name: str, kfac_on: bool, overrides: list[str], width: int = 70) -> str:
    """``MLPClassifier on digits, K-FAC`` plus the job's overrides (wrapped), so that the plots
    of a sweep (``-m kfac.damping=1e-3,1e-2``) say which run each one is."""
    import textwrap

    title = f"{model_name} on digits, {'K-FAC' if kfac_on else 'no K-FAC'}"
    if overrides:
        title += "\n" + "\n".join(textwrap.wrap(" ".join(overrides), width))
    return title


def run(
    cfg: DictConfig,
    output_dir: Path,
    extra_callbacks: list[Any] | None = None,
    csv_logger: bool = True,
) -> RunResult:
    """Fit, test (if ``cfg.test``), then plot (if ``cfg.plot``); files go to ``output_dir``.

    ``csv_logger=False`` runs without a logger (no metrics.csv, no plot; the progress bar and the
    returned test metrics stay): the demo times both runs that way, see examples/demo.py.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule, model, trainer, kfac = build(cfg, output_dir, extra_callbacks, csv_logger)
    trainer.fit(model, datamodule=datamodule)
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        results = trainer.test(model, datamodule=datamodule, verbose=True)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    metrics_csv = output_dir / "metrics.csv"
    metrics_csv = metrics_csv if metrics_csv.exists() else None
    plot = None
    if cfg.get("plot", True) and metrics_csv is not None and trainer.is_global_zero:
        title = plot_title(type(model).__name__, kfac is not None, task_overrides())
        plot = plot_losses(metrics_csv, output_dir / "loss.png", title)
    return RunResult(trainer, model, datamodule, kfac, test_metrics, output_dir, metrics_csv, plot)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the test loss (a sweeper's objective)."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    result = run(cfg, output_dir)
    print(f"outputs in {output_dir}")
    return result.test_metrics.get("test/loss")


if __name__ == "__main__":
    main()
