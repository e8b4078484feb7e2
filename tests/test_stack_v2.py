"""The Stack v2 rows (blob ids, contents in a local folder of gzip'd Software Heritage blobs) and
one-language subsets of a local hub-dataset snapshot; local parquet files only."""

import gzip
import hashlib
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_processing import ingest, prepare, stack_v2
from data_processing.shards import ShardError, iter_dir_records

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _blob_id(data: bytes) -> str:
    """Software Heritage content ids are SHA1 git-style hashes; any 40 hex digits do for the test."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _rows_and_blobs(tmp_path: Path):
    """Five Stack v2 rows whose blobs lie in the three layouts, one latin-1 blob, one vendored row."""
    blobs = tmp_path / "blobs"
    texts = {name: (STDLIB / "json" / name).read_bytes() for name in ("decoder.py", "encoder.py", "scanner.py")}
    rows = []
    for k, (name, data) in enumerate(texts.items()):
        bid = _blob_id(data)
        path = [blobs / bid, blobs / "content" / bid, blobs / bid[:2] / bid[2:4] / bid][k]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(data))  # as the S3 objects are served: gzip'd
        rows.append({"blob_id": bid, "path": f"/json/{name}", "repo_name": "python/cpython", "language": "Python",
                     "detected_licenses": ["PSF-2.0"], "src_encoding": "UTF-8", "is_vendor": False,
                     "is_generated": False})
    latin = "# caf\xe9\nprint('ol\xe9')\n".encode("latin-1")
    (blobs / f"{_blob_id(latin)}.gz").write_bytes(gzip.compress(latin))
    rows.append({"blob_id": _blob_id(latin), "path": "cafe.py", "repo_name": "jane/gpl-thing", "language": "Python",
                 "detected_licenses": ["GPL-3.0-only"], "src_encoding": "ISO-8859-1", "is_vendor": False,
                 "is_generated": False})
    rows.append({"blob_id": "0" * 40, "path": "node_modules/x.js", "repo_name": "jane/web", "language": "JavaScript",
                 "detected_licenses": [], "src_encoding": "UTF-8", "is_vendor": True, "is_generated": False})
    return rows, blobs, texts


def _parquet(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_rows_read_from_blobs_in_every_layout(tmp_path):
    """Contents come from the blob folder (gunzipped, decoded with src_encoding); meta carries
    repo, path, language, the detected licenses and the blob id; vendored rows are skipped."""
    rows, blobs, texts = _rows_and_blobs(tmp_path)
    stats = ingest.IngestStats()
    records = list(ingest.iter_hf(data_files=[_parquet(tmp_path / "v2.parquet", rows)], blobs=str(blobs), stats=stats))
    assert [r["text"] for r in records[:3]] == [t.decode() for t in texts.values()]
    assert records[3]["text"] == "# caf\xe9\nprint('ol\xe9')\n"
    meta = records[0]["meta"]
    assert meta["repo_name"] == "python/cpython" and meta["file_name"] == "json/decoder.py"
    assert meta["language"] == "Python" and meta["license"] == "PSF-2.0" and meta["blob_id"] == rows[0]["blob_id"]
    assert records[3]["meta"]["license"] == "GPL-3.0-only"
    assert stats.files_seen == 5 and stats.files_kept == 4 and stats.skipped["vendored"]["files"] == 1


def test_missing_or_corrupt_blob_is_an_error_naming_it(tmp_path):
    """A blob id with no file, or a corrupt gzip stream, raises naming the blob and the row."""
    rows, blobs, _ = _rows_and_blobs(tmp_path)
    rows[1]["blob_id"] = "f" * 40
    with pytest.raises(ShardError, match=r"v2.parquet:2: blob f{40} not found under"):
        list(ingest.iter_hf(data_files=[_parquet(tmp_path / "v2.parquet", rows)], blobs=str(blobs)))
    (blobs / rows[0]["blob_id"]).write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ShardError, match="unreadable blob"):
        stack_v2.read_blob_bytes(blobs, rows[0]["blob_id"], "row 1")
    with pytest.raises(ShardError, match="no contents; give the blob folder with --blobs"):
        list(ingest.iter_hf(data_files=[_parquet(tmp_path / "v2.parquet", rows)]))


def test_prepare_stack_v2_with_licenses_and_bad_blob(tmp_path, capsys):
    """prepare --hf-data-files ROWS --blobs DIR --licenses permissive: the PSF files are kept, the
    GPL one dropped; a missing blob: one line naming it, exit 2, no output left."""
    rows, blobs, texts = _rows_and_blobs(tmp_path)
    data = _parquet(tmp_path / "v2.parquet", rows)
    out = tmp_path / "out"
    assert prepare.main(["--hf-data-files", data, "--blobs", str(blobs), "--out", str(out), "--workers", "1",
                         "--licenses", "permissive", "--validation-fraction", "0"]) == 0
    kept = {r["meta"]["file_name"] for r in iter_dir_records(out / "train")}
    assert kept == {f"json/{n}" for n in texts}
    report = json.loads((out / "report.json").read_text())
    assert report["licenses"]["by_license"]["GPL-3.0-only"]["decision"] == "dropped_not_allowed"
    assert report["ingest"]["skipped"]["vendored"]["files"] == 1
    capsys.readouterr()
    rows[2]["blob_id"] = "e" * 40
    bad = _parquet(tmp_path / "bad.parquet", rows)
    assert prepare.main(["--hf-data-files", bad, "--blobs", str(blobs), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "e" * 40 in err[0] and "bad.parquet:3" in err[0]
    assert not list((tmp_path / "out2").rglob("*.jsonl.zst")) and not (tmp_path / "out2" / "report.json").exists()


def test_one_language_of_a_local_snapshot(tmp_path):
    """--hf-dataset SNAPSHOT --hf-config Python reads data/Python only; --hf-data-dir data/Go the Go
    folder; a missing subset is an error naming it."""
    root = tmp_path / "the-stack-smol"
    _parquet(root / "data" / "Python" / "train-00000-of-00002.parquet",
             [{"content": "print(1)\n", "repo_name": "a/b", "path": "x.py", "language": "Python"}])
    _parquet(root / "data" / "Python" / "train-00001-of-00002.parquet",
             [{"content": "print(2)\n", "repo_name": "a/b", "path": "y.py", "language": "Python"}])
    _parquet(root / "data" / "Go" / "train-00000-of-00001.parquet",
             [{"content": "package main\n", "repo_name": "c/d", "path": "m.go", "language": "Go"}])
    python = list(ingest.iter_hf(dataset=str(root), config="Python"))
    assert [r["meta"]["file_name"] for r in python] == ["x.py", "y.py"]
    go = list(ingest.iter_hf(dataset=str(root), data_dir="data/Go"))
    assert [r["text"] for r in go] == ["package main\n"] and go[0]["meta"]["language"] == "Go"
    assert len(list(ingest.iter_hf(dataset=str(root)))) == 3
    with pytest.raises(ShardError, match="no subset folder data/Rust or Rust"):
        list(ingest.iter_hf(dataset=str(root), config="Rust"))


def test_ingest_cli_with_config(tmp_path, capsys):
    """``python -m data_processing.ingest --hf-dataset DIR --hf-config LANG`` writes that language."""
    root = tmp_path / "snap"
    _parquet(root / "data" / "Python" / "a.parquet",
             [{"content": "x = 1\n", "repo_name": "a/b", "path": "x.py", "language": "Python"}])
    _parquet(root / "data" / "C" / "a.parquet", [{"content": "int x;\n", "repo_name": "a/b", "path": "x.c"}])
    assert ingest.main(["--hf-dataset", str(root), "--hf-config", "C", "--out", str(tmp_path / "out")]) == 0
    records = list(iter_dir_records(tmp_path / "out"))
    assert [r["text"] for r in records] == ["int x;\n"] and records[0]["meta"]["language"] == "C"
