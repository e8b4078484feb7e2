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


class ShardError(ValueError):
    """A shard or one of its records is unreadable; the message names file and line."""


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


class _ZstdFrames(io.RawIOBase):
    """Decompress a stream of concatenated zstd frames, raising on a truncated last frame.

    ``zstandard``'s ``stream_reader`` returns a silent short read (often zero bytes) when the
    input stops inside a frame, so a half-copied shard would look valid but empty; here the
    end of input inside a frame is an error.
    """

    CHUNK = 1 << 20

    def __init__(self, raw):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = None  # decompressor of the frame in progress, None between frames
        self._buf = b""
        self._pos = 0  # read offset into _buf (slicing a large bytes object each read is quadratic)
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while self._pos >= len(self._buf) and not self._eof:
            self._buf, self._pos = b"", 0
            data = self._raw.read(self.CHUNK)
            if not data:
                self._eof = True
                if self._dobj is not None:
                    raise zstandard.ZstdError("truncated zstd stream: input ends inside a frame")
                return
            while data:
                if self._dobj is None:
                    self._dobj = self._dctx.decompressobj()
                self._buf += self._dobj.decompress(data)  # a few frames per chunk at most
                if self._dobj.eof:
                    data = self._dobj.unused_data
                    self._dobj = None
                else:
                    data = b""

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos : self._pos + n]
        self._pos += n
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


def _text_stream(path: str, raw) -> io.TextIOBase:
    if path.endswith((".zst", ".zstd")):
        reader = io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
        return io.TextIOWrapper(reader, encoding="utf-8", newline="\n")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", newline="\n")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="\n")


def iter_lines(
    path: str | os.PathLike,
    start_line: int = 0,
    *,
    fileobj: BinaryIO | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, raw_line)`` (1-based) from a shard, skipping ``start_line`` lines.

    A corrupt or truncated stream raises ``ShardError`` naming the file and the line at which
    reading failed. With ``fileobj`` the shard's bytes come from that open binary stream (a
    cluster engine that fetched the file itself) and ``path`` only names it and picks the
    decompressor from its suffix. ``progress(n)`` is called with the file bytes read, as they
    are read.
    """
    path = os.fspath(path)
    lineno = 0
    try:
        opened = contextlib.nullcontext(fileobj) if fileobj is not None else _open_binary(path)
        with opened as file:
            raw = file if progress is None else io.BufferedReader(_CountingReader(file, progress), 1 << 20)
            with _text_stream(path, raw) as stream:
                for lineno, line in enumerate(stream, start=1):  # noqa: B007 (used in except)
                    if lineno <= start_line:
                        continue
                    yield lineno, line
    except FileNotFoundError as err:
        raise ShardError(f"{path}: file not found") from err
    except (zstandard.ZstdError, OSError, EOFError, UnicodeDecodeError) as err:
        raise ShardError(
            f"{path}:{lineno + 1}: unreadable shard ({type(err).__name__}: {err})"
        ) from err


def parse_record(line: str, where: str) -> dict[str, Any]:
    """Parse one JSON line into a record, checking it has a string ``text``."""
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
) -> Iterator[dict[str, Any]]:
    """Yield records of one shard. Bad lines raise ``ShardError`` naming file:line, or are
    counted in ``bad`` and skipped when ``skip_bad`` is set. Blank lines are ignored.
    ``fileobj``: read the bytes from this stream instead of opening ``path`` (see ``iter_lines``)."""
    path = os.fspath(path)
    lines = iter_lines(path, start_line=start_line, fileobj=fileobj)
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
                bad.add("unreadable shard", str(err).split(": ", 1)[0])
            return
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield parse_record(line, where)
        except ShardError as err:
            if not skip_bad:
                raise
            if bad is not None:
                bad.add(str(err)[len(where) + 2 :], where)


def iter_dir_records(source, *, skip_bad: bool = False, bad: BadRecordCounter | None = None):
    """Yield records of every shard under ``source`` in sorted shard order."""
    for path in list_shards(source):
        yield from iter_records(path, skip_bad=skip_bad, bad=bad)


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
        line = json.dumps(record, ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        self._stream.write(data)
        self.count += 1
        self.bytes_written += len(data)

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
