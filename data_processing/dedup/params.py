"""Dedup parameters and stage 1's map (exact hash + MinHash signature per text): the one
definition both engines call, so their hashes and signatures are bit-identical."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from data_processing import minhash

BATCH_RECORDS = 64
BATCH_BYTES = 1 << 20  # small batches keep all workers busy on small inputs


@dataclass
class DedupParams:
    """Near-duplicate parameters; ``bands``/``rows`` default to ``minhash.choose_bands``."""

    threshold: float = 0.85
    num_perm: int = 128
    bands: int | None = None
    rows: int | None = None
    seed: int = 1
    shingle_words: int = minhash.SHINGLE_WORDS
    lsh_target: float = 0.99

    def resolved(self) -> DedupParams:
        if self.bands is None or self.rows is None:
            self.bands, self.rows = minhash.choose_bands(self.threshold, self.num_perm, self.lsh_target)
        return self


def normalise_whitespace(text: str) -> str:
    """Text with every whitespace run replaced by one space and the ends stripped."""
    return " ".join(text.split())


_WHITESPACE = re.compile(r"\s")  # the characters str.split() splits on
_PIECE_CHARS = 1 << 18


def exact_hash(text: str) -> int:
    """``hash_bytes`` of the UTF-8 ``normalise_whitespace(text)``, computed over pieces of the
    text cut at whitespace: ``split()`` of a whole 10 MB text holds a word object per word,
    about 8 times the text in memory."""
    digest = hashlib.blake2b(digest_size=8)
    lo, n, sep = 0, len(text), ""
    while lo < n:
        hi = lo + _PIECE_CHARS
        if hi < n:
            found = _WHITESPACE.search(text, hi)
            hi = found.start() if found else n
        words = text[lo:hi].split()
        if words:
            digest.update((sep + " ".join(words)).encode("utf-8"))
            sep = " "
        lo = hi
    return int.from_bytes(digest.digest(), "little")


def map_signatures(texts: list[str], num_perm: int, seed: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 for a batch of texts: uint64 exact hashes (whitespace-normalised blake2b) and
    ``(n, num_perm)`` uint32 MinHash signatures. Every engine calls this one function, so their
    hashes and signatures are bit-identical."""
    exact = np.array([exact_hash(t) for t in texts], dtype=np.uint64)
    sigs = np.stack([minhash.signature(minhash.shingle_hashes(t, k), num_perm, seed) for t in texts])
    return exact, sigs


def map_shingles(texts: list[str], k: int) -> list[np.ndarray]:
    """Stage 4's map: the exact shingle-hash sets of ``texts``."""
    return [minhash.shingle_hashes(t, k) for t in texts]
