"""The Stack v2 and other hub datasets read from local copies.

The Stack v2 (``bigcode/the-stack-v2*``) ships metadata only: each parquet row has ``blob_id``,
``path``, ``repo_name``, ``language``, ``detected_licenses``, ``src_encoding``, ``is_vendor``,
``is_generated``, ... and the file contents live in Software Heritage's S3 bucket, one object per
blob at ``content/{blob_id}``, gzip-compressed (the dataset card's download code reads
``s3://softwareheritage/content/{blob_id}`` through gzip and decodes with ``src_encoding``). A
local mirror of those objects is a folder passed as ``--blobs DIR``; each blob is looked up as

* ``DIR/{blob_id}`` or ``DIR/{blob_id}.gz`` (the S3 keys downloaded flat),
* ``DIR/content/{blob_id}`` (the bucket's own prefix kept),
* ``DIR/{blob_id[0:2]}/{blob_id[2:4]}/{blob_id}`` (Software Heritage's sharded on-disk layout,
  as in its license-blobs dataset),

and is gunzipped when it starts with the gzip magic bytes (a blob already decompressed is read
as it is). No network: the blobs must be there.

``--hf-dataset`` may also name a local snapshot folder of a hub dataset; ``--hf-config`` (a
language, e.g. ``Python``) and/or ``--hf-data-dir`` (e.g. ``data/Python``) pick the subset's
parquet files, as the hub's ``load_dataset(name, config, data_dir=...)`` would.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from data_processing.shards import ShardError

GZIP_MAGIC = b"\x1f\x8b"


def blob_candidates(blobs_dir: Path, blob_id: str) -> list[Path]:
    """Where a blob may lie under ``blobs_dir``, in lookup order (see the module docstring)."""
    return [blobs_dir / blob_id, blobs_dir / f"{blob_id}.gz", blobs_dir / "content" / blob_id,
            blobs_dir / blob_id[0:2] / blob_id[2:4] / blob_id]


def read_blob_bytes(blobs_dir: str | Path, blob_id: str, where: str) -> bytes:
    """The (gunzipped) bytes of one blob; ``ShardError`` naming the blob and ``where`` (the row)
    when no file holds it or its gzip stream is corrupt."""
    if not blob_id or "/" in blob_id or blob_id.startswith("."):
        raise ShardError(f"{where}: bad blob_id {blob_id!r}")
    blobs_dir = Path(blobs_dir)
    for path in blob_candidates(blobs_dir, blob_id):
        if path.is_file():
            try:
                data = path.read_bytes()
                return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data
            except (OSError, EOFError, zlib.error) as err:
                raise ShardError(f"{path}: unreadable blob {blob_id} ({where}): {err}") from None
    raise ShardError(f"{where}: blob {blob_id} not found under {blobs_dir}")


def decode_blob(data: bytes, encoding: str | None) -> str | None:
    """Text of a blob in its ``src_encoding`` (UTF-8 when not given), or None when it does not
    decode (counted as ``undecodable`` by ingest)."""
    try:
        return data.decode(encoding or "utf-8")
    except (UnicodeDecodeError, LookupError):
        return None


def local_dataset_files(root: str | Path, config: str | None, data_dir: str | None) -> list[str]:
    """Parquet files of one subset of a local dataset snapshot: ``root/data_dir`` if given, else
    ``root/data/{config}`` or ``root/{config}``, else the whole snapshot. ``ShardError`` when the
    folder is missing or holds no parquet file."""
    root = Path(root)
    if data_dir:
        folders = [root / data_dir]
    elif config:
        folders = [root / "data" / config, root / config]
    else:
        folders = [root]
    for folder in folders:
        if folder.is_dir():
            files = sorted(str(p) for p in folder.rglob("*.parquet"))
            if not files:
                raise ShardError(f"{folder}: no parquet files")
            return files
    raise ShardError(f"{root}: no subset folder {' or '.join(str(f.relative_to(root)) for f in folders)}")
