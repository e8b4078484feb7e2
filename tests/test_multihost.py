"""Multi-host support: launch scripts (dry runs), bad start-up input, and 2 CPU processes."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess


def _bash(script, *args, timeout=30):
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
    assert rc == 2 and took < 5
    assert err == "error: mesh.process_id: 5 is out of range for 2 processes (0..1)"


def test_unreachable_coordinator_fails_within_timeout(capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err, took = _main(capsys, monkeypatch, {"CODENEO_COORDINATOR": f"127.0.0.1:{port}",
                                                "CODENEO_NUM_PROCESSES": "2", "CODENEO_PROCESS_ID": "1",
                                                "CODENEO_INIT_TIMEOUT": "3"})
    assert rc == 2 and took < 30, took
    assert len(err.splitlines()) == 1 and err.startswith(f"error: mesh.coordinator_address: 127.0.0.1:{port} "
                                                         "unreachable after 3 s"), err


def test_mesh_not_matching_devices_fails(capsys, monkeypatch, tiny_corpus, tmp_path):
    data, tok = tiny_corpus
    rc, err, took = _main(capsys, monkeypatch, {}, f"run.output_dir={tmp_path}", f"tokenizer.path={tok}",
                          "mesh.data=16", "train.batch_size=16")
    assert rc == 2 and took < 30
    assert err.startswith("error: mesh: data x fsdp x tensor = 16x1x1 = 16 devices, but 8 are available"), err
