"""LightningCLI (jsonargparse) with KFACCallback, in both packages.

``pytorch_lightning.cli.LightningCLI`` takes ``lightning_kfac.KFACCallback``;
``lightning.pytorch.cli.LightningCLI`` takes
``lightning_kfac.integrations.lightning.unified.KFACCallback`` (its Callback base). Checked:
lowercase enum strings, a ``config:`` mapping that is not overridden by the keywords' defaults, and
a typo or bad value reported in one line without a traceback. The runs are real subprocesses of a
user's CLI script (tests/cli_scripts/boring_cli.py); the error cases are also checked in-process
(fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (dev extra)"
)

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "tests" / "cli_scripts" / "boring_cli.py"
PACKAGES = {
    "pytorch_lightning": "lightning_kfac.KFACCallback",
    "lightning": "lightning_kfac.integrations.lightning.unified.KFACCallback",
}
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
]


def run_cli(tmp_path: Path, package: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(SCRIPT), package, "fit", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def kfac_result(stdout: str) -> list:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("KFAC_RESULT ")]
    return json.loads(line[len("KFAC_RESULT ") :])


def error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_cli_takes_lowercase_enums_and_a_config_mapping(tmp_path, package):
    """YAML ``init_args: {config: {...}}`` plus command-line keywords: the mapping's values are
    used (not the keywords' defaults that jsonargparse passes), the lowercase enum string is
    accepted, an explicit keyword overrides the mapping, and the run preconditions 3 steps."""
    pytest.importorskip(package)
    (tmp_path / "cfg.yaml").write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: {PACKAGES[package]}\n"
        "      init_args:\n"
        "        config: {damping: 0.02, kl_clip: 0.05, factor_update_steps: 2}\n"
    )
    proc = run_cli(
        tmp_path,
        package,
        "--config",
        "cfg.yaml",
        "--trainer.max_steps=3",
        "--trainer.callbacks.compute_method=inverse",
        "--trainer.callbacks.kl_clip=0.1",
        "--trainer.callbacks.inv_update_steps=2",
        *QUIET,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (found,) = kfac_result(proc.stdout)
    assert found["class"] == PACKAGES[package].replace(
        "lightning_kfac.KFACCallback", "lightning_kfac.integrations.lightning.callback.KFACCallback"
    )
    config = found["config"]
    assert (config["damping"], config["factor_update_steps"]) == (0.02, 2)  # from the mapping
    assert (config["kl_clip"], config["inv_update_steps"]) == (0.1, 2)  # keywords win
    assert config["compute_method"] == "inverse"
    assert found["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_cli_typo_and_bad_value_are_one_clear_line(tmp_path, package):
    pytest.importorskip(package)
    callback = f"--trainer.callbacks+={PACKAGES[package]}"
    typo = run_cli(tmp_path, package, callback, "--trainer.callbacks.dampng=0.01")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "Option 'dampng' is not accepted" in typo.stderr

    bad = run_cli(tmp_path, package, callback, "--trainer.callbacks.damping=-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert (
        error_lines(bad.stderr)[-1]
        == "error: KFACCallback: Invalid damping=-1.0: must be a finite number > 0."
    )

    (tmp_path / "typo.yaml").write_text(
        f"trainer:\n  callbacks:\n    - class_path: {PACKAGES[package]}\n"
        "      init_args:\n        config: {dampng: 0.01}\n"
    )
    mapping = run_cli(tmp_path, package, "--config", "typo.yaml")
    assert mapping.returncode == 2 and "Traceback" not in mapping.stderr
    assert error_lines(mapping.stderr)[-1].startswith(
        "error: KFACCallback: Invalid option(s) ['dampng'] (did you mean 'damping'?)"
    )


# -- the same errors in-process (fast) -------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv also holds arguments (pytest's)."""
    monkeypatch.setattr(sys, "argv", ["boring_cli.py"])


def _cli_in_process(package: str, args: list):
    if package == "lightning":
        cli_mod = pytest.importorskip("lightning.pytorch.cli")
        from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
    else:
        import pytorch_lightning.cli as cli_mod
        from pytorch_lightning.demos.boring_classes import BoringDataModule, BoringModel
    return cli_mod.LightningCLI(
        BoringModel,
        BoringDataModule,
        run=False,
        args=[f"--trainer.callbacks+={PACKAGES[package]}", *args],
    )


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_in_process_cli_values_reach_the_callback(package):
    cli = _cli_in_process(
        package,
        [
            "--trainer.callbacks.compute_method=ekfac",
            "--trainer.callbacks.fisher_type=mc",
            "--trainer.callbacks.likelihood=gaussian",
            '--trainer.callbacks.config={"damping": 0.05}',
            "--trainer.logger=false",
        ],
    )
    (callback,) = [cb for cb in cli.trainer.callbacks if hasattr(cb, "preconditioner")]
    assert callback.config.damping == 0.05
    assert (
        callback.config.compute_method.value,
        callback.config.fisher_type.value,
        callback.config.likelihood.value,
    ) == ("ekfac", "mc", "gaussian")


@pytest.mark.parametrize("package", sorted(PACKAGES))
@pytest.mark.parametrize(
    "arg, expected",
    [
        (
            "--trainer.callbacks.damping=-1",
            "error: KFACCallback: Invalid damping=-1.0: must be a finite number > 0.",
        ),
        (
            "--trainer.callbacks.factor_decay=1.5",
            "error: KFACCallback: Invalid factor_decay=1.5: must be a number in [0, 1).",
        ),
    ],
)
def test_in_process_bad_value_exits_with_one_line(capsys, package, arg, expected):
    with pytest.raises(SystemExit) as exit_info:
        _cli_in_process(package, [arg, "--trainer.logger=false"])
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err)[-1] == expected


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_in_process_bad_enum_is_a_parse_error_listing_the_choices(capsys, package):
    with pytest.raises(SystemExit) as exit_info:
        _cli_in_process(package, ["--trainer.callbacks.compute_method=Inverted"])
    assert exit_info.value.code == 2
    assert (
        "Expected a typing.Literal['eigen', 'inverse', 'ekfac']. Got value: Inverted"
        in capsys.readouterr().err
    )
