"""A representative held-out evaluation set: ``eval_tokens`` tokens drawn with a seed across
every validation shard, in rows of one language each.

* Every document of the validation shards (all of them, not the head of the sorted stream) is
  put in one seeded random order (``seed`` only: the same on every device and process).
* The documents are taken in that order, each appended with ``<|endoftext|>`` to the token
  stream of its language (``meta.language``; ``"unknown"`` without one); whenever a language's
  stream holds ``block_size + 1`` tokens, they become the next row, labelled with the language.
* After ``eval_tokens // (block_size + 1)`` rows, the remaining ``eval_tokens % (block_size + 1)``
  tokens (if any) are the head of the first language stream to hold that many, padded with -1
  (no loss) to a last row. So ``tokens == eval_tokens`` exactly, and padding only ends the last row.
* No control codes and no fill-in-the-middle: the set measures plain next-token loss, the same
  whatever the training options.

Only the documents needed are tokenized, in rounds sized by the characters per token seen so
far; their texts are kept from the first scan when the set is small, else re-read by position.
The result does not depend on those rounds (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_processing.shards import BadRecordCounter
from data_processing.sources import ShardSource
from data_processing.tokens import load_tokenizer_file

__all__ = ["HeldOut", "heldout_rows"]

UNKNOWN = "unknown"  # the language of documents without meta.language
_CHARS_PER_TOKEN_GUESS = 3.0  # first round's estimate (code with a trained BPE: 3-4 characters a token)
_MARGIN = 1.2  # read this much more text than the estimate needs, so one round usually suffices
_MIN_ROUND_DOCS = 64  # and at least this many documents a round (each round reads the shards again)
_KEEP_TEXT_CHARS = 1 << 28  # a validation set up to this size keeps its texts from the scan: no re-reading


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows: ``rows`` int32 ``[N, block_size + 1]`` (-1 pads only the end of the last
    row), ``language[i]`` the language of row ``i``, ``tokens`` the real (non-padding) tokens."""

    rows: np.ndarray
    language: list[str]
    tokens: int

    def token_counts(self) -> dict[str, int]:
        """Real tokens per language, for per-language losses and reports."""
        counts: dict[str, int] = {}
        real = (self.rows >= 0).sum(axis=1)
        for language, n in zip(self.language, real.tolist(), strict=True):
            counts[language] = counts.get(language, 0) + n
        return counts

    def batches(self, global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """The rows in global batches of ``global_batch_size`` (the last filled with all -1 rows),
        this process's slice of each: ``(rows_BT int32 [B/P, block_size + 1], row_B int64 [B/P])``,
        ``row_B`` the index into ``rows``/``language`` (-1 for a padding row)."""
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"train.batch_size: the global batch of {global_batch_size} rows must be a positive "
                             f"multiple of the {process_count} processes")
        n, width = self.rows.shape
        steps = max(1, math.ceil(n / global_batch_size))
        rows = np.full((steps * global_batch_size, width), -1, np.int32)
        rows[:n] = self.rows
        index = np.full(steps * global_batch_size, -1, np.int64)
        index[:n] = np.arange(n)
        local = global_batch_size // process_count
        out = []
        for step in range(steps):
            lo = step * global_batch_size + process_index * local
            out.append((rows[lo : lo + local], index[lo : lo + local]))
        return out


class _RowBuilder:
    """Per-language EOS-joined streams cut into rows, in document order (see module docstring)."""

    def __init__(self, window: int, eval_tokens: int):
        self.window = window
        self.full_rows, self.rest = divmod(eval_tokens, window)
        self.pending: dict[str, np.ndarray] = {}  # per language: tokens not yet in a row (under a row)
        self.rows: list[np.ndarray] = []
        self.language: list[str] = []
        self.done = eval_tokens == 0
        self.stream_tokens: dict[str, int] = {}  # everything added, per language

    def tokens_needed(self) -> int:
        """About how many more tokens must be added (for sizing the next read)."""
        return max(1, (self.full_rows - len(self.rows)) * self.window + self.rest)

    def add(self, language: str, ids: np.ndarray) -> None:
        """Append one document (its tokens and EOS already joined) to its language's stream and
        cut the rows it completes."""
        self.stream_tokens[language] = self.stream_tokens.get(language, 0) + len(ids)
        held = self.pending.get(language)
        buf = ids if held is None or not len(held) else np.concatenate([held, ids])
        pos, w = 0, self.window
        while len(self.rows) < self.full_rows and len(buf) - pos >= w:
            self._emit(language, buf[pos : pos + w])
            pos += w
        if len(self.rows) == self.full_rows:
            if not self.rest:
                self.done = True
            elif len(buf) - pos >= self.rest:
                self._emit(language, buf[pos : pos + self.rest])
                pos += self.rest
                self.done = True
        self.pending[language] = buf[pos:]

    def _emit(self, language: str, tokens: np.ndarray) -> None:
        row = np.full(self.window, -1, np.int32)
        row[: len(tokens)] = tokens
        self.rows.append(row)
        self.language.append(language)

    def available(self) -> int:
        """The most ``eval_tokens`` the documents added so far could give (all of them added)."""
        full = sum(n // self.window for n in self.stream_tokens.values())
        return full * self.window + max((n % self.window for n in self.stream_tokens.values()), default=0)


def _scan(source: ShardSource, skip_bad: bool, bad: BadRecordCounter):
    """``(unit, line, language, characters)`` arrays of every document of ``source``, and their
    texts while they total under ``_KEEP_TEXT_CHARS`` characters (else None: re-read by position)."""
    units, lines, langs, chars = [], [], [], []
    texts: list[str] | None = []
    total = 0
    for unit in range(len(source)):
        for line, doc in source.iter_unit(unit, skip_bad=skip_bad, bad=bad):
            if doc is not None:
                units.append(unit)
                lines.append(line)
                langs.append(doc.language or UNKNOWN)
                chars.append(len(doc.text))
                total += len(doc.text)
                if texts is not None:
                    texts.append(doc.text)
                    if total > _KEEP_TEXT_CHARS:
                        texts = None
    return np.asarray(units, np.int64), np.asarray(lines, np.int64), langs, np.asarray(chars, np.int64), texts


def _read_texts(source: ShardSource, units: np.ndarray, lines: np.ndarray) -> Iterator[str]:
    """Texts of the documents at ``(units[i], lines[i])``, in that order (one pass per shard)."""
    found: dict[tuple[int, int], str] = {}
    for unit in np.unique(units).tolist():
        wanted = set(lines[units == unit].tolist())
        last = max(wanted)
        # The scan already raised or counted bad lines; only good documents are wanted here.
        for line, doc in source.iter_unit(unit, owned=wanted.__contains__, skip_bad=True):
            if doc is not None:
                found[(unit, line)] = doc.text
            if line >= last:
                break
    for unit, line in zip(units.tolist(), lines.tolist(), strict=True):
        if (unit, line) not in found:
            raise ValueError(f"{source.describe(unit)}:{line}: the validation shard changed while it was read")
        yield found[(unit, line)]


def heldout_rows(
    validation_dir,
    tokenizer_path,
    *,
    block_size: int,
    eval_tokens: int,
    seed: int = 0,
    skip_bad: bool = False,
) -> HeldOut:
    """The held-out set of ``eval_tokens`` tokens (see the module docstring).

    ``validation_dir``: shards (a folder, glob, list or ``ShardSource``). Raises ``ValueError``
    naming ``data.eval_tokens`` when the validation set cannot give that many tokens."""
    if block_size < 1:
        raise ValueError(f"data.block_size: expected a positive number of tokens, got {block_size}")
    if eval_tokens < 1:
        raise ValueError(f"data.eval_tokens: expected a positive number of tokens, got {eval_tokens}")
    source = validation_dir if isinstance(validation_dir, ShardSource) else ShardSource(validation_dir)
    where = source.describe(0) if len(source) == 1 else f"{len(source)} shards from {source.describe(0)}"
    tokenizer, eos_id = load_tokenizer_file(tokenizer_path)
    units, lines, langs, chars, kept = _scan(source, skip_bad, BadRecordCounter())
    order = np.random.default_rng([int(seed) & ((1 << 64) - 1), 0x68656C64]).permutation(len(units))
    builder = _RowBuilder(block_size + 1, eval_tokens)
    start, seen_chars, seen_tokens, rounds = 0, 0, 0, 0
    while not builder.done and start < len(order):
        per_token = seen_chars / seen_tokens if seen_tokens else _CHARS_PER_TOKEN_GUESS
        # Doubling with every round bounds the rounds (each a pass over the shards) by a logarithm.
        budget = builder.tokens_needed() * per_token * _MARGIN * 2**rounds
        end = start + max(_MIN_ROUND_DOCS, 1 + int(np.searchsorted(np.cumsum(chars[order[start:]]), budget)))
        chunk = order[start:end]
        texts = ([kept[i] for i in chunk.tolist()] if kept is not None
                 else list(_read_texts(source, units[chunk], lines[chunk])))
        for doc, encoding in zip(chunk.tolist(), tokenizer.encode_batch_fast(texts, add_special_tokens=False),
                                 strict=True):
            ids = np.asarray([*encoding.ids, eos_id], np.int32)
            seen_chars, seen_tokens = seen_chars + int(chars[doc]), seen_tokens + len(ids)
            builder.add(langs[doc], ids)
            if builder.done:
                break
        start, rounds = end, rounds + 1
    if not builder.done:
        raise ValueError(f"data.eval_tokens: {eval_tokens} tokens requested but the validation set ({where}) gives "
                         f"at most {builder.available()} in one-language rows of block_size + 1 = {block_size + 1} "
                         f"tokens ({sum(builder.stream_tokens.values())} tokens in all)")
    rows_NT = np.stack(builder.rows) if builder.rows else np.zeros((0, block_size + 1), np.int32)
    return HeldOut(rows=rows_NT, language=builder.language, tokens=int((rows_NT >= 0).sum()))
