"""Benchmark the jitted train step (ours) against the Hugging Face Flax GPT-Neo peer on the same batch.

    python bench/train_step.py --config configs/gpt_neo_125m.yaml --set model.vocab_size=50257
    python bench/train_step.py --quick            # tiny config, a few minutes on 2 CPU cores
    python bench/train_step.py --quick --sweep    # also each speed option alone against the baseline
    python bench/train_step.py --config configs/gpt_neo_125m.yaml --set model.vocab_size=50257 --plan --sweep
                                                  # memory only: compile, never run (any size, on CPU)

The last printed line is one JSON object (see ``main``)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Ours and the peer's worker are alive at the same time (they take turns): on a GPU neither may
# grab 75% of its memory up front. Peak memory is still measured (peak_bytes_in_use).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train import config as config_lib  # noqa: E402
from train.core import metrics, sharding  # noqa: E402
from train.core.model import init_params  # noqa: E402
from train.core.step import compile_steps, loss_sum_fn  # noqa: E402

# One step of per_device_batch_size x devices without accumulation, as the peer runs it (a config's
# own batch_size / grad_accum_steps, e.g. the 125M recipe's 0.5M-token step, are for training).
STEP_OVERRIDES = ["train.batch_size=0", "optimizer.grad_accum_steps=1"]
QUICK_OVERRIDES = ["model.vocab_size=4096", "train.batch_size=8", "data.block_size=128", "mesh.data=-1"]
PEER_VENV = ROOT / "bench" / ".peer-venv"
PEER_REQUIREMENTS = ["transformers==4.57.*", "jax", "flax", "optax", "numpy"]


def peak_memory_bytes(device) -> tuple[int | None, str]:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss"


class OursRunner:
    """Our compiled, donated train step on one batch, timed ``n`` steps at a time."""

    def __init__(self, cfg, batch_np: np.ndarray, warmup: int):
        mesh = sharding.make_mesh(cfg)
        compiled = compile_steps(cfg, mesh)
        self.step = compiled.train_step
        self.state = compiled.init(jax.random.PRNGKey(cfg.train.seed))
        self.batch = sharding.global_batch(batch_np, mesh)
        t = time.perf_counter()
        executable = self.step.lower(self.state, self.batch).compile()
        self.compile_time_s = time.perf_counter() - t
        self.temp_bytes = _temp_bytes(executable)
        self.num_devices = mesh.size
        self.batch_shards = batch_shards(mesh)
        self.time(warmup)  # also fills jit's dispatch cache

    def time(self, n: int) -> list[float]:
        """Seconds of each of ``n`` steps; one host sync per step only to time it (block_until_ready)."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.state, out = self.step(self.state, self.batch)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
        return times

    def close(self):
        self.state = self.batch = None


class PeerRunner:
    """The peer's step in a worker process of its own venv (``bench/peer_step.py``), same protocol."""

    def __init__(self, cfg, batch_path: str, warmup: int, venv: Path):
        from train.interop.convert import hf_config_dict

        py = ensure_peer_venv(venv)
        args = {
            "hf_config": hf_config_dict(cfg.model), "batch": batch_path, "warmup": warmup,
            "dtype": cfg.model.compute_dtype, "seed": cfg.train.seed,
            "lr": cfg.optimizer.learning_rate, "b1": cfg.optimizer.b1, "b2": cfg.optimizer.b2,
            "eps": cfg.optimizer.eps, "weight_decay": cfg.optimizer.weight_decay, "clip": cfg.optimizer.clip_norm,
        }
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen([str(py), str(ROOT / "bench" / "peer_step.py"), "--json-args", json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=env)
        self.info = self._reply()
        self.compile_time_s = self.info["compile_time_s"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"peer worker exited with {self.proc.returncode}: {self._stderr.read()[-3000:]}")
        return json.loads(line)

    def time(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._reply()["step_times_s"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._stderr.close()


def time_in_rounds(runners: dict, steps: int, rounds: int) -> dict[str, list[list[float]]]:
    """Time every runner ``steps`` steps per round, the runners taking turns, ``rounds`` times.

    Alternating short rounds exposes each side to the same drift of a shared machine (other jobs,
    clocks); timing one side fully and then the other does not: on the 2-core CI box sequential
    runs of the same code gave 1.05x-1.23x the peer."""
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(runner.time(steps))
    return times


def median_step(rounds_times: list[list[float]]) -> float:
    return statistics.median(t for r in rounds_times for t in r)


def round_ratios(slow: list[list[float]], fast: list[list[float]]) -> list[float]:
    """Per round, median step time of ``slow`` over that of ``fast`` (how many times faster)."""
    return [statistics.median(s) / statistics.median(f) for s, f in zip(slow, fast, strict=True)]


def batch_shards(mesh) -> int:
    """How many ways the batch is split (the mesh's batch axes)."""
    return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


def residual_bytes(cfg, batch_size: int, seq_len: int) -> int:
    """Bytes the backward pass keeps from the forward pass for one micro-batch of a batch shard
    of ``batch_size`` sequences, unsharded otherwise (the leaves of
    ``jax.vjp``'s closure, shapes only, nothing allocated). Exact for the traced program and the
    same on every backend, unlike a compiler's buffer plan; it can count a parameter the forward
    pass keeps as is, so it errs high by at most the parameters' size."""
    micro = batch_size // max(cfg.optimizer.grad_accum_steps, 1)
    params = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((micro, seq_len + 1), np.int32)
    closure = jax.eval_shape(lambda p, t: jax.vjp(lambda q: loss_sum_fn(q, t, cfg.model)[0], p)[1], params, tokens)
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(closure))


def plan_memory(cfg, batch_size: int, seq_len: int) -> dict:
    """Compile the train step for abstract inputs (nothing allocated, nothing run) and report
    XLA's buffer plan on this backend next to the backend-independent residual bytes."""
    mesh = sharding.make_mesh(cfg)
    compiled = compile_steps(cfg, mesh)
    batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), np.int32, sharding=compiled.batch_sharding)
    t = time.perf_counter()
    executable = compiled.train_step.lower(compiled.abstract_state, batch).compile()
    compile_s = time.perf_counter() - t
    m = executable.memory_analysis()
    # The state is donated (aliased): outputs reuse the argument buffers.
    planned = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"compile_time_s": compile_s, "state_bytes": int(m.argument_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "planned_bytes": int(planned),
            "residual_bytes": residual_bytes(cfg, batch_size // batch_shards(mesh), seq_len),
            "num_devices": mesh.size}


def _temp_bytes(executable) -> int | None:
    """XLA's planned scratch memory of the compiled step (activations, workspaces) per device:
    unlike process peak memory, it is per variant and comparable on every backend."""
    try:
        return int(executable.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports a memory analysis
        return None


def sweep_variants(cfg) -> list[tuple[str, list[str]]]:
    """Each speed option of issue "Performance" alone, against the configuration as given."""
    T = cfg.data.block_size
    others = [impl for impl in config_lib.CHOICES["model.attention_impl"] if impl != cfg.model.attention_impl
              and (impl != "cudnn" or (jax.default_backend() == "gpu" and cfg.model.compute_dtype != "float32"))]
    return [
        ("baseline", []),
        *[(f"attention {impl}", [f"model.attention_impl={impl}"]) for impl in others],
        ("remat full", ["model.remat=full"]),
        ("remat dots", ["model.remat=dots"]),
        # The loss option is the one the config does not use: chunks of T/4, or the plain loss.
        ("loss plain", ["model.loss_chunk_size=0"]) if cfg.model.loss_chunk_size
        else (f"loss chunk {max(T // 4, 1)}", [f"model.loss_chunk_size={max(T // 4, 1)}"]),
    ]


def sweep_rows(config_path: str, overrides: list[str], variants, runners: dict, times: dict,
               batch_np: np.ndarray) -> list[dict]:
    """One row per ``sweep_variants`` entry; tokens/s relative to the baseline, by rounds."""
    B, T1 = batch_np.shape
    base = times["baseline"]
    rows = []
    for name, extra in variants:
        cfg = config_lib.load(config_path, overrides + extra)
        r, step_s = runners[name], median_step(times[name])
        rows.append({"variant": name, "overrides": extra, "tokens_per_second": batch_np[:, 1:].size / step_s,
                     "step_time_s": step_s, "compile_time_s": r.compile_time_s, "temp_bytes": r.temp_bytes,
                     "relative": statistics.median(round_ratios(base, times[name])),
                     "residual_bytes": residual_bytes(cfg, B // r.batch_shards, T1 - 1)})
        print(f"[sweep] {name:24s} {rows[-1]['tokens_per_second']:10.0f} tok/s  x{rows[-1]['relative']:.2f}  "
              f"temp {(r.temp_bytes or 0) / 2**20:8.1f} MiB  "
              f"residuals {rows[-1]['residual_bytes'] / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
    return rows


def run_plan(config_path: str, overrides: list[str], sweep: bool) -> dict:
    """``--plan``: memory figures only, for the configuration (and each sweep variant)."""
    base_cfg = config_lib.load(config_path, overrides)
    B, T = config_lib.global_batch_size(base_cfg, jax.device_count()), base_cfg.data.block_size
    variants = sweep_variants(base_cfg) if sweep else [("baseline", [])]
    rows = []
    for name, extra in variants:
        r = {"variant": name, "overrides": extra,
             **plan_memory(config_lib.load(config_path, overrides + extra), B, T)}
        rows.append(r)
        print(f"[plan] {name:24s} state {r['state_bytes'] / 2**30:6.2f} GiB  temp {r['temp_bytes'] / 2**30:6.2f} GiB  "
              f"planned {r['planned_bytes'] / 2**30:6.2f} GiB  residuals {r['residual_bytes'] / 2**30:6.2f} GiB",
              file=sys.stderr, flush=True)
    device = jax.devices()[0]
    return {"plan": rows, "planned_bytes": rows[0]["planned_bytes"], "residual_bytes": rows[0]["residual_bytes"],
            "device": getattr(device, "device_kind", device.platform), "num_devices": rows[0]["num_devices"],
            "config": config_path, "overrides": overrides, "compute_dtype": base_cfg.model.compute_dtype,
            "batch_size": B, "seq_len": T, "jax_version": jax.__version__}


def ensure_peer_venv(venv: Path) -> Path:
    """Create (or reuse) the peer virtual environment; ``.ready`` marks a finished install."""
    py = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        if not py.exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
        (venv / ".ready").touch()
    return py


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="tiny config (configs/tiny.yaml) unless --config is given")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20, --quick 10)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds in which ours, the peer and each sweep variant take turns (default 3, --quick 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip the Hugging Face Flax peer")
    p.add_argument("--peer-venv", default=str(PEER_VENV))
    p.add_argument("--sweep", action="store_true", help="also time each speed option alone (JSON field 'sweep')")
    p.add_argument("--plan", action="store_true",
                   help="memory only: compile for abstract inputs, never run (fields 'plan', 'planned_bytes')")
    a = p.parse_args(argv)
    config_path = a.config or (str(ROOT / "configs" / "tiny.yaml") if a.quick else None)
    if config_path is None:
        p.error("--config is required without --quick")
    overrides = STEP_OVERRIDES + (QUICK_OVERRIDES if a.quick else []) + a.overrides
    if a.plan:
        result = run_plan(config_path, overrides, a.sweep)
        print(json.dumps(result), flush=True)
        return result
    cfg = config_lib.load(config_path, overrides)
    steps = a.steps or (10 if a.quick else 20)
    B, T = config_lib.global_batch_size(cfg, jax.device_count()), cfg.data.block_size
    batch_np = np.random.default_rng(cfg.train.seed).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)

    rounds = a.rounds or (5 if a.quick else 3)
    runners = {"baseline": OursRunner(cfg, batch_np, a.warmup)}
    ours = runners["baseline"]
    device = jax.devices()[0]
    mem, mem_kind = peak_memory_bytes(device)  # after the warm-up steps, before any other variant exists
    variants = sweep_variants(cfg) if a.sweep else [("baseline", [])]
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_peer:
            path = os.path.join(tmp, "batch.npy")
            np.save(path, batch_np)
            runners["peer"] = PeerRunner(cfg, path, a.warmup, Path(a.peer_venv))
        for name, extra in variants[1:]:
            runners[name] = OursRunner(config_lib.load(config_path, overrides + extra), batch_np, a.warmup)
        try:
            times = time_in_rounds(runners, steps, rounds)
        finally:
            for runner in runners.values():
                runner.close()
    tokens = B * T
    tps = tokens / median_step(times["baseline"])
    peak = metrics.device_peak_flops(device)
    peak_kind = metrics.peak_flops_source(device)
    per_dev = tps / ours.num_devices
    mfu = per_dev * metrics.flops_per_token(cfg.model, T) / peak if peak else None
    peer = runners.get("peer")
    peer_tps = tokens / median_step(times["peer"]) if peer else None
    ratios = round_ratios(times["peer"], times["baseline"]) if peer else None
    sweep = sweep_rows(config_path, overrides, variants, runners, times, batch_np) if a.sweep else None
    result = {
        "tokens_per_second": tps, "tokens_per_second_per_device": per_dev,
        "step_time_s": median_step(times["baseline"]), "compile_time_s": ours.compile_time_s,
        "peak_memory_bytes": mem, "peak_memory_kind": mem_kind,
        "temp_bytes": ours.temp_bytes, "residual_bytes": residual_bytes(cfg, B // ours.batch_shards, T),
        "sweep": sweep,
        "mfu": mfu, "peak_flops_per_device": peak, "peak_flops_kind": peak_kind,
        "peer_tokens_per_second": peer_tps, "peer_step_time_s": median_step(times["peer"]) if peer else None,
        "peer_compile_time_s": peer.compile_time_s if peer else None,
        # The median of the per-round ratios, and their spread: how sure the comparison is.
        "speedup": statistics.median(ratios) if peer else None,
        "speedup_min": min(ratios) if peer else None, "speedup_max": max(ratios) if peer else None,
        "device": getattr(device, "device_kind", device.platform), "num_devices": ours.num_devices,
        "config": config_path, "overrides": overrides, "compute_dtype": cfg.model.compute_dtype,
        "batch_size": B, "seq_len": T, "steps": steps, "rounds": rounds, "jax_version": jax.__version__,
        "peer_jax_version": peer.info["jax_version"] if peer else None,
        "peer_transformers_version": peer.info["transformers_version"] if peer else None,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
