"""Pre-tokenized token cache: tokenize every shard once, then train from token arrays.

    python -m data_processing.token_cache --data data/train --tokenizer TOK_DIR --out CACHE_DIR

The Rust BPE tokenizer bounds the live loader (0.3-0.7 M tokens/s on 2 cores, see
docs/benchmarks.md); reading cached token arrays is two orders of magnitude faster. As levanter
does, each shard is tokenized once (shards in parallel processes, with a progress bar) into::

    CACHE_DIR/tok-<sha256 of the tokenizer>[:16]/<shard name>-<sha256 of the shard path>[:16].npz

An entry holds, for every line of its shard (1-based; blank and bad lines included, so line
numbers stay the shard's): the document's text tokens (no EOS, no control code), its
``meta.language``, and for a bad line the reason. The loader addresses documents by
``(unit, line)`` exactly as it does in shards (``CachedShardSource``), so the document order,
host split, resume state and batches are those of the live path, bit for bit (tested).

What the cache accelerates: the plain stream, control codes (prepended from the cached language
when loading) and sliding windows (cut when loading). A fill-in-the-middle draw depends on the
epoch, so those documents (the ``fim_rate`` fraction) are still cut from their text and
tokenized when loading, their text read from the shard beside the cache; the rest come cached.

Safety: an entry is written under a temporary name and renamed into place once complete. It
records the tokenizer's hash and its shard's identity (path, size, modification time; not a
content hash, which would read every shard at every start). A changed shard is reported as
stale, a missing entry as missing (one line naming the shard and the command that builds it);
a damaged entry fails its zip CRC-32 or its shape checks when read.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_processing.shards import (
    MAX_RECORD_BYTES,
    BadRecordCounter,
    ShardError,
    is_blank,
    iter_lines,
    list_shards,
    parse_record,
    unreadable_reason,
)
from data_processing.sources import Document, Owned, ShardSource, count_bad, every_line, record_language
from data_processing.tokens import load_tokenizer_file, tokenizer_file
from data_processing.workers import WorkerDiedError, WorkerProcesses

CACHE_VERSION = 1
_BLANK, _BAD = -1, -2  # ``kinds`` of lines without a document; >= 0 is an index into ``languages``
_ENCODE_BATCH = 256  # documents per tokenizer call while building
_POLL_S = 0.2  # how often the build loop drains worker progress


class TokenCacheError(ValueError):
    """A token cache entry is missing, stale or damaged; the message names it and the fix."""


def tokenizer_hash(tokenizer_path: str | os.PathLike) -> str:
    """sha256 of the tokenizer's canonical JSON (key order and whitespace do not matter)."""
    path = tokenizer_file(tokenizer_path)
    with open(path, encoding="utf-8") as f:
        canonical = json.dumps(json.load(f), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def shard_identity(path: str) -> dict[str, Any]:
    """``{"path", "size", "mtime"}`` of a shard: what decides whether its cache entry is fresh."""
    if "://" in path:
        import fsspec

        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
        stamp = next((info[k] for k in ("mtime", "updated", "LastModified", "last_modified", "etag", "md5Hash")
                      if info.get(k) is not None), None)
        return {"path": path, "size": int(info["size"]), "mtime": str(stamp)}
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise ShardError(f"{path}: file not found") from err
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": str(st.st_mtime_ns)}


def entry_path(cache_dir: str | os.PathLike, tok_hash: str, shard: str) -> Path:
    """Where the entry of ``shard`` for the tokenizer with hash ``tok_hash`` lives."""
    where = shard if "://" in shard else os.path.abspath(shard)
    name = os.path.basename(shard.rstrip("/")).split(".")[0] or "shard"
    digest = hashlib.sha256(where.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"tok-{tok_hash[:16]}" / f"{name}-{digest}.npz"


def build_command(shard: str, tokenizer_path: str, cache_dir: str | os.PathLike) -> str:
    """The CLI call that (re)builds the entry of ``shard``, for error messages."""
    return f"python -m data_processing.token_cache --data {shard} --tokenizer {tokenizer_path} --out {cache_dir}"


# -- building -----------------------------------------------------------------------------------


def _encode_shard(shard: str, tokenizer, vocab_size: int, report: Callable[[int, int], None], *,
                  skip_bad: bool = True, max_record_bytes: int | None = MAX_RECORD_BYTES) -> dict[str, Any]:
    """Tokenize every document of ``shard``: the arrays and metadata of its entry.
    ``report(file_bytes, tokens)`` is called as the shard is read and tokenized. A bad line or
    an unreadable (corrupt, truncated, empty) shard raises ``ShardError`` naming it, or, with
    ``skip_bad``, is recorded in the entry, where the loader finds it as it would in the shard."""
    kinds: list[int] = []
    languages: list[str | None] = [None]
    language_index: dict[str | None, int] = {None: 0}
    bad: dict[str, str] = {}
    unreadable = unreadable_as = None
    per_line: list[np.ndarray] = []  # token counts, one array per encoded batch
    pieces: list[np.ndarray] = []
    batch: list[str] = []
    batch_lines: list[int] = []

    def flush() -> None:
        nonlocal batch, batch_lines
        if not batch:
            return
        ids = [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
        counts = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        pieces.append(np.concatenate(ids))
        per_line.append(np.stack([np.asarray(batch_lines, np.int64), counts]))
        report(0, int(counts.sum()))
        batch, batch_lines = [], []

    lines = iter_lines(shard, progress=lambda n: report(n, 0), max_record_bytes=max_record_bytes)
    while True:
        try:
            lineno, line = next(lines)
        except StopIteration:
            break
        except ShardError as err:
            if not skip_bad:
                raise
            # Replayed when loading: the live reader stops (or raises) at the same place.
            unreadable, unreadable_as = str(err), unreadable_reason(err)
            break
        if is_blank(line):
            kinds.append(_BLANK)
            continue
        where = f"{shard}:{lineno}"
        try:
            record = parse_record(line, where)
        except ShardError as err:
            if not skip_bad:
                raise
            kinds.append(_BAD)
            bad[str(lineno)] = str(err)[len(where) + 2 :]
            continue
        language = record_language(record)
        if language not in language_index:
            language_index[language] = len(languages)
            languages.append(language)
        kinds.append(language_index[language])
        batch.append(record["text"])
        batch_lines.append(lineno)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    flush()
    num_lines = len(kinds)
    lengths = np.zeros(num_lines, np.int64)
    for lines_counts in per_line:
        lengths[lines_counts[0] - 1] = lines_counts[1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32  # halves the cache for GPT-2-size vocabularies
    return {
        "tokens": tokens.astype(dtype),
        "offsets": offsets,
        "kinds": np.asarray(kinds, np.int16),
        "meta": {
            "num_lines": num_lines,
            "num_docs": int(sum(k >= 0 for k in kinds)),
            "num_tokens": int(offsets[-1]),
            "vocab_size": vocab_size,
            "languages": languages,
            "bad": bad,
            "unreadable": unreadable,
            "unreadable_reason": unreadable_as,  # how the live reader counts it ("empty file", ...)
        },
    }


def _write_entry(entry: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write an entry atomically: a temporary file in the same folder, renamed when complete."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            meta_bytes = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
            np.savez(f, meta=meta_bytes, **arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a cache is shared data
        os.replace(tmp, entry)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_meta(entry: Path) -> dict[str, Any] | None:
    """The metadata of an entry (reads only that member), or None if there is no entry."""
    try:
        with np.load(entry) as z:
            return json.loads(bytes(z["meta"]).decode("utf-8"))
    except FileNotFoundError:
        return None
    except Exception as err:  # a damaged file: zipfile, numpy and json all raise their own errors
        raise TokenCacheError(f"{entry}: damaged token cache entry ({type(err).__name__}: {err}); "
                              "delete it and build it again") from err


def _is_fresh(meta: dict[str, Any] | None, identity: dict[str, Any], tok_hash: str) -> bool:
    return (meta is not None and meta.get("version") == CACHE_VERSION and meta.get("tokenizer_sha256") == tok_hash
            and meta.get("shard") == identity)


# Builder processes: the tokenizer is loaded once per process by the initializer.
_builder: dict[str, Any] = {}


def _init_builder(tokenizer_path: str, progress_queue, sequential: bool, skip_bad: bool = True,
                  max_record_bytes: int | None = MAX_RECORD_BYTES) -> None:
    if sequential:
        # Several builder processes already use every core: Rust threads in each would only
        # contend (one process per shard measured ~10% faster than one process with threads).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer, _ = load_tokenizer_file(tokenizer_path)
    _builder.update(tokenizer=tokenizer, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
                    queue=progress_queue, tok_hash=tokenizer_hash(tokenizer_path), skip_bad=skip_bad,
                    max_record_bytes=max_record_bytes)


def _build_one(shard: str, entry: Path, force: bool) -> tuple[str, int, bool]:
    """Build ``shard``'s entry unless a fresh one exists (another host may have just written it).
    Returns ``(shard, tokens, built)``."""
    tok_hash = _builder["tok_hash"]
    identity = shard_identity(shard)  # before reading: a shard changed meanwhile is then stale
    if not force:
        with contextlib.suppress(TokenCacheError):
            meta = read_meta(entry)
            if _is_fresh(meta, identity, tok_hash) and (_builder["skip_bad"] or not _first_bad(meta)):
                return shard, int(meta["num_tokens"]), False
    queue = _builder["queue"]
    report = (lambda b, t: queue.put((b, t))) if queue is not None else _builder["report"]
    out = _encode_shard(shard, _builder["tokenizer"], _builder["vocab_size"], report, skip_bad=_builder["skip_bad"],
                        max_record_bytes=_builder["max_record_bytes"])
    meta = {"version": CACHE_VERSION, "tokenizer_sha256": tok_hash, "shard": identity, **out.pop("meta")}
    _write_entry(entry, out, meta)
    return shard, int(meta["num_tokens"]), True


def _first_bad(meta: dict[str, Any]) -> str | None:
    """The error of an entry's first bad line (or of its unreadable end), None for a clean shard."""
    shard = meta["shard"]["path"]
    if meta.get("bad"):
        line = min(meta["bad"], key=int)
        return f"{shard}:{line}: {meta['bad'][line]}"
    return meta.get("unreadable") or None


def _count_entry_bad(meta: dict[str, Any], counter: BadRecordCounter) -> None:
    """Add an entry's bad lines (and an unreadable end) to ``counter``, by reason."""
    shard = meta["shard"]["path"]
    for line, reason in sorted(meta.get("bad", {}).items(), key=lambda kv: int(kv[0])):
        counter.add(reason, f"{shard}:{line}")
    if meta.get("unreadable"):
        counter.add(meta.get("unreadable_reason") or "unreadable shard", meta["unreadable"])


@dataclass
class BuildSummary:
    """What ``build_cache`` did; ``bad_records`` counts the bad lines skipped (``skip_bad``) in
    all of the cache's entries, by reason."""

    shards: int
    built: int
    reused: int
    tokens_built: int
    seconds: float
    folder: str
    bad_records: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rate = self.tokens_built / self.seconds if self.seconds > 0 else 0.0
        return {"shards": self.shards, "built": self.built, "reused": self.reused, "tokens_built": self.tokens_built,
                "seconds": round(self.seconds, 2), "tokens_per_second": round(rate), "folder": self.folder,
                "bad_records": self.bad_records}


def build_cache(
    source,
    tokenizer_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    host: tuple[int, int] = (0, 1),
    skip_bad: bool = False,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> BuildSummary:
    """Tokenize every shard of ``source`` whose entry is missing or stale (all with ``force``).

    A corrupt, truncated or empty shard, or a bad line (not JSON, no text, longer than
    ``max_record_bytes``), raises ``ShardError`` naming it, so that a cache is never built over
    data the loader would refuse; with ``skip_bad`` they are recorded in the entries (the loader
    then counts and skips them as it does in the shards) and counted in ``bad_records``.

    Shards are built in ``workers`` processes (default: all cores; 1 = in this process, the
    tokenizer using its own threads). ``host = (i, P)``: host ``i`` of ``P`` starts at the
    ``i/P`` point of the list, so that hosts sharing one cache folder build different shards
    first; an entry another process finished meanwhile is not built again. Entries are written
    atomically.
    """
    shards = list(source.paths) if isinstance(source, ShardSource) else list_shards(source)
    tokenizer_path = tokenizer_file(tokenizer_path)
    tok_hash = tokenizer_hash(tokenizer_path)
    entries = {s: entry_path(cache_dir, tok_hash, s) for s in shards}
    t0 = time.perf_counter()
    todo = []
    for shard in shards:
        try:
            meta = read_meta(entries[shard])
            fresh = not force and _is_fresh(meta, shard_identity(shard), tok_hash)
        except TokenCacheError:
            fresh = False  # damaged: rebuilt below
        if fresh and not skip_bad and _first_bad(meta):
            raise ShardError(_first_bad(meta))  # built earlier with skip_bad; this build refuses it
        if not fresh:
            todo.append(shard)
    k = host[0] * len(todo) // max(host[1], 1)
    todo = todo[k:] + todo[:k]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    built = tokens = 0
    from tqdm import tqdm

    bar = tqdm(total=sum(_size(s) for s in todo), desc="token cache", unit="B", unit_scale=True,
               disable=not (progress and todo), dynamic_ncols=True)
    tokens_seen = 0

    def advance(nbytes: int, ntokens: int) -> None:
        nonlocal tokens_seen
        tokens_seen += ntokens
        bar.update(nbytes)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(tokens=f"{tokens_seen / 1e6:.1f}M", tok_s=f"{tokens_seen / elapsed / 1e3:.0f}k", refresh=False)

    try:
        if workers == 1:
            _init_builder(tokenizer_path, None, False, skip_bad, max_record_bytes)
            _builder["report"] = advance
            for shard in todo:
                _, n, fresh_built = _build_one(shard, entries[shard], force)
                built, tokens = built + fresh_built, tokens + n * fresh_built
        else:
            built, tokens = _build_in_pool(todo, entries, tokenizer_path, workers, force, advance,
                                           (skip_bad, max_record_bytes))
    finally:
        bar.close()
        _builder.clear()
    bad = BadRecordCounter()
    for shard in shards:
        meta = read_meta(entries[shard])
        if meta is not None:
            _count_entry_bad(meta, bad)
    return BuildSummary(shards=len(shards), built=built, reused=len(shards) - built, tokens_built=tokens,
                        seconds=time.perf_counter() - t0, folder=str(Path(cache_dir) / f"tok-{tok_hash[:16]}"),
                        bad_records=dict(bad.counts))


def _build_in_pool(todo, entries, tokenizer_path, workers, force, advance, reading) -> tuple[int, int]:
    """``reading``: ``(skip_bad, max_record_bytes)`` for every builder."""
    # spawn, not fork: callers (the trainer) run JAX threads, which fork would break.
    progress_queue = multiprocessing.get_context("spawn").Queue()
    built = tokens = 0
    pool = WorkerProcesses(workers, _init_builder, (tokenizer_path, progress_queue, True, *reading), context="spawn")
    try:
        for shard in todo:
            pool.submit(_build_one, shard, entries[shard], force)
        for _ in todo:
            while True:
                with contextlib.suppress(queue.Empty):
                    while True:
                        advance(*progress_queue.get(timeout=_POLL_S))
                try:
                    _, n, fresh_built = pool.result(timeout=0)
                    break
                except TimeoutError:
                    continue
                except WorkerDiedError as e:
                    raise RuntimeError(f"a token cache builder process died (killed for memory?): {e}") from None
            built, tokens = built + fresh_built, tokens + n * fresh_built
    finally:
        pool.close()
    with contextlib.suppress(queue.Empty):
        while True:
            advance(*progress_queue.get_nowait())
    return built, tokens


def _size(shard: str) -> int:
    with contextlib.suppress(Exception):
        return int(shard_identity(shard)["size"])
    return 0


# -- reading ------------------------------------------------------------------------------------


class CachedUnit:
    """The loaded entry of one shard: token ranges and kinds by line."""

    def __init__(self, entry: Path, shard: str):
        try:
            with np.load(entry) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                # Reading a member to its end checks its zip CRC-32: flipped bits raise here.
                self.tokens, self.offsets, self.kinds = z["tokens"], z["offsets"], z["kinds"]
        except FileNotFoundError as err:
            raise TokenCacheError(f"{entry}: token cache entry of {shard} disappeared") from err
        except Exception as err:
            raise TokenCacheError(f"{entry}: damaged token cache entry ({type(err).__name__}: {err}); "
                                  "delete it and build it again") from err
        n = int(meta["num_lines"])
        ok = (self.offsets.shape == (n + 1,) and self.kinds.shape == (n,) and int(self.offsets[-1]) == len(self.tokens)
              and (len(self.tokens) == 0 or int(self.tokens.max()) < int(meta["vocab_size"])))
        if not ok:
            raise TokenCacheError(f"{entry}: damaged token cache entry (arrays do not match their metadata); "
                                  "delete it and build it again")
        self.entry, self.shard, self.meta, self.num_lines = entry, shard, meta, n
        self.languages: list[str | None] = meta["languages"]

    def tokens_at(self, line: int) -> np.ndarray:
        """The cached text tokens of the document on ``line`` (1-based)."""
        if not 0 < line <= self.num_lines or self.kinds[line - 1] < 0:
            raise TokenCacheError(f"{self.entry}: no cached document for {self.shard}:{line}; the shard changed "
                                  "since the cache was built: build it again")
        return self.tokens[self.offsets[line - 1] : self.offsets[line]]

    def iter_lines(
        self, start_line: int, owned: Owned, skip_bad: bool, bad: BadRecordCounter | None
    ) -> Iterator[tuple[int, Document | None]]:
        """What ``ShardSource.iter_unit`` yields for the shard, with tokens instead of text."""
        kinds, offsets, tokens, languages = self.kinds.tolist(), self.offsets, self.tokens, self.languages
        for line in range(start_line + 1, self.num_lines + 1):
            kind = kinds[line - 1]
            if kind == _BLANK or not owned(line):
                yield line, None
            elif kind == _BAD:
                # As the live reader: bad lines raise, or are counted and skipped.
                where, reason = f"{self.shard}:{line}", self.meta["bad"][str(line)]
                if not skip_bad:
                    raise ShardError(f"{where}: {reason}")
                count_bad(bad, reason, where)
                yield line, None
            else:
                yield line, Document(None, languages[kind], (), tokens[offsets[line - 1] : offsets[line]])
        unreadable = self.meta.get("unreadable")
        if unreadable:
            if not skip_bad:
                raise ShardError(unreadable)
            count_bad(bad, self.meta.get("unreadable_reason") or "unreadable shard", unreadable)


class TokenCache:
    """The entries of ``shards`` for one tokenizer; every entry is checked present and fresh here,
    so a stale cache is reported before training starts, not hours into it."""

    def __init__(self, cache_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, shards: list[str]):
        self.cache_dir = str(cache_dir)
        self.tokenizer_path = tokenizer_file(tokenizer_path)
        self.tok_hash = tokenizer_hash(self.tokenizer_path)
        self.shards = list(shards)
        self.entries = [entry_path(cache_dir, self.tok_hash, s) for s in self.shards]
        for shard, entry in zip(self.shards, self.entries, strict=True):
            meta = read_meta(entry)
            fix = build_command(shard, os.path.dirname(self.tokenizer_path), cache_dir)
            if meta is None:
                raise TokenCacheError(f"{entry}: no token cache entry for {shard} (build it: {fix})")
            if meta.get("version") != CACHE_VERSION:
                raise TokenCacheError(f"{entry}: token cache format {meta.get('version')}, expected {CACHE_VERSION} "
                                      f"(build it again: {fix} --force)")
            if not _is_fresh(meta, shard_identity(shard), self.tok_hash):
                raise TokenCacheError(f"{entry}: stale token cache entry: {shard} changed (size or modification "
                                      f"time) since it was built (build it again: {fix})")

    def load(self, unit: int) -> CachedUnit:
        """Read one shard's entry (whole: the loader reads a unit front to back)."""
        return CachedUnit(self.entries[unit], self.shards[unit])


class CachedShardSource:
    """A ``ShardSource`` whose documents carry their cached tokens (``Document.tokens``).

    Same units, lines, ownership and bad-record behaviour as the shards themselves. With
    ``with_text`` (fill-in-the-middle needs it) the shard is read alongside for the texts;
    otherwise the shards are not opened at all and ``Document.text`` is None.
    """

    def __init__(self, shards: ShardSource, cache: TokenCache, *, with_text: bool = False):
        if list(shards.paths) != cache.shards:
            raise ValueError("CachedShardSource: the cache was opened for other shards")
        self.shards = shards
        self.cache = cache
        self.with_text = with_text

    def __len__(self) -> int:
        return len(self.shards)

    def describe(self, unit: int) -> str:
        """Human-readable name of one unit (its shard), for error messages."""
        return self.shards.describe(unit)

    def iter_unit(
        self,
        unit: int,
        *,
        start_line: int = 0,
        owned: Owned = every_line,
        skip_bad: bool = False,
        bad: BadRecordCounter | None = None,
    ) -> Iterator[tuple[int, Document | None]]:
        """Yield ``(line, document)`` for lines after ``start_line``, as ``ShardSource.iter_unit``."""
        cached = self.cache.load(unit)
        if not self.with_text:
            yield from cached.iter_lines(start_line, owned, skip_bad, bad)
            return
        for line, doc in self.shards.iter_unit(unit, start_line=start_line, owned=owned, skip_bad=skip_bad, bad=bad):
            yield line, (None if doc is None else doc._replace(tokens=cached.tokens_at(line)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="shards: folders, files, globs or fsspec URLs")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json) the run trains with")
    p.add_argument("--out", required=True, help="cache folder (data.token_cache)")
    p.add_argument("--workers", type=int, default=None, help="builder processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="rebuild entries that are already fresh")
    p.add_argument("--skip-bad", action="store_true",
                   help="record and count bad lines and unreadable shards (the loader then skips them with "
                        "data.skip_bad) instead of stopping")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help=f"a line longer than this is a bad record (default {MAX_RECORD_BYTES})")
    args = p.parse_args(argv)
    if args.max_record_bytes < 1:
        p.error(f"--max-record-bytes {args.max_record_bytes}: must be >= 1")
    try:
        summary = build_cache(args.data, args.tokenizer, args.out, workers=args.workers, force=args.force,
                              skip_bad=args.skip_bad, max_record_bytes=args.max_record_bytes)
    except (ShardError, TokenCacheError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
