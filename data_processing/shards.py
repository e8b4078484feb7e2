"""Read and write Code Clippy / lm_dataformat shards: one JSON object per line.

A record is ``{"text": str, "meta": {...}}``. Reading accepts ``*.jsonl``, ``*.jsonl.gz`` and
``*.jsonl.zst`` (also ``*.json.zst`` and ``*.jsonl.zstd`` as lm_dataformat wrote them), from
local paths or any fsspec URL. Writing always goes to a temporary name beside the target and is
renamed into place only once the shard is complete, so a crash never leaves a half-written file
under a final name.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

SHARD_SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".json.zst", ".jsonl.gz", ".jsonl")


# Longest record line read (UTF-8 bytes, newline excluded). Code corpora cap files far lower
# (Codex: 1 MB, The Stack: 1 MB, ingest: 8 MB); 10 MB leaves room for JSON escaping while one
# runaway line (a 181 MB data blob took dedup to 7.8 GB) can no longer take a machine's memory.
MAX_RECORD_BYTES = 10 << 20
_SKIP_PIECE = 1 << 20  # an over-long line is read past in pieces of this size, never held whole


class ShardError(ValueError):
    """A shard or one of its records is unreadable; the message names file and line."""


class EmptyShardError(ShardError):
    """A shard file with no bytes at all (an interrupted copy, a placeholder)."""


def unreadable_reason(err: ShardError) -> str:
    """How a shard that ended in ``err`` is counted by ``BadRecordCounter``."""
    return "empty file" if isinstance(err, EmptyShardError) else "unreadable shard"


@dataclass(frozen=True)
class BadLine:
    """Yielded by ``iter_lines`` in place of a line that cannot hold a record: one longer than
    the record size limit (never read into memory whole) or one that is not UTF-8. The rest of
    the shard stays readable; ``parse_record`` raises for it, so callers count or refuse it as
    any other bad record."""

    reason: str


def is_blank(line: str | BadLine) -> bool:
    """True for a line with nothing but whitespace (ignored by every reader)."""
    return isinstance(line, str) and not line.strip()


@dataclass
class BadRecordCounter:
    """Counts records skipped with ``skip_bad=True``, by reason, for reports."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def is_shard(path: str | os.PathLike) -> bool:
    """True when the file name has one of the shard suffixes."""
    return str(path).endswith(SHARD_SUFFIXES)


def list_shards(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Sorted shard paths under a directory (recursively), a glob/URL, or an explicit list.

    Raises ``ShardError`` when nothing is found, so an empty data directory is reported clearly
    instead of producing an empty (or endless) stream.
    """
    if not isinstance(source, (str, os.PathLike)):
        paths: list[str] = []
        for item in source:
            paths.extend(list_shards(item))
        return sorted(set(paths))
    text = os.fspath(source)
    if "://" in text:
        import fsspec

        fs, _, roots = fsspec.get_fs_token_paths(text)
        found: list[str] = []
        for root in roots:
            if fs.isdir(root):
                found.extend(p for p in fs.find(root) if is_shard(p))
            elif is_shard(root):
                found.append(root)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        paths = sorted(f"{protocol}://{p}" if "://" not in p else p for p in found)
    else:
        p = Path(text)
        if p.is_dir():
            paths = sorted(str(f) for f in p.rglob("*") if f.is_file() and is_shard(f))
        elif p.is_file():
            paths = [str(p)]
        else:
            import glob

            paths = sorted(f for f in glob.glob(text, recursive=True) if os.path.isfile(f) and is_shard(f))
    if not paths:
        raise ShardError(f"{text}: no shards found (expected files ending in {', '.join(SHARD_SUFFIXES)})")
    return paths


def _open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
_FCS_BYTES = (0, 2, 4, 8)  # frame content size field by FCS flag (flag 0 with single segment: 1)
_DICT_ID_BYTES = (0, 1, 2, 4)


class _FrameWalker:
    """Follows the frame and block structure of a zstd stream (RFC 8878: magic numbers, frame
    headers, block headers and sizes, checksums, skippable frames) without decompressing, so
    that a stream cut inside a frame can be told from a complete one: ``zstandard``'s
    ``stream_reader`` returns a silent short read (often zero bytes) when the input stops
    inside a frame, and a half-copied shard would look valid but smaller."""

    def __init__(self) -> None:
        self._state, self._need, self._hold, self._skip = "magic", 4, b"", 0
        self._checksum = False
        # A malformed header is kept, not raised: the decoder reports it when it gets there, after
        # the lines before it (the walker reads ahead of the decoder).
        self.error: zstandard.ZstdError | None = None

    @property
    def at_boundary(self) -> bool:
        """True between frames: the bytes fed so far are whole frames."""
        return self._state == "magic" and not self._hold and not self._skip

    def feed(self, data: bytes) -> None:
        """Walk over the next compressed bytes; a malformed header stops the walk (``error``)."""
        i, n = 0, len(data)
        while i < n and self.error is None:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._hold), n - i)
            self._hold += data[i : i + k]
            i += k
            if len(self._hold) == self._need:
                fieldbytes, self._hold = self._hold, b""
                try:
                    self._advance(fieldbytes)
                except zstandard.ZstdError as err:
                    self.error = err

    def _expect(self, state: str, need: int, skip: int = 0) -> None:
        self._state, self._need, self._skip = state, need, skip

    def _advance(self, b: bytes) -> None:
        value = int.from_bytes(b, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif value in _SKIPPABLE:
                self._expect("skippable size", 4)
            else:
                raise zstandard.ZstdError(f"not a zstd frame (magic number {value:#010x})")
        elif self._state == "skippable size":
            self._expect("magic", 4, skip=value)
        elif self._state == "descriptor":
            fcs, single, self._checksum, dict_id = value >> 6, value >> 5 & 1, bool(value >> 2 & 1), value & 3
            rest = (0 if single else 1) + _DICT_ID_BYTES[dict_id] + (_FCS_BYTES[fcs] or single)
            self._expect("header", rest) if rest else self._expect("block", 3)
        elif self._state == "header":
            self._expect("block", 3)
        elif self._state == "block":
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            if kind == 3:
                raise zstandard.ZstdError("corrupt zstd block header (reserved block type)")
            payload = 1 if kind == 1 else size  # an RLE block holds one byte, repeated size times
            if not last:
                self._expect("block", 3, skip=payload)
            elif self._checksum:
                self._expect("checksum", 4, skip=payload)
            else:
                self._expect("magic", 4, skip=payload)
        else:  # checksum
            self._expect("magic", 4)


class _Tee:
    """A binary reader that shows every byte it reads to ``sink`` and notes the end of input."""

    def __init__(self, raw, sink: Callable[[bytes], None]):
        self._raw, self._sink, self.eof = raw, sink, False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._sink(data)
        else:
            self.eof = True
        return data


class _ZstdFrames(io.RawIOBase):
    """Decompress a stream of concatenated zstd frames, raising on a truncated last frame.

    Output comes in reads of the caller's size (``stream_reader``), so a line that decompresses
    to gigabytes from a few kilobytes is never expanded at once; ``_FrameWalker`` checks that
    the input ends between frames.
    """

    CHUNK = 1 << 17  # compressed bytes per read of the input

    def __init__(self, raw):
        self._walker = _FrameWalker()
        self._input = _Tee(raw, self._walker.feed)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._input, read_size=self.CHUNK, read_across_frames=True, closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._reader.readinto(b)
        if n == 0 and len(b):
            if not self._input.eof:
                raise zstandard.ZstdError("zstd decoder stopped before the end of the input")
            if self._walker.error is not None:
                raise self._walker.error
            if not self._walker.at_boundary:
                raise zstandard.ZstdError("truncated zstd stream: input ends inside a frame")
        return n


class _CountingReader(io.RawIOBase):
    """Passes reads through and reports how many file bytes were read: the progress of a long
    read, in the units of the file's size (compressed bytes for a compressed shard)."""

    def __init__(self, raw, report: Callable[[int], None]):
        self._raw = raw
        self._report = report

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        if n:
            self._report(n)
        return n


def _decompressed(path: str, raw) -> BinaryIO:
    """The shard's bytes, decompressed according to its suffix."""
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    return raw


def _lines(stream: BinaryIO, limit: int | None) -> Iterator[str | BadLine]:
    """The ``\n``-terminated lines of ``stream`` decoded as UTF-8. A line over ``limit`` bytes
    is read past in bounded pieces and comes as a ``BadLine``, so memory stays bounded by the
    limit whatever the input holds."""
    cap = None if limit is None else limit + 1
    while True:
        raw = stream.readline(cap) if cap else stream.readline()
        if not raw:
            return
        if cap and len(raw) == cap and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(_SKIP_PIECE)
            yield BadLine(f"record longer than the limit of {limit} bytes (max_record_bytes)")
            continue
        try:
            line: str | BadLine = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = BadLine("not valid UTF-8")
        raw = b""  # not held while the caller works on the line: one copy of a large record fewer
        yield line


def iter_lines(
    path: str | os.PathLike,
    start_line: int = 0,
    *,
    fileobj: BinaryIO | None = None,
    progress: Callable[[int], None] | None = None,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> Iterator[tuple[int, str | BadLine]]:
    """Yield ``(line_number, raw_line)`` (1-based) from a shard, skipping ``start_line`` lines.

    A corrupt or truncated stream, or an empty (0-byte) file, raises ``ShardError`` naming the
    file and the line at which reading failed. A line longer than ``max_record_bytes`` (None:
    no limit) or not UTF-8 comes as a ``BadLine`` and reading goes on after it. With
    ``fileobj`` the shard's bytes come from that open binary stream (a cluster engine that
    fetched the file itself) and ``path`` only names it and picks the decompressor from its
    suffix. ``progress(n)`` is called with the file bytes read, as they are read.
    """
    path = os.fspath(path)
    lineno = 0
    file_bytes = 0

    def count(n: int) -> None:
        nonlocal file_bytes
        file_bytes += n
        if progress is not None:
            progress(n)

    try:
        opened = contextlib.nullcontext(fileobj) if fileobj is not None else _open_binary(path)
        with opened as file:
            raw = io.BufferedReader(_CountingReader(file, count), 1 << 20)
            with _decompressed(path, raw) as stream:
                for lineno, line in enumerate(_lines(stream, max_record_bytes), start=1):  # noqa: B007
                    if lineno <= start_line:
                        continue
                    yield lineno, line
    except FileNotFoundError as err:
        raise ShardError(f"{path}: file not found") from err
    except (zstandard.ZstdError, OSError, EOFError) as err:
        raise ShardError(
            f"{path}:{lineno + 1}: unreadable shard ({type(err).__name__}: {err})"
        ) from err
    if file_bytes == 0:
        # Not even a compression header: a copy that never happened, not a shard without records.
        raise EmptyShardError(f"{path}: empty file (0 bytes), not a shard")


def parse_record(line: str | BadLine, where: str) -> dict[str, Any]:
    """Parse one JSON line into a record, checking it has a string ``text``."""
    if isinstance(line, BadLine):
        raise ShardError(f"{where}: {line.reason}")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ShardError(f"{where}: not a JSON object ({err.msg})") from err
    if not isinstance(record, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("text"), str):
        raise ShardError(f"{where}: record has no string field 'text'")
    meta = record.get("meta")
    if meta is None:
        record["meta"] = {}
    elif not isinstance(meta, dict):
        raise ShardError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return record


def iter_records(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    bad: BadRecordCounter | None = None,
    start_line: int = 0,
    fileobj: BinaryIO | None = None,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> Iterator[dict[str, Any]]:
    """Yield records of one shard. Bad lines (longer than ``max_record_bytes`` included) raise
    ``ShardError`` naming file:line, or are counted in ``bad`` and skipped when ``skip_bad`` is
    set; so is a corrupt, truncated or empty shard, which ends it. Blank lines are ignored.
    ``fileobj``: read the bytes from this stream instead of opening ``path`` (see ``iter_lines``)."""
    path = os.fspath(path)
    lines = iter_lines(path, start_line=start_line, fileobj=fileobj, max_record_bytes=max_record_bytes)
    while True:
        try:
            lineno, line = next(lines)
        except StopIteration:
            return
        except ShardError as err:
            # A corrupt stream ends the shard: nothing after it can be read.
            if not skip_bad:
                raise
            if bad is not None:
                bad.add(unreadable_reason(err), str(err).split(": ", 1)[0])
            return
        if is_blank(line):
            continue
        where = f"{path}:{lineno}"
        try:
            record = parse_record(line, where)
        except ShardError as err:
            if not skip_bad:
                raise
            if bad is not None:
                bad.add(str(err)[len(where) + 2 :], where)
            continue
        yield record


def iter_dir_records(source, *, skip_bad: bool = False, bad: BadRecordCounter | None = None,
                     max_record_bytes: int | None = MAX_RECORD_BYTES):
    """Yield records of every shard under ``source`` in sorted shard order (see ``iter_records``)."""
    for path in list_shards(source):
        yield from iter_records(path, skip_bad=skip_bad, bad=bad, max_record_bytes=max_record_bytes)


class ShardWriter:
    """Write records to ``path`` atomically: a temporary file in the same folder, renamed on
    ``close()``. Used as a context manager; an exception inside the block deletes the
    temporary file and leaves no shard behind.
    """

    def __init__(self, path: str | os.PathLike, *, level: int = 3):
        self.path = Path(path)
        if not is_shard(self.path):
            raise ValueError(f"{self.path}: shard names must end in one of {SHARD_SUFFIXES}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        # mkstemp creates 0600 files; shards are shared data, so use the usual umask'd mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        self._raw = os.fdopen(fd, "wb")
        name = str(self.path)
        if name.endswith((".zst", ".zstd")):
            self._stream = zstandard.ZstdCompressor(level=level).stream_writer(self._raw, closefd=False)
        elif name.endswith(".gz"):
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0)
        else:
            self._stream = self._raw
        self.count = 0
        self.bytes_written = 0

    def write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, ensure_ascii=False).encode("utf-8")
        self._stream.write(data)
        self._stream.write(b"\n")  # not concatenated: a large record is not copied once more
        self.count += 1
        self.bytes_written += len(data) + 1

    def close(self) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            if self._stream is not self._raw:
                self._stream.close()
            self._raw.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write all ``records`` to one shard atomically; returns the record count."""
    with ShardWriter(path) as writer:
        for record in records:
            writer.write(record)
    return writer.count


class ShardSetWriter:
    """Write a stream of records as numbered shards ``{prefix}-00000.jsonl.zst`` in ``out_dir``,
    starting a new shard once the current one holds ``max_bytes`` (uncompressed) or
    ``max_records``. Each shard is written atomically by ``ShardWriter``.

    ``close()`` also deletes ``{prefix}-*`` shards left by an earlier, larger or interrupted run
    with the same output folder, so a rerun with the same arguments ends with exactly the shards
    it wrote and nothing stale beside them.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        *,
        max_bytes: int = 64 << 20,
        max_records: int | None = None,
        suffix: str = ".jsonl.zst",
    ):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.suffix = suffix
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.paths: list[str] = []
        self.count = 0
        self.bytes_written = 0
        self._current: ShardWriter | None = None

    def _roll(self) -> ShardWriter:
        if self._current is not None:
            self._current.close()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}{self.suffix}"
        self.paths.append(str(path))
        self._current = ShardWriter(path)
        return self._current

    def write(self, record: dict[str, Any]) -> None:
        writer = self._current
        if (
            writer is None
            or writer.bytes_written >= self.max_bytes
            or (self.max_records is not None and writer.count >= self.max_records)
        ):
            writer = self._roll()
        before = writer.bytes_written
        writer.write(record)
        self.count += 1
        self.bytes_written += writer.bytes_written - before

    def close(self) -> list[str]:
        """Finish the last shard, remove stale shards of this prefix; returns the shard paths."""
        if self._current is not None:
            self._current.close()
            self._current = None
        keep = {Path(p).name for p in self.paths}
        if self.out_dir.is_dir():
            for old in self.out_dir.glob(f"{self.prefix}-*{self.suffix}"):
                if old.name not in keep:
                    old.unlink()
        return list(self.paths)

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
