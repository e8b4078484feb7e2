"""The training loop: compose config, mesh, model, loader, optimizer, checkpoints and metrics.

One call, ``train(cfg)``: builds (or resumes) the sharded state, streams batches, steps,
evaluates, logs and checkpoints. Resumption is exact: the checkpoint holds the optimizer state,
the step (from which dropout keys and the schedule derive) and every host's loader position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train import config as C
from train.core import distributed, sharding
from train.core.checkpoint import Checkpointer, gather_host_states
from train.core.metrics import MetricsWriter, Throughput, device_peak_flops, measured_cpu_peak_flops
from train.core.step import compile_steps
from train.interop import convert, vocab

EOS_TOKEN = "<|endoftext|>"


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, bad data, mismatched tokenizer); the message says why."""


def tokenizer_info(path: str | Path) -> tuple[int, int]:
    """(vocabulary size incl. added tokens, end-of-text id) of the tokenizer folder at ``path``."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if file.exists():
        tok = Tokenizer.from_file(str(file))
        eos, size = tok.token_to_id(EOS_TOKEN), tok.get_vocab_size(with_added_tokens=True)
    elif (Path(path) / "vocab.json").exists():  # a GPT-2 style folder: vocab.json + merges.txt
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(path))
        eos, size = fast.convert_tokens_to_ids(EOS_TOKEN), len(fast)
    else:
        raise C.ConfigError(
            f"tokenizer.path: {path} has no tokenizer.json (train one with python -m tokenizer.train_tokenizer)"
        )
    if eos is None:
        raise C.ConfigError(f"tokenizer.path: {path} has no {EOS_TOKEN} token")
    return size, eos


def resolve(cfg: C.Config, device_count: int) -> C.Config:
    """Fill the values left to the run (vocabulary from the tokenizer, global batch from devices)
    so that the saved config repeats the run exactly."""
    if cfg.model.init_from:
        # The Hugging Face folder decides the architecture (and the tokenizer unless one is set);
        # numerics settings (compute dtype, remat, attention implementation) stay ours.
        import json

        hf_cfg = Path(cfg.model.init_from) / "config.json"
        if not hf_cfg.exists():
            raise C.ConfigError(f"model.init_from: {cfg.model.init_from} has no config.json")
        arch = convert.model_config_from_hf(json.loads(hf_cfg.read_text()), cfg.model)
        cfg = C.replace(cfg, model={f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)})
        if not cfg.tokenizer.path:
            cfg = C.replace(cfg, tokenizer={"path": cfg.model.init_from})
        vocab, _ = tokenizer_info(cfg.tokenizer.path)
        if vocab > cfg.model.vocab_size:
            # Tokens added for this run (control codes, FIM sentinels): the embedding grows.
            cfg = C.replace(cfg, model={"vocab_size": vocab})
    else:
        vocab, _ = tokenizer_info(cfg.tokenizer.path)
        if cfg.model.vocab_size == 0:
            cfg = C.replace(cfg, model={"vocab_size": vocab})
        elif cfg.model.vocab_size < vocab:
            raise C.ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {vocab} tokens "
                f"({cfg.tokenizer.path}); set it to 0 to take the tokenizer's size"
            )
    if cfg.train.batch_size == 0:
        cfg = C.replace(cfg, train={"batch_size": C.global_batch_size(cfg, device_count)})
    C.validate_for_devices(cfg, device_count)
    return cfg


def next_epoch(loader_states: dict[str, Any]) -> int:
    """The first epoch no host of a saved run had started: where the data stream restarts when a
    checkpoint is restored with a different number of processes."""
    epochs = [int((st.get("docs") or {}).get("epoch", 0)) for st in loader_states.values() if st]
    return max(epochs, default=-1) + 1


def encode_options(cfg: C.Config):
    """The loader's ``EncodeOptions`` for ``cfg.data`` (control codes, FIM, sliding windows)."""
    from data_processing.packing import EncodeOptions

    d = cfg.data
    windows = d.packing == "windows"
    return EncodeOptions(
        control_codes=d.control_codes, fim_rate=d.fim_rate, fim_spm_rate=d.fim_spm_rate,
        window=d.block_size + 1 if windows else 0, stride=(d.window_stride or d.block_size) if windows else 0,
        seed=cfg.train.seed,
    )


def ensure_token_cache(cfg: C.Config) -> None:
    """Build the missing or stale entries of ``data.token_cache`` for the run's tokenizer (every
    process; hosts sharing the folder start at different shards and skip finished ones)."""
    from data_processing.token_cache import build_cache

    summary = build_cache(cfg.data.train_dir, cfg.tokenizer.path, cfg.data.token_cache,
                          progress=cfg.logging.progress and jax.process_index() == 0,
                          host=(jax.process_index(), jax.process_count()))
    if summary.built and jax.process_index() == 0:
        print(f"[train] token cache: built {summary.built} of {summary.shards} shards "
              f"({summary.tokens_built} tokens, {summary.seconds:.0f} s) in {summary.folder}", flush=True)


def _make_loaders(cfg: C.Config, batch_per_host: int):
    from data_processing.loader import TokenLoader, validation_batches

    d = cfg.data
    encode = encode_options(cfg)
    if d.token_cache:
        ensure_token_cache(cfg)
    loader = TokenLoader(
        d.train_dir, cfg.tokenizer.path, block_size=d.block_size, batch_size_per_host=batch_per_host,
        seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers,
        process_index=jax.process_index(), process_count=jax.process_count(), skip_bad=d.skip_bad,
        prefetch=d.prefetch, tokenize_batch=d.tokenize_batch, encode=encode, host_split=d.host_split,
        token_cache=d.token_cache or None,
    )
    val = []
    if cfg.train.eval_every and d.eval_batches:
        val = list(validation_batches(
            d.validation_dir, cfg.tokenizer.path, block_size=d.block_size, batch_size_per_host=batch_per_host,
            num_batches=d.eval_batches, process_index=jax.process_index(), process_count=jax.process_count(),
            encode=encode,
        ))
    return loader, val


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (preemptible TPUs)."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught: leave them alone.
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate(compiled, params, val_batches: list[np.ndarray]) -> dict[str, float]:
    """Mean token loss and perplexity over the fixed validation batches."""
    total, tokens = 0.0, 0.0
    for host_batch in val_batches:
        out = compiled.eval_step(params, sharding.global_batch(host_batch, compiled.mesh))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train(cfg: C.Config, *, stop_after: int | None = None) -> dict[str, Any]:
    """Train until ``train.max_steps`` (or ``stop_after`` steps in this call, for tests that
    simulate an interruption). Returns a summary with the final step and losses."""
    distributed.initialize(cfg.mesh)
    cfg = vocab.prepare_tokenizer(cfg, cfg.run.output_dir)
    cfg = resolve(cfg, jax.device_count())
    is_main = jax.process_index() == 0
    run_dir = Path(cfg.run.output_dir)
    if is_main:
        C.save(cfg, run_dir)
    mesh = sharding.make_mesh(cfg)
    compiled = compile_steps(cfg, mesh)
    batch_per_host = cfg.train.batch_size // jax.process_count()
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = ckpt.latest_step()
    loader_state = None
    restart_epoch = None
    if start is None:
        state = _initial_state(cfg, compiled)
    else:
        state, loader_states, _ = ckpt.restore(start, compiled.abstract_state)
        if len(loader_states) == jax.process_count():
            loader_state = loader_states[str(jax.process_index())]  # None: saved before any data was read
            print(f"[train] resumed from step {start} in {ckpt.directory}", flush=True)
        else:
            # A different process count: the model and optimizer state were resharded onto this
            # mesh by the restore; a host's data position cannot be split or merged, so the data
            # stream restarts at the start of the epoch after the furthest one any host had reached.
            restart_epoch = next_epoch(loader_states)
            print(f"[train] resumed from step {start} in {ckpt.directory} (saved by {len(loader_states)} "
                  f"processes, now {jax.process_count()}): data restarts at epoch {restart_epoch}", flush=True)
    step = int(state.step)
    # No loader (and no data needed) when there is nothing to train, e.g. max_steps 0 after init_from.
    loader, val_batches = (_make_loaders(cfg, batch_per_host) if step < cfg.train.max_steps else (None, []))
    if loader is not None and loader_state is not None:
        loader.restore(loader_state)
    elif loader is not None and restart_epoch is not None:
        loader.restart_at_epoch(restart_epoch)
    writer = MetricsWriter(run_dir, cfg, active=is_main)
    best = BestCheckpoint(run_dir, cfg.checkpoint.keep_best) if cfg.checkpoint.keep_best else None

    peak = device_peak_flops(jax.devices()[0])
    if peak is None and jax.devices()[0].platform == "cpu":
        # Simulated CPU devices share the same cores: each gets its share of the measured peak.
        peak = measured_cpu_peak_flops() / jax.local_device_count()
    throughput = Throughput(cfg, cfg.train.batch_size * cfg.data.block_size, jax.device_count(), peak)
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    end = cfg.train.max_steps if stop_after is None else min(cfg.train.max_steps, step + stop_after)
    pending: list[tuple[int, dict]] = []
    last_good_save = start
    history: list[dict[str, Any]] = []
    progress = _progress(cfg, is_main, step, cfg.train.max_steps)
    t_start = time.time()

    def flush() -> None:
        """Fetch the metrics of the steps since the last flush (one host sync), check them, log."""
        nonlocal pending
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        pending = []
        losses = [float(m["loss"]) for m in fetched]
        bad = [s for s, loss in zip(steps, losses, strict=True) if not math.isfinite(loss)]
        if bad:
            where = f"step {last_good_save}" if last_good_save is not None else "none"
            raise TrainingError(
                f"step {bad[0]}: loss is {losses[steps.index(bad[0])]}; stopping. Last good checkpoint: {where} "
                f"in {ckpt.directory}"
            )
        throughput.add_steps(len(steps))
        rates = throughput.rates()
        for s, m in zip(steps, fetched, strict=True):
            record = {"step": s, "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                      "grad_norm": float(m["grad_norm"]), "tokens": s * tokens_per_step, **rates,
                      "elapsed_s": round(time.time() - t_start, 3)}
            writer.write(record)
            history.append(record)
        if progress is not None:
            progress.update(len(steps))
            mfu = rates["mfu"]
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rates['tokens_per_second']:.0f}",
                                 mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")

    def save(at: int, force: bool = False) -> None:
        nonlocal last_good_save
        flush()  # never checkpoint a state whose loss we have not checked
        host_states = gather_host_states(loader.state() if loader is not None else None)
        meta = {"step": at, "config": C.to_dict(cfg), "tokens": at * tokens_per_step}
        ckpt.save(at, state, host_states, meta, force=force)
        last_good_save = at

    # Test hook: CODENEO_DUMP_BATCHES=1 writes this host's batches to RUN/debug_batches_p{i}.npy.
    dump: list[np.ndarray] | None = [] if os.environ.get("CODENEO_DUMP_BATCHES") == "1" else None
    eval_results: dict[str, float] = {}
    with _StopSignal() as stop:
        try:
            while step < end:
                host_batch = next(loader)
                if dump is not None:
                    dump.append(np.asarray(host_batch))
                state, metrics = compiled.train_step(state, sharding.global_batch(host_batch, mesh))
                step += 1
                pending.append((step, metrics))
                if step % cfg.train.log_every == 0:
                    flush()
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and val_batches:
                    flush()
                    eval_results = evaluate(compiled, state.params, val_batches)
                    writer.write({"step": step, **eval_results, "tokens": step * tokens_per_step})
                    if is_main:
                        print(f"[eval] step {step}: loss {eval_results['eval_loss']:.4f} "
                              f"perplexity {eval_results['perplexity']:.2f}", flush=True)
                    if best is not None:
                        best.offer(step, eval_results, state, {"step": step, "config": C.to_dict(cfg), **eval_results})
                if cfg.train.humaneval_every and step % cfg.train.humaneval_every == 0:
                    flush()
                    results = humaneval_check(cfg, state.params, step) if is_main else {}
                    writer.write({"step": step, **results, "tokens": step * tokens_per_step})
                if step % cfg.train.save_every == 0:
                    save(step)
                if stop.received:
                    print(f"[train] {stop.received} received: saving step {step} and exiting", flush=True)
                    break
            flush()
            if step != last_good_save:
                save(step, force=True)
        finally:
            if dump:
                np.save(run_dir / f"debug_batches_p{jax.process_index()}.npy", np.stack(dump))
            ckpt.close()
            if best is not None:
                best.close()
            if loader is not None:
                loader.close()
            writer.close()
            if progress is not None:
                progress.close()
    return {"step": step, "history": history, "eval": eval_results, "run_dir": str(run_dir),
            "stopped_by": stop.received}


class BestCheckpoint:
    """Keeps the one checkpoint with the lowest value of ``metric`` (e.g. eval_loss) in
    ``RUN/checkpoints/best/``, beside the last-N checkpoints; survives resumes."""

    def __init__(self, run_dir: Path, metric: str):
        self.metric = metric
        self.ckpt = Checkpointer(Path(run_dir) / "checkpoints" / "best", keep=1, async_save=False)
        self.value = math.inf
        step = self.ckpt.latest_step()
        if step is not None:
            meta = self.ckpt.manager.restore(step, args=ocp_meta_args())["meta"]
            self.value = float(meta.get(metric, math.inf))

    def offer(self, step: int, results: dict[str, float], state, meta: dict[str, Any]) -> bool:
        if self.metric not in results:
            raise C.ConfigError(f"checkpoint.keep_best: no metric {self.metric!r} (have {', '.join(results)})")
        if not results[self.metric] < self.value:
            return False
        self.value = results[self.metric]
        self.ckpt.save(step, state, {}, meta, force=True)
        return True

    def close(self) -> None:
        self.ckpt.close()


def ocp_meta_args():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(meta=ocp.args.JsonRestore())


def humaneval_check(cfg: C.Config, params, step: int) -> dict[str, float]:
    """A small seeded HumanEval sample (``train.humaneval_tasks`` x ``train.humaneval_samples``),
    greedy for one sample, temperature 0.8 for several; run on process 0."""
    from transformers import AutoTokenizer

    from train.evaluation.code_eval import humaneval_quick
    from train.inference.decoding import completion_fn_from_params

    samples = cfg.train.humaneval_samples
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer.path)
    fn = completion_fn_from_params(cfg.model, params, tok, temperature=0.0 if samples == 1 else 0.8,
                                   top_p=0.95, max_new_tokens=128, seed=step)
    results = humaneval_quick(fn, n_tasks=cfg.train.humaneval_tasks, samples=samples, seed=cfg.train.seed)
    print(f"[humaneval] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()), flush=True)
    return results


def _initial_state(cfg: C.Config, compiled):
    """A fresh state: random init, or the weights of ``model.init_from`` with a fresh optimizer."""
    if not cfg.model.init_from:
        return compiled.init(jax.random.PRNGKey(cfg.train.seed))
    from train.interop.hf_io import load_hf_folder

    hf_cfg, params = load_hf_folder(cfg.model.init_from, cfg.model)
    if cfg.model.vocab_size > hf_cfg.vocab_size:
        params = vocab.grow_vocab(params, hf_cfg.vocab_size, cfg.model)
    params = jax.device_put(params, compiled.state_shardings.params)
    print(f"[train] initialised from {cfg.model.init_from} ({cfg.model.family})", flush=True)
    return compiled.state_from_params(params)


def _progress(cfg: C.Config, is_main: bool, initial: int, total: int):
    if not (is_main and cfg.logging.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def restore_state(run_dir: str | Path, step: int | None = None, *, mesh=None, best: bool = False):
    """``(config, train state, loader states, meta)`` of a checkpoint of ``run_dir`` (latest
    unless ``step``), on one device by default. ``best`` reads the best-by-eval checkpoint kept
    with ``checkpoint.keep_best``."""
    run_dir = Path(run_dir)
    cfg = C.load(run_dir / "config.yaml")
    cfg = dataclasses.replace(cfg, mesh=C.MeshConfig(data=1, fsdp=1, tensor=1))
    if mesh is None:
        mesh = sharding.make_mesh(C.replace(cfg, train={"batch_size": 1, "per_device_batch_size": 1},
                                            optimizer={"grad_accum_steps": 1}), jax.devices()[:1])
    compiled = compile_steps(cfg, mesh)
    folder = run_dir / "checkpoints" / ("best" if best else "")
    ckpt = Checkpointer(folder, keep=10**6, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{folder}: no checkpoint found")
        state, loader_states, meta = ckpt.restore(step, compiled.abstract_state)
    finally:
        ckpt.close()
    return cfg, state, loader_states, meta


def restore_params(run_dir: str | Path, step: int | None = None, *, mesh=None, best: bool = False):
    """Parameters (and the run's config and step) of a checkpoint, on one device by default:
    what export, sampling and evaluation need. See ``restore_state``."""
    cfg, state, _, meta = restore_state(run_dir, step, mesh=mesh, best=best)
    return cfg, state.params, int(meta["step"])
