"""One global data order for any number of hosts, served from the token cache.

The run_clm way, with random access instead of a stream (as Grain and levanter do):

* the *stream*: every training document in corpus order (shards sorted, lines in file order),
  each as ``[control code] tokens <|endoftext|>``, concatenated;
* *rows*: the stream cut into ``rows_per_epoch = len(stream) // (block_size + 1)`` fixed rows;
  the partial last row (fewer than ``block_size + 1`` tokens, the same ones every epoch) is dropped.
  With ``packing: windows`` the rows are instead every window ``cut_windows`` cuts from each
  document (padded with -1), documents in corpus order;
* the *order*: the rows of epoch ``e`` in a seeded pseudo-random permutation keyed by
  ``(seed, epoch)``: a 6-round mixed-radix Feistel network with cycle walking, computed on the
  fly (no permutation array);
* *global batches*: the epochs' permuted rows one after another, cut into batches of
  ``global_batch_size`` rows; a batch may straddle two epochs, so no row is ever skipped;
* *hosts*: process ``p`` of ``P`` reads rows ``[p*B/P, (p+1)*B/P)`` of every global batch.
* with a language *mixture* (``data.mixture``, ``data_processing.mixture``): each language's
  documents make its own stream and rows (so a row is one language) and its own epochs, permuted
  by ``(seed, epoch, language)``; global row ``i`` is the language a fixed 4096-row weighted
  schedule gives it, and that language's ``k``-th row drawn, ``k`` a closed form of ``i``.

So the sequence of global batches is a pure function of (corpus, tokenizer, seed, block size,
global batch size, encode options, mixture), whatever the number of processes, and the resume
state is a single row count. A row is looked up in memory-mapped token arrays of the cache
entries through one small index per shard (see ``_UnitIndex``; 4 bytes a document, 5 with
control codes, 4 more with windows, 16 a same-language run with a mixture: docs/data_order.md).
With ``fim_rate > 0`` each row handed out is rearranged for fill-in-the-middle after it is
assembled, per ``<|endoftext|>``-separated segment, keyed by the row's sequence position
(``data_processing.fim_rows``; BigCode's Megatron-LM way).

No JAX here: each host gets numpy arrays; the trainer assembles the global ``jax.Array``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import zipfile
from collections import OrderedDict, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data_processing.fim_rows import RowFim, fim_rows
from data_processing.mixture import PERIOD, MixtureSchedule, language_key, resolve_weights
from data_processing.packing import EncodeOptions
from data_processing.shards import BadRecordCounter, ShardError
from data_processing.sources import ShardSource, count_bad
from data_processing.token_cache import TokenCache, TokenCacheError
from data_processing.tokens import FIM_TOKENS, control_token, load_tokenizer_file, sentinel_ids

__all__ = ["GlobalOrderLoader", "feistel_permute"]

STATE_KIND = "global_order"
# A string, not TokenLoader's integer: TokenLoader.restore refuses this state on its version check.
STATE_VERSION = "global_order/1"
_ROUNDS = 6  # Feistel rounds (even: the radices come back): 4 already look random; 6 for margin
_OPEN_UNITS = 64  # memory-mapped token arrays kept open (each holds a file descriptor)
_M64 = (1 << 64) - 1
_AHEAD_TOKENS = 1 << 20  # tokens per host read at once (4 MB): numpy's per-call cost paid once for many rows


# -- the permutation ---------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a strong bit mixer."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def _round_keys(seed: int, epoch: int, stream: int | None = None) -> np.ndarray:
    """The Feistel round keys of one epoch: seeded by ``(seed, epoch)`` only, or with a mixture by
    ``(seed, epoch, stream)`` (``stream``: a number derived from the language)."""
    entropy = [int(seed) & _M64, int(epoch), 0x676C6F62] + ([] if stream is None else [int(stream)])
    return np.random.SeedSequence(entropy).generate_state(_ROUNDS, np.uint64)


def language_stream(language: str) -> int:
    """The permutation key of a mixture language: 64 bits of its name's SHA-256."""
    return int.from_bytes(hashlib.sha256(language.encode("utf-8")).digest()[:8], "little")


def feistel_permute(index: np.ndarray, n: int, seed: int, epoch: int, stream: int | None = None) -> np.ndarray:
    """``perm(index)`` for the seeded permutation of ``range(n)`` of ``epoch`` (int64 in, int64 out).

    A Feistel network on mixed radices (Black and Rogaway's FE2): ``x = L*b + R`` with
    ``L < a``, ``R < b`` and ``a*b >= n``, rounds ``(L, R) -> (R, (L + F(R)) mod a)`` with the
    radices swapping each round, is a bijection of ``[0, a*b)`` after an even number of rounds.
    ``a ~ b ~ sqrt(n)`` leave under ``a`` values outside ``[0, n)``; cycle walking (apply again
    while the result is ``>= n``) makes it a bijection of ``[0, n)``, rarely needing a second
    pass. O(1) memory: any index is computed on its own. ``stream`` keys one of several
    independent permutations of the same ``(seed, epoch)`` (a mixture's languages)."""
    if n < 1:
        raise ValueError(f"feistel_permute: n must be positive, got {n}")
    a = math.isqrt(n - 1) + 1
    b = -(-n // a)
    keys = _round_keys(seed, epoch, stream)
    x = np.asarray(index, np.int64).astype(np.uint64)
    todo = np.ones(x.shape, bool)
    ua, ub = np.uint64(a), np.uint64(b)
    while todo.any():
        v = x[todo]
        left, right, m, r = v // ub, v % ub, ua, ub
        for key in keys:
            left, right, m, r = right, (left + _mix64(right ^ key) % m) % m, r, m
        x[todo] = left * ub + right
        todo[todo] = x[todo] >= np.uint64(n)
    return x.astype(np.int64)


# -- the cache, memory-mapped ------------------------------------------------------------------


def _member_layout(entry: Path, name: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    """``(byte offset, dtype, shape)`` of the array ``name`` inside an ``.npz`` entry. ``np.savez``
    stores members uncompressed, so the raw array can be memory-mapped at that offset."""
    with zipfile.ZipFile(entry) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise TokenCacheError(f"{entry}: member {name} is compressed; build the entry again")
    with open(entry, "rb") as f:
        f.seek(info.header_offset)
        # The local file header: its own name and extra field lengths (they may differ from the
        # central directory's, e.g. zip64 extras), then the member's bytes: a .npy file.
        sig, *_, name_len, extra_len = struct.unpack("<4s5H3L2H", f.read(30))
        if sig != b"PK\x03\x04":
            raise TokenCacheError(f"{entry}: damaged token cache entry (bad zip header); build it again")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise TokenCacheError(f"{entry}: member {name} is Fortran-ordered; build the entry again")
        return f.tell(), dtype, shape


class _UnitIndex:
    """What the global order keeps of one shard: where its documents start in its stream.

    ``starts[j]`` is the stream position of document ``j`` relative to the shard's stream, with one
    final entry for the shard's stream end (uint32 when it fits, 4 bytes a document). The body
    tokens of document ``j`` are ``tokens[starts[j] - k*j : ...]`` with ``k`` the specials per
    document (EOS, plus the control code), because blank and bad lines hold no tokens. With
    control codes, ``doc_kinds`` adds each document's language (the cache's ``kinds``)."""

    def __init__(self, offsets: np.ndarray, kinds: np.ndarray, specials: int, window: int = 0, stride: int = 0):
        doc_lines = np.flatnonzero(kinds >= 0)
        tok_starts = offsets[doc_lines].astype(np.int64)
        n_docs = len(doc_lines)
        end = int(offsets[-1]) + specials * n_docs
        dtype = np.uint32 if end < 1 << 32 else np.int64
        starts = np.empty(n_docs + 1, dtype)
        starts[:-1] = tok_starts + specials * np.arange(n_docs, dtype=np.int64)
        starts[-1] = end
        self.starts = starts
        self.length = end
        self.num_docs = n_docs
        self.num_tokens = int(offsets[-1])
        # Each document's language, only for control codes (1 byte a document).
        self.doc_kinds = (kinds[doc_lines].astype(np.uint8 if kinds.max(initial=0) < 256 else np.int16)
                          if specials > 1 else np.zeros(0, np.uint8))
        # Sliding windows: the first row of each document (4 bytes a document), as ``cut_windows``
        # cuts it: starts 0, stride, ... while a window fits, plus one ending at its last token.
        self.row_starts = np.zeros(0, np.uint32)
        self.num_rows = 0
        if window:
            m = np.diff(starts.astype(np.int64))
            count = np.where(m <= window, 1, -(-(m - window) // stride) + 1)
            self.num_rows = int(count.sum())
            self.row_starts = np.concatenate([[0], np.cumsum(count)]).astype(
                np.uint32 if self.num_rows < 1 << 32 else np.int64)

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.doc_kinds.nbytes + self.row_starts.nbytes


class GlobalOrderLoader:
    """Infinite iterator of this process's rows of every global batch, int32
    ``[global_batch_size // process_count, block_size + 1]``; see the module docstring.

    ``cache``: a ``TokenCache``, or its folder together with ``source`` (the training shards)
    and ``tokenizer_path``. ``encode``: control codes, sliding windows (``window`` must be
    ``block_size + 1``) and fill-in-the-middle (``fim_rate``, ``fim_spm_rate``: applied to each
    row after it is assembled, per segment, ``data_processing.fim_rows``; ``gather`` gives the
    rows before it).
    Bad records: their lines hold no tokens in the cache; they raise ``ShardError`` (file:line)
    when the loader is built unless ``skip_bad``, which counts them in ``bad_records`` and
    leaves them out of the stream. ``mixture``: ``{language: weight}`` (``data.mixture``; see
    ``data_processing.mixture``): rows per language, drawn by the weighted schedule.
    """

    def __init__(
        self,
        cache,
        *,
        block_size: int,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        encode: EncodeOptions | None = None,
        skip_bad: bool = False,
        source=None,
        tokenizer_path=None,
        mixture: Mapping[str, float] | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"data.block_size: expected a positive number of tokens, got {block_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.cache = _open_cache(cache, source, tokenizer_path)
        self.control_codes = bool(encode and encode.control_codes)
        self.block_size, self.window = block_size, block_size + 1
        self.windows = bool(encode and encode.window)  # packing: windows (one document a row, padded)
        self.stride = encode.stride if self.windows else 0
        if self.windows and encode.window != self.window:
            raise ValueError(f"data.packing=windows: windows must be block_size + 1 = {self.window} tokens long")
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.bad_records = BadRecordCounter()
        self._tokenizer, self.eos_id = load_tokenizer_file(self.cache.tokenizer_path)
        self._specials = 1 + self.control_codes
        self._units: list[_UnitIndex] = []
        self._control_ids: list[np.ndarray] = []  # per unit: control token id by unit-local language
        self._layouts: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        self._doc_languages: list[tuple[np.ndarray, list[str]]] | None = [] if mixture else None
        metas = []
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        for unit in range(len(self.cache.shards)):
            meta = self._index_unit(unit, skip_bad)
            metas.append([meta["num_lines"], meta["num_docs"], meta["num_tokens"]])
        lengths = np.array([u.length for u in self._units], np.int64)
        self._unit_base = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.stream_tokens = int(self._unit_base[-1])
        self.rows_per_epoch = self.stream_tokens // self.window
        self._row_base = np.zeros(0, np.int64)  # windows: each shard's first row
        if self.windows:
            self._row_base = np.concatenate([[0], np.cumsum([u.num_rows for u in self._units])]).astype(np.int64)
            self.rows_per_epoch = int(self._row_base[-1])
        self.mixture: _Mixture | None = None
        if mixture:
            self.mixture = self._build_mixture(mixture)
            self.rows_per_epoch = self.mixture.rows_per_epoch
        self._fim = self._row_fim(encode)
        self._corpus = hashlib.sha256(json.dumps([self.cache.tok_hash, metas]).encode()).hexdigest()[:16]
        self._check_batch(global_batch_size)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.position = 0  # rows of the global sequence handed out (by every process together)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        # Batches are read several at a time: numpy's per-call cost, paid once per read-ahead.
        self._ahead: deque[tuple[int, np.ndarray]] = deque()
        self._ahead_batches = max(1, _AHEAD_TOKENS // (self.local_batch_size * self.window))

    # -- public API ---------------------------------------------------------------------------

    def __iter__(self) -> GlobalOrderLoader:
        return self

    def __next__(self) -> np.ndarray:
        """This process's rows of the next global batch, int32 ``[local batch, block_size + 1]``."""
        if self._open is None:
            raise RuntimeError("GlobalOrderLoader is closed")
        if not self._ahead or self._ahead[0][0] != self.position:
            self._read_ahead()
        _, rows_BT = self._ahead.popleft()
        self.position += self.global_batch_size
        return rows_BT

    @property
    def epoch(self) -> int:
        """The epoch of the next row to be handed out."""
        return self.position // self.rows_per_epoch

    def local_positions(self, position: int, batches: int = 1) -> np.ndarray:
        """Sequence positions (int64 ``[batches, local batch]``) of this process's rows in the
        ``batches`` global batches starting at sequence position ``position``."""
        first = position + self.process_index * self.local_batch_size
        batch_starts = first + self.global_batch_size * np.arange(batches, dtype=np.int64)
        return batch_starts[:, None] + np.arange(self.local_batch_size, dtype=np.int64)

    def row_indices(self, positions: np.ndarray) -> np.ndarray:
        """Stream row index at each sequence position (int64, same shape): position ``q`` is row
        ``perm_{seed, q // rows_per_epoch}(q % rows_per_epoch)``. Without a mixture only: with one,
        a row is a language's row (``language_rows``)."""
        if self.mixture is not None:
            raise ValueError("row_indices: with data.mixture rows are per language; use language_rows")
        q = np.asarray(positions, np.int64)
        epochs, within = np.divmod(q, self.rows_per_epoch)
        out = np.empty(q.shape, np.int64)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = feistel_permute(within[sel], self.rows_per_epoch, self.seed, epoch)
        return out

    def rows_at(self, position: int, count: int) -> np.ndarray:
        """The rows (int32 ``[count, block_size + 1]``) at sequence positions ``position ...``, as
        ``next`` hands them out (with FIM applied)."""
        return self._rows_at_positions(np.arange(position, position + count, dtype=np.int64))

    def language_rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """With a mixture: ``(language index into mixture.languages, row of that language)`` at each
        sequence position. Position ``q`` is language ``L = schedule(q)``, its ``k``-th row drawn
        (a closed form of ``q``); that is row ``perm_{seed, L, k // rows_L}(k % rows_L)`` of ``L``."""
        mix = self.mixture
        if mix is None:
            raise ValueError("language_rows: only with data.mixture (without one, row_indices)")
        lang, k = mix.schedule.at(np.asarray(positions, np.int64).reshape(-1))
        rows = np.empty(len(k), np.int64)
        for L in np.unique(lang).tolist():
            sel = np.flatnonzero(lang == L)
            n, stream = int(mix.rows[L]), language_stream(mix.languages[L])
            epochs, within = np.divmod(k[sel], n)
            for epoch in np.unique(epochs).tolist():
                at = epochs == epoch
                rows[sel[at]] = feistel_permute(within[at], n, self.seed, epoch, stream)
        return lang, rows

    def languages_at(self, positions: np.ndarray) -> list[str]:
        """The language of the row at each sequence position (with a mixture; else a ValueError)."""
        if self.mixture is None:
            raise ValueError("languages_at: rows are single-language only with data.mixture")
        lang, _ = self.mixture.schedule.at(np.asarray(positions, np.int64).reshape(-1))
        return [self.mixture.languages[i] for i in lang.tolist()]

    def language_counts(self, total_rows: int) -> dict[str, dict[str, Any]]:
        """With a mixture, per language: its tokens, rows and share in the corpus (before weighting)
        and its weight, rows, tokens (``block_size`` a row, as trained) and epochs among the first
        ``total_rows`` rows of the global sequence (after weighting): a closed form, no replay."""
        mix = self.mixture
        if mix is None:
            raise ValueError("language_counts: only with data.mixture")
        drawn = mix.schedule.counts(total_rows)
        all_rows = max(int(mix.rows.sum()), 1)
        return {name: {"corpus_tokens": int(mix.tokens[i]), "corpus_rows": int(mix.rows[i]),
                       "natural_share": int(mix.rows[i]) / all_rows,
                       "weight": int(mix.schedule.slots[i]) / mix.schedule.period,
                       "rows": int(drawn[i]), "tokens": int(drawn[i]) * self.block_size,
                       "epochs": int(drawn[i]) / int(mix.rows[i]) if mix.rows[i] else 0.0}
                for i, name in enumerate(mix.languages)}

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of stream rows ``rows`` (int64 ``[n]``): int32 ``[n, block_size + 1]``, as the
        cache holds them (fill-in-the-middle is applied after, by sequence position).

        Each row is one or (at a shard boundary) more contiguous pieces of a shard's stream; a
        piece's document tokens are one contiguous slice of the shard's token array, with the
        few specials (EOS, control codes) of the documents it spans placed around them."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if not len(rows):
            return np.zeros((0, self.window), np.int32)
        pieces = self._window_pieces(rows) if self.windows else self._pieces(rows * self.window)
        return self._assemble(pieces, len(rows))

    def _rows_at_positions(self, positions: np.ndarray) -> np.ndarray:
        """The rows (int32 ``[n, block_size + 1]``) at sequence positions ``positions`` (int64 ``[n]``),
        as the trainer gets them: with FIM, rearranged per segment, keyed by ``(epoch, position)``."""
        rows_BT = self._stream_rows_at(positions)
        if self._fim is None:
            return rows_BT
        return fim_rows(rows_BT, positions // self.rows_per_epoch, positions, self._fim)

    def _stream_rows_at(self, positions: np.ndarray) -> np.ndarray:
        """The rows at sequence positions ``positions`` as the cache holds them (before FIM)."""
        if self.mixture is None:
            return self.gather(self.row_indices(positions))
        lang, rows = self.language_rows(positions)
        if self.windows:
            return self.gather(self.mixture.global_rows(lang, rows))
        return self._assemble(self.mixture.pieces(lang, rows, self.window, self._unit_base), len(rows))

    def _assemble(self, pieces: np.ndarray, n_rows: int) -> np.ndarray:
        """The ``n_rows`` rows (int32 ``[n_rows, block_size + 1]``) that ``pieces`` (sorted by their
        position in the flat output) fill: specials placed, bodies sliced from the mapped tokens."""
        w = self.window
        flat = np.empty(n_rows * w, np.int32)
        special = np.zeros(len(flat), bool)
        if self.windows:
            self._pad(pieces, flat, special)
        groups = [(unit, np.flatnonzero(pieces[:, 0] == unit)) for unit in np.unique(pieces[:, 0]).tolist()]
        first, count = np.zeros(len(pieces), np.int64), np.zeros(len(pieces), np.int64)
        for unit, sel in groups:
            first[sel], count[sel] = self._fill_unit(unit, pieces[sel], flat, special)
        # The bodies, joined in piece order, fill the slots that are not specials.
        body, at = np.empty(int(count.sum()), np.int32), np.cumsum(count) - count
        for unit, sel in groups:
            _copy_bodies(self._tokens(unit), first[sel], count[sel], at[sel], body)
        flat[~special] = body
        # Memory-mapped tokens skip the zip CRC check of a full read: catch damage that matters
        # (an id the embedding does not have, which a device gather would silently clamp).
        if len(flat) and int(flat.max()) >= self.vocab_size:
            bad = int(np.flatnonzero(body >= self.vocab_size)[0])
            unit = int(pieces[np.searchsorted(np.cumsum(count), bad, side="right"), 0])
            raise TokenCacheError(f"{self.cache.entries[unit]}: damaged token cache entry (a token id >= the "
                                  f"vocabulary size {self.vocab_size}); delete it and build it again")
        return flat.reshape(n_rows, w)

    def state(self) -> dict[str, Any]:
        """Small JSON-serialisable state, the same on every process and for any process count:
        the rows handed out so far plus what must match on restore."""
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "seed": self.seed,
            "block_size": self.block_size,
            "control_codes": self.control_codes,
            "windows": [self.window, self.stride] if self.windows else None,
            "corpus": self._corpus,
            "rows_per_epoch": self.rows_per_epoch,
            "global_batch_size": self.global_batch_size,
            "position": self.position,
            **({"mixture": self.mixture.schedule.state()} if self.mixture is not None else {}),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch at which ``state`` was taken (any process count).
        Another global batch size continues at the same row, so no row is repeated or skipped."""
        if state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: expected kind={STATE_KIND!r} version {STATE_VERSION!r}, got "
                             f"kind={state.get('kind')!r} version {state.get('version')!r} (a TokenLoader state?)")
        mine = self.state()
        for key in ("seed", "block_size", "control_codes", "windows", "corpus", "rows_per_epoch"):
            if state.get(key) != mine[key]:
                what = "the training shards or tokenizer changed" if key == "corpus" else "the run changed"
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{mine[key]!r} ({what})")
        if state.get("mixture") != mine.get("mixture"):
            raise ValueError(f"loader state has mixture={state.get('mixture')!r} (rows per {PERIOD} by language) "
                             f"but this loader has {mine.get('mixture')!r} (data.mixture or the corpus changed)")
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state: position must be a non-negative integer, got {position!r}")
        self.position = position
        self._ahead.clear()

    def restart_at_epoch(self, epoch: int) -> None:
        """Start at the first row of ``epoch`` (its own seeded permutation): where a run continues
        when its saved position belongs to another stream (the tokenizer or the shards changed)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.position = epoch * self.rows_per_epoch
        self._ahead.clear()

    @staticmethod
    def next_epoch_of(state: dict[str, Any]) -> int:
        """The first epoch after the one a saved state had reached."""
        return int(state.get("position", 0)) // max(int(state.get("rows_per_epoch") or 1), 1) + 1

    def close(self) -> None:
        """Release the memory-mapped token arrays; the loader cannot be used afterwards."""
        self._open = None
        self._ahead.clear()

    def __enter__(self) -> GlobalOrderLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def index_bytes(self) -> int:
        """Bytes held by the order's index (the per-document arrays; the tokens stay on disk)."""
        runs = self.mixture.nbytes if self.mixture is not None else 0
        return sum(u.nbytes for u in self._units) + self._unit_base.nbytes + self._row_base.nbytes + runs

    def _read_ahead(self) -> None:
        """Read this process's rows of the next few global batches in one ``gather``."""
        k, b, n = self._ahead_batches, self.global_batch_size, self.local_batch_size
        rows_BT = self._rows_at_positions(self.local_positions(self.position, k).reshape(-1))
        self._ahead = deque((self.position + i * b, rows_BT[i * n : (i + 1) * n]) for i in range(k))

    # -- building ------------------------------------------------------------------------------

    def _build_mixture(self, mixture: Mapping[str, float]) -> _Mixture:
        """Each language's runs of consecutive documents, its rows, and the weighted schedule."""
        docs, self._doc_languages = self._doc_languages, None
        names = sorted({keys[k] for kinds, keys in docs for k in np.unique(kinds).tolist()})
        ids = {name: i for i, name in enumerate(names)}
        src: list[list[np.ndarray]] = [[] for _ in names]
        length: list[list[np.ndarray]] = [[] for _ in names]
        tokens = np.zeros(len(names), np.int64)
        for unit, (kinds, keys) in enumerate(docs):
            if not len(kinds):
                continue
            lookup = np.array([ids.get(k, -1) for k in keys], np.int16)
            lang, start, size, stream = self._unit_runs(unit, lookup[kinds])
            for i in np.unique(lang).tolist():
                at = lang == i
                src[i].append(start[at])
                length[i].append(size[at])
                tokens[i] += int(stream[at].sum())
        return _Mixture(names, src, length, tokens, mixture, self.window, self.windows)

    def _unit_runs(self, unit: int, doc_lang: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(language, start, length, stream tokens)`` of each run of consecutive same-language
        documents of ``unit``; start and length in the global stream (concat) or in global rows
        (windows)."""
        index = self._units[unit]
        first = np.concatenate([[0], np.flatnonzero(np.diff(doc_lang)) + 1])
        bounds = np.concatenate([first, [len(doc_lang)]])
        starts = index.starts.astype(np.int64)[bounds]
        tokens = np.diff(starts)
        if self.windows:
            rows = index.row_starts.astype(np.int64)[bounds]
            return doc_lang[first], self._row_base[unit] + rows[:-1], np.diff(rows), tokens
        return doc_lang[first], self._unit_base[unit] + starts[:-1], tokens, tokens

    def _row_fim(self, encode: EncodeOptions | None) -> RowFim | None:
        """What ``fim_rows`` needs, or None without FIM; the sentinels must be in the tokenizer."""
        if encode is None or encode.fim_rate <= 0:
            return None
        sentinels = sentinel_ids(self._tokenizer)
        if sentinels is None:
            raise ValueError(f"data.fim_rate: {self.cache.tokenizer_path} lacks the fill-in-the-middle tokens "
                             f"{list(FIM_TOKENS)}")
        heads = frozenset(int(i) for ids in self._control_ids for i in ids.tolist() if i >= 0)
        return RowFim(self._tokenizer, encode.fim_rate, encode.fim_spm_rate, self.seed, self.eos_id, sentinels, heads)

    def _check_batch(self, batch: int) -> None:
        """Refuse a global batch the order cannot serve, in one line naming train.batch_size."""
        if batch < 1 or batch % self.process_count:
            raise ValueError(f"train.batch_size: the global batch of {batch} rows must be a positive multiple "
                             f"of the {self.process_count} processes")
        if batch > self.rows_per_epoch:
            raise ValueError(f"train.batch_size: the global batch of {batch} rows exceeds the {self.rows_per_epoch} "
                             f"rows of block_size + 1 = {self.window} tokens in one epoch of the training set")

    def _index_unit(self, unit: int, skip_bad: bool) -> dict[str, Any]:
        """Read one entry's line offsets and kinds (not its tokens) into a ``_UnitIndex``."""
        entry, shard = self.cache.entries[unit], self.cache.shards[unit]
        try:
            with np.load(entry) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                offsets, kinds = z["offsets"], z["kinds"]
        except FileNotFoundError as err:
            raise TokenCacheError(f"{entry}: token cache entry of {shard} disappeared") from err
        except Exception as err:  # zipfile, numpy and json each raise their own errors
            raise TokenCacheError(f"{entry}: damaged token cache entry ({type(err).__name__}: {err}); "
                                  "delete it and build it again") from err
        layout = _member_layout(entry, "tokens")
        if offsets.shape != (meta["num_lines"] + 1,) or kinds.shape != (meta["num_lines"],) \
                or layout[2] != (meta["num_tokens"],) or int(offsets[-1]) != meta["num_tokens"]:
            raise TokenCacheError(f"{entry}: damaged token cache entry (arrays do not match their metadata); "
                                  "delete it and build it again")
        self._check_bad(unit, meta, skip_bad)
        index = _UnitIndex(offsets, kinds, self._specials, self.window if self.windows else 0, self.stride)
        self._units.append(index)
        self._layouts.append(layout)
        if self._doc_languages is not None:  # a mixture: each document's language, until the runs are built
            self._doc_languages.append((kinds[kinds >= 0], [language_key(x) for x in meta["languages"]]))
        self._control_ids.append(self._unit_control_ids(unit, meta, kinds) if self.control_codes
                                 else np.zeros(0, np.int32))
        return meta

    def _check_bad(self, unit: int, meta: dict[str, Any], skip_bad: bool) -> None:
        """Bad lines (and an unreadable tail) raise as the live reader does, or are counted."""
        shard = self.cache.shards[unit]
        for line, reason in sorted(meta["bad"].items(), key=lambda kv: int(kv[0])):
            if not skip_bad:
                raise ShardError(f"{shard}:{line}: {reason}")
            count_bad(self.bad_records, reason, f"{shard}:{line}")
        if meta.get("unreadable"):
            if not skip_bad:
                raise ShardError(meta["unreadable"])
            count_bad(self.bad_records, "unreadable shard", meta["unreadable"])

    def _unit_control_ids(self, unit: int, meta: dict[str, Any], kinds: np.ndarray) -> np.ndarray:
        """Control token id of each of the unit's languages (indexed by the cache's ``kinds``)."""
        ids = np.full(len(meta["languages"]), -1, np.int32)
        used = set(np.unique(kinds[kinds >= 0]).tolist())
        for k, language in enumerate(meta["languages"]):
            if k not in used:
                continue
            if language is None:
                line = int(np.flatnonzero(kinds == k)[0]) + 1
                raise ValueError(f"data.control_codes: document {self.cache.shards[unit]}:{line} has no meta.language")
            token_id = self._tokenizer.token_to_id(control_token(language))
            if token_id is None:
                raise ValueError(f"data.control_codes: {self.cache.tokenizer_path} has no token "
                                 f"{control_token(language)!r} for language {language!r}")
            ids[k] = token_id
        return ids

    # -- reading -------------------------------------------------------------------------------

    def _pieces(self, starts: np.ndarray) -> np.ndarray:
        """Split rows (stream starts) at shard boundaries: int64 ``[n_pieces, 4]`` of
        ``(unit, position in the unit's stream, length, position in the flat output)``."""
        w, base = self.window, self._unit_base
        units = np.searchsorted(base, starts, side="right") - 1
        dest = np.arange(len(starts), dtype=np.int64) * w
        fits = starts + w <= base[units + 1]
        out = [np.stack([units[fits], starts[fits] - base[units[fits]], np.full(fits.sum(), w), dest[fits]], 1)]
        for start, d in zip(starts[~fits].tolist(), dest[~fits].tolist(), strict=True):
            # Rare: a row across a shard boundary (possibly across several tiny shards).
            pos, left = start, w
            while left:
                u = int(np.searchsorted(base, pos, side="right") - 1)
                take = min(left, int(base[u + 1]) - pos)
                out.append(np.array([[u, pos - base[u], take, d + w - left]], np.int64))
                pos, left = pos + take, left - take
        pieces = np.concatenate(out).astype(np.int64)
        return pieces[np.argsort(pieces[:, 3], kind="stable")]  # output order: bodies are joined in it

    def _window_pieces(self, rows: np.ndarray) -> np.ndarray:
        """Sliding-window rows as pieces: row -> (shard, document, window) -> the window's
        stream range in its shard (never across documents, so never across shards)."""
        w, stride = self.window, self.stride
        units = np.searchsorted(self._row_base, rows, side="right") - 1
        out = np.empty((len(rows), 4), np.int64)
        out[:, 0], out[:, 3] = units, np.arange(len(rows), dtype=np.int64) * w
        for unit in np.unique(units).tolist():
            sel = units == unit
            index = self._units[unit]
            local = rows[sel] - self._row_base[unit]
            doc = np.searchsorted(index.row_starts, local.astype(index.row_starts.dtype), side="right") - 1
            first = index.starts[doc].astype(np.int64)
            m = index.starts[doc + 1].astype(np.int64) - first  # the document's stream length
            i = local - index.row_starts[doc].astype(np.int64)
            out[sel, 1] = first + np.where(m <= w, 0, np.minimum(i * stride, m - w))
            out[sel, 2] = np.minimum(m, w)
        return out

    def _pad(self, pieces: np.ndarray, flat: np.ndarray, special: np.ndarray) -> None:
        """-1 after each short piece (a document shorter than a window): no loss there."""
        short = pieces[pieces[:, 2] < self.window]
        gaps = self.window - short[:, 2]
        at = np.repeat(short[:, 3] + short[:, 2] - np.cumsum(gaps) + gaps, gaps) + np.arange(int(gaps.sum()))
        flat[at] = -1
        special[at] = True

    def _tokens(self, unit: int) -> np.ndarray:
        """The memory-mapped token array of ``unit`` (a bounded LRU of open maps)."""
        found = self._open.get(unit)
        if found is not None:
            self._open.move_to_end(unit)
            return found
        offset, dtype, shape = self._layouts[unit]
        tokens = np.zeros(0, dtype)
        if shape[0]:
            # A plain ndarray view: slicing an np.memmap costs microseconds of Python per call.
            tokens = np.memmap(self.cache.entries[unit], dtype=dtype, mode="r", offset=offset,
                               shape=shape).view(np.ndarray)
        self._open[unit] = tokens
        if len(self._open) > _OPEN_UNITS:
            self._open.popitem(last=False)
        return tokens

    def _fill_unit(self, unit: int, pieces: np.ndarray, flat: np.ndarray,
                   special: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For ``pieces`` (all in ``unit``), write the specials into ``flat`` and mark them in
        ``special``; return each piece's body tokens as ``(first index in the unit's token array,
        count)``."""
        index, k = self._units[unit], self._specials
        c = k - 1
        starts = index.starts
        q0, n, dest = pieces[:, 1], pieces[:, 2], pieces[:, 3]
        j0 = np.searchsorted(starts, q0.astype(starts.dtype), side="right").astype(np.int64) - 1
        j1 = np.searchsorted(starts, (q0 + n - 1).astype(starts.dtype), side="right").astype(np.int64) - 1
        # Every document the piece touches, with its piece: its EOS, and its control code, may fall inside.
        counts = j1 - j0 + 1
        owner = np.repeat(np.arange(len(pieces)), counts)
        docs = np.repeat(j0, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        lo, hi = q0[owner], q0[owner] + n[owner]
        eos_q = starts[docs + 1].astype(np.int64) - 1
        inside = (eos_q >= lo) & (eos_q < hi)
        at = eos_q[inside] - lo[inside] + dest[owner[inside]]
        flat[at] = self.eos_id
        special[at] = True
        n_special = np.bincount(owner[inside], minlength=len(pieces))
        if c:
            head_q = starts[docs].astype(np.int64)
            inside = head_q >= lo  # a document's head is never past its piece's end (docs <= j1)
            at = head_q[inside] - lo[inside] + dest[owner[inside]]
            flat[at] = self._control_ids[unit][index.doc_kinds[docs[inside]]]
            special[at] = True
            n_special += np.bincount(owner[inside], minlength=len(pieces))
        # First body token at or after q0: every special before it is k per earlier document,
        # plus the head of document j0 when q0 is past it.
        first = q0 - k * j0 - c * (q0 > starts[j0].astype(np.int64))
        return first, n - n_special


def _copy_bodies(tokens: np.ndarray, first: np.ndarray, count: np.ndarray, at: np.ndarray, body: np.ndarray) -> None:
    """``body[at[i] : at[i] + count[i]] = tokens[first[i] : first[i] + count[i]]`` for every piece:
    slice copies for few or long pieces, one fancy-index gather for many short ones (a mixture's
    runs of small documents), the same result either way."""
    if len(first) > 16 and int(count.sum()) < 256 * len(first):
        within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        body[np.repeat(at, count) + within] = tokens[np.repeat(first, count) + within]
        return
    for t0, nb, a in zip(first.tolist(), count.tolist(), at.tolist(), strict=True):
        body[a : a + nb] = tokens[t0 : t0 + nb]


class _Mixture:
    """What a mixture keeps: per language, its runs of consecutive documents (``src``: where each
    starts in the global stream, or its first global row with windows; ``cum``: where it starts
    in the language's own stream or rows), the language's rows, and the weighted schedule."""

    def __init__(self, languages: list[str], src: list[list[np.ndarray]], length: list[list[np.ndarray]],
                 tokens: np.ndarray, weights: Mapping[str, float], window: int, windows: bool):
        self.languages = languages
        self.src = [np.concatenate(parts).astype(np.int64) for parts in src]
        self.cum = []
        for parts in length:  # one language at a time: the peak is one language's runs, not all of them
            cum = np.zeros(sum(len(x) for x in parts) + 1, np.int64)
            np.cumsum(np.concatenate(parts), out=cum[1:])
            self.cum.append(cum)
        self.tokens = tokens
        self.rows = np.array([int(c[-1]) if windows else int(c[-1]) // window for c in self.cum], np.int64)
        resolved = resolve_weights(weights, dict(zip(languages, self.rows.tolist(), strict=True)))
        self.schedule = MixtureSchedule(languages, resolved)
        drawn = self.schedule.slots > 0
        if (self.rows[drawn] == 0).any():  # a weight that rounds up from nothing: refused as resolve_weights does
            name = languages[int(np.flatnonzero(drawn & (self.rows == 0))[0])]
            raise ValueError(f"data.mixture: language {name!r} has no full row of block_size + 1 tokens")
        self.rows_per_epoch = int(self.rows[drawn].sum())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.src + self.cum) + self.schedule.schedule.nbytes + self.schedule.rank.nbytes

    def global_rows(self, lang: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Windows packing: the global row of each language row (every run is consecutive rows)."""
        out = np.empty(len(rows), np.int64)
        for L in np.unique(lang).tolist():
            sel = np.flatnonzero(lang == L)
            k = np.searchsorted(self.cum[L], rows[sel], side="right") - 1
            out[sel] = self.src[L][k] + rows[sel] - self.cum[L][k]
        return out

    def pieces(self, lang: np.ndarray, rows: np.ndarray, w: int, unit_base: np.ndarray) -> np.ndarray:
        """Concat packing: language rows as pieces ``(unit, position in the unit's stream, length,
        position in the flat output)``, sorted by output position; a row is ``w`` tokens of its
        language's stream, one piece per run it touches (a run never crosses a shard)."""
        out = []
        for L in np.unique(lang).tolist():
            sel = np.flatnonzero(lang == L)
            s, cum = rows[sel] * w, self.cum[L]
            k0 = np.searchsorted(cum, s, side="right") - 1
            k1 = np.searchsorted(cum, s + w - 1, side="right") - 1
            counts = k1 - k0 + 1
            owner = np.repeat(np.arange(len(sel)), counts)
            run = np.repeat(k0, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            lo = np.maximum(s[owner], cum[run])
            hi = np.minimum(s[owner] + w, cum[run + 1])
            start = self.src[L][run] + lo - cum[run]
            units = np.searchsorted(unit_base, start, side="right") - 1
            out.append(np.stack([units, start - unit_base[units], hi - lo, sel[owner] * w + lo - s[owner]], 1))
        pieces = np.concatenate(out).astype(np.int64)
        return pieces[np.argsort(pieces[:, 3], kind="stable")]


def _open_cache(cache, source, tokenizer_path) -> TokenCache:
    """A ``TokenCache`` as given, or opened (and checked fresh) from its folder."""
    if isinstance(cache, TokenCache):
        return cache
    if source is None or tokenizer_path is None:
        raise ValueError("data.token_cache: GlobalOrderLoader needs source= (the training shards) and "
                         "tokenizer_path= with a cache folder")
    shards = source if isinstance(source, ShardSource) else ShardSource(source)
    return TokenCache(os.fspath(cache), tokenizer_path, shards.paths)
