"""Ingest: turn local source trees (or a Hugging Face ``datasets`` source) into shards.

Each folder at ``depth`` below a source root is one repository (``depth=1``: every top-level
folder; ``depth=2``: ``owner/repo`` layouts). Files sitting above that depth belong to one
repository named ``<root>-root``. Every record carries its *own* file's path, unlike Code Clippy
where all files of a repository got the same ``file_name`` (its issue #71).

Skipped files are counted by reason (``binary``, ``undecodable``, ``lock_file``, ``minified``,
``unknown_language``, ``too_large``, ``unreadable``, ``empty``); pruned folders are counted as
``vendored_dir`` and ``symlink_loop``.

    python -m data_processing.ingest SRC [SRC ...] --out DIR [--depth 1]
    python -m data_processing.ingest --hf-data-files the_stack_part.parquet --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_processing import licenses, stack_v2
from data_processing.languages import detect_language
from data_processing.shards import (
    MAX_RECORD_BYTES,
    BadRecordCounter,
    ShardError,
    ShardSetWriter,
    iter_dir_records,
)

# Folders that hold someone else's code or build output: training on them mostly duplicates
# popular libraries (and their minified builds) many times over.
VENDORED_DIRS = frozenset({
    "node_modules", "bower_components", "vendor", "vendors", "third_party", "thirdparty", "3rdparty",
    "external", "site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", ".tox", ".nox",
    ".venv", "venv", ".mypy_cache", ".pytest_cache", "build", "dist", "target", ".idea", ".vscode",
})
LOCK_FILES = frozenset({
    "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "Cargo.lock", "poetry.lock", "Pipfile.lock",
    "composer.lock", "Gemfile.lock", "go.sum", "mix.lock", "Podfile.lock", "uv.lock", "flake.lock",
})
BINARY_PROBE_BYTES = 8192
DEFAULT_MAX_FILE_BYTES = 8 << 20  # ingest hard cap; the size *filter* (1 MB) comes later


@dataclass
class IngestStats:
    """What ingest kept and skipped; ``as_dict()`` is what goes into the reports."""

    files_seen: int = 0
    files_kept: int = 0
    bytes_kept: int = 0
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    languages: dict[str, dict[str, int]] = field(default_factory=dict)
    repositories: set[str] = field(default_factory=set)

    def skip(self, reason: str, nbytes: int = 0) -> None:
        entry = self.skipped.setdefault(reason, {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += nbytes

    def keep(self, record: dict[str, Any]) -> None:
        meta = record["meta"]
        self.files_kept += 1
        self.bytes_kept += meta["size"]
        entry = self.languages.setdefault(meta["language"], {"files": 0, "bytes": 0})
        entry["files"] += 1
        entry["bytes"] += meta["size"]
        self.repositories.add(meta["repo_name"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_seen": self.files_seen,
            "files_kept": self.files_kept,
            "bytes_kept": self.bytes_kept,
            "repositories": len(self.repositories),
            "skipped": dict(sorted(self.skipped.items())),
            "languages": dict(sorted(self.languages.items(), key=lambda kv: -kv[1]["bytes"])),
        }


def detect_license(repo_dir: Path) -> str:
    """SPDX expression of the LICENSE/COPYING file at the top of a repository, or ``unknown``
    (``data_processing.licenses``)."""
    return licenses.detect_repo_license(repo_dir)


def _is_minified(name: str, language: str | None, data: bytes) -> bool:
    if ".min." in name or name.endswith(("-min.js", ".bundle.js")):
        return True
    # Minifiers put whole programs on a handful of lines; hand-written JS/CSS never averages
    # 500+ bytes per line.
    if language in ("JavaScript", "TypeScript") and len(data) > 2000:
        return len(data) / (data.count(b"\n") + 1) > 500
    return False


def read_source_file(path: Path, rel_name: str, stats: IngestStats, max_file_bytes: int) -> str | None:
    """Read one file as UTF-8 text, or count why it is skipped and return ``None``."""
    name = path.name
    if name in LOCK_FILES:
        stats.skip("lock_file")
        return None
    language = detect_language(name)
    if language is None:
        stats.skip("unknown_language")
        return None
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            stats.skip("too_large", size)
            return None
        data = path.read_bytes()
    except OSError:
        stats.skip("unreadable")
        return None
    if not data.strip():
        stats.skip("empty", len(data))
        return None
    if b"\x00" in data[:BINARY_PROBE_BYTES]:
        stats.skip("binary", len(data))
        return None
    if _is_minified(name, language, data):
        stats.skip("minified", len(data))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("undecodable", len(data))
        return None


def iter_tree(
    root: str | os.PathLike,
    *,
    depth: int = 1,
    stats: IngestStats | None = None,
    root_repo: str | None = None,
    license_name: str | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Iterator[dict[str, Any]]:
    """Yield one record per kept source file under ``root``, in a deterministic (sorted) order.

    Symlinked folders are followed once: a folder whose real path was already visited is a loop
    (or an alias) and is pruned, counted as ``symlink_loop``.
    """
    stats = stats if stats is not None else IngestStats()
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: source is not a directory")
    root_repo = root_repo or f"{root.resolve().name}-root"
    seen_dirs: set[str] = set()
    licenses: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            stats.skip("symlink_loop")
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        kept_dirs = []
        for d in sorted(dirnames):
            if d in VENDORED_DIRS or d.startswith("."):
                stats.skip("vendored_dir")
            else:
                kept_dirs.append(d)
        dirnames[:] = kept_dirs
        rel_dir = Path(dirpath).relative_to(root)
        parts = rel_dir.parts
        for fname in sorted(filenames):
            stats.files_seen += 1
            if len(parts) >= depth:
                repo = "/".join(parts[:depth])
                repo_dir = root.joinpath(*parts[:depth])
                file_name = "/".join((*parts[depth:], fname))
            else:
                repo, repo_dir = root_repo, root
                file_name = "/".join((*parts, fname))
            path = Path(dirpath) / fname
            text = read_source_file(path, file_name, stats, max_file_bytes)
            if text is None:
                continue
            if license_name is None and repo not in licenses:
                licenses[repo] = detect_license(repo_dir)
            record = {
                "text": text,
                "meta": {
                    "repo_name": repo,
                    "file_name": file_name,
                    "language": detect_language(fname),
                    "license": license_name or licenses[repo],
                    "size": len(text.encode("utf-8")),
                    "source": str(root),
                },
            }
            stats.keep(record)
            yield record


_HF_TEXT = ("content", "text", "code")
_HF_REPO = ("max_stars_repo_name", "repo_name", "repository_name", "repo")
_HF_PATH = ("max_stars_repo_path", "path", "file_name", "filepath")
_HF_LANG = ("lang", "language")
_HF_LICENSE = ("max_stars_repo_licenses", "detected_licenses", "license", "licenses")


def _pick(row: dict[str, Any], names: tuple[str, ...], default: Any = None) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return default


def _iter_parquet(files: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def iter_hf(
    *,
    data_files: list[str] | None = None,
    dataset: str | None = None,
    allow_download: bool = False,
    split: str = "train",
    stats: IngestStats | None = None,
    limit: int | None = None,
    config: str | None = None,
    data_dir: str | None = None,
    blobs: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield records from a Hugging Face ``datasets`` source: local parquet/json/csv files, a
    local snapshot folder of a hub dataset (``config``/``data_dir`` pick one subset, e.g. one
    language), or a hub dataset (The Stack, ...) only when ``allow_download`` is set, so nothing
    is fetched by accident. Column names of The Stack and Code Clippy are recognised; rows of The
    Stack v2 (``blob_id``, no contents) are read from the local blob folder ``blobs``
    (``data_processing.stack_v2``)."""
    stats = stats if stats is not None else IngestStats()
    if dataset and not data_files and Path(dataset).is_dir():
        data_files = stack_v2.local_dataset_files(dataset, config, data_dir)
    if data_files:
        ext = data_files[0].split(".")[-1].lower()
        builder = {"parquet": "parquet", "json": "json", "jsonl": "json", "csv": "csv"}.get(ext)
        if builder is None:
            raise ShardError(f"{data_files[0]}: expected a .parquet, .json, .jsonl or .csv file")
        for f in data_files:
            if not Path(f).is_file():
                raise ShardError(f"{f}: file not found")
        if builder == "parquet":
            # pyarrow directly: same rows as datasets' parquet builder, without its seconds of
            # import and cache set-up (matters for quick runs and tests).
            ds = _iter_parquet(data_files)
        else:
            import datasets

            ds = datasets.load_dataset(builder, data_files=data_files, split=split, streaming=True)
        origin = data_files[0]
    elif dataset:
        if not allow_download:
            raise ShardError(f"{dataset}: reading a hub dataset needs --hf-allow-download")
        import datasets

        ds = datasets.load_dataset(dataset, config, data_dir=data_dir, split=split, streaming=True)
        origin = dataset
    else:
        raise ValueError("give data_files or dataset")
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        stats.files_seen += 1
        text = _pick(row, _HF_TEXT)
        if text is None and row.get("blob_id") is not None:
            text = _stack_v2_text(row, blobs, stats, f"{origin}:{i + 1}")
            if text is None:
                continue
        if not isinstance(text, str):
            raise ShardError(f"{origin}:{i + 1}: row has no text column (expected one of {_HF_TEXT})")
        if not text.strip():
            stats.skip("empty")
            continue
        # The Stack v2 writes paths from the repository root ("/src/a.py"); file_name is relative.
        path = str(_pick(row, _HF_PATH, f"row-{i}")).lstrip("/")
        lic = _pick(row, _HF_LICENSE, "unknown")
        if isinstance(lic, list):
            lic = ",".join(map(str, lic)) or "unknown"
        record = {
            "text": text,
            "meta": {
                "repo_name": str(_pick(row, _HF_REPO, "unknown")),
                "file_name": path,
                "language": _pick(row, _HF_LANG) or detect_language(path) or "unknown",
                "license": str(lic),
                "size": len(text.encode("utf-8")),
                "source": origin,
            },
        }
        if row.get("blob_id") is not None:
            record["meta"]["blob_id"] = str(row["blob_id"])
        stats.keep(record)
        yield record


def _stack_v2_text(row: dict[str, Any], blobs: str | None, stats: IngestStats, where: str) -> str | None:
    """Contents of a The Stack v2 row from the blob folder, or None when skipped (counted as
    ``vendored``/``generated`` by the dataset's own flags, ``binary`` or ``undecodable``)."""
    if blobs is None:
        raise ShardError(f"{where}: row has a blob_id but no contents; give the blob folder with --blobs DIR")
    if row.get("is_vendor") or row.get("is_generated"):
        stats.skip("vendored" if row.get("is_vendor") else "generated")
        return None
    data = stack_v2.read_blob_bytes(blobs, str(row["blob_id"]), where)
    if b"\x00" in data[:BINARY_PROBE_BYTES]:
        stats.skip("binary", len(data))
        return None
    text = stack_v2.decode_blob(data, row.get("src_encoding"))
    if text is None:
        stats.skip("undecodable", len(data))
    return text


def iter_shards(
    source,
    *,
    stats: IngestStats | None = None,
    skip_bad: bool = False,
    bad: BadRecordCounter | None = None,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> Iterator[dict[str, Any]]:
    """Yield records of existing shards (Code Clippy's, or ours) with their meta completed:
    ``size`` recomputed, ``language`` detected from ``file_name`` when missing, ``repo_name``,
    ``file_name`` and ``license`` defaulting to ``"unknown"``. Other meta fields are kept.
    Bad records and shards (a line over ``max_record_bytes`` included) raise ``ShardError``, or
    are counted in ``bad`` with ``skip_bad``."""
    stats = stats if stats is not None else IngestStats()
    for record in iter_dir_records(source, skip_bad=skip_bad, bad=bad, max_record_bytes=max_record_bytes):
        stats.files_seen += 1
        text = record["text"]
        if not text.strip():
            stats.skip("empty", len(text.encode("utf-8")))
            continue
        meta = record["meta"]
        meta.setdefault("repo_name", "unknown")
        meta.setdefault("file_name", "unknown")
        meta.setdefault("license", "unknown")
        meta["size"] = len(text.encode("utf-8"))
        if not meta.get("language"):
            meta["language"] = detect_language(str(meta["file_name"])) or "unknown"
        stats.keep(record)
        yield record


def capped(records, *, max_files: int | None = None, max_bytes: int | None = None):
    """Stop a record stream after ``max_files`` records or once ``max_bytes`` of text is passed."""
    if max_files is not None and max_files <= 0:
        return
    total = 0
    for n, record in enumerate(records, start=1):
        total += record["meta"]["size"]
        yield record
        # Stop before pulling the next record, so upstream stats count only what was passed on.
        if (max_files is not None and n >= max_files) or (max_bytes is not None and total >= max_bytes):
            return


def progress(records, desc: str):
    """Wrap a record stream in a tqdm bar showing files/s and MB/s (silent when not a TTY)."""
    start = time.perf_counter()
    total = 0
    with tqdm(desc=desc, unit=" files", disable=None) as bar:
        for record in records:
            total += record["meta"].get("size") or len(record["text"])
            bar.update(1)
            if bar.n % 200 == 0:
                bar.set_postfix_str(f"{total / 1e6 / max(time.perf_counter() - start, 1e-9):.1f} MB/s")
            yield record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", nargs="*", help="source trees; each folder at --depth is one repository")
    parser.add_argument("--out", required=True, help="output folder for ingest-NNNNN.jsonl.zst shards")
    parser.add_argument("--depth", type=int, default=1, help="folder depth that names a repository")
    parser.add_argument("--license", default=None, help="licence for every record (default: detect)")
    parser.add_argument("--hf-data-files", nargs="+", default=None, help="local parquet/json/csv files")
    parser.add_argument("--hf-dataset", default=None, help="hub dataset name (needs --hf-allow-download)")
    parser.add_argument("--hf-allow-download", action="store_true")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--hf-config", default=None, help="dataset config (e.g. a language of The Stack v2)")
    parser.add_argument("--hf-data-dir", default=None, help="subfolder of the dataset (e.g. data/Python)")
    parser.add_argument("--blobs", default=None, help="local folder of The Stack v2 / Software Heritage blobs")
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--max-bytes", type=int, default=None)
    parser.add_argument("--shard-size-mb", type=float, default=64.0)
    args = parser.parse_args(argv)
    if not args.src and not args.hf_data_files and not args.hf_dataset:
        parser.error("give at least one SRC, --hf-data-files or --hf-dataset")
    stats = IngestStats()
    try:
        def records():
            for src in args.src:
                yield from iter_tree(src, depth=args.depth, stats=stats, license_name=args.license)
            if args.hf_data_files or args.hf_dataset:
                yield from iter_hf(data_files=args.hf_data_files, dataset=args.hf_dataset,
                                   allow_download=args.hf_allow_download, split=args.hf_split, stats=stats,
                                   config=args.hf_config, data_dir=args.hf_data_dir, blobs=args.blobs)

        stream = progress(capped(records(), max_files=args.max_files, max_bytes=args.max_bytes), "ingest")
        with ShardSetWriter(args.out, "ingest", max_bytes=int(args.shard_size_mb * (1 << 20))) as writer:
            for record in stream:
                writer.write(record)
        report = {"ingest": stats.as_dict(), "shards": writer.paths}
        (Path(args.out) / "ingest_report.json").write_text(json.dumps(report, indent=2) + "\n")
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"files": writer.count, "bytes": writer.bytes_written, "shards": len(writer.paths)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
