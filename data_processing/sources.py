"""Document sources for the loader: shard files, or a Hugging Face ``datasets`` stream.

A source is a sequence of *units* (a shard file, or one shard of an HF stream) and each unit is a
sequence of numbered lines (1-based). The loader addresses a document by ``(unit, line)``,
which is what makes its state small: it can re-read any document by position instead of
storing text. ``iter_unit`` yields ``(line, Document | None)`` for every line so the caller can
track its position; ``None`` stands for a line that is blank, bad (and skipped) or owned by
another host. Ownership is decided *before* parsing so that hosts skip the JSON work for the
documents they do not own, and ``owned`` is called as each line is reached, never ahead: the
document stream reads several units interleaved and decides ownership from how many lines it
has read in all (``docstream``).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

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

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

Owned = Callable[[int], bool]


class Document(NamedTuple):
    """One document as the loader sees it: its text, its language (``meta.language``; used for
    control codes), ``key``, its position ``(epoch, unit, line)`` once the document stream
    has placed it (seeds per-document randomness such as fill-in-the-middle, so that it is the
    same after a restore), and ``tokens``, its text already tokenized when it comes from a token
    cache (``data_processing.token_cache``; ``text`` is then None unless FIM needs it)."""

    text: str | None
    language: str | None = None
    key: tuple[int, ...] = ()
    tokens: np.ndarray | None = None


def record_language(record: dict) -> str | None:
    """The record's language (``meta.language``, else a top-level ``language``), or None."""
    meta = record.get("meta")
    language = meta.get("language") if isinstance(meta, dict) else None
    if language is None:
        language = record.get("language")
    return language if isinstance(language, str) else None


def every_line(_line: int) -> bool:
    """The line filter that keeps every line (one host, or whole shards per host)."""
    return True


class ShardSource:
    """``*.jsonl[.zst|.gz]`` shards under a directory, a glob, an fsspec URL or a list of them.
    A line longer than ``max_record_bytes`` is a bad record (never read into memory whole)."""

    def __init__(self, source, *, max_record_bytes: int | None = MAX_RECORD_BYTES):
        self.max_record_bytes = max_record_bytes
        text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        if text is not None and "://" not in text and os.path.isabs(text) and glob.has_magic(text):
            # list_shards globs relative to the working directory only; expand absolute globs here.
            matches = sorted(glob.glob(text, recursive=True))
            source = matches or text  # no match: let list_shards report "no shards found"
        self.paths = list_shards(source)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, unit: int) -> str:
        """Human-readable name of one unit, for error messages."""
        return self.paths[unit]

    def iter_unit(
        self,
        unit: int,
        *,
        start_line: int = 0,
        owned: Owned = every_line,
        skip_bad: bool = False,
        bad: BadRecordCounter | None = None,
    ) -> Iterator[tuple[int, Document | None]]:
        """Yield ``(line, document)`` for lines after ``start_line``; the document is None for lines
        that are not ``owned``, blank, or bad and skipped. Bad lines raise ``ShardError``
        naming file:line unless ``skip_bad``."""
        path = self.paths[unit]
        lines = iter_lines(path, start_line=start_line, max_record_bytes=self.max_record_bytes)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                return
            except ShardError as err:
                # A corrupt compressed stream ends the shard: nothing after it is readable.
                if not skip_bad:
                    raise
                count_bad(bad, unreadable_reason(err), str(err))
                return
            if not owned(lineno) or is_blank(line):
                yield lineno, None
                continue
            where = f"{path}:{lineno}"
            try:
                record = parse_record(line, where)
            except ShardError as err:
                if not skip_bad:
                    raise
                count_bad(bad, str(err)[len(where) + 2 :], where)
                yield lineno, None
                continue
            yield lineno, Document(record["text"], record_language(record))


# Builders of ``load_dataset`` that read local or remote files the caller names; anything else
# is a hub dataset id, which needs ``allow_hub=True`` so that no test or run downloads by accident.
_FILE_BUILDERS = {"json", "parquet", "csv", "text", "arrow"}


class HFDatasetSource:
    """A Hugging Face ``datasets`` stream (``load_dataset(..., streaming=True)``), one unit per
    shard of the stream (``IterableDataset.n_shards``, e.g. one per data file): unit ``i`` is
    ``ds.shard(n_shards, i)``, so the document stream interleaves them and splits them between
    hosts like shard files.

    Example: ``HFDatasetSource("json", data_files="data/*.jsonl")`` or
    ``HFDatasetSource("parquet", data_files=[...])``; hub ids such as
    ``HFDatasetSource("codeparrot/github-code", allow_hub=True)``. Positions are example
    indices within a unit, so resuming re-streams that unit up to the saved position
    (``IterableDataset.skip``).
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        data_files=None,
        split: str = "train",
        text_field: str = "text",
        allow_hub: bool = False,
        **load_kwargs,
    ):
        if path not in _FILE_BUILDERS and not allow_hub:
            raise ValueError(
                f"HFDatasetSource({path!r}): not one of the file builders {sorted(_FILE_BUILDERS)}; "
                "pass allow_hub=True to stream a dataset from the Hugging Face hub"
            )
        if path in _FILE_BUILDERS and data_files is None:
            raise ValueError(f"HFDatasetSource({path!r}) needs data_files")
        self.path = path
        self.name = name
        self.data_files = data_files
        self.split = split
        self.text_field = text_field
        self.load_kwargs = load_kwargs
        self._ds = None

    def __len__(self) -> int:
        """The stream's shards (resolves the data files once)."""
        return max(1, int(self._dataset().n_shards))

    def describe(self, unit: int) -> str:
        """Human-readable name of the stream (and the unit, if it has several), for error messages."""
        name = f"datasets:{self.path}" + (f"[{self.name}]" if self.name else "") + f"/{self.split}"
        return name if len(self) == 1 else f"{name}#shard{unit}of{len(self)}"

    def _dataset(self):
        if self._ds is not None:
            return self._ds
        from datasets import load_dataset  # heavy import, only when this source is used

        # Built once: resolving data files is slow, and the streaming dataset can be re-iterated.
        self._ds = load_dataset(
            self.path,
            self.name,
            data_files=self.data_files,
            split=self.split,
            streaming=True,
            **self.load_kwargs,
        )
        return self._ds

    def _unit_dataset(self, unit: int):
        """The stream of one unit: the whole stream if it has one shard, else its ``unit``-th."""
        ds = self._dataset()
        count = len(self)
        if not 0 <= unit < count:
            raise IndexError(f"{self.describe(0)}: unit {unit} of {count}")
        return ds if count == 1 else ds.shard(num_shards=count, index=unit)

    def iter_unit(
        self,
        unit: int,
        *,
        start_line: int = 0,
        owned: Owned = every_line,
        skip_bad: bool = False,
        bad: BadRecordCounter | None = None,
    ) -> Iterator[tuple[int, Document | None]]:
        """Yield ``(index, document)`` (1-based) for examples after ``start_line``."""
        ds = self._unit_dataset(unit)
        if start_line:
            ds = ds.skip(start_line)
        where_prefix = self.describe(unit)
        for index, example in enumerate(ds, start=start_line + 1):
            if not owned(index):
                yield index, None
                continue
            text = example.get(self.text_field)
            if not isinstance(text, str):
                where = f"{where_prefix}:{index}"
                message = f"example has no string field {self.text_field!r}"
                if not skip_bad:
                    raise ShardError(f"{where}: {message}")
                count_bad(bad, message, where)
                yield index, None
                continue
            yield index, Document(text, record_language(example))


def count_bad(bad: BadRecordCounter | None, reason: str, where: str) -> None:
    logger.warning("skipping bad input at %s: %s", where, reason)
    if bad is not None:
        bad.add(reason, where)


def make_source(source, *, max_record_bytes: int | None = MAX_RECORD_BYTES) -> ShardSource | HFDatasetSource:
    """Wrap a dir / glob / URL / list of shards as a ``ShardSource``; pass source objects through."""
    if isinstance(source, (ShardSource, HFDatasetSource)):
        return source
    return ShardSource(source, max_record_bytes=max_record_bytes)
