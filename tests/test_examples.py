"""The examples: fast_dev_run of every experiment preset, the Hydra CLI (single run, sweep, a
type error) in subprocesses, the `make demo` comparison at a tiny budget, the plain-PyTorch loop.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from examples import demo, plain_pytorch
from examples.train import CONF_DIR, run

ROOT = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def cli(*args, timeout=300):
    """Run examples/train.py in a subprocess from the repository root."""
    return subprocess.run(
        [sys.executable, "examples/train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kfac_state(checkpoint: Path) -> dict:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("KFACCallback")]
    assert len(states) == 1, list(ckpt["callbacks"])
    return states[0]


def train_losses(metrics_csv: Path) -> dict:
    with open(metrics_csv, newline="") as fh:
        return {
            int(r["step"]): float(r["train/loss"])
            for r in csv.DictReader(fh)
            if r.get("train/loss")
        }


def preconditionable(model: nn.Module) -> dict:
    """name -> (dim A, dim G) for every Linear / Conv2d (with bias: +1 in A)."""
    dims = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            dims[name] = (m.in_features + 1, m.out_features)
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            dims[name] = (m.in_channels * k + 1, m.out_channels)
    return dims


# -- fast_dev_run of each experiment preset, in process -----------------------------------------
@pytest.mark.parametrize(
    "experiment,kfac", [(e, None) for e in EXPERIMENTS] + [("classifier", "off")]
)
def test_fast_dev_run_of_each_experiment(experiment, kfac, tmp_path):
    overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true"]
    overrides += [f"kfac={kfac}"] if kfac else []
    result = run(compose_cfg(*overrides), tmp_path)
    assert result.trainer.global_step == 1
    model = result.model.eval()
    callbacks = [type(c).__name__ for c in result.trainer.callbacks]
    if kfac == "off":
        assert result.kfac is None and "KFACCallback" not in callbacks
    else:
        # the callback built from cfg.kfac ran: a factor pair for every Linear / Conv2d layer
        assert "KFACCallback" in callbacks
        factors = result.kfac.factors()
        expected = preconditionable(model)
        assert sorted(factors) == sorted(expected)
        for name, (A, G) in factors.items():
            assert (A.shape[0], G.shape[0]) == expected[name]
            assert torch.isfinite(A).all() and torch.isfinite(G).all()
    # the logged test metrics are those of the trained model on the held-out split
    x, y = result.datamodule.test_set.tensors
    with torch.no_grad():
        out = model(x)
    if experiment == "autoencoder":
        bce = F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1).mean()
        assert result.test_metrics["test/loss"] == pytest.approx(float(bce), rel=1e-5)
        mse = (torch.sigmoid(out) - x).pow(2).sum(1).mean()
        assert result.test_metrics["test/mse"] == pytest.approx(float(mse), rel=1e-5)
    else:
        acc = (out.argmax(1) == y).float().mean()
        assert result.test_metrics["test/acc"] == pytest.approx(float(acc), abs=1e-6)


# -- the CLI, in subprocesses -------------------------------------------------------------------
def test_cli_override_reaches_the_callback_and_outputs_are_written(tmp_path):
    out = tmp_path / "run"
    proc = cli("kfac.damping=0.02", "trainer.max_steps=3", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert saved.kfac.damping == 0.02 and saved.kfac._target_ == "lightning_kfac.KFACCallback"
    assert "kfac.damping=0.02" in OmegaConf.load(out / ".hydra" / "overrides.yaml")
    assert sorted(train_losses(out / "metrics.csv")) == [0, 1, 2]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    (checkpoint,) = (out / "checkpoints").glob("*.ckpt")
    state = kfac_state(checkpoint)
    assert state["config"]["damping"] == 0.02
    assert state["config"]["compute_method"] == saved.kfac.compute_method
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3


def test_cli_sweep_gives_each_run_its_damping(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "kfac.damping=1e-3,1e-2",
        "trainer.max_steps=2",
        "test=false",
        "plot=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job, damping in (("0", 1e-3), ("1", 1e-2)):
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").kfac.damping == damping
        (checkpoint,) = (sweep / job / "checkpoints").glob("*.ckpt")
        assert kfac_state(checkpoint)["config"]["damping"] == damping


def test_cli_wrong_type_is_reported_by_hydra_naming_the_key():
    proc = cli("kfac.factor_update_steps=abc", timeout=120)
    assert proc.returncode != 0
    assert "kfac.factor_update_steps" in proc.stderr
    assert "could not be converted to Integer" in proc.stderr


def test_cli_help_offers_the_presets_but_not_the_internal_schema():
    proc = cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("kfac: ")]
    presets = sorted(p.stem for p in (CONF_DIR / "kfac").glob("*.yaml"))
    assert line == "kfac: " + ", ".join(presets) and "schema" not in line


def test_plot_title_carries_the_sweep_overrides():
    from examples.train import plot_title

    title = plot_title("MLPClassifier", True, ["experiment=classifier", "kfac.damping=0.01"])
    assert title == "MLPClassifier on digits, K-FAC\nexperiment=classifier kfac.damping=0.01"
    assert plot_title("DeepAutoencoder", False, []) == "DeepAutoencoder on digits, no K-FAC"


# -- `make demo` at a tiny budget ---------------------------------------------------------------
def test_demo_tiny_budget_writes_the_table_and_the_plot(tmp_path, capsys):
    results = demo.main(
        [
            "--budget",
            "120",
            "--max-steps",
            "6",
            "--window",
            "3",
            "--threads",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert set(results) == {"K-FAC", "no K-FAC"}
    assert results["K-FAC"]["preconditioned_layers"] == 8  # the autoencoder's Linear layers
    assert results["no K-FAC"]["preconditioned_layers"] == 0
    with open(tmp_path / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    curves = {name: [r for r in rows if r["run"] == name] for name in results}
    for name, r in results.items():
        assert [int(c["step"]) for c in curves[name]] == [1, 2, 3, 4, 5, 6]
        losses = [float(c["loss"]) for c in curves[name]]
        assert r["final_loss"] == pytest.approx(sum(losses[-3:]) / 3)
        assert r["steps"] == 6 and r["steps_to_target"] is not None
    # same seed, same init, same first batch: the runs differ only from the first update on
    assert curves["K-FAC"][0]["loss"] == curves["no K-FAC"][0]["loss"]
    assert results["K-FAC"]["target"] == max(r["final_loss"] for r in results.values())
    table = (tmp_path / "summary.md").read_text()
    for text in (
        "| K-FAC |",
        "| no K-FAC |",
        "final train loss",
        "steps/cpu s",
        "cpu s to loss<=",
        "CPU seconds of the training thread",
    ):
        assert text in table and text in printed
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert len(results["K-FAC"]["diagnostics"]) == 8 and "diagnostics" not in results["no K-FAC"]
    assert (tmp_path / "diagnostics.png").read_bytes()[:8] == PNG_MAGIC and "Kronecker" in printed


# -- the plain PyTorch loop ---------------------------------------------------------------------
def test_plain_pytorch_example_kfac_beats_sgd_after_the_same_steps(capsys):
    results = plain_pytorch.main(["--steps", "30"])
    assert results["K-FAC + SGD"] < results["SGD"]
    printed = capsys.readouterr().out
    assert "SGD" in printed and "K-FAC + SGD" in printed
