"""The benchmark suite (benchmarks/suite.py): ``python -m benchmarks suite --smoke`` end to end.

The smoke mode trains a fixed number of steps, so losses, steps, the chosen learning rates, the
targets and the seeds reached are deterministic; the CPU times are measured but never asserted.
Every figure of the table is recomputed here from the runs stored in the JSON.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bench
pytest.importorskip("sklearn", reason="scikit-learn (a dev extra) provides the digits data")
pytest.importorskip("matplotlib", reason="matplotlib (a dev extra) draws the suite's plots")

from benchmarks import suite  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "suite",
            "--smoke",
            "--out",
            str(out),
            "--variant",
            "kfac_batch_init=factor_init=batch",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "suite.json") as f:
        return out, json.load(f), proc.stdout


def test_outputs_table_json_and_one_plot_per_problem(smoke):
    out, payload, stdout = smoke
    methods = ["sgd", "adam", "kfac", "kfac_batch_init"]
    assert payload["smoke"] is True
    table = (out / "suite.md").read_text()
    assert table in stdout
    for problem in suite.SMOKE_PROBLEMS:
        assert (out / f"suite_{problem}.png").stat().st_size > 1000
        for method in methods:
            assert (
                sum(line.startswith(f"| {problem} | {method} |") for line in table.splitlines())
                == 1
            )
    assert [r["method"] for r in payload["rows"]] == methods * len(suite.SMOKE_PROBLEMS)
    assert payload["methods"]["kfac_batch_init"]["kfac"] == {"factor_init": "batch"}
    assert payload["methods"]["kfac"]["kfac"] == {}  # K-FAC = the defaults, no knob
    assert "faster to the target than the best of SGD and Adam on" in table


def test_learning_rates_targets_and_times_follow_the_stated_protocol(smoke):
    _, payload, _ = smoke
    runs = payload["runs"]
    points = payload["eval_points"]
    for row in payload["rows"]:
        p, m = row["problem"], row["method"]
        tuning = [r for r in runs if r["problem"] == p and r["method"] == m and r["seed"] == 0]
        grid = payload["grids"][m]
        assert sorted(r["lr"] for r in tuning) == sorted(grid)
        assert row["lr"] == min(tuning, key=lambda r: suite.score(r, points))["lr"]
        seeds = [r for r in runs if r["problem"] == p and r["method"] == m and r["lr"] == row["lr"]]
        assert sorted(r["seed"] for r in seeds) == [0, 1, 2]
        assert all(r["steps"][-1] == suite.SMOKE_STEPS or r["diverged"] for r in seeds)
        # target: L_init^0.2 x (best first-order median lowest loss)^0.8
        mine = [r for r in payload["rows"] if r["problem"] == p]
        lowest = min(r["lowest_loss"] for r in mine if r["method"] in suite.FIRST_ORDER)
        assert row["target"] == pytest.approx(row["initial_loss"] ** 0.2 * lowest**0.8, rel=1e-12)
        reach = [
            next(
                (
                    (t, s)
                    for t, s, v in zip(r["times"], r["steps"], r["losses"])
                    if v <= row["target"]
                ),
                (math.inf, math.inf),
            )
            for r in seeds
        ]
        assert row["reached"] == f"{sum(math.isfinite(s) for _, s in reach)}/3"
        assert row["steps_to_target"] == statistics.median(s for _, s in reach)
        assert row["time_to_target_s"] == statistics.median(t for t, _ in reach)


def test_smoke_losses_are_deterministic(smoke):
    _, payload, _ = smoke
    stored = next(
        r
        for r in payload["runs"]
        if r["problem"] == "lm_b16" and r["method"] == "kfac" and r["seed"] == 1
    )
    again = suite.train(
        "lm_b16",
        dict(suite.METHODS["kfac"], name="kfac"),
        stored["lr"],
        1,
        budget_s=math.inf,
        max_steps=suite.SMOKE_STEPS,
    )
    assert again["steps"] == stored["steps"]
    assert again["losses"] == pytest.approx(stored["losses"], rel=1e-6)
    assert again["counters"]["factor_updates"] > 0  # K-FAC did run


def test_target_reach_score_and_wins_on_known_values():
    assert suite.target_loss(100.0, 1.0) == pytest.approx(100.0**0.2)
    run = {"times": [0.0, 1.0, 2.0], "steps": [0, 10, 20], "losses": [5.0, 3.0, 1.0]}
    assert suite.first_reach(run, 3.0) == (1.0, 10)
    assert suite.first_reach(run, 0.5) == (math.inf, math.inf)
    assert suite.score(run, 2) == pytest.approx((math.log(5) + math.log(3)) / 3)
    assert suite.score({"losses": [5.0, math.inf]}, 2) == math.inf  # diverged: never preferred
    rows = [
        {"problem": "a", "method": "sgd", "x_best_first_order": 1.0},
        {"problem": "a", "method": "kfac", "x_best_first_order": 0.5},
        {"problem": "b", "method": "kfac", "x_best_first_order": math.inf},
    ]
    assert suite.wins(rows) == {"kfac": ["a"]}


def test_variant_parsing_and_errors():
    v = suite._parse_variant("rel=damping_mode=relative,damping=0.1,kl_clip=none,low_rank=false")
    assert v["kfac"] == {
        "damping_mode": "relative",
        "damping": 0.1,
        "kl_clip": None,
        "low_rank": False,
    }
    with pytest.raises(ValueError, match="--variant"):
        suite._parse_variant("sgd=damping=1")
    with pytest.raises(ValueError, match="key=value"):
        suite._parse_variant("x=damping")
