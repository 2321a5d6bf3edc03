"""monitoring: the log line's averages (Interval) and metrics.jsonl across a resume (MetricsLog)."""

import json
import math

import pytest

from eva_repro.training.monitoring import Interval, MetricsLog


def test_interval_averages_finite_steps_but_counts_every_steps_samples_and_time():
    interval = Interval()
    interval.add(loss=2.0, cosine=0.5, norm=1.0, samples=8, wait=0.5, seconds=1.0)
    interval.add(loss=math.nan, cosine=0.0, norm=math.inf, samples=8, wait=0.0, seconds=1.0)
    interval.add(loss=4.0, cosine=0.7, norm=3.0, samples=8, wait=0.5, seconds=2.0)
    record = interval.record()
    assert record["loss"] == 3.0 and record["grad_norm"] == 2.0
    assert record["velocity_cosine"] == pytest.approx(0.6)
    assert record["samples_per_s"] == 6.0 and record["data_wait_fraction"] == 0.25
    interval.reset()
    assert interval.record() == {"loss": 0.0, "velocity_cosine": 0.0, "grad_norm": 0.0,
                                 "samples_per_s": 0.0, "data_wait_fraction": 0.0}


def test_metrics_log_drops_steps_past_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=None)
    for step in range(1, 8):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=4).close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=None).close()  # a new run
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    MetricsLog(tmp_path / "other_rank", enabled=False, tensorboard=False, resume_step=None).write(
        {"step": 1})
    assert not (tmp_path / "other_rank").exists()
