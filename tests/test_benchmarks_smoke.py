"""Smoke test of ``make bench``: ``python -m benchmarks --tiny`` in one subprocess.

Checks that every benchmark prints its table and writes a JSON and a PNG whose rows carry every
table column with finite numbers, and that the figures derived in the JSON are consistent with
each other (ratios recomputed from the times). No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bench
pytest.importorskip("sklearn", reason="scikit-learn (a dev extra) is needed by time_to_target")
pytest.importorskip("matplotlib", reason="matplotlib (a dev extra) draws the benchmark plots")

NON_NUMERIC = {
    "model",
    "variant",
    "problem",
    "method",
    "knob",
    "sweep",
    "component",
    "reached",
    "clamped",
    "stage",
    "fisher",
    "layer",
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _load(out, name):
    with open(out / f"{name}.json") as f:
        return json.load(f)


def _check_rows(rows, columns):
    assert rows, "no rows"
    for row in rows:
        missing = [c for c in columns if c not in row]
        assert not missing, f"missing columns {missing} in {row}"
        for c in columns:
            if c not in NON_NUMERIC:
                assert isinstance(row[c], (int, float)) and math.isfinite(row[c]), (c, row)


@pytest.mark.parametrize("name", ["step_overhead", "time_to_target", "scaling", "kronecker"])
def test_every_benchmark_writes_json_png_and_table(bench_run, name):
    out, stdout = bench_run
    payload = _load(out, name)
    assert (out / f"{name}.png").stat().st_size > 1000
    _check_rows(payload["rows"], payload["columns"])
    assert payload["tiny"] is True
    header = next(
        line for line in stdout.splitlines() if line.split()[:2] == payload["columns"][:2]
    )
    assert header.split() == payload["columns"]  # the printed table has every column


def test_step_overhead_covers_models_and_variants(bench_run):
    payload = _load(bench_run[0], "step_overhead")
    rows = payload["rows"]
    assert {r["model"] for r in rows} == {"mlp", "autoencoder", "cnn"}
    for model in ("mlp", "autoencoder", "cnn"):
        variants = {r["variant"]: r for r in rows if r["model"] == model}
        assert set(variants) == {
            "sgd",
            "eigen/every",
            "eigen/2-20",
            "inverse/every",
            "inverse/2-20",
        }
        sgd = variants["sgd"]["step_ms"]
        for r in variants.values():
            assert r["x_sgd"] == pytest.approx(r["step_ms"] / sgd)
            assert r["x_bound"] == pytest.approx(r["step_ms"] / r["bound_ms"])
            assert r["steps"] >= 20
        # The bound grows with the work: every-step K-FAC > amortized K-FAC > plain SGD.
        for method in ("eigen", "inverse"):
            assert (
                variants[f"{method}/every"]["bound_ms"]
                > variants[f"{method}/2-20"]["bound_ms"]
                > variants["sgd"]["bound_ms"]
            )
        assert variants["eigen/2-20"]["factor_MB"] > 0 and variants["sgd"]["factor_MB"] == 0


def test_time_to_target_has_three_methods_and_seeds(bench_run):
    payload = _load(bench_run[0], "time_to_target")
    for problem in ("digits_autoencoder", "digits_mlp"):
        rows = {r["method"]: r for r in payload["rows"] if r["problem"] == problem}
        assert set(rows) == {"kfac+sgd", "sgd-nesterov", "adam"}
        seeds = {run["seed"] for run in payload["runs"] if run["problem"] == problem}
        assert seeds == {0, 1, 2}
        for r in rows.values():
            assert r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
            assert r["final_loss"] > 0


def test_scaling_fits_every_component(bench_run):
    payload = _load(bench_run[0], "scaling")
    fits = payload["fits"]
    keys = {(f["sweep"], f["method"], f["component"]) for f in fits}
    assert keys == {
        (s, m, c)
        for s in ("width", "batch")
        for m in ("eigen", "inverse")
        for c in ("factors", "decomposition", "precondition")
    }
    assert all(math.isfinite(f["exponent"]) for f in fits)


def test_kronecker_reports_every_layer_stage_and_fisher(bench_run):
    rows = _load(bench_run[0], "kronecker")["rows"]
    for problem, layers in (("digits_autoencoder", 8), ("digits_mlp", 3)):
        sel = [r for r in rows if r["problem"] == problem]
        assert len({r["layer"] for r in sel}) == layers
        assert len({(r["stage"], r["fisher"]) for r in sel}) == 4  # init/trained x emp./true
        assert len(sel) == 4 * layers
        for r in sel:
            assert r["kronecker_error"] >= 0 and 0 <= r["mean_grad_ratio"] <= 1


def test_tiny_time_to_target_runs_a_step_budget(bench_run):
    """--tiny trains every run for a fixed number of steps (not seconds), so which methods reach
    the target, at which step, and the target itself are the same under any machine load; each
    is reached after step 0, so every time ratio is finite."""
    payload = _load(bench_run[0], "time_to_target")
    assert payload["budget_s"] is None
    for run in payload["runs"]:
        assert run["steps"][-1] == payload["budget_steps"][run["problem"]]
    for row in payload["rows"]:
        assert row["steps"] >= 1 and math.isfinite(row["x_best_baseline"])


def test_time_to_target_step_budget_ignores_the_clock():
    """``max_steps`` wins over a zero-second budget: exactly that many steps, evaluated after
    each (eval_every=1), and the same losses on a second run (no dependence on timing)."""
    from benchmarks import time_to_target

    data = time_to_target.load_data()
    runs = [
        time_to_target.train(
            "digits_mlp", "kfac+sgd", 3e-4, 0, data, budget_s=0.0, eval_every=1, max_steps=5
        )
        for _ in range(2)
    ]
    assert runs[0]["steps"] == [0, 1, 2, 3, 4, 5]
    assert runs[0]["losses"] == runs[1]["losses"]
