"""Wire one training run: config -> tokenizer, state, loaders, hooks -> the core loop.

``train(cfg)`` builds (or resumes) the sharded state, streams batches, steps, evaluates, logs and
checkpoints. Resumption is exact: the checkpoint holds the optimizer state, the step (from which
dropout keys and the schedule derive) and every host's loader position. This module only
composes; the math and the loop live in ``train.core``, the Hugging Face pieces in
``train.interop``, HumanEval in ``train.evaluation``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from data_processing.tokens import TokenizerFileError, tokenizer_info
from train import config as C
from train.core import distributed, sharding
from train.core.checkpoint import Checkpointer
from train.core.hooks import BestCheckpoint, CheckpointHook, EvalHook
from train.core.loop import StopSignal, TrainingError, TrainLoop
from train.core.metrics import MetricsWriter, Throughput, device_peak_flops, measured_cpu_peak_flops
from train.core.step import compile_steps
from train.interop import convert, vocab

__all__ = ["TrainingError", "resolve", "train"]


def _tokenizer_size(path: str) -> int:
    try:
        return tokenizer_info(path)[0]
    except TokenizerFileError as err:
        raise C.ConfigError(f"tokenizer.path: {err}") from err


def resolve(cfg: C.Config, device_count: int) -> C.Config:
    """Fill the values left to the run (vocabulary from the tokenizer, global batch from devices)
    so that the saved config repeats the run exactly."""
    if cfg.model.init_from:
        # The Hugging Face folder decides the architecture (and the tokenizer unless one is set);
        # numerics settings (compute dtype, remat, attention implementation) stay ours.
        hf_cfg = Path(cfg.model.init_from) / "config.json"
        if not hf_cfg.exists():
            raise C.ConfigError(f"model.init_from: {cfg.model.init_from} has no config.json")
        arch = convert.model_config_from_hf(json.loads(hf_cfg.read_text()), cfg.model)
        cfg = C.replace(cfg, model={f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)})
        if not cfg.tokenizer.path:
            cfg = C.replace(cfg, tokenizer={"path": cfg.model.init_from})
        size = _tokenizer_size(cfg.tokenizer.path)
        if size > cfg.model.vocab_size:
            # Tokens added for this run (control codes, FIM sentinels): the embedding grows.
            cfg = C.replace(cfg, model={"vocab_size": size})
    else:
        size = _tokenizer_size(cfg.tokenizer.path)
        if cfg.model.vocab_size == 0:
            cfg = C.replace(cfg, model={"vocab_size": size})
        elif cfg.model.vocab_size < size:
            raise C.ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {size} tokens "
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


def make_loaders(cfg: C.Config, batch_per_host: int):
    """``(training TokenLoader, fixed validation batches)`` of this process."""
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


def initial_state(cfg: C.Config, compiled):
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


@dataclasses.dataclass
class Start:
    """Where a run starts: its state, and this host's data position (or the epoch to restart at)."""

    state: Any
    saved_step: int | None
    loader_state: dict | None = None
    restart_epoch: int | None = None


def start_or_resume(cfg: C.Config, compiled, ckpt: Checkpointer) -> Start:
    """Restore the latest checkpoint of the run (resharded onto this mesh), or initialise."""
    step = ckpt.latest_step()
    if step is None:
        return Start(initial_state(cfg, compiled), None)
    state, loader_states, _ = ckpt.restore(step, compiled.abstract_state)
    if len(loader_states) == jax.process_count():
        print(f"[train] resumed from step {step} in {ckpt.directory}", flush=True)
        # None: saved before any data was read.
        return Start(state, step, loader_state=loader_states[str(jax.process_index())])
    # A different process count: a host's data position cannot be split or merged, so the data
    # stream restarts at the start of the epoch after the furthest one any host had reached.
    epoch = next_epoch(loader_states)
    print(f"[train] resumed from step {step} in {ckpt.directory} (saved by {len(loader_states)} "
          f"processes, now {jax.process_count()}): data restarts at epoch {epoch}", flush=True)
    return Start(state, step, restart_epoch=epoch)


def _throughput(cfg: C.Config) -> Throughput:
    peak = device_peak_flops(jax.devices()[0])
    if peak is None and jax.devices()[0].platform == "cpu":
        # Simulated CPU devices share the same cores: each gets its share of the measured peak.
        peak = measured_cpu_peak_flops() / jax.local_device_count()
    return Throughput(cfg, cfg.train.batch_size * cfg.data.block_size, jax.device_count(), peak)


def _progress(cfg: C.Config, is_main: bool, initial: int):
    """A tqdm bar updated at each metrics flush, or None."""
    if not (is_main and cfg.logging.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _show(progress):
    def update(n_steps: int, last: dict[str, Any]) -> None:
        progress.update(n_steps)
        mfu = last.get("mfu")
        progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_second']:.0f}",
                             mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")

    return update


def add_hooks(loop: TrainLoop, cfg: C.Config, *, run_dir: Path, ckpt: Checkpointer, loader, val_batches,
              saved_step: int | None, is_main: bool) -> list:
    """Register evaluation (+ best checkpoint), HumanEval and checkpoint hooks; returns what to close."""
    closers = []

    def meta(step: int) -> dict[str, Any]:
        return {"step": step, "config": C.to_dict(cfg), "tokens": step * loop.tokens_per_step}

    if cfg.train.eval_every and val_batches:
        best = BestCheckpoint(run_dir, cfg.checkpoint.keep_best, meta) if cfg.checkpoint.keep_best else None
        closers += [best] if best is not None else []
        loop.add_hook(EvalHook(val_batches, is_main=is_main, on_result=best.offer if best else None),
                      every=cfg.train.eval_every)
    if cfg.train.humaneval_every:
        from train.evaluation.hook import HumanEvalHook

        loop.add_hook(HumanEvalHook(cfg, is_main=is_main), every=cfg.train.humaneval_every)
    saver = CheckpointHook(ckpt, loader_state=lambda: loader.state() if loader is not None else None, meta=meta,
                           saved_step=saved_step)
    if saved_step is not None:
        loop.last_good_checkpoint = f"step {saved_step} in {ckpt.directory}"
    loop.add_hook(saver, every=cfg.train.save_every)
    loop.add_hook(saver.at_end, every=0, at_end=True)
    return closers


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
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = start_or_resume(cfg, compiled, ckpt)
    step = int(start.state.step)
    # No loader (and no data needed) when there is nothing to train, e.g. max_steps 0 after init_from.
    loader, val_batches = None, []
    if step < cfg.train.max_steps:
        loader, val_batches = make_loaders(cfg, cfg.train.batch_size // jax.process_count())
        if start.loader_state is not None:
            loader.restore(start.loader_state)
        elif start.restart_epoch is not None:
            loader.restart_at_epoch(start.restart_epoch)
    writer = MetricsWriter(run_dir, cfg, active=is_main)
    throughput = _throughput(cfg)
    progress = _progress(cfg, is_main, step)

    def rates(n_steps: int) -> dict[str, Any]:
        throughput.add_steps(n_steps)
        return throughput.rates()

    loop = TrainLoop(compiled, start.state, loader, tokens_per_step=cfg.train.batch_size * cfg.data.block_size,
                     log_every=cfg.train.log_every, log=writer.write, rates=rates,
                     on_metrics=_show(progress) if progress is not None else None)
    closers = add_hooks(loop, cfg, run_dir=run_dir, ckpt=ckpt, loader=loader, val_batches=val_batches,
                        saved_step=start.saved_step, is_main=is_main)
    end = cfg.train.max_steps if stop_after is None else min(cfg.train.max_steps, step + stop_after)
    with StopSignal() as stop:
        try:
            loop.run(end, stop)
        finally:
            for item in [ckpt, *closers, loader, writer, progress]:
                if item is not None:
                    item.close()
    evals = [h.fn for h in loop.hooks if isinstance(h.fn, EvalHook)]
    return {"step": loop.step, "history": loop.history, "eval": evals[0].last if evals else {},
            "run_dir": str(run_dir), "stopped_by": stop.received}
