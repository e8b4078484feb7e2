"""bench/convergence.py on tiny sizes: both sides train, one evaluator scores both, one JSON line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIDE_FIELDS = ["tokens", "steps", "train_s", "eval_s", "final_heldout_loss", "points", "tokens_per_second",
               "tokens_per_second_with_saves", "tokens_per_second_end_to_end", "final_train_loss"]
TOP_FIELDS = ["ours", "peer", "loss_gap", "speedup", "order", "heldout_tokens", "recipe", "machine", "load_avg",
              "command", "date", "wall_s", "png"]


def _bench(*args, timeout=900):
    """Run the benchmark (one simulated device: the test-wide XLA_FLAGS dropped); returns the process."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(ROOT / "bench" / "convergence.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_tiny_run_both_sides_fall_on_equal_tokens(tiny_corpus, tmp_path):
    """A few steps of a 1-layer GPT-Neo: the JSON fields exist, both sides' losses are finite and fall
    (training loss below the ln(vocab) of a fresh model; the peer's held-out loss from the first point
    to the last), both trained on the same token count, the PNG exists.

    Ours' held-out loss is only checked finite here: in 16 steps of 4 x 32 tokens ours reads one or
    two documents (its data order, being changed in train/), so its held-out loss may rise while its
    training loss falls; the benchmark reports that, the test of the benchmark does not judge it."""
    data, tok = tiny_corpus
    png = tmp_path / "curve.png"
    out = _bench("--quick", "--data", str(data), "--tokenizer", str(tok), "--work", str(tmp_path / "work"),
                 "--steps", "16", "--warmup", "2", "--points", "2", "--batch-size", "4", "--block-size", "32",
                 "--eval-tokens", "2000", "--set", "model.num_layers=1", "--set", "optimizer.learning_rate=1e-3",
                 "--png", str(png))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for f in TOP_FIELDS:
        assert f in r, f
    for name in ("ours", "peer"):
        side = r[name]
        for f in SIDE_FIELDS:
            assert f in side, (name, f)
        losses = [p["heldout_loss"] for p in side["points"]]
        assert [p["step"] for p in side["points"]] == [8, 16], name
        assert all(0 < loss < 20 for loss in losses), (name, losses)  # finite, not NaN
        assert side["final_train_loss"] < math.log(r["recipe"]["vocab_size"]) - 0.1, (name, side)
        assert side["tokens_per_second"] > 0 and side["steps"] == 16
    peer_losses = [p["heldout_loss"] for p in r["peer"]["points"]]
    assert peer_losses[-1] < peer_losses[0], peer_losses
    assert r["ours"]["tokens"] == r["peer"]["tokens"] == 16 * 4 * 32
    assert r["recipe"]["training_tokens"] == 16 * 4 * 32 and r["heldout_tokens"] >= 2000
    assert r["order"] == ["ours", "peer"] and r["machine"]["cpu_count"] >= 1
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_option_is_one_line_naming_it(tmp_path):
    """A bad value stops before any work with one line that names the option, exit code 2."""
    out = _bench("--quick", "--points", "0", "--work", str(tmp_path), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --points: expected a positive integer, got 0"]
    assert not any(tmp_path.iterdir())


def test_steady_rate_leaves_out_the_checkpoint_intervals():
    """Tokens/s of training steps only: an interval that starts at a checkpoint point (ours writes
    a checkpoint there, the peer copies its weights) is not counted; marks sharing a time are one."""
    sys.path.insert(0, str(ROOT))
    from bench.convergence import steady_rate

    marks = [(10, 1.0), (20, 2.0), (25, 2.5), (30, 4.0), (40, 5.0), (40, 5.0)]
    assert steady_rate(marks) == pytest.approx(30 / 4.0)
    assert steady_rate(marks, (25,)) == pytest.approx(25 / 2.5)
    assert steady_rate([(10, 1.0)]) is None


def _side(loss, rate, tokens=1024):
    return {"tokens": tokens, "final_heldout_loss": loss, "tokens_per_second": rate, "device": "cpu",
            "final_train_loss": None, "points": [{"step": 4, "tokens": tokens, "heldout_loss": loss}]}


def test_seeds_are_summarised_by_their_means_and_spread():
    """Two seeds: the sides' figures are means (token counts stay ints, a figure missing in one run is
    missing), the gap is the mean gap with its sample standard deviation, the speedup the mean of
    the runs' speedups with its minimum, and each run keeps its own line."""
    sys.path.insert(0, str(ROOT))
    from bench import convergence as conv

    runs = [{"seed": 0, "order": ["ours", "peer"], "ours": _side(6.0, 300.0), "peer": _side(6.2, 200.0)},
            {"seed": 1, "order": ["peer", "ours"], "ours": _side(6.4, 330.0), "peer": _side(6.3, 300.0)}]
    s = conv.summarize_runs(runs)
    assert s["ours"]["final_heldout_loss"] == 6.2 and s["peer"]["final_heldout_loss"] == 6.25
    assert s["ours"]["points"] == [{"step": 4, "tokens": 1024, "heldout_loss": 6.2}]
    assert s["ours"]["tokens"] == 1024 and isinstance(s["ours"]["tokens"], int)
    assert s["ours"]["final_train_loss"] is None and s["ours"]["device"] == "cpu"
    assert s["loss_gap"] == -0.05 and s["loss_gap_sd"] == round(math.sqrt(2 * 0.15 ** 2), 4)
    assert [r["speedup"] for r in s["runs"]] == [1.5, 1.1] and s["speedup"] == 1.3 and s["speedup_min"] == 1.1
    assert [r["order"] for r in s["runs"]] == [["ours", "peer"], ["peer", "ours"]]
    one = conv.summarize_runs(runs[:1])
    assert one["loss_gap"] == -0.2 and one["loss_gap_sd"] is None and one["ours"] == runs[0]["ours"]
    runs[1]["peer"]["tokens_per_second"] = None
    assert conv.summarize_runs(runs)["speedup"] is None
