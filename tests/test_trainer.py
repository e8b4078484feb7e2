"""The training loop end to end on a tiny model: metrics, eval, checkpoints, exact resume,
NaN stop, SIGTERM, export to Hugging Face and greedy sampling parity."""

import json
import math

import jax
import numpy as np
import pytest

from tests.helpers import tiny_config
from train import config as C
from train.core.metrics import read_metrics
from train.core.run_dir import restore_params
from train.run import TrainingError, train


def _cfg(tiny_corpus, run_dir, *extra):
    data, tok = tiny_corpus
    return C.load("configs/tiny.yaml", [
        f"run.output_dir={run_dir}", f"data.train_dir={data / 'train'}", f"data.validation_dir={data / 'validation'}",
        f"tokenizer.path={tok}", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.window_size=16", "data.block_size=64", "train.batch_size=8",
        "train.max_steps=12", "train.log_every=1", "train.save_every=4", "train.eval_every=6",
        "data.eval_tokens=4096", "data.shuffle_buffer=50", "schedule.warmup_steps=2", "schedule.decay_steps=10",
        "logging.progress=false", "logging.wandb_mode=disabled", *extra,
    ])


def test_run_writes_config_metrics_checkpoints_and_resumes_exactly(tiny_corpus, tmp_path):
    full = train(_cfg(tiny_corpus, tmp_path / "full"))
    assert full["step"] == 12
    # An interrupted run: stop after 5 steps (checkpoint at 4 and the forced save at 5), then rerun,
    # this time reading a token cache (data.token_cache, built by the trainer): same batches.
    part_cfg = _cfg(tiny_corpus, tmp_path / "part")
    first = train(part_cfg, stop_after=5)
    assert first["step"] == 5
    second = train(C.replace(part_cfg, data={"token_cache": str(tmp_path / "cache")}))
    assert second["step"] == 12
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2  # one entry per training shard
    ref = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part") if "loss" in r}
    assert sorted(got) == list(range(1, 13)) and sorted(ref) == list(range(1, 13))
    assert all(got[s] == ref[s] for s in range(6, 13)), (got, ref)  # bit-identical after the resume
    _, p_full, _ = restore_params(tmp_path / "full")
    _, p_part, _ = restore_params(tmp_path / "part")
    for a, b in zip(jax.tree_util.tree_leaves(p_full), jax.tree_util.tree_leaves(p_part), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # what the run directory holds
    saved = C.load(tmp_path / "full" / "config.yaml")
    assert saved.model.vocab_size == 512 and saved.train.batch_size == 8
    records = read_metrics(tmp_path / "full")
    train_rec = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    for key in ("step", "loss", "learning_rate", "tokens_per_second", "mfu", "grad_norm"):
        assert all(key in r for r in train_rec), key
    assert [r["step"] for r in evals] == [6, 12]
    # 4096 held-out tokens in rows of 65: 63 rows, 64 predicted labels each
    assert all(r["eval_tokens"] == 63 * 64 and r["eval_loss/python"] == pytest.approx(r["eval_loss"]) for r in evals)
    assert all(r["mfu"] is None for r in train_rec)  # a CPU has no peak that bounds the step
    assert all(r["perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] < math.log(512)
    assert train_rec[0]["learning_rate"] == 0.0 and train_rec[2]["learning_rate"] > 0
    steps = sorted(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8, 12]  # keep=2 most recent


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, tmp_path / "run", "train.max_steps=8")
    train(cfg, stop_after=4)  # a good checkpoint at step 4
    bad = C.replace(cfg, optimizer={"learning_rate": 1e30}, schedule={"warmup_steps": 0})
    with pytest.raises(TrainingError, match=r"step \d+: loss is nan.*Last good checkpoint: step 4"):
        train(bad)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]


def test_wandb_offline_writes_a_local_run(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, tmp_path / "run", "train.max_steps=2", "logging.wandb_mode=offline",
               "train.eval_every=0")
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (tmp_path / "run" / "wandb_id.txt").read_text().strip() in runs[0].name


def test_export_loads_in_transformers_with_equal_logits_and_greedy(tiny_corpus, tmp_path):
    import torch
    from transformers import AutoTokenizer, GPTNeoForCausalLM, pipeline

    from train.core.step import next_token_logits
    from train.inference.decoding import generate_ids
    from train.interop.export import export

    cfg = _cfg(tiny_corpus, tmp_path / "run", "train.max_steps=3", "train.eval_every=0")
    train(cfg)
    out, step = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert step == 3
    hf = GPTNeoForCausalLM.from_pretrained(out).eval()
    assert hf.config.vocab_size == 512 and hf.transformer.wte.weight.shape[0] == 512
    mcfg, params, _ = restore_params(tmp_path / "run")
    ids = np.random.RandomState(0).randint(0, 512, (2, 40))
    ours = np.asarray(next_token_logits(params, ids, cfg=mcfg.model))[..., :512]
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.encode("def main(")
    greedy = generate_ids(mcfg.model, params, [prompt], max_new_tokens=12, temperature=0.0)[0]
    ref_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    assert greedy == ref_ids
    text = pipeline("text-generation", model=str(out), tokenizer=tok)("import os", max_new_tokens=5)
    assert text[0]["generated_text"].startswith("import os")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt_neo"


def test_keep_best_keeps_lowest_eval_checkpoint_beside_last(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, tmp_path / "run", "train.max_steps=9", "train.eval_every=3",
               "checkpoint.keep_best=eval_loss", "checkpoint.keep=1")
    train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    want = min(evals, key=lambda r: r["eval_loss"])["step"]
    _, _, best_step = restore_params(tmp_path / "run", best=True)
    assert best_step == want
    _, _, last_step = restore_params(tmp_path / "run")
    assert last_step == 9


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_until

    data, tok = tiny_corpus
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "train", "--config", "configs/tiny.yaml",
            "--set", f"run.output_dir={run}", "--set", f"data.train_dir={data / 'train'}",
            "--set", f"data.validation_dir={data / 'validation'}", "--set", f"tokenizer.path={tok}",
            "--set", "model.hidden_size=64", "--set", "model.num_layers=2", "--set", "data.block_size=64",
            "--set", "train.batch_size=4", "--set", "train.max_steps=100000", "--set", "train.log_every=1",
            "--set", "train.save_every=100000", "--set", "train.eval_every=0", "--set", "logging.progress=false",
            "--set", "logging.wandb_mode=disabled"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = run / "metrics.jsonl"

    def three_steps_logged() -> bool:
        assert proc.poll() is None, proc.stdout.read()  # it died: it will never log
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    try:
        # Compiling takes seconds on a laptop, minutes on a loaded CI box: wait for the condition.
        wait_until(three_steps_logged, 900, "three logged steps")
    except TimeoutError:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    logged = max(r["step"] for r in read_metrics(run))
    assert steps == [logged] and 3 <= logged < 100000


def test_humaneval_every_logs_pass_at_1(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, tmp_path / "run", "train.max_steps=2", "train.eval_every=0",
               "train.humaneval_every=2", "train.humaneval_tasks=3")
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "humaneval/pass@1" in r]
    assert [r["step"] for r in rows] == [2]
    assert rows[0]["humaneval/pass@1"] == 0.0  # an untrained tiny model solves nothing


def test_eval_tokens_beyond_the_validation_set_is_refused_before_the_first_step(tiny_corpus, tmp_path):
    with pytest.raises(C.ConfigError, match=r"^data\.eval_tokens: ") as err:
        train(_cfg(tiny_corpus, tmp_path / "run", "data.eval_tokens=100000000"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_held_out_losses_do_not_depend_on_the_device_count(tiny_corpus, tmp_path):
    """The same parameters scored on 1 device (batch 2) and on 8 devices (batch 8): the same
    held-out rows, eval_loss within float rounding."""
    from train.core import sharding
    from train.core.hooks import evaluate
    from train.core.step import compile_steps
    from train.run import make_eval_set, resolve

    results = []
    for devices, batch in ((1, 2), (8, 8)):
        cfg = resolve(_cfg(tiny_corpus, tmp_path / f"d{devices}", f"train.batch_size={batch}"), devices)
        mesh = sharding.make_mesh(cfg, jax.devices()[:devices])
        compiled = compile_steps(cfg, mesh)
        params = compiled.init(jax.random.PRNGKey(0)).params
        eval_set = make_eval_set(cfg)
        assert sum(int((i >= 0).sum()) for i in eval_set.index) == len(eval_set.language)
        results.append(evaluate(compiled, params, eval_set))
    assert results[0]["eval_tokens"] == results[1]["eval_tokens"] == 63 * 64
    assert results[0]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-6)


def test_eval_at_start_logs_the_untrained_model_as_step_0(tiny_corpus, tmp_path):
    out = train(_cfg(tiny_corpus, tmp_path / "run", "train.max_steps=4", "train.eval_every=4",
                     "train.eval_at_start=true", "train.save_every=4"))
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4] and out["step"] == 4
    assert evals[0]["eval_loss"] == pytest.approx(math.log(512), rel=0.05)  # an untrained model: ~uniform
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]


def test_global_batch_the_order_cannot_serve_is_refused_in_one_line(tiny_corpus, tmp_path):
    """More rows per batch than one epoch of the training set holds: refused before the first step."""
    with pytest.raises(C.ConfigError, match=r"^train\.batch_size: ") as err:
        train(_cfg(tiny_corpus, tmp_path / "run", "train.batch_size=65536", "data.block_size=64"))
    assert "\n" not in str(err.value)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one_exactly(tiny_corpus, tmp_path, capsys):
    """A file of the latest checkpoint truncated: the run says so in one line, sets it aside,
    resumes from the previous checkpoint and continues bit-exactly (losses equal an uninterrupted
    run's), and metrics.jsonl holds each step once."""
    full = train(_cfg(tiny_corpus, tmp_path / "full", "train.max_steps=10", "train.eval_every=0"))
    cfg = _cfg(tiny_corpus, tmp_path / "part", "train.max_steps=10", "train.eval_every=0")
    train(cfg, stop_after=8)  # checkpoints at 4 and 8
    files = [p for p in (tmp_path / "part" / "checkpoints" / "8").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    capsys.readouterr()
    out = train(cfg)
    printed = capsys.readouterr().out
    assert "checkpoint step 8" in printed and "cannot be restored" in printed and "resumed from step 4" in printed
    assert out["step"] == 10 and list((tmp_path / "part" / "checkpoints_damaged").iterdir())
    ref = {r["step"]: r["loss"] for r in full["history"]}
    got = [r for r in read_metrics(tmp_path / "part") if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 11))  # each step once
    assert all(r["loss"] == ref[r["step"]] for r in got), (got, ref)


def test_records_of_one_flush_share_its_time(monkeypatch):
    """Every record of a flush carries the flush's time: its steps were all done by then. (A clock
    read per record dated the first ones earlier, which bench/convergence.py read as steps taking
    no time: ours' steady rate came out ~11% too high.)"""
    import itertools
    import types

    from train.core import loop as L
    from train.core import sharding

    clock = iter(range(100, 1000, 7))  # every reading of the clock later than the last
    monkeypatch.setattr(L.time, "time", lambda: float(next(clock)))
    mesh = sharding.make_mesh(tiny_config())

    def train_step(state, batch):
        return state + 1, {"loss": 1.0, "learning_rate": 0.1, "grad_norm": 1.0}

    compiled = types.SimpleNamespace(train_step=train_step, mesh=mesh)
    records = []
    loop = L.TrainLoop(compiled, types.SimpleNamespace(step=0), itertools.repeat(np.zeros((8, 33), np.int32)),
                       tokens_per_step=8, log_every=5, log=records.append, rates=lambda n: {})
    loop.state = 0
    loop.run(10)
    assert [r["step"] for r in records] == list(range(1, 11))
    times = [r["elapsed_s"] for r in records]
    assert len(set(times[:5])) == 1 and len(set(times[5:])) == 1 and times[5] > times[0]
