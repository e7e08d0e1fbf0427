"""The demo's claim holds with another process loading a core (a CPU burner next to it).

The demo budgets CPU time of the training thread (torch on one thread), so a burner that takes a
core slows the wall clock but not the budget: both runs still get the same training work, and
K-FAC still reaches the baseline's final loss in a fraction of the baseline's CPU time. The
README states the same comparison at the default budget (`make demo`).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the demo trains on scikit-learn's digits (examples extra)")

from examples import demo

BURNER = "import time\nend = time.time() + 1800\nwhile time.time() < end:\n    pass\n"


@pytest.mark.slow
def test_demo_claim_holds_next_to_a_cpu_burner(tmp_path):
    burner = subprocess.Popen([sys.executable, "-c", BURNER])
    try:
        results = demo.main(["--out", str(tmp_path)])  # the default budget: 3,000 steps
        assert burner.poll() is None, "the burner stopped before the demo ended"
    finally:
        burner.kill()
        burner.wait()
    kfac, plain = results["K-FAC"], results["no K-FAC"]
    for r in (kfac, plain):  # the budget is steps: the same work whatever the wall clock did
        assert r["steps"] == 3000 and r["wall_s"] >= r["cpu_s"] * 0.9
    assert kfac["final_loss"] < plain["final_loss"]
    assert kfac["target"] == plain["final_loss"]
    # the README's claim: K-FAC reaches the baseline's final loss in under 0.4x its steps and
    # under 0.85x its CPU time (measured: 0.32x the steps; 0.46x the CPU time at load average 13,
    # 0.67x next to the burner; see the README)
    assert kfac["steps_to_target"] < 0.4 * plain["steps_to_target"]
    assert kfac["time_to_target_s"] < 0.85 * plain["time_to_target_s"]
