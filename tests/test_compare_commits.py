"""benchmarks/compare_commits.py: the statistics of the two-tree comparison on known times."""

from __future__ import annotations

import math

import pytest

from benchmarks.compare_commits import summarize, table


def _rounds(a: list[list[float]], b: list[list[float]]) -> list[dict]:
    return [
        {"A": {"m/e": {"step": ta, "engine": ta}}, "B": {"m/e": {"step": tb, "engine": tb}}}
        for ta, tb in zip(a, b)
    ]


def test_summary_pools_medians_and_spreads_round_ratios():
    rounds = _rounds([[1.0, 2.0, 3.0], [1.0, 1.0, 9.0]], [[2.0, 2.0, 2.0], [3.0, 3.0, 0.5]])
    s = summarize(rounds, "m/e", "step")
    # pooled A = [1, 2, 3, 1, 1, 9] -> median 1.5; pooled B = [2, 2, 2, 3, 3, 0.5] -> median 2
    assert s["A_ms"] == pytest.approx(1500.0)
    assert s["B_ms"] == pytest.approx(2000.0)
    assert s["ratio"] == pytest.approx(2.0 / 1.5)
    # per round: median B / median A = 2 / 2 and 3 / 1
    assert (s["round_min"], s["round_max"]) == (pytest.approx(1.0), pytest.approx(3.0))


def test_identical_times_give_ratio_one_in_the_table():
    rounds = _rounds([[0.1, 0.2]] * 3, [[0.1, 0.2]] * 3)
    row = table(rounds, ["m/e"]).splitlines()[-1].split()
    assert row[0] == "m/e"
    assert math.isclose(float(row[1]), 150.0) and math.isclose(float(row[3]), 1.0)
    assert row[4] == "[1.000,1.000]"
