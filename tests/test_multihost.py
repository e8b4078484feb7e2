"""Multi-host support: launch scripts (dry runs), bad start-up input, and 2 CPU processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess


def _bash(script, *args, timeout=300):  # dry runs take a second; the bound is against a hang only
    return subprocess.run(["bash", str(ROOT / "run_scripts" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_tpu_pod_dry_run_prints_every_command():
    out = _bash("tpu_pod.sh", "--project", "proj", "--zone", "us-central2-b", "--accelerator", "v4-32",
                "--name", "neo", "--repo", "https://example.com/codeneo.git", "--data", "gs://bucket/data",
                "--config", "configs/tiny.yaml", "--set", "train.max_steps=7", "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    where = "--project=proj --zone=us-central2-b"
    assert lines[0] == (f"gcloud compute tpus tpu-vm create neo {where} --accelerator-type=v4-32 "
                        "--version=tpu-ubuntu2204-base")
    ssh = [ln for ln in lines if ln.startswith(f"gcloud compute tpus tpu-vm ssh neo {where} --worker=all --command=")]
    assert len(ssh) == 4, lines  # clone, install, data, train: all on every worker
    assert "git\\ clone" in ssh[0] and "https://example.com/codeneo.git" in ssh[0]
    assert "jax\\[tpu\\]" in ssh[1]
    assert "gs://b" in ssh[2]
    assert "python\\ -m\\ train\\ --config\\ configs/tiny.yaml\\ --set\\ train.max_steps=7" in ssh[3]
    assert lines[-1] == f"gcloud compute tpus tpu-vm scp neo:codeneo/train.log runs/tpu_logs/ {where} --worker=all"
    missing = _bash("tpu_pod.sh", "--zone", "z", "--repo", "r", "--dry-run")
    assert missing.returncode == 2 and "--project is required" in missing.stderr


def test_gpu_nodes_dry_run_prints_sbatch_script_and_command():
    out = _bash("gpu_nodes.sh", "--nodes", "4", "--gpus-per-node", "8", "--per", "gpu", "--partition", "a100",
                "--config", "configs/tiny.yaml", "--set", "train.max_steps=7", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --partition=a100"):
        assert line in text.splitlines(), text
    assert "srun --kill-on-bad-exit=1" in text and "-m train --config configs/tiny.yaml --set train.max_steps=7" in text
    assert text.strip().splitlines()[-1] == "sbatch runs/slurm_logs/codeneo.sbatch"
    per_node = _bash("gpu_nodes.sh", "--per", "node", "--dry-run").stdout
    assert "#SBATCH --ntasks-per-node=1" in per_node and "#SBATCH --gpus-per-task=8" in per_node
    bad = _bash("gpu_nodes.sh", "--per", "socket", "--dry-run")
    assert bad.returncode == 2 and "--per must be node or gpu" in bad.stderr


def test_local_cpu_dry_run_prints_one_command_per_process():
    out = _bash("local_cpu.sh", "--processes", "3", "--devices", "2", "--port", "4321", "--dry-run", "--",
                "--config", "configs/tiny.yaml")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in line
        assert "CODENEO_COORDINATOR=127.0.0.1:4321 CODENEO_NUM_PROCESSES=3" in line
        assert f"CODENEO_PROCESS_ID={i} " in line and "-m train --config configs/tiny.yaml" in line


# --- bad start-up input: a one-line error naming the key, in bounded time -------------------------

def _main(capsys, monkeypatch, env, *sets):
    from train.__main__ import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    rc = main(["--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    return rc, err, time.monotonic() - t0


def test_process_id_out_of_range_fails_at_once(capsys, monkeypatch):
    rc, err, took = _main(capsys, monkeypatch, {"CODENEO_COORDINATOR": "127.0.0.1:1", "CODENEO_NUM_PROCESSES": "2",
                                                "CODENEO_PROCESS_ID": "5"})
    # No coordinator contacted: only import time, far below the 300 s default join timeout (a
    # generous bound: importing JAX on a loaded CI box takes long).
    assert rc == 2 and took < 120
    assert err == "error: mesh.process_id: 5 is out of range for 2 processes (0..1)"


def test_unreachable_coordinator_fails_within_timeout(capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err, took = _main(capsys, monkeypatch, {"CODENEO_COORDINATOR": f"127.0.0.1:{port}",
                                                "CODENEO_NUM_PROCESSES": "2", "CODENEO_PROCESS_ID": "1",
                                                "CODENEO_INIT_TIMEOUT": "3"})
    assert rc == 2 and took < 120, took  # the 3 s timeout, not the 300 s default (plus imports on a loaded box)
    assert len(err.splitlines()) == 1 and err.startswith(f"error: mesh.coordinator_address: 127.0.0.1:{port} "
                                                         "unreachable after 3 s"), err


def test_mesh_not_matching_devices_fails(capsys, monkeypatch, tiny_corpus, tmp_path):
    data, tok = tiny_corpus
    rc, err, took = _main(capsys, monkeypatch, {}, f"run.output_dir={tmp_path}", f"tokenizer.path={tok}",
                          "mesh.data=16", "train.batch_size=16")
    assert rc == 2 and took < 120
    assert err.startswith("error: mesh: data x fsdp x tensor = 16x1x1 = 16 devices, but 8 are available"), err


# --- 2 processes x 4 CPU devices vs 1 process x 8 devices; resume on a different mesh -------------

STEPS = 4


def _overrides(tiny_corpus, run_dir):
    data, tok = tiny_corpus
    return [f"run.output_dir={run_dir}", f"data.train_dir={data / 'train'}", f"tokenizer.path={tok}",
            "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.window_size=16",
            "data.block_size=64", "train.batch_size=8", f"train.max_steps={STEPS}", "train.log_every=1",
            f"train.save_every={STEPS}", "train.eval_every=0", "data.shuffle_buffer=50", "data.num_workers=1",
            "schedule.warmup_steps=2", "schedule.decay_steps=10", "logging.progress=false",
            "logging.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def two_process_run(tiny_corpus, tmp_path_factory):
    """``python -m train`` in 2 processes x 4 simulated CPU devices (gloo collectives), coordinated on
    127.0.0.1, through the plain CLI. Returns the run directory."""
    run_dir = tmp_path_factory.mktemp("two_proc") / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "train", "--config", "configs/tiny.yaml"]
    for o in _overrides(tiny_corpus, run_dir):
        args += ["--set", o]
    procs = []
    for i in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "HF_HUB_OFFLINE": "1", "CODENEO_COORDINATOR": f"127.0.0.1:{port}",
               "CODENEO_NUM_PROCESSES": "2", "CODENEO_PROCESS_ID": str(i), "CODENEO_INIT_TIMEOUT": "120"}
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=1200)[0])  # a bound against a hang: 2 processes on a loaded box
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outs[i][-3000:]}"
    return run_dir


def _losses(run_dir) -> dict[int, float]:
    from train.core.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_two_processes_step_on_the_same_global_batches_as_one_process(two_process_run, tiny_corpus, tmp_path):
    """The 2-process run and a 1-process x 8-device run of the same config: the same losses per step
    (within 1e-5) and parameters. And the global batches ``python -m train.batches`` writes (one
    process) are what the 2-process run stepped on: stepping the same initial model on them here
    gives its losses."""
    import json

    import jax
    import numpy as np

    from train import config as C
    from train.core import sharding
    from train.core.run_dir import restore_params
    from train.core.step import compile_steps
    from train.run import resolve, train

    one = tmp_path / "one"
    out = train(C.load("configs/tiny.yaml", _overrides(tiny_corpus, one)))
    assert out["step"] == STEPS and jax.device_count() == 8 and jax.process_count() == 1
    two, ones = _losses(two_process_run), _losses(one)
    assert sorted(two) == sorted(ones) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [ones[s] for s in sorted(ones)], rtol=0, atol=1e-5)
    _, p_two, _ = restore_params(two_process_run, STEPS)
    _, p_one, _ = restore_params(one, STEPS)
    for a, b in zip(jax.tree_util.tree_leaves(p_two), jax.tree_util.tree_leaves(p_one), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)

    batches = tmp_path / "batches.jsonl"
    proc = subprocess.run([sys.executable, "-m", "train.batches", "--config", "configs/tiny.yaml",
                           *[a for o in _overrides(tiny_corpus, tmp_path / "b") for a in ("--set", o)],
                           "--steps", str(STEPS), "--out", str(batches)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in batches.read_text().splitlines()]
    assert [(r["step"], r["row"]) for r in lines] == [(s, i) for s in range(1, STEPS + 1) for i in range(8)]
    assert all(r["text"] and len(r["tokens"]) == 65 for r in lines)
    global_BT = np.array([r["tokens"] for r in lines], np.int32).reshape(STEPS, 8, 65)
    cfg = resolve(C.load("configs/tiny.yaml", _overrides(tiny_corpus, tmp_path / "unused")), 8)
    mesh = sharding.make_mesh(cfg)
    compiled = compile_steps(cfg, mesh)
    state = compiled.init(jax.random.PRNGKey(cfg.train.seed))
    ours = []
    for s in range(STEPS):
        state, m = compiled.train_step(state, sharding.global_batch(global_BT[s], mesh))
        ours.append(float(m["loss"]))
    np.testing.assert_allclose(ours, [two[s] for s in range(1, STEPS + 1)], rtol=0, atol=1e-5)


def test_two_process_checkpoint_resumes_exactly_in_one_process_on_another_mesh(two_process_run, tiny_corpus,
                                                                              tmp_path):
    """The 2-process checkpoint (mesh data=8) restores in this 1-process run on a data=4 x fsdp=2
    mesh: params right after the restore equal the saved ones, and the run continues the global
    data order exactly where it stopped: its losses after the resume equal those of an
    uninterrupted 1-process run (within 1e-5)."""
    import shutil

    import jax
    import numpy as np

    from train import config as C
    from train.core import sharding
    from train.core.run_dir import restore_params
    from train.run import train

    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run, run_dir)
    more = 4
    cfg = C.load("configs/tiny.yaml", _overrides(tiny_corpus, run_dir) + [
        f"train.max_steps={STEPS + more}", "mesh.data=4", "mesh.fsdp=2"])
    _, saved_8, _ = restore_params(two_process_run, STEPS)
    other_mesh = sharding.make_mesh(C.replace(cfg, mesh={"data": 4, "fsdp": 2}))
    _, restored, _ = restore_params(run_dir, STEPS, mesh=other_mesh)
    for a, b in zip(jax.tree_util.tree_leaves(saved_8), jax.tree_util.tree_leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = train(cfg)
    assert out["step"] == STEPS + more
    after = {r["step"]: r["loss"] for r in out["history"]}
    assert sorted(after) == list(range(STEPS + 1, STEPS + more + 1))
    reference = train(C.load("configs/tiny.yaml", _overrides(tiny_corpus, tmp_path / "ref") + [
        f"train.max_steps={STEPS + more}"]))
    ref = {r["step"]: r["loss"] for r in reference["history"]}
    np.testing.assert_allclose([after[s] for s in sorted(after)], [ref[s] for s in sorted(after)], rtol=0, atol=1e-5)
