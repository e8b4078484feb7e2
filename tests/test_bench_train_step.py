"""bench/train_step.py --quick on CPU: the last line is a JSON object with the documented fields."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["tokens_per_second", "tokens_per_second_per_device", "step_time_s", "compile_time_s", "peak_memory_bytes",
          "mfu", "peer_tokens_per_second", "peer_step_time_s", "speedup", "device", "num_devices", "config",
          "overrides", "compute_dtype", "batch_size", "seq_len", "jax_version", "peer_jax_version",
          "peer_transformers_version"]


def _run(*extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--quick", "--steps", "2", "--rounds", "2",
           "--warmup", "1", "--set", "model.num_layers=2", "--set", "train.batch_size=4",
           "--set", "data.block_size=64", "--set", "model.loss_chunk_size=0", *extra]  # baseline: the plain loss
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)  # against a hang only
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quick_no_peer_json_line():
    r = _run("--no-peer")
    for f in FIELDS:
        assert f in r, f
    for f in ["tokens_per_second", "tokens_per_second_per_device", "step_time_s", "compile_time_s",
              "peak_memory_bytes"]:
        assert isinstance(r[f], (int, float)) and r[f] > 0, (f, r[f])
    # A CPU has no peak that bounds the step: no MFU, and the JSON says why.
    assert r["mfu"] is None and r["peak_flops_kind"].startswith("none")
    assert r["num_devices"] == 1 and r["batch_size"] == 4 and r["seq_len"] == 64
    assert r["peer_tokens_per_second"] is None and r["speedup"] is None and r["rounds"] == 2
    assert r["device"] and r["compute_dtype"] == "float32"


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "bench" / ".peer-venv" / ".ready").exists(),
                    reason="peer venv bench/.peer-venv not created (creating it takes minutes)")
def test_quick_with_peer():
    r = _run()
    assert r["peer_tokens_per_second"] > 0 and r["rounds"] == 2
    # The speedup is the median of the two rounds' ratios, between their extremes.
    assert 0 < r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    assert r["speedup"] == pytest.approx((r["speedup_min"] + r["speedup_max"]) / 2)
    assert r["peer_transformers_version"].startswith("4.57")


@pytest.mark.slow
def test_quick_sweep_rows_and_chunked_loss_saves_memory():
    r = _run("--no-peer", "--sweep", "--rounds", "1")
    rows = {row["variant"]: row for row in r["sweep"]}
    assert list(rows) == ["baseline", "attention einsum", "attention dot_product", "remat full", "remat dots",
                          "loss chunk 16"]
    assert rows["baseline"]["relative"] == 1.0
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["compile_time_s"] > 0 and row["temp_bytes"] > 0
        assert row["relative"] > 0  # the median of per-round ratios to the baseline (timed in turns)
    # The point of the chunked loss: the [B, T, V] fp32 logits are never materialised at once.
    assert rows["loss chunk 16"]["temp_bytes"] < rows["baseline"]["temp_bytes"]


def test_plan_memory_only():
    """--plan compiles every variant for abstract inputs and reports memory without running a step."""
    r = _run("--no-peer", "--plan", "--sweep")
    rows = {row["variant"]: row for row in r["plan"]}
    assert list(rows) == ["baseline", "attention einsum", "attention dot_product", "remat full", "remat dots",
                          "loss chunk 16"]
    assert r["planned_bytes"] == rows["baseline"]["planned_bytes"] and r["batch_size"] == 4 and r["seq_len"] == 64
    for row in rows.values():
        assert 0 < row["state_bytes"] < row["planned_bytes"] and row["residual_bytes"] > 0
    # What each option is for, in backend-independent bytes kept for the backward pass.
    base = rows["baseline"]["residual_bytes"]
    assert rows["remat full"]["residual_bytes"] < rows["remat dots"]["residual_bytes"] < base
    assert rows["loss chunk 16"]["residual_bytes"] < base
    assert "tokens_per_second" not in r  # nothing was timed
