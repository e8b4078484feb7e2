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

from data_processing.atomic import write_json_atomic
from data_processing.tokens import TokenizerFileError, tokenizer_info
from train import config as C
from train.core import distributed, sharding
from train.core.checkpoint import Checkpointer
from train.core.hooks import BestCheckpoint, CheckpointHook, EvalHook, EvalSet
from train.core.loop import StopSignal, TrainingError, TrainLoop
from train.core.metrics import MetricsWriter, Throughput, device_peak_flops, peak_flops_source
from train.core.optimizer import check_schedule
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
        check_tokenizer_fits(cfg, json.loads(hf_cfg.read_text()), size, arch.vocab_size)
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
    if cfg.optimizer.grad_accum_steps == 0:
        cfg = C.replace(cfg, optimizer={"grad_accum_steps": C.grad_accum_steps(cfg, device_count)})
    C.validate_for_devices(cfg, device_count)
    return cfg


def check_tokenizer_fits(cfg: C.Config, hf_config: dict[str, Any], size: int, model_vocab: int) -> None:
    """Refuse a tokenizer that does not belong to the ``model.init_from`` model: more tokens than
    its embedding rows (besides the marker tokens this run adds), or another end-of-text id."""
    added = len(vocab.special_tokens_for(cfg.data))  # the embedding grows by these rows only
    if size > model_vocab + added:
        raise C.ConfigError(
            f"tokenizer.path: {cfg.tokenizer.path} has {size} tokens, more than the {model_vocab} of model.init_from "
            f"{cfg.model.init_from}" + (f" plus the {added} marker tokens this run adds" if added else "")
            + "; leave tokenizer.path empty to use the model's own tokenizer")
    eos = hf_config.get("eos_token_id")
    _, tok_eos = tokenizer_info(cfg.tokenizer.path)
    if isinstance(eos, int) and eos != tok_eos:
        raise C.ConfigError(
            f"tokenizer.path: {cfg.tokenizer.path} has <|endoftext|> at id {tok_eos}, model.init_from "
            f"{cfg.model.init_from} ends text with id {eos} (config.json eos_token_id)")


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


def token_cache_dir(cfg: C.Config) -> str | None:
    """The run's token cache folder: ``data.token_cache``, ``RUN_DIR/token_cache`` for ``auto``
    with a local training folder, None when off (empty) or the shards are not a local folder."""
    d = cfg.data
    if d.token_cache == "auto":
        return str(Path(cfg.run.output_dir).absolute() / "token_cache") if Path(d.train_dir).is_dir() else None
    return d.token_cache or None


def ensure_token_cache(cfg: C.Config, folder: str) -> None:
    """Build the missing or stale entries of the token cache ``folder`` for the run's tokenizer
    (every process; hosts sharing the folder start at different shards and skip finished ones)."""
    from data_processing.token_cache import build_cache

    summary = build_cache(cfg.data.train_dir, cfg.tokenizer.path, folder, skip_bad=cfg.data.skip_bad,
                          progress=cfg.logging.progress and jax.process_index() == 0,
                          host=(jax.process_index(), jax.process_count()))
    if summary.built and jax.process_index() == 0:
        print(f"[train] token cache: built {summary.built} of {summary.shards} shards "
              f"({summary.tokens_built} tokens, {summary.seconds:.0f} s) in {summary.folder}", flush=True)


def stream_reason(cfg: C.Config, cache: str | None) -> str | None:
    """Why the run cannot use the global data order (None: it can). Every encode option (control
    codes, windows, fill-in-the-middle per row) is served; what it needs is a token cache."""
    if cfg.data.order == "stream":
        return "data.order is stream"
    if cache is None:
        return "no token cache (data.token_cache is empty, or data.train_dir is not a local folder)"
    return None


def make_train_loader(cfg: C.Config, *, quiet: bool = False):
    """This process's training loader: the global order over the token cache, or (with a printed
    reason) the streaming ``TokenLoader``."""
    from data_processing.global_order import GlobalOrderLoader
    from data_processing.loader import TokenLoader

    d = cfg.data
    cache = token_cache_dir(cfg)
    if cache is not None:
        ensure_token_cache(cfg, cache)
    reason = stream_reason(cfg, cache)
    if reason is not None and d.mixture:
        raise C.ConfigError(f"data.mixture: applies to the global data order only, and this run streams ({reason})")
    if reason is None:
        try:
            return GlobalOrderLoader(cache, source=d.train_dir, tokenizer_path=cfg.tokenizer.path,
                                     block_size=d.block_size, global_batch_size=cfg.train.batch_size,
                                     seed=cfg.train.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count(), encode=encode_options(cfg),
                                     skip_bad=d.skip_bad, mixture=d.mixture or None)
        except ValueError as err:
            # a global batch the order cannot serve, a mixture the corpus cannot (a language it lacks)
            if str(err).startswith(("train.batch_size:", "data.mixture:")):
                raise C.ConfigError(str(err)) from err
            raise
    if jax.process_index() == 0 and not quiet:
        print(f"[train] data order: streaming loader ({reason})", flush=True)
    return TokenLoader(
        d.train_dir, cfg.tokenizer.path, block_size=d.block_size,
        batch_size_per_host=cfg.train.batch_size // jax.process_count(), seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers, process_index=jax.process_index(),
        process_count=jax.process_count(), skip_bad=d.skip_bad, prefetch=d.prefetch,
        tokenize_batch=d.tokenize_batch, encode=encode_options(cfg), host_split=d.host_split, token_cache=cache,
        interleave=d.stream_interleave,
    )


MIXTURE_FILE = "data_mixture.json"  # in the run directory: per-language token counts before and after weighting


def write_mixture_info(loader, cfg: C.Config, run_dir: Path) -> Path | None:
    """With ``data.mixture``, write ``RUN_DIR/data_mixture.json``: the configured weights and, per
    language, the corpus tokens and rows (before weighting) and the weight, rows, tokens and
    epochs of the whole run (``train.max_steps`` global batches; after weighting). None without."""
    if getattr(loader, "mixture", None) is None:
        return None
    rows = cfg.train.max_steps * cfg.train.batch_size
    info = {"mixture": dict(cfg.data.mixture), "run_rows": rows, "block_size": cfg.data.block_size,
            "languages": loader.language_counts(rows)}
    path = run_dir / MIXTURE_FILE
    write_json_atomic(path, info)
    return path


def make_eval_set(cfg: C.Config) -> EvalSet | None:
    """The fixed held-out set (``data.eval_tokens`` drawn with the seed across all validation
    shards; no FIM, no control codes) in global batches of the micro-batch size, or None."""
    from data_processing.heldout import heldout_rows

    if not cfg.train.eval_every:
        return None
    d = cfg.data
    try:
        held = heldout_rows(d.validation_dir, cfg.tokenizer.path, block_size=d.block_size,
                            eval_tokens=d.eval_tokens, seed=cfg.train.seed, skip_bad=d.skip_bad)
    except ValueError as err:
        raise C.ConfigError(str(err)) from err
    batch = cfg.train.batch_size // cfg.optimizer.grad_accum_steps
    local = held.batches(batch, jax.process_index(), jax.process_count())
    index = [i for _, i in held.batches(batch)]
    return EvalSet([rows for rows, _ in local], index, held.language,
                   min_language_tokens=max(2 * d.block_size, d.eval_tokens // 50))


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


def restore_newest_complete(ckpt: Checkpointer, compiled, damaged_dir: Path):
    """``(step, state, loader states)`` of the newest checkpoint that restores, or None when the
    run has none. A newer one that cannot be restored (a truncated or missing file) is reported in
    one line and, once an older one restored, set aside into ``damaged_dir`` (it would block saving
    that step again). When none restores (a changed model, say) nothing is moved: one line says so."""
    failed: list[tuple[int, str]] = []
    for step in reversed(ckpt.steps()):
        try:
            state, loader_states, _ = ckpt.restore(step, compiled.abstract_state)
        except Exception as err:  # tensorstore/orbax raise many kinds; the step is what matters
            first = (str(err).strip().splitlines() or [""])[0][:200]
            failed.append((step, f"{type(err).__name__}: {first}"))
            print(f"[train] checkpoint step {step} in {ckpt.directory} cannot be restored ({failed[-1][1]}); "
                  "trying the previous one", flush=True)
            continue
        for bad, _ in failed:
            print(f"[train] damaged checkpoint step {bad} moved to {ckpt.set_aside(bad, damaged_dir)}", flush=True)
        return step, state, loader_states
    if failed:
        raise TrainingError(f"{ckpt.directory}: no checkpoint can be restored (step {failed[0][0]}: {failed[0][1]}); "
                            "was the model changed? Use another run.output_dir, or remove its checkpoints to "
                            "start from step 0")
    return None


def start_or_resume(cfg: C.Config, compiled, ckpt: Checkpointer) -> Start:
    """Restore the newest complete checkpoint of the run (resharded onto this mesh), or initialise."""
    found = restore_newest_complete(ckpt, compiled, Path(cfg.run.output_dir) / "checkpoints_damaged")
    if found is None:
        return Start(initial_state(cfg, compiled), None)
    step, state, loader_states = found
    first = loader_states.get("0") or {}
    if first.get("kind") == "global_order":
        # The global order's position is the same on every process: any process count continues it.
        print(f"[train] resumed from step {step} in {ckpt.directory}", flush=True)
        return Start(state, step, loader_state=first)
    if len(loader_states) == jax.process_count():
        print(f"[train] resumed from step {step} in {ckpt.directory}", flush=True)
        # None: saved before any data was read.
        return Start(state, step, loader_state=loader_states[str(jax.process_index())])
    # A streaming loader saved by another process count: a host's position cannot be split or
    # merged, so the data restarts at the start of the epoch after the furthest one any host reached.
    epoch = next_epoch(loader_states)
    print(f"[train] resumed from step {step} in {ckpt.directory} (saved by {len(loader_states)} "
          f"processes, now {jax.process_count()}): data restarts at epoch {epoch}", flush=True)
    return Start(state, step, restart_epoch=epoch)


def restore_data_position(loader, state: dict[str, Any]) -> None:
    """Continue the saved data position; a global-order position saved over another stream (the
    tokenizer grew, the shards changed) continues at the start of the next epoch of the new one."""
    from data_processing.global_order import GlobalOrderLoader

    if isinstance(loader, GlobalOrderLoader) and state.get("kind") == "global_order" \
            and state.get("corpus") != loader.state()["corpus"]:
        epoch = GlobalOrderLoader.next_epoch_of(state)
        if jax.process_index() == 0:
            print(f"[train] the training stream changed since the checkpoint (tokenizer or shards): the data order "
                  f"restarts at epoch {epoch}", flush=True)
        loader.restart_at_epoch(epoch)
        return
    loader.restore(state)


def _throughput(cfg: C.Config) -> Throughput:
    """Tokens/s and MFU against the device's vendor peak (none on a CPU: tokens/s only)."""
    device = jax.devices()[0]
    if jax.process_index() == 0:
        print(f"[train] MFU peak: {peak_flops_source(device)}", flush=True)
    return Throughput(cfg, cfg.train.batch_size * cfg.data.block_size, jax.device_count(),
                      device_peak_flops(device))


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


def add_hooks(loop: TrainLoop, cfg: C.Config, *, run_dir: Path, ckpt: Checkpointer, loader, eval_set,
              saved_step: int | None, is_main: bool) -> list:
    """Register evaluation (+ best checkpoint), HumanEval and checkpoint hooks; returns what to close."""
    closers = []

    def meta(step: int) -> dict[str, Any]:
        return {"step": step, "config": C.to_dict(cfg), "tokens": step * loop.tokens_per_step}

    if eval_set is not None:
        best = BestCheckpoint(run_dir, cfg.checkpoint.keep_best, meta) if cfg.checkpoint.keep_best else None
        closers += [best] if best is not None else []
        loop.add_hook(EvalHook(eval_set, is_main=is_main, on_result=best.offer if best else None),
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
    check_schedule(cfg.optimizer, cfg.schedule, cfg.train.max_steps)
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
    loader, eval_set = None, None
    if step < cfg.train.max_steps:
        loader, eval_set = make_train_loader(cfg), make_eval_set(cfg)
        if is_main:
            write_mixture_info(loader, cfg, run_dir)
        try:
            if start.loader_state is not None:
                restore_data_position(loader, start.loader_state)
            elif start.restart_epoch is not None and hasattr(loader, "restart_at_epoch"):
                loader.restart_at_epoch(start.restart_epoch)
        except ValueError as err:  # a state written by the other loader, or by another corpus
            loader.close()
            raise TrainingError(f"{run_dir}: cannot continue the saved data position: {err}") from err
    # Records a lost attempt wrote after the restored step are dropped: each step is logged once.
    writer = MetricsWriter(run_dir, cfg, active=is_main, resume_step=step)
    throughput = _throughput(cfg)
    progress = _progress(cfg, is_main, step)

    def rates(n_steps: int) -> dict[str, Any]:
        throughput.add_steps(n_steps)
        return throughput.rates()

    loop = TrainLoop(compiled, start.state, loader, tokens_per_step=cfg.train.batch_size * cfg.data.block_size,
                     log_every=cfg.train.log_every, log=writer.write, rates=rates,
                     on_metrics=_show(progress) if progress is not None else None)
    closers = add_hooks(loop, cfg, run_dir=run_dir, ckpt=ckpt, loader=loader, eval_set=eval_set,
                        saved_step=start.saved_step, is_main=is_main)
    end = cfg.train.max_steps if stop_after is None else min(cfg.train.max_steps, step + stop_after)
    evals = [h.fn for h in loop.hooks if isinstance(h.fn, EvalHook)]
    with StopSignal() as stop:
        try:
            if evals and cfg.train.eval_at_start and start.saved_step is None:
                evals[0](loop)  # the held-out loss before any training
            loop.run(end, stop)
        finally:
            for item in [ckpt, *closers, loader, writer, progress]:
                if item is not None:
                    item.close()
    return {"step": loop.step, "history": loop.history, "eval": evals[0].last if evals else {},
            "run_dir": str(run_dir), "stopped_by": stop.received}
