"""Ingest: repositories from folders, per-file metadata, skip reasons, Hugging Face sources."""

import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

from data_processing import ingest
from data_processing.ingest import IngestStats, iter_hf, iter_tree
from data_processing.languages import LANGUAGES, detect_language
from data_processing.shards import ShardError, iter_dir_records
from tests.test_licenses import MIT

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_language_detection_covers_required_languages():
    names = {
        "a.py": "Python", "a.js": "JavaScript", "a.ts": "TypeScript", "types.d.ts": "TypeScript",
        "A.java": "Java", "a.c": "C", "a.h": "C", "a.cpp": "C++", "a.hpp": "C++", "a.cs": "C#",
        "a.go": "Go", "a.rs": "Rust", "a.rb": "Ruby", "a.php": "PHP", "a.sh": "Shell", "a.kt": "Kotlin",
        "a.scala": "Scala", "a.swift": "Swift", "a.lua": "Lua", "a.jl": "Julia", "a.hs": "Haskell",
        "a.R": "R", "a.sql": "SQL", "Makefile": "Makefile", "Dockerfile": "Dockerfile", "MOD.PY": "Python",
    }
    for name, lang in names.items():
        assert detect_language(name) == lang, name
    assert len(LANGUAGES) >= 20
    for name in ("data.json", "README.md", ".bashrc", "image.png", "noext"):
        assert detect_language(name) is None


@pytest.fixture
def tree(tmp_path):
    """Two repositories of real stdlib code plus every kind of file ingest must skip."""
    root = tmp_path / "src"
    no_cache = shutil.ignore_patterns("__pycache__")
    shutil.copytree(STDLIB / "json", root / "jsonrepo", ignore=no_cache)
    shutil.copytree(STDLIB / "wsgiref", root / "wsgirepo" / "pkg", ignore=no_cache)
    (root / "wsgirepo" / "LICENSE").write_text(MIT)
    shutil.copy(STDLIB / "bisect.py", root / "toplevel.py")
    other = root / "mixed"
    other.mkdir()
    (other / "script.sh").write_text("#!/bin/sh\necho hello world\n")
    (other / "binary.py").write_bytes(b"print(1)\n\x00\x01\x02 binary payload")
    (other / "latin1.py").write_bytes("# caf\xe9\nprint('x')\n".encode("latin-1"))
    (other / "package-lock.json").write_text("{}")
    (other / "yarn.lock").write_text("lock")
    (other / "app.min.js").write_text("var a=1;" * 50)
    (other / "bundle.js").write_text("var a=1;" * 1000)  # one long line: minified
    (other / "notes.txt").write_text("not code")
    (other / "empty.py").write_text("\n\n")
    (other / "node_modules" / "lib").mkdir(parents=True)
    (other / "node_modules" / "lib" / "index.js").write_text("module.exports = 1;\n")
    os.symlink(other, other / "loop")  # a symlink back to its own parent
    return root


def test_every_record_is_its_own_file(tree):
    stats = IngestStats()
    records = list(iter_tree(tree, stats=stats))
    assert records, "nothing ingested"
    for r in records:
        meta = r["meta"]
        if meta["repo_name"] == "src-root":
            path = tree / meta["file_name"]
        else:
            path = tree / meta["repo_name"] / meta["file_name"]
        assert path.read_text("utf-8") == r["text"], meta
        assert meta["size"] == len(r["text"].encode("utf-8"))
        assert meta["language"] == detect_language(path.name)
    names = {(r["meta"]["repo_name"], r["meta"]["file_name"]) for r in records}
    assert ("jsonrepo", "decoder.py") in names
    assert ("wsgirepo", "pkg/handlers.py") in names
    assert ("src-root", "toplevel.py") in names
    assert ("mixed", "script.sh") in names
    assert len({r["meta"]["file_name"] for r in records if r["meta"]["repo_name"] == "jsonrepo"}) > 3
    lic = {r["meta"]["repo_name"]: r["meta"]["license"] for r in records}
    assert lic["wsgirepo"] == "MIT" and lic["jsonrepo"] == "unknown"


def test_skips_are_counted_by_reason(tree):
    stats = IngestStats()
    list(iter_tree(tree, stats=stats))
    skipped = {k: v["files"] for k, v in stats.skipped.items()}
    assert skipped["binary"] == 1
    assert skipped["undecodable"] == 1
    assert skipped["lock_file"] == 2
    assert skipped["minified"] == 2
    assert skipped["empty"] == 1
    assert skipped["vendored_dir"] == 1
    assert skipped["symlink_loop"] == 1
    assert skipped["unknown_language"] >= 1  # notes.txt (+ any data files of the copied packages)
    assert stats.files_kept > 10 and stats.repositories == {"jsonrepo", "wsgirepo", "src-root", "mixed"}
    shell = len("#!/bin/sh\necho hello world\n")
    assert stats.as_dict()["languages"]["Shell"] == {"files": 1, "bytes": shell}


def test_depth_two_names_owner_repo(tmp_path):
    (tmp_path / "alice" / "proj" / "src").mkdir(parents=True)
    (tmp_path / "alice" / "proj" / "src" / "main.go").write_text("package main\nfunc main() {}\n")
    records = list(iter_tree(tmp_path, depth=2))
    assert [(r["meta"]["repo_name"], r["meta"]["file_name"], r["meta"]["language"]) for r in records] == [
        ("alice/proj", "src/main.go", "Go")
    ]


def test_cli_writes_shards_and_report(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert ingest.main([str(tree), "--out", str(out), "--max-files", "3"]) == 0
    records = list(iter_dir_records(out))
    assert len(records) == 3
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["ingest"]["files_kept"] >= 3
    assert sorted(p.name for p in out.iterdir()) == ["ingest-00000.jsonl.zst", "ingest_report.json"]


def test_cli_missing_source_exits_2(tmp_path, capsys):
    assert ingest.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: source is not a directory" in capsys.readouterr().err


def test_hf_local_parquet_with_the_stack_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (STDLIB / "bisect.py").read_text()
    table = pa.table({
        "content": [text, "fn main() {}\n", ""],
        "max_stars_repo_name": ["python/cpython", "rust/hello", "x/y"],
        "max_stars_repo_path": ["Lib/bisect.py", "src/main.rs", "e.py"],
        "max_stars_repo_licenses": [["PSF-2.0"], ["MIT", "Apache-2.0"], []],
    })
    pq.write_table(table, tmp_path / "part.parquet")
    stats = IngestStats()
    records = list(iter_hf(data_files=[str(tmp_path / "part.parquet")], stats=stats))
    assert [r["meta"]["file_name"] for r in records] == ["Lib/bisect.py", "src/main.rs"]
    assert records[0]["text"] == text
    assert records[1]["meta"]["language"] == "Rust"
    assert records[1]["meta"]["license"] == "MIT,Apache-2.0"
    assert stats.skipped["empty"]["files"] == 1


def test_hf_hub_dataset_needs_explicit_flag():
    with pytest.raises(ShardError, match="needs --hf-allow-download"):
        list(iter_hf(dataset="bigcode/the-stack-smol"))
