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


def _offline_history(run_dir, run_id):
    """Every history row of the offline wandb runs of ``run_id`` under ``run_dir/wandb`` (not the
    superseded ones), read from their ``.wandb`` files: leveldb-log blocks of protobuf records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    logs = (run_dir / "wandb").glob(f"offline-run-*-{run_id}-attempt*/run-{run_id}.wandb")
    for path in sorted(logs, key=lambda p: p.parent.name.rsplit("attempt", 1)[1]):
        data, pos, chunks, part = path.read_bytes(), 7, [], b""  # 7: the ":W&B" file header
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += left
                continue
            part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # FULL, LAST
                chunks.append(part)
                part = b""
        for chunk in chunks:
            rec = pb.Record()
            rec.ParseFromString(chunk)
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.append({k: v for k, v in row.items() if k == "_step" or not k.startswith("_")})
    return rows


@pytest.mark.slow
def test_wandb_offline_history_holds_each_step_once_after_a_resume(tmp_path, monkeypatch):
    """A crashed attempt logged steps 10..50 to wandb; the run resumes from 30: the offline run
    to sync holds 10, 20, 30 (replayed) and the new 40, 50, once each, and the lost attempt's
    directory is set aside."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables wandb for every other test
    cfg = tiny_config("logging.wandb_mode=offline")
    first = MetricsWriter(tmp_path, cfg, resume_step=0)
    for step in range(10, 60, 10):
        first.write({"step": step, "loss": 10.0 - step / 10})
    first.close()
    wandb.teardown()  # waits for wandb's service to write out every record (finish() may return before)
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert [r["_step"] for r in _offline_history(tmp_path, run_id)] == [10, 20, 30, 40, 50]

    second = MetricsWriter(tmp_path, cfg, resume_step=30)
    for step in (40, 50):
        second.write({"step": step, "loss": 1.0})
    second.close()
    wandb.teardown()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    history = _offline_history(tmp_path, run_id)
    assert [(r["_step"], r["loss"]) for r in history] == [(10, 9.0), (20, 8.0), (30, 7.0), (40, 1.0), (50, 1.0)]
    assert len(list((tmp_path / "wandb" / "superseded").glob(f"offline-run-*-{run_id}-attempt*"))) == 1

    third = MetricsWriter(tmp_path, cfg, resume_step=50)  # nothing lost: the run simply continues
    third.write({"step": 60, "loss": 0.5})
    third.close()
    wandb.teardown()
    assert [r["_step"] for r in _offline_history(tmp_path, run_id)] == [10, 20, 30, 40, 50, 60]
    # one folder per attempt, even when two start within one second (wandb names them by the second)
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}-attempt*"))) == 2
