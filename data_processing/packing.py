"""Tokenize documents in batches and pack them into fixed windows with no padding.

Every document is followed by ``<|endoftext|>``; the token stream of all documents is cut into
consecutive windows of ``block_size + 1`` tokens (inputs ``[:-1]``, labels ``[1:]``), so no
token is padding and a document may straddle two windows. Only ``numpy`` and ``tokenizers``
are imported here because this module is what worker processes load.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

EOS_TOKEN = "<|endoftext|>"


def tokenizer_file(tokenizer_path: str | os.PathLike) -> str:
    """``tokenizer.json`` inside a tokenizer folder (or the file itself)."""
    path = os.fspath(tokenizer_path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a tokenizer folder or file)")
    return path


def load_tokenizer(tokenizer_path: str | os.PathLike):
    """Load a fast ``tokenizers.Tokenizer`` and the id of ``<|endoftext|>``; error if it lacks one."""
    from tokenizers import Tokenizer

    path = tokenizer_file(tokenizer_path)
    tokenizer = Tokenizer.from_file(path)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{path}: tokenizer has no {EOS_TOKEN!r} token, needed between documents")
    return tokenizer, int(eos_id)


def tokenize_texts(tokenizer, eos_id: int, texts: list[str]) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by ``eos_id`` (int32)."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    # encode_batch_fast skips offset tracking, which we never use; Rust threads do the work.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    ids: list[int] = []
    for encoding in encodings:
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


# Worker-process side: each worker loads the tokenizer once, by path (picklable, no big state).
_worker: tuple[Any, int] | None = None


def init_worker(tokenizer_path: str) -> None:
    """``multiprocessing`` initializer: load the tokenizer into this worker process."""
    global _worker
    _worker = load_tokenizer(tokenizer_path)


def worker_tokenize(texts: list[str]) -> np.ndarray:
    """Tokenize one chunk in a worker process (after ``init_worker``)."""
    assert _worker is not None, "init_worker was not called"
    return tokenize_texts(_worker[0], _worker[1], texts)


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
