"""What K-FAC costs, visible while training: the ``kfac/time_*`` metrics in a real CSVLogger.

The timings are not compared with thresholds (wall time depends on the machine's load); what is
checked is their structure: every phase lies inside ``pre.step`` (the phases sum to at most
``time_ms``), ``pre.step`` lies inside the training step (``time_ms <= step_ms``), the share is
their ratio, and the logged values are the engine's own per-step statistics.
"""

from __future__ import annotations

import csv

import pytest
from pytorch_lightning.loggers import CSVLogger

from lightning_kfac import KFACCallback
from tests.support.lightning import MLP, Recorder, loader, make_dataset, make_trainer

PHASES = ("kfac/time_factors_ms", "kfac/time_decompose_ms", "kfac/time_precondition_ms")
TIMES = ("kfac/time_ms", *PHASES, "kfac/step_ms", "kfac/overhead_share")


def read_rows(path):
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if row.get("kfac/time_ms")]


def test_timing_metrics_are_written_by_a_csv_logger(tmp_path):
    callback = KFACCallback(damping=1e-2, factor_update_steps=1, inv_update_steps=2)
    engine = Recorder(lambda trainer, module: dict(callback.preconditioner.last_stats))
    trainer = make_trainer(
        tmp_path,
        max_steps=6,
        callbacks=[callback, engine],
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="logs"),
    )
    trainer.fit(MLP(), loader(make_dataset(6 * 8), 8))

    rows = read_rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))
    for row, stats in zip(rows, engine.records):
        values = {key: float(row[key]) for key in TIMES}
        for key in ("time_ms", "time_factors_ms", "time_decompose_ms", "time_precondition_ms"):
            assert values[f"kfac/{key}"] == pytest.approx(stats[key], rel=1e-6)
        assert all(values[key] > 0 for key in TIMES)
        assert sum(values[key] for key in PHASES) <= values["kfac/time_ms"] * (1 + 1e-6)
        assert values["kfac/time_ms"] <= values["kfac/step_ms"] * (1 + 1e-6)
        assert values["kfac/overhead_share"] == pytest.approx(
            values["kfac/time_ms"] / values["kfac/step_ms"], rel=1e-5
        )
    assert "kfac/overhead_share" not in trainer.progress_bar_metrics


def test_prog_bar_shows_the_overhead_share_without_a_logger(tmp_path):
    callback = KFACCallback(damping=1e-2, factor_update_steps=1, inv_update_steps=2, prog_bar=True)
    trainer = make_trainer(
        tmp_path, max_steps=2, callbacks=[callback], log_every_n_steps=1, enable_progress_bar=True
    )
    trainer.fit(MLP(), loader(make_dataset(2 * 8), 8))
    share = trainer.progress_bar_metrics["kfac/overhead_share"]
    assert 0.0 < share <= 1.0
    assert "kfac/time_ms" not in trainer.progress_bar_metrics  # only the share, kept short


def test_accumulated_batches_share_one_step_time(tmp_path):
    """With accumulate_grad_batches=2, step_ms covers both micro-batches of the optimizer step:
    one logged row per optimizer step, and the share stays time_ms / step_ms."""
    callback = KFACCallback(damping=1e-2, factor_update_steps=1, inv_update_steps=1)
    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        callbacks=[callback],
        log_every_n_steps=1,
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path, name="logs"),
    )
    trainer.fit(MLP(), loader(make_dataset(6 * 8), 8))
    rows = read_rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert len(rows) == 3
    for row in rows:
        assert float(row["kfac/overhead_share"]) == pytest.approx(
            float(row["kfac/time_ms"]) / float(row["kfac/step_ms"]), rel=1e-5
        )


def test_logged_times_are_means_over_the_steps_since_the_last_write(tmp_path):
    """log_every_n_steps=3 with factors every 3 steps: each written row is the mean of its 3
    steps (so the factor update inside each interval is amortized, not skipped), and the share
    is the ratio of the sums."""
    callback = KFACCallback(damping=1e-2, factor_update_steps=3, inv_update_steps=6)
    engine = Recorder(lambda trainer, module: dict(callback.preconditioner.last_stats))
    trainer = make_trainer(
        tmp_path,
        max_steps=6,
        callbacks=[callback, engine],
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path, name="logs"),
    )
    trainer.fit(MLP(), loader(make_dataset(6 * 8), 8))
    rows = read_rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 5]
    for row, steps in zip(rows, (engine.records[0:3], engine.records[3:6])):
        for key in ("time_ms", "time_factors_ms", "time_decompose_ms", "time_precondition_ms"):
            mean = sum(s[key] for s in steps) / 3
            assert float(row[f"kfac/{key}"]) == pytest.approx(mean, rel=1e-6)
        assert float(row["kfac/overhead_share"]) == pytest.approx(
            float(row["kfac/time_ms"]) / float(row["kfac/step_ms"]), rel=1e-5
        )
