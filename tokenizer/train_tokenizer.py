"""Train a GPT-2-style byte-level BPE tokenizer on the code corpus, or adopt an existing one.

    python -m tokenizer.train_tokenizer --data DATA_DIR/train --vocab-size 50257 --out TOK_DIR
    python -m tokenizer.train_tokenizer --from-existing PATH/TO/gpt2 --out TOK_DIR

The result is a folder that ``transformers.AutoTokenizer.from_pretrained(TOK_DIR)`` loads offline.

Vocabulary layout: the BPE trainer would put special tokens first (id 0), but GPT-2 and GPT-Neo
keep ``<|endoftext|>`` as the *last* id (50256 of 50257). So the trainer learns
``vocab_size - 1`` byte-level tokens and merges with no special tokens, and ``<|endoftext|>`` is
added afterwards, landing on id ``vocab_size - 1``. The initial alphabet is all 256 byte symbols
(``ByteLevel.alphabet()``), so every byte sequence is encodable, whatever the corpus contained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from data_processing.atomic import atomic_dir
from data_processing.tokens import EOS_TOKEN

DEFAULT_MODEL_MAX_LENGTH = 2048  # GPT-Neo's context length


class TokenizerError(ValueError):
    """A tokenizer folder or training input is unusable; the message names what and why."""


def _byte_level_pipeline(tok: Tokenizer) -> Tokenizer:
    """Give ``tok`` GPT-2's pre-tokenisation, decoder and post-processor (in place)."""
    # add_prefix_space=False: GPT-2 does not invent a space before the first word, and adding
    # one would break decode(encode(x)) == x for text starting with a non-space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False as in GPT-2's tokenizer.json: offsets cover the leading space.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def iter_texts(
    data: str | os.PathLike | Iterable[str],
    max_bytes: int | None = None,
    progress: bool = True,
    batch_size: int = 256,
) -> Iterator[list[str]]:
    """Yield batches of document texts from the shards under ``data``, streaming.

    Stops once ``max_bytes`` UTF-8 bytes have been yielded; the last document is cut at a
    character boundary so that no more than ``max_bytes`` bytes are ever read into training.
    ``data`` may also be an iterable of strings (used by tests and callers with in-memory text).
    """
    from tqdm import tqdm

    if isinstance(data, (str, os.PathLike)):
        from data_processing.shards import iter_dir_records

        source: Iterable[str] = (rec["text"] for rec in iter_dir_records(data))
    else:
        source = data
    bar = tqdm(total=max_bytes, unit="B", unit_scale=True, desc="tokenizer text", disable=not progress)
    seen = 0
    batch: list[str] = []
    try:
        for text in source:
            size = len(text.encode("utf-8"))
            if max_bytes is not None and seen + size > max_bytes:
                left = max_bytes - seen
                # Cut on a character boundary: drop a trailing partial UTF-8 sequence.
                text = text.encode("utf-8")[:left].decode("utf-8", errors="ignore")
                size = len(text.encode("utf-8"))
            if text:
                batch.append(text)
                seen += size
                bar.update(size)
            if len(batch) >= batch_size:
                yield batch
                batch = []
            if max_bytes is not None and seen >= max_bytes:
                break
        if batch:
            yield batch
    finally:
        bar.close()


def train_bpe(
    texts: Iterable[list[str] | str],
    vocab_size: int = 50257,
    min_frequency: int = 2,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (strings or batches).

    Returns a tokenizer whose last id is ``<|endoftext|>``; it has ``vocab_size`` entries unless
    the corpus is too small to learn that many merges, in which case a warning names the size
    reached.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise TokenizerError(
            f"--vocab-size {vocab_size}: must be at least {len(alphabet) + 1} "
            f"(256 byte symbols plus {EOS_TOKEN})"
        )
    tok = _byte_level_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is kept for <|endoftext|>, see module docstring
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=alphabet,
        show_progress=progress,
    )
    seen = 0

    def counted():
        # The 256 byte symbols are in the vocabulary even with no text, so count the text itself.
        nonlocal seen
        for item in texts:
            seen += len(item) if isinstance(item, str) else sum(map(len, item))
            yield item

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise TokenizerError("no training text: the data held no non-empty 'text' field")
    learned = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    eos_id = tok.token_to_id(EOS_TOKEN)
    assert eos_id == learned, (eos_id, learned)  # eos must be the last id, as in GPT-2
    if tok.get_vocab_size() < vocab_size:
        warnings.warn(
            f"corpus too small for --vocab-size {vocab_size}: reached {tok.get_vocab_size()} tokens "
            f"(lower --min-frequency or give more text)",
            stacklevel=2,
        )
    return tok


def wrap_fast(tok: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
    """Wrap a ``tokenizers.Tokenizer`` as a ``transformers`` fast tokenizer with GPT-2's specials."""
    from transformers import PreTrainedTokenizerFast

    if tok.token_to_id(EOS_TOKEN) is None:
        raise TokenizerError(f"tokenizer has no {EOS_TOKEN!r} token (expected a GPT-2 / GPT-Neo vocabulary)")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        # Clean-up would turn " ." into "." on decode and break decode(encode(x)) == x for code.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def load_tokenizer(path: str | os.PathLike, model_max_length: int | None = None):
    """Load a GPT-2 / GPT-Neo style tokenizer folder as a ``PreTrainedTokenizerFast``.

    The folder holds either ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; the result has
    ``eos_token == "<|endoftext|>"``. Raises ``TokenizerError`` naming the folder otherwise.
    """
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a tokenizer folder (directory not found)")
    if model_max_length is None:
        model_max_length = DEFAULT_MODEL_MAX_LENGTH
        config = path / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("model_max_length")
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{config}: not valid JSON ({err.msg})") from err
            if isinstance(value, int) and value < 10**9:
                model_max_length = value
    if (path / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path / 'tokenizer.json'}: unreadable tokenizer ({err})") from err
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
        except Exception as err:
            raise TokenizerError(f"{path}: unreadable vocab.json/merges.txt ({err})") from err
        tok = _byte_level_pipeline(Tokenizer(bpe))
        if tok.token_to_id(EOS_TOKEN) is not None:
            # GPT-2's vocab.json holds <|endoftext|> as an ordinary entry; register it as special
            # so it is matched in raw text and skipped by skip_special_tokens.
            tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        added = path / "added_tokens.json"
        if added.is_file():
            extra = json.loads(added.read_text())
            for content, _ in sorted(extra.items(), key=lambda kv: kv[1]):
                if tok.token_to_id(content) is None:
                    tok.add_tokens([AddedToken(content, normalized=False, special=False)])
    else:
        raise TokenizerError(f"{path}: expected tokenizer.json, or vocab.json and merges.txt")
    try:
        return wrap_fast(tok, model_max_length)
    except TokenizerError as err:
        raise TokenizerError(f"{path}: {err}") from err


def write_tokenizer_files(fast, folder: str | os.PathLike) -> None:
    """``fast.save_pretrained(folder)``, made loadable by transformers 4.x as well as 5.x.

    transformers 5 records its own class name (``TokenizersBackend``) which 4.x does not know;
    ``PreTrainedTokenizerFast`` loads ``tokenizer.json`` as it is in both. 5.x also no longer
    writes ``special_tokens_map.json``, which older loaders read, so it is written here.
    """
    folder = Path(folder)
    fast.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = {k: EOS_TOKEN for k in ("bos_token", "eos_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def save_tokenizer(fast, out: str | os.PathLike) -> Path:
    """Save a fast tokenizer to ``out`` atomically (temporary sibling folder, then rename).

    An existing ``out`` is replaced only after the new folder is complete.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_tokenizer_files(fast, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m tokenizer.train_tokenizer", description=__doc__.split("\n")[0]
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder (or glob) of *.jsonl.zst/.gz/.jsonl training shards")
    src.add_argument(
        "--from-existing",
        metavar="DIR",
        help="use an existing GPT-2/GPT-Neo tokenizer folder (tokenizer.json, or vocab.json+merges.txt)",
    )
    ap.add_argument("--out", required=True, help="output tokenizer folder")
    ap.add_argument("--vocab-size", type=int, default=50257, help="total size including <|endoftext|>")
    ap.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    ap.add_argument("--max-bytes", type=int, default=None, help="cap on UTF-8 bytes of training text")
    ap.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = ap.parse_args(argv)

    from data_processing.shards import ShardError

    try:
        if args.from_existing:
            fast = load_tokenizer(args.from_existing, args.model_max_length)
        else:
            if args.max_bytes is not None and args.max_bytes <= 0:
                raise TokenizerError(f"--max-bytes {args.max_bytes}: expected a positive number of bytes")
            texts = iter_texts(args.data, max_bytes=args.max_bytes, progress=not args.no_progress)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tok = train_bpe(
                    texts, args.vocab_size, min_frequency=args.min_frequency, progress=not args.no_progress
                )
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
            fast = wrap_fast(tok, args.model_max_length)
        save_tokenizer(fast, args.out)
    except (TokenizerError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(fast)} tokens, {EOS_TOKEN} = id {fast.eos_token_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
