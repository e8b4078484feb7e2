"""Add whitespace tokens to a tokenizer, and to the embedding of a model that uses it.

    python -m tokenizer.add_tokens --tokenizer TOK_DIR [--out OUT_DIR] [--report-data DATA/validation]
    python -m tokenizer.add_tokens --hf-model HF_DIR [--tokenizer TOK_DIR] [--out OUT_DIR]
    python -m tokenizer.add_tokens --checkpoint RUN_DIR [--out NEW_RUN_DIR]
    python -m tokenizer.add_tokens ... --special --tokens '["<|python|>"]'   (markers: mean-row init)

This is Code Clippy's token-addition step without its bugs:

* the new embedding rows go *after* the last existing id (Code Clippy wrote the tab row into ids
  50256-50258, overwriting ``<|endoftext|>`` and leaving two of its four new rows random);
  every existing row is kept bit for bit and each new row is a copy of the ``"\\t"`` row;
* the tokens are ordinary added tokens, not special ones, so ``decode(...,
  skip_special_tokens=True)`` never deletes indentation.

Added tokens are matched on the raw text before GPT-2's pre-tokenisation (leftmost-longest, so
eight spaces become one token rather than two four-space tokens), which is what lets four spaces
of indentation become a single token although byte-level BPE would split them as ``ĠĠĠ`` +
``Ġdef``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken

from data_processing.atomic import atomic_dir
from data_processing.tokens import padded_vocab_size
from tokenizer.train_tokenizer import TokenizerError, load_tokenizer, write_tokenizer_files

# Code Clippy's list: two tabs, and runs of 2, 4 and 8 spaces.
DEFAULT_WHITESPACE_TOKENS = ["\t\t", "  ", "    ", "        "]
DEFAULT_PAD_MULTIPLE = 128  # the Flax model pads its tied embedding to a multiple of 128 rows
DEFAULT_REPORT_MAX_BYTES = 20_000_000


class AddTokensError(ValueError):
    """The tokens cannot be added as asked; the message says which token or file and why."""


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-to-symbol table (as in its encoder.py and tokenizers' ByteLevel): printable
    # bytes map to themselves, the rest to code points from 256 up, in byte order.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_SYMBOLS = _bytes_to_unicode()


def byte_level_form(text: str) -> str:
    """``text`` as byte-level BPE vocabulary symbols (``" "`` -> ``"Ġ"``, ``"\t"`` -> ``"ĉ"``)."""
    return "".join(_BYTE_SYMBOLS[b] for b in text.encode("utf-8"))


def plan_added_tokens(tokenizer, tokens: Sequence[str], special: bool = False) -> list[str]:
    """Return the tokens of ``tokens`` that still need adding to ``tokenizer``, in order.

    A token already present as an added token of the same kind (ordinary, or ``special``) is
    skipped, so re-running adds nothing. A token that exists otherwise (in the base vocabulary,
    literally or in its byte-level form, or as an added token of the other kind) raises
    ``AddTokensError``: adding it would either do nothing or change what it means. Runs of 2+
    whitespace characters are allowed although their byte-level form may be in the vocabulary
    (see the comment in the loop).
    """
    backend = tokenizer.backend_tokenizer
    base = backend.get_vocab(with_added_tokens=False)
    added = {tok.content: (i, tok) for i, tok in backend.get_added_tokens_decoder().items()}
    seen: set[str] = set()
    new: list[str] = []
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise AddTokensError(f"token {token!r}: expected a non-empty string")
        if token in seen:
            raise AddTokensError(f"token {token!r} is listed twice")
        seen.add(token)
        if token in added:
            idx, existing = added[token]
            if existing.special != special:
                kind = "a special" if existing.special else "an ordinary"
                raise AddTokensError(f"token {token!r} already exists as {kind} added token, id {idx}")
            continue
        if token in base:
            raise AddTokensError(f"token {token!r} already exists in the base vocabulary as id {base[token]}")
        form = byte_level_form(token)
        # A run of 2+ whitespace characters may have a byte-level entry (GPT-2 has 'ĠĠĠĠ'), but
        # GPT-2 pre-tokenisation keeps the last space for the next word ('ĠĠĠ' + 'Ġdef'), so that
        # entry never encodes indentation: adding the run is the point. Anything else whose
        # byte-level form is in the vocabulary ('\t' as 'ĉ', ' def' as 'Ġdef') already exists.
        if form in base and not (len(token) >= 2 and token.isspace()):
            raise AddTokensError(
                f"token {token!r} already exists in the base vocabulary as id {base[form]} ({form!r})"
            )
        new.append(token)
    return new


def tab_token_id(tokenizer) -> int:
    """Id of the single token that encodes ``"\\t"``; ``AddTokensError`` if there is none."""
    ids = tokenizer.backend_tokenizer.encode("\t", add_special_tokens=False).ids
    if len(ids) != 1:
        raise AddTokensError(
            f"tokenizer has no single '\\t' token ('\\t' encodes as {len(ids)} ids {ids}); "
            "new rows are initialised from the tab row"
        )
    return ids[0]


def add_to_tokenizer(tokenizer, new_tokens: Sequence[str], special: bool = False) -> list[int]:
    """Add ``new_tokens`` to ``tokenizer`` (in place) as non-normalised added tokens: ordinary
    ones (text, such as whitespace) or ``special`` ones (markers such as control codes and
    fill-in-the-middle sentinels, which ``skip_special_tokens`` removes when decoding).

    Returns their ids, which are consecutive from the old ``len(tokenizer)``.
    """
    old = len(tokenizer)
    # Whitespace must be ordinary (special=False): skip_special_tokens must keep indentation.
    # normalized=False and no lstrip/rstrip/single_word: match the exact raw text, nothing around it.
    objs = [
        AddedToken(t, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        for t in new_tokens
    ]
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": objs}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_tokens(objs)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
    if ids != list(range(old, old + len(new_tokens))):
        raise AddTokensError(f"added tokens got ids {ids}, expected {old}..{old + len(new_tokens) - 1}")
    return ids


def extend_embedding(
    wte: np.ndarray,
    old_vocab: int,
    new_vocab: int,
    tab_id: int | None,
    pad_multiple: int = DEFAULT_PAD_MULTIPLE,
) -> np.ndarray:
    """Return the embedding for a vocabulary grown from ``old_vocab`` to ``new_vocab`` tokens.

    ``wte`` is ``[rows, D]`` with ``rows >= old_vocab`` (rows past ``old_vocab`` are padding).
    The result has ``padded_vocab_size(new_vocab, pad_multiple)`` rows and ``wte``'s dtype: rows
    ``0..old_vocab-1`` are bit-identical to ``wte``, rows ``old_vocab..new_vocab-1`` are copies
    of row ``tab_id`` (``None``: the mean of the old rows, for markers that resemble no
    token), and padding rows after ``new_vocab`` are zeros (padding ids are never produced by
    the tokenizer; the model masks their logits).
    """
    wte = np.asarray(wte)
    if wte.ndim != 2:
        raise AddTokensError(f"embedding must be 2-D [rows, dim], got shape {wte.shape}")
    if not 0 < old_vocab <= wte.shape[0]:
        raise AddTokensError(f"embedding has {wte.shape[0]} rows, fewer than the {old_vocab} tokens")
    if new_vocab < old_vocab:
        raise AddTokensError(f"new vocabulary ({new_vocab}) is smaller than the old one ({old_vocab})")
    if tab_id is not None and not 0 <= tab_id < old_vocab:
        raise AddTokensError(f"tab id {tab_id} is not an existing token (vocabulary {old_vocab})")
    if pad_multiple < 1:
        raise AddTokensError(f"pad_multiple must be >= 1, got {pad_multiple}")
    out = np.zeros((padded_vocab_size(new_vocab, pad_multiple), wte.shape[1]), dtype=wte.dtype)
    out[:old_vocab] = wte[:old_vocab]
    mean = wte[:old_vocab].astype(np.float64).mean(axis=0).astype(wte.dtype) if tab_id is None else None
    out[old_vocab:new_vocab] = mean if tab_id is None else wte[tab_id]
    return out


def bytes_per_token(tokenizer, texts: Iterable[str], batch_size: int = 64) -> dict:
    """Count UTF-8 bytes and tokens of ``texts``; returns ``{"bytes", "tokens", "documents",
    "bytes_per_token"}``."""
    backend = tokenizer.backend_tokenizer
    n_bytes = n_tokens = n_docs = 0
    batch: list[str] = []

    def flush():
        nonlocal n_tokens
        n_tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
        batch.clear()

    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_docs += 1
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return {
        "bytes": n_bytes,
        "tokens": n_tokens,
        "documents": n_docs,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else float("nan"),
    }


def report(
    before, after, data: str, max_bytes: int | None, added: Sequence[str], progress: bool = True
) -> dict:
    """Bytes per token of the shards under ``data`` with the ``before`` and ``after`` tokenizers."""
    from tokenizer.train_tokenizer import iter_texts

    # Materialise the (capped) text once so both tokenizers see exactly the same documents.
    texts = [t for batch in iter_texts(data, max_bytes=max_bytes, progress=progress) for t in batch]
    b, a = bytes_per_token(before, texts), bytes_per_token(after, texts)
    return {
        "data": str(data),
        "max_bytes": max_bytes,
        "documents": b["documents"],
        "bytes": b["bytes"],
        "tokens_before": b["tokens"],
        "tokens_after": a["tokens"],
        "bytes_per_token_before": b["bytes_per_token"],
        "bytes_per_token_after": a["bytes_per_token"],
        "vocab_before": len(before),
        "vocab_after": len(after),
        "added_tokens": list(added),
    }


def _to_numpy_bits(weight) -> tuple[np.ndarray, object]:
    """A torch tensor as a numpy array with the same bits (bfloat16 viewed as int16)."""
    import torch

    w = weight.detach().cpu()
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16).numpy(), torch.bfloat16
    return w.numpy(), None


def _from_numpy_bits(arr: np.ndarray, view_dtype):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(view_dtype) if view_dtype is not None else t


def extend_hf_model(model, old_vocab: int, new_vocab: int, tab_id: int | None) -> None:
    """Grow a Hugging Face causal LM's token embedding (and an untied output layer) in place.

    Rows are exactly ``new_vocab`` (Hugging Face models are not padded); old rows keep their bits,
    new rows copy the tab row (``None``: the mean row). ``model.config.vocab_size`` is updated.
    """
    import torch

    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == emb.weight.data_ptr()
    arr, view = _to_numpy_bits(emb.weight)
    new_in = extend_embedding(arr, old_vocab, new_vocab, tab_id, pad_multiple=1)
    new_out = None
    if out_emb is not None and not tied:
        o_arr, o_view = _to_numpy_bits(out_emb.weight)
        o_new = extend_embedding(o_arr, old_vocab, new_vocab, tab_id, pad_multiple=1)
        new_out = _from_numpy_bits(o_new, o_view)
        if getattr(out_emb, "bias", None) is not None:
            raise AddTokensError("output layer has a bias; extending it is not supported")
    # mean_resizing=False: the new rows are overwritten below, no need to sample them.
    model.resize_token_embeddings(new_vocab, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(_from_numpy_bits(new_in, view))
        if new_out is not None:
            model.get_output_embeddings().weight.copy_(new_out)
    model.config.vocab_size = new_vocab


_TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
}


def _replaced_file(name: str) -> bool:
    """Files of a Hugging Face folder that the extended model and tokenizer supersede."""
    weights = name.endswith((".safetensors", ".bin", ".h5", ".msgpack", ".index.json", ".ckpt"))
    return weights or name in _TOKENIZER_FILES


def _check_model_vocab(model_dir: Path, n_tokens: int) -> None:
    """Refuse a model whose vocabulary is smaller than its (already extended) tokenizer."""
    config = model_dir / "config.json"
    try:
        vocab = json.loads(config.read_text())["vocab_size"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise AddTokensError(f"{config}: expected a Hugging Face config with 'vocab_size' ({err})") from err
    if vocab < n_tokens:
        raise AddTokensError(
            f"{config}: vocab_size {vocab} < {n_tokens} tokens: the tokenizer already has the new tokens "
            "but the model was not extended; pass the tokenizer the model was trained with"
        )


def _copy_or_keep(src: Path, out: Path, tok=None) -> None:
    """Nothing to add: leave ``src`` as is, or copy it (plus ``tok``) to a different ``out``."""
    if src.resolve() == out.resolve() and tok is None:
        return
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if tok is not None:
            write_tokenizer_files(tok, tmp)


def run(
    tokens: Sequence[str],
    out: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    hf_model_dir: str | os.PathLike | None = None,
    report_data: str | None = None,
    report_max_bytes: int | None = DEFAULT_REPORT_MAX_BYTES,
    progress: bool = True,
    special: bool = False,
) -> dict:
    """Add ``tokens`` to a tokenizer folder, or to a Hugging Face model folder and its tokenizer.

    Writes the result to ``out`` atomically (may equal the source folder). Returns a summary
    with ``added`` (tokens and ids) and, if ``report_data`` is given, the bytes/token report.
    ``special`` adds markers (special tokens, rows initialised from the mean row, no tab needed).
    """
    if tokenizer_dir is None and hf_model_dir is None:
        raise AddTokensError("give a tokenizer folder, a Hugging Face model folder, or both")
    src = Path(hf_model_dir if hf_model_dir is not None else tokenizer_dir)
    out = Path(out)
    tok = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else src)
    new = plan_added_tokens(tok, tokens, special=special)
    summary: dict = {"added": {}, "skipped": [t for t in tokens if t not in new]}
    if not new:
        if hf_model_dir is not None:
            _check_model_vocab(Path(hf_model_dir), len(tok))
        _copy_or_keep(src, out, tok if tokenizer_dir is not None and hf_model_dir is not None else None)
        return summary
    tab_id = None if special else tab_token_id(tok)
    before = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else src)
    old_vocab = len(tok)
    ids = add_to_tokenizer(tok, new, special=special)
    summary["added"] = dict(zip(new, ids, strict=True))
    summary["init_row"] = tab_id

    with atomic_dir(out) as tmp:
        if hf_model_dir is not None:
            from transformers import AutoModelForCausalLM

            # dtype="auto": keep the stored precision, so unchanged rows stay bit-identical.
            try:
                model = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype="auto")
            except (OSError, ValueError, KeyError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise AddTokensError(
                    f"{hf_model_dir}: not a loadable Hugging Face causal LM folder ({first})"
                ) from err
            rows = model.get_input_embeddings().weight.shape[0]
            if rows < old_vocab:
                raise AddTokensError(
                    f"{hf_model_dir}: model has {rows} embedding rows "
                    f"but the tokenizer has {old_vocab} tokens"
                )
            if rows > old_vocab:
                print(
                    f"note: {hf_model_dir}: {rows - old_vocab} embedding rows beyond the tokenizer's "
                    f"{old_vocab} tokens are dropped (never produced by the tokenizer)"
                )
            extend_hf_model(model, old_vocab, len(tok), tab_id)
            # Copy files the saves below do not write (README, licence, ...) first. Old weights and
            # tokenizer files are left out: stale copies could be loaded instead of the new ones.
            for f in Path(hf_model_dir).iterdir():
                if f.is_file() and not f.name.startswith(".") and not _replaced_file(f.name):
                    shutil.copy2(f, tmp / f.name)
            model.save_pretrained(str(tmp))
        write_tokenizer_files(tok, tmp)
        if report_data is not None:
            summary["report"] = report(before, tok, report_data, report_max_bytes, new, progress)
            (tmp / "report.json").write_text(json.dumps(summary["report"], indent=2) + "\n")
    return summary


def parse_tokens(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_WHITESPACE_TOKENS)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise AddTokensError(
            f'--tokens: expected a JSON list of strings, e.g. \'["\\t\\t", "    "]\' ({err.msg})'
        ) from err
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise AddTokensError("--tokens: expected a JSON list of strings")
    return value


def print_added(summary: dict) -> None:
    row = summary["init_row"]
    source = "the mean row" if row is None else f"tab id {row}"
    for token, idx in summary["added"].items():
        print(f"added {json.dumps(token)} as id {idx} (row initialised from {source})")


def _add_to_checkpoint(args) -> int:
    """``--checkpoint RUN_DIR``: the work needs JAX and the trainer's checkpoint format, so it is
    handed to ``python -m train.interop.vocab`` in a process of its own; this package never
    imports JAX or ``train``."""
    if args.tokenizer is not None or args.hf_model is not None or args.report_data is not None:
        raise AddTokensError("--checkpoint takes no --tokenizer, --hf-model or --report-data (the run names its own)")
    command = [sys.executable, "-m", "train.interop.vocab", "--checkpoint", args.checkpoint]
    command += ["--tokens", args.tokens] if args.tokens is not None else []
    command += ["--out", args.out] if args.out is not None else []
    command += ["--special"] if args.special else []
    sys.stdout.flush()
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m tokenizer.add_tokens", description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (alone, or the one --hf-model uses)")
    ap.add_argument("--hf-model", metavar="DIR", help="Hugging Face GPT-Neo folder (config + weights)")
    ap.add_argument("--checkpoint", metavar="RUN_DIR", help="training run of this project (its latest checkpoint)")
    ap.add_argument("--out", metavar="DIR", help="output folder (default: update the input folder in place)")
    ap.add_argument(
        "--tokens",
        metavar="JSON",
        help=f"JSON list of tokens to add (default {json.dumps(DEFAULT_WHITESPACE_TOKENS)})",
    )
    ap.add_argument(
        "--report-data", metavar="DIR", help="shards to measure bytes/token on (validation split)"
    )
    ap.add_argument("--report-max-bytes", type=int, default=DEFAULT_REPORT_MAX_BYTES)
    ap.add_argument("--special", action="store_true",
                    help="add marker tokens (control codes, sentinels) as special tokens, rows from the mean row")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from data_processing.shards import ShardError

    try:
        if args.checkpoint is not None:
            return _add_to_checkpoint(args)
        if args.tokenizer is None and args.hf_model is None:
            raise AddTokensError("give --tokenizer DIR, --hf-model DIR, or both")
        tokens = parse_tokens(args.tokens)
        source = args.hf_model if args.hf_model is not None else args.tokenizer
        out = args.out if args.out is not None else source
        summary = run(
            tokens,
            out,
            tokenizer_dir=args.tokenizer,
            hf_model_dir=args.hf_model,
            report_data=args.report_data,
            report_max_bytes=args.report_max_bytes,
            progress=not args.no_progress,
            special=args.special,
        )
    except (AddTokensError, TokenizerError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not summary["added"]:
        print(f"nothing to add: {json.dumps(summary['skipped'])} already added; {out} left as it was")
        return 0
    print_added(summary)
    if summary["skipped"]:
        print(f"already present, skipped: {json.dumps(summary['skipped'])}")
    if "report" in summary:
        r = summary["report"]
        print(
            f"bytes/token on {r['data']} ({r['bytes']:,} bytes, {r['documents']} documents): "
            f"{r['bytes_per_token_before']:.3f} before, {r['bytes_per_token_after']:.3f} after "
            f"({r['tokens_before']:,} -> {r['tokens_after']:,} tokens)"
        )
        if r["bytes_per_token_after"] < r["bytes_per_token_before"]:
            # Seen with tokenizers trained on code: BPE had learned newline+indent tokens
            # ('ĊĠĠĠ'), and the added tokens, matched before pre-tokenisation, split them apart.
            print(
                "note: the added tokens make this text take more tokens; this tokenizer already "
                "encodes indentation well (see docs/tokenizer.md)"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
