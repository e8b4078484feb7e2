"""The run's vocabulary: the marker tokens its data options need, and embeddings grown for them.

Control codes (``data.control_codes``) and fill-in-the-middle (``data.fim_rate``) need tokens
the base tokenizer lacks. They are added with the project's token-addition utility as *special*
tokens (markers, not text), the extended tokenizer is written to ``RUN_DIR/tokenizer`` and the
run uses it from then on; the saved config points at it, so export, sampling and serving see
the same ids. A model started from a checkpoint (``model.init_from``) gets the new embedding
rows initialised from the mean of the existing rows; old rows are unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np

from data_processing.atomic import atomic_dir
from data_processing.languages import LANGUAGES
from data_processing.tokens import FIM_TOKENS, control_token
from train import config as C


def special_tokens_for(data: C.DataConfig) -> list[str]:
    """The marker tokens ``data``'s options need, in a fixed order (so ids never depend on the corpus)."""
    tokens: list[str] = []
    if data.control_codes:
        tokens += [control_token(language) for language in sorted(LANGUAGES)]
    if data.fim_rate > 0:
        tokens += list(FIM_TOKENS)
    return tokens


def prepare_tokenizer(cfg: C.Config, run_dir: str | Path) -> C.Config:
    """Make sure the run's tokenizer has the tokens ``cfg.data`` needs.

    Returns ``cfg`` unchanged when it has them already, else writes the extended tokenizer to
    ``RUN_DIR/tokenizer`` (process 0, atomically; every process waits for it) and returns
    ``cfg`` with ``tokenizer.path`` set to it. Adding is deterministic, so a resumed run
    rewrites the same files."""
    from tokenizer.add_tokens import AddTokensError, add_to_tokenizer, plan_added_tokens
    from tokenizer.train_tokenizer import TokenizerError, load_tokenizer, write_tokenizer_files

    needed = special_tokens_for(cfg.data)
    if not needed:
        return cfg
    source = cfg.tokenizer.path or cfg.model.init_from
    try:
        tok = load_tokenizer(source)
        new = plan_added_tokens(tok, needed, special=True)
    except (AddTokensError, TokenizerError) as err:
        raise C.ConfigError(f"tokenizer.path: {err}") from err
    if not new:
        return cfg
    add_to_tokenizer(tok, new, special=True)
    out = Path(run_dir).absolute() / "tokenizer"
    if jax.process_index() == 0:
        with atomic_dir(out) as tmp:
            write_tokenizer_files(tok, tmp)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("codeneo: run tokenizer written")
    print(f"[train] added {len(new)} special tokens for {', '.join(_reasons(cfg.data))} -> {out}", flush=True)
    return C.replace(cfg, tokenizer={"path": str(out)})


def _reasons(data: C.DataConfig) -> list[str]:
    return [name for name, on in (("control codes", data.control_codes), ("FIM", data.fim_rate > 0)) if on]


def grow_vocab(params: dict, old_vocab: int, cfg: C.ModelConfig) -> dict:
    """``params`` (numpy, padded for ``old_vocab`` tokens) with the token embedding (and an
    untied output layer) grown to ``cfg.vocab_size`` tokens and ``cfg.padded_vocab_size`` rows:
    old rows bit-identical, new rows the mean of the old rows, padding rows zero."""
    from tokenizer.add_tokens import extend_embedding

    out = dict(params)
    for name in ("wte", "lm_head"):
        if name in out:
            grown = extend_embedding(np.asarray(out[name]), old_vocab, cfg.vocab_size, None, cfg.vocab_multiple)
            out[name] = grown
    return out


def add_tokens_to_run(run_dir: str | Path, tokens: list[str], out: str | Path | None = None, *,
                      special: bool = False) -> dict:
    """Add ``tokens`` to a training run: its tokenizer and its latest checkpoint.

    The tied embedding (and an untied output layer) grows to the new vocabulary, padded to
    ``model.vocab_multiple`` rows as the model expects; new rows copy the ``"\\t"`` row (or the
    mean row for ``special`` markers); every old row is bit-identical; the optimizer moments of
    new rows start at zero. The result is a complete run directory at ``out`` (default: the run
    itself, replaced atomically) holding the extended tokenizer, the updated ``config.yaml`` and
    the grown checkpoint with its loader state, so ``python -m train --config OUT/config.yaml``
    continues training. Returns ``{"added": {token: id}, "skipped": [...], "step": step}``."""
    from tokenizer.add_tokens import add_to_tokenizer, plan_added_tokens, tab_token_id
    from tokenizer.train_tokenizer import load_tokenizer, write_tokenizer_files
    from train.core.checkpoint import Checkpointer
    from train.core.run_dir import restore_state

    run_dir = Path(run_dir).absolute()
    out = run_dir if out is None else Path(out).absolute()
    if not (run_dir / "config.yaml").is_file():
        raise C.ConfigError(f"--checkpoint {run_dir}: no config.yaml (expected a run directory of python -m train)")
    cfg = C.load(run_dir / "config.yaml")
    tok = load_tokenizer(cfg.tokenizer.path)
    new = plan_added_tokens(tok, tokens, special=special)
    summary: dict = {"added": {}, "skipped": [t for t in tokens if t not in new]}
    if not new:
        return summary
    fill = None if special else tab_token_id(tok)
    old_vocab = len(tok)
    if old_vocab > cfg.model.vocab_size:
        raise C.ConfigError(f"{run_dir}: the tokenizer has {old_vocab} tokens, the model only {cfg.model.vocab_size}")
    ids = add_to_tokenizer(tok, new, special=special)
    summary["added"] = dict(zip(new, ids, strict=True))
    summary["init_row"] = fill

    _, state, loader_states, meta = restore_state(run_dir)
    new_cfg = C.replace(cfg, model={"vocab_size": len(tok)}, tokenizer={"path": str(out / "tokenizer")},
                        run={"output_dir": str(out)})
    grown = grow_state_vocab(state, cfg.model, new_cfg.model, fill)
    step = int(meta["step"])
    summary["step"] = step

    with atomic_dir(out) as tmp:
        for item in run_dir.iterdir():  # metrics, reports, ... (not the checkpoints or tokenizer)
            if item.name not in ("checkpoints", "tokenizer", "config.yaml") and not item.name.startswith("."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_tokenizer_files(tok, tmp / "tokenizer")
        C.save(new_cfg, tmp)
        ckpt = Checkpointer(tmp / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
        try:
            ckpt.save(step, grown, loader_states, {**meta, "config": C.to_dict(new_cfg)}, force=True)
        finally:
            ckpt.close()
        # The saved config names OUT; orbax records no absolute paths, so the folder can move.
    return summary


def grow_state_vocab(state, old: C.ModelConfig, new: C.ModelConfig, fill_row: int | None):
    """A train state with every vocabulary-sized array grown from ``old`` to ``new``: the
    embedding (and output layer) via ``extend_embedding`` (row ``fill_row``, or the mean), and
    optimizer moments with zero rows; everything else unchanged. Arrays come back as numpy."""
    from tokenizer.add_tokens import extend_embedding

    def grow(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        arr = np.asarray(leaf)
        if not (("wte" in names or "lm_head" in names) and arr.ndim == 2 and arr.shape[0] == old.padded_vocab_size):
            return arr
        if names[0] == "params":
            return extend_embedding(arr, old.vocab_size, new.vocab_size, fill_row, new.vocab_multiple)
        out = np.zeros((new.padded_vocab_size, arr.shape[1]), arr.dtype)
        out[: old.vocab_size] = arr[: old.vocab_size]  # moments of new rows start at zero
        return out

    return jax.tree_util.tree_map_with_path(grow, state)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.interop.vocab --checkpoint RUN [--tokens JSON] [--out DIR] [--special]``:
    what ``python -m tokenizer.add_tokens --checkpoint`` hands over to; returns the exit status."""
    import argparse
    import json
    import sys

    from tokenizer.add_tokens import AddTokensError, parse_tokens, print_added

    ap = argparse.ArgumentParser(prog="python -m tokenizer.add_tokens --checkpoint", description=main.__doc__)
    ap.add_argument("--checkpoint", required=True, metavar="RUN_DIR")
    ap.add_argument("--tokens", metavar="JSON")
    ap.add_argument("--out", metavar="DIR")
    ap.add_argument("--special", action="store_true")
    args = ap.parse_args(argv)
    try:
        summary = add_tokens_to_run(args.checkpoint, parse_tokens(args.tokens), args.out, special=args.special)
    except (AddTokensError, C.ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.checkpoint
    if not summary["added"]:
        print(f"nothing to add: {json.dumps(summary['skipped'])} already added; {args.checkpoint} left as it was")
        return 0
    print_added(summary)
    print(f"wrote {out} (checkpoint step {summary['step']}, tokenizer, config.yaml); "
          f"continue with: python -m train --config {out}/config.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
