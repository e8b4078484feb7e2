"""metrics.jsonl holds each step once after a resume (issue #23): the records a crashed attempt
wrote after its last checkpoint are dropped when the writer opens for the resumed run."""

import json
import os

import pytest

from tests.helpers import tiny_config
from train.core.metrics import MetricsWriter, read_metrics, truncate_metrics


def _leftovers(path):
    """A crashed attempt's log: train records every 10 steps to 50, evaluations and a HumanEval
    check keyed by step, a step-less record, and a last line torn by the crash."""
    records = [{"note": "run started"}]
    for step in range(10, 60, 10):
        records.append({"step": step, "loss": 10.0 - step / 10})
        if step % 20 == 0:
            records.append({"step": step, "eval_loss": 9.0 - step / 10, "perplexity": 100.0 - step})
    records.append({"step": 40, "humaneval/pass@1": 0.0})
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 60, "loss": 4.'
    path.write_text(text)
    return records


def _config():
    return tiny_config("logging.wandb_mode=disabled")


def test_resume_drops_the_lost_attempts_records_of_every_kind(tmp_path):
    before = _leftovers(tmp_path / "metrics.jsonl")
    writer = MetricsWriter(tmp_path, _config(), resume_step=30)
    after = read_metrics(tmp_path)  # would raise on the torn line if it were still there
    assert after == [r for r in before if r.get("step", 0) <= 30]
    assert {r["step"] for r in after if "step" in r} == {10, 20, 30}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # The resumed run writes the steps after 30 again: each step's records are there once.
    for step in (40, 50):
        writer.write({"step": step, "loss": 1.0})
    writer.write({"step": 40, "eval_loss": 0.5, "perplexity": 1.6})
    writer.close()
    train_steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    eval_steps = [r["step"] for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert train_steps == [10, 20, 30, 40, 50] and eval_steps == [20, 40]


def test_truncate_keeps_records_up_to_the_step_and_reports_what_it_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _leftovers(path)
    assert truncate_metrics(path, 50) == 1  # only the torn line
    assert truncate_metrics(path, 50) == 0
    mtime = path.stat().st_mtime_ns
    assert truncate_metrics(path, 100) == 0 and path.stat().st_mtime_ns == mtime  # nothing to drop: not rewritten
    assert truncate_metrics(path, 0) == 8  # 5 train, 2 eval, 1 HumanEval record
    assert read_metrics(tmp_path) == [{"note": "run started"}]
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


def test_truncation_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _leftovers(path)
    original = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        truncate_metrics(path, 30)
    assert path.read_bytes() == original  # the old file stays whole until the new one replaces it
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_inactive_writer_and_no_resume_step_leave_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _leftovers(path)
    original = path.read_bytes()
    MetricsWriter(tmp_path, _config(), active=False, resume_step=0).close()
    MetricsWriter(tmp_path, _config()).close()
    assert path.read_bytes() == original
    writer = MetricsWriter(tmp_path, _config(), resume_step=0)  # a fresh start after a crash before any save
    assert writer.truncate_after(0) == 0
    assert read_metrics(tmp_path) == [{"note": "run started"}]
