"""Tokenize documents in batches and pack them into fixed windows with no padding.

Every document is followed by ``<|endoftext|>`` (and optionally preceded by its language's
control code, or rearranged for fill-in-the-middle). By default the token stream of all
documents is cut into consecutive windows of ``block_size + 1`` tokens (inputs ``[:-1]``,
labels ``[1:]``), so no token is padding and a document may straddle two windows; with
sliding-window packing each document is cut into its own windows instead (padded with -1,
which the loss ignores). Only ``numpy`` and ``tokenizers`` are imported here because this
module is what worker processes load.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_processing.fim import arrange, fim_pieces
from data_processing.tokens import FIM_TOKENS, control_token, load_tokenizer_file, sentinel_ids, tokenizer_file


@dataclass(frozen=True)
class EncodeOptions:
    """How documents become tokens (picklable: sent once to every worker process).

    Defaults give the plain stream: each document's tokens followed by ``<|endoftext|>``."""

    control_codes: bool = False  # prepend the document language's control token
    fim_rate: float = 0.0  # fraction of documents rearranged for fill-in-the-middle
    fim_spm_rate: float = 0.0  # of those, the fraction in SPM rather than PSM order
    window: int = 0  # > 0: cut each document into windows of this many tokens, padded with -1
    stride: int = 0  # start-to-start distance of consecutive windows (with ``window``)
    seed: int = 0  # seeds the per-document fill-in-the-middle draws (with each document's key)

    def __post_init__(self):
        # The ranges of the config values (fractions, stride <= block) are checked once, at config
        # load (train/config.py); this is the options' own consistency.
        if self.window and not 0 < self.stride < self.window:
            raise ValueError(f"data.window_stride: expected 1..{self.window - 1} tokens, got {self.stride}")


def cut_windows(ids: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Windows ``[k, window]`` of one document's tokens, the Autocoder way: starts ``0, stride,
    2*stride, ...`` while a window still fits, plus one window ending at the last token so that
    every token is in some window; a document shorter than one window is padded with -1 (no
    loss). With ``stride = window - 1`` every label token is predicted once (but in the last)."""
    n = len(ids)
    if n <= window:
        out = np.full((1, window), -1, np.int32)
        out[0, :n] = ids
        return out
    starts = list(range(0, n - window, stride)) + [n - window]
    return np.stack([ids[s : s + window] for s in starts]).astype(np.int32)


class DocumentEncoder:
    """Turns ``Document``s into one flat int32 token array, per ``EncodeOptions``.

    Per document: ``[control code] body <|endoftext|>``, where the body is the tokenized text or,
    for the documents drawn for fill-in-the-middle, its rearrangement (``data_processing.fim``).
    The draw for a document uses a generator keyed by ``(seed, document key)``, so it does not
    depend on batching, workers or restarts. With ``window`` the result is the concatenation
    of each document's padded windows (a multiple of ``window`` long)."""

    def __init__(self, tokenizer_path: str | os.PathLike, options: EncodeOptions | None = None):
        self.options = options or EncodeOptions()
        self.tokenizer, self.eos_id = load_tokenizer_file(tokenizer_path)
        self.path = tokenizer_file(tokenizer_path)
        # encode_batch_fast skips offset tracking, which we never use; Rust threads do the work.
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self._control: dict[str, int] = {}
        self.sentinels = None
        if self.options.fim_rate > 0:
            self.sentinels = sentinel_ids(self.tokenizer)
            if self.sentinels is None:
                raise ValueError(
                    f"data.fim_rate: {self.path} lacks the fill-in-the-middle tokens {list(FIM_TOKENS)}"
                )

    def control_id(self, doc) -> int:
        """Id of ``doc``'s control token; ``ValueError`` naming what is missing."""
        language = doc.language
        if language is None:
            raise ValueError(f"data.control_codes: document {doc.key} has no meta.language")
        found = self._control.get(language)
        if found is None:
            found = self.tokenizer.token_to_id(control_token(language))
            if found is None:
                raise ValueError(
                    f"data.control_codes: {self.path} has no token {control_token(language)!r} "
                    f"for language {language!r}"
                )
            self._control[language] = found
        return found

    def _fim_draw(self, doc) -> tuple[bool, np.random.Generator | None]:
        o = self.options
        if o.fim_rate <= 0:
            return False, None
        rng = np.random.default_rng([o.seed, *doc.key, 7])
        return bool(rng.random() < o.fim_rate), rng

    def encode(self, docs: list) -> np.ndarray:
        """Token ids of ``docs`` concatenated (see the class docstring). A document carrying
        cached ``tokens`` (token cache) is not tokenized again unless it is drawn for FIM."""
        if not docs:
            return np.zeros(0, dtype=np.int32)
        o = self.options
        if not (o.control_codes or o.fim_rate > 0 or o.window) and all(d.tokens is None for d in docs):
            # The plain live stream, one batched call: the hot path. One array per document, then
            # one concatenate: measured 22% less CPU than extending one flat list (docs/benchmarks.md).
            eos = np.array([self.eos_id], np.int32)
            parts: list[np.ndarray] = []
            for encoding in self._encode([d.text for d in docs], add_special_tokens=False):
                parts.append(np.asarray(encoding.ids, np.int32))
                parts.append(eos)
            return np.concatenate(parts)
        # Every text piece of the chunk goes through one batched call; plans say how to join them.
        pieces: list[str] = []
        plans: list[tuple[int, int, bool]] = []  # (first piece, piece count (0: cached tokens), spm)
        for doc in docs:
            fim, rng = self._fim_draw(doc)
            if fim:
                if doc.text is None:
                    raise ValueError(f"data.fim_rate: document {doc.key} has no text to rearrange")
                prefix, middle, suffix = fim_pieces(doc.text, rng)
                plans.append((len(pieces), 3, bool(rng.random() < o.fim_spm_rate)))
                pieces.extend((prefix, middle, suffix))
            elif doc.tokens is not None:
                plans.append((0, 0, False))
            else:
                plans.append((len(pieces), 1, False))
                pieces.append(doc.text)
        encoded = [e.ids for e in self._encode(pieces, add_special_tokens=False)] if pieces else []
        bodies: list = []
        for doc, (first, count, spm) in zip(docs, plans, strict=True):
            if count == 0:
                bodies.append(doc.tokens)
            elif count == 1:
                bodies.append(encoded[first])
            else:
                prefix, middle, suffix = encoded[first : first + 3]
                bodies.append(arrange(prefix, middle, suffix, spm, self.sentinels))
        heads = [self.control_id(doc) for doc in docs] if o.control_codes else None
        if not o.window:
            return self._join(heads, bodies)
        rows = (self._join(None if heads is None else heads[i : i + 1], [body]) for i, body in enumerate(bodies))
        return np.concatenate([cut_windows(row, o.window, o.stride).reshape(-1) for row in rows])

    def _join(self, heads: list[int] | None, bodies: list) -> np.ndarray:
        """``[head] body <|endoftext|>`` for each document, concatenated into one int32 array
        (filled in place: no per-document temporary arrays)."""
        extra = 1 + (heads is not None)
        out = np.empty(sum(len(b) for b in bodies) + extra * len(bodies), np.int32)
        pos = 0
        for i, body in enumerate(bodies):
            if heads is not None:
                out[pos] = heads[i]
                pos += 1
            n = len(body)
            out[pos : pos + n] = body
            pos += n
            out[pos] = self.eos_id
            pos += 1
        return out


# Worker-process side: each worker builds its encoder once, by path (picklable, no big state).
_worker: DocumentEncoder | None = None


def init_worker(tokenizer_path: str, options: EncodeOptions | None = None) -> None:
    """``multiprocessing`` initializer: load the tokenizer into this worker process."""
    global _worker
    _worker = DocumentEncoder(tokenizer_path, options)


def worker_encode(docs: list) -> np.ndarray:
    """Encode one chunk of documents in a worker process (after ``init_worker``)."""
    assert _worker is not None, "init_worker was not called"
    return _worker.encode(docs)


class Packer:
    """Cuts a stream of token chunks into ``[batch, block_size + 1]`` int32 batches.

    Each chunk comes with ``start``, the document-stream state before its first document, and
    ``end``, the state after its last. After every batch the packer reports the resume point as
    ``(start of the chunk holding the next unused token, tokens of that chunk already used)``,
    so leftover tokens never need to be stored: they are re-tokenized from that chunk.
    """

    def __init__(
        self,
        chunks: Iterable[tuple[Any, Any, np.ndarray]],
        *,
        block_size: int,
        batch_size: int,
        skip: int = 0,
    ):
        self.chunks = iter(chunks)
        self.window = block_size + 1
        self.batch_tokens = batch_size * self.window
        self.batch_size = batch_size
        # Each entry: [start_state, end_state, tokens, used]
        self.pieces: deque[list[Any]] = deque()
        self.available = 0
        self.last_end: Any = None
        self.skip = skip

    def _pull(self) -> bool:
        try:
            start, end, tokens = next(self.chunks)
        except StopIteration:
            return False
        used = 0
        if self.skip:
            # Restoring: the first ``skip`` tokens of the stream were delivered before the save.
            used = min(self.skip, len(tokens))
            self.skip -= used
        if self.pieces or used < len(tokens):
            self.pieces.append([start, end, tokens, used])
            self.available += len(tokens) - used
        # When no piece is left over, the next unused token is the first of the chunk after this one.
        self.last_end = end
        return True

    def resume_point(self) -> tuple[Any, int]:
        """``(chunk start state, tokens of it used)`` for the next unused token."""
        if self.pieces:
            start, _, _, used = self.pieces[0]
            return start, used
        return self.last_end, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        while self.available < self.batch_tokens:
            if not self._pull():
                raise StopIteration
        parts = []
        need = self.batch_tokens
        while need:
            piece = self.pieces[0]
            tokens, used = piece[2], piece[3]
            take = min(need, len(tokens) - used)
            parts.append(tokens[used : used + take])
            piece[3] = used + take
            need -= take
            if piece[3] == len(tokens):
                self.pieces.popleft()
        self.available -= self.batch_tokens
        return np.concatenate(parts).reshape(self.batch_size, self.window)
