"""prepare: ingest -> filter -> dedup -> split by repository, report.json, reruns."""

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_processing import minhash, prepare
from data_processing.shards import iter_dir_records

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPOS = ["json", "wsgiref", "html", "urllib", "logging", "concurrent", "sqlite3", "xmlrpc"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for name in REPOS:
        shutil.copytree(STDLIB / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "test*"))
    # A near copy of a json file inside another repository, and a top-level module.
    text = (STDLIB / "json" / "decoder.py").read_text()
    (root / "html" / "vendored_decoder.py").write_text(text.replace("    ", "  ") + "\n# local tweak\n")
    shutil.copy(STDLIB / "bisect.py", root / "bisect.py")
    return root


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    report = prepare.prepare(out, sources=[str(src)], validation_fraction=0.3, seed=3, workers=1,
                             progress=False)
    return out, report


def test_layout_and_report_fields(prepared):
    out, report = prepared
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "train", "validation"]
    assert [p.name for p in (out / "train").iterdir()] == ["train-00000.jsonl.zst"]
    assert [p.name for p in (out / "validation").iterdir()] == ["validation-00000.jsonl.zst"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    fields = ("version", "sources", "params", "ingest", "filters", "dedup", "split", "languages", "seconds")
    for key in fields:
        assert key in report
    train, val = report["split"]["train"], report["split"]["validation"]
    assert train["files"] == sum(1 for _ in iter_dir_records(out / "train"))
    assert val["files"] == sum(1 for _ in iter_dir_records(out / "validation"))
    assert train["files"] + val["files"] == report["dedup"]["output"]["files"]
    assert report["dedup"]["input"]["files"] == report["filters"]["kept"]["files"]
    assert report["filters"]["kept"]["files"] + sum(
        v["files"] for v in report["filters"]["dropped"].values()) == report["ingest"]["files_kept"]
    assert report["languages"]["Python"]["train"]["files"] == train["files"]
    assert report["dedup"]["near"]["removed_files"] >= 1  # the planted vendored_decoder.py


def test_split_by_repository_without_leaks(prepared):
    out, report = prepared
    train = list(iter_dir_records(out / "train"))
    val = list(iter_dir_records(out / "validation"))
    train_repos = {r["meta"]["repo_name"] for r in train}
    val_repos = {r["meta"]["repo_name"] for r in val}
    assert val_repos and train_repos and not train_repos & val_repos
    assert sorted(val_repos) == report["split"]["validation"]["repository_names"]
    assert f"{Path(report['sources'][0]).name}-root" in train_repos | val_repos
    # Byte fraction respected.
    assert report["split"]["validation"]["bytes"] <= 0.3 * (
        report["split"]["validation"]["bytes"] + report["split"]["train"]["bytes"])
    # No near duplicate of a validation file is left in train.
    tsets = [minhash.shingle_hashes(r["text"]) for r in train]
    for r in val:
        v = minhash.shingle_hashes(r["text"])
        assert max(minhash.jaccard(v, t) for t in tsets) < 0.85, r["meta"]["file_name"]


def test_split_is_deterministic_and_seeded(src, prepared, tmp_path):
    _, report = prepared
    again = prepare.prepare(tmp_path / "b", sources=[str(src)], validation_fraction=0.3, seed=3, workers=1,
                            progress=False)
    names = report["split"]["validation"]["repository_names"]
    assert again["split"]["validation"]["repository_names"] == names


def test_choose_validation_by_bytes():
    repos = {"huge": 10_000, **{f"r{i}": 100 for i in range(20)}}
    chosen = prepare.choose_validation(repos, 0.05, seed=0)
    assert "huge" not in chosen and 1 <= len(chosen) <= 6
    assert sum(repos[r] for r in chosen) <= 0.05 * sum(repos.values())
    assert prepare.choose_validation(repos, 0.05, seed=0) == chosen
    assert prepare.choose_validation({"only": 5}, 0.5, seed=0) == []
    assert prepare.choose_validation({"a": 100, "b": 100}, 0.01, seed=0) in (["a"], ["b"])


def test_default_source_is_stdlib_with_caps_and_rerun(tmp_path):
    out = tmp_path / "d"
    report = prepare.prepare(out, max_files=40, shard_size_mb=0.05, workers=1, progress=False)
    assert report["sources"] == [sysconfig.get_paths()["stdlib"]]
    assert report["ingest"]["files_kept"] == 40
    n_shards = len(list((out / "train").iterdir()))
    assert n_shards > 1
    names = {r["meta"]["repo_name"] for r in iter_dir_records(out / "train")}
    assert "stdlib-root" in names
    assert all(r["meta"]["license"] == "PSF-2.0" for r in iter_dir_records(out / "train"))
    # Same output folder, bigger shards: nothing stale remains, same records.
    before = sorted(r["meta"]["file_name"] for r in iter_dir_records(out))
    prepare.prepare(out, max_files=40, workers=1, progress=False)
    assert [p.name for p in (out / "train").iterdir()] == ["train-00000.jsonl.zst"]
    assert sorted(r["meta"]["file_name"] for r in iter_dir_records(out)) == before
    assert not (out / ".work").exists()


def test_cli(src, tmp_path, capsys):
    out = tmp_path / "cli"
    assert prepare.main(["--src", str(src), "--out", str(out), "--max-files", "30", "--workers", "1",
                         "--validation-fraction", "0.2", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"]["train"]["files"] + summary["split"]["validation"]["files"] <= 30
    assert prepare.main(["--src", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing: source is not a directory" in capsys.readouterr().err


def test_repo_hash_uniform_enough():
    xs = np.array([prepare.repo_hash(f"repo{i}", 0) for i in range(2000)])
    assert xs.min() >= 0 and xs.max() < 1 and abs(xs.mean() - 0.5) < 0.03


def test_prepare_from_existing_code_clippy_shards(tmp_path):
    import zstandard

    # Code Clippy style: no size/language, extra meta, a duplicate, and one bad line.
    text = (STDLIB / "bisect.py").read_text()
    lines = [
        json.dumps({"text": text, "meta": {"repo_name": "a/x", "file_name": "bisect.py", "stars": 1}}),
        json.dumps({"text": text, "meta": {"repo_name": "b/y", "file_name": "copy.py"}}),
        json.dumps({"text": "fn main() {}\n", "meta": {"repo_name": "c/z", "file_name": "m.rs"}}),
        "not json",
    ]
    src = tmp_path / "cc" / "data_0_time1_default.jsonl.zst"
    src.parent.mkdir()
    src.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    out = tmp_path / "out"
    with pytest.raises(Exception, match=r"data_0_time1_default.jsonl.zst:4: not a JSON object"):
        prepare.prepare(out, shards=[str(src.parent)], workers=1, progress=False)
    report = prepare.prepare(out, shards=[str(src.parent)], skip_bad=True, workers=1, progress=False,
                             validation_fraction=0.5)
    assert report["bad_records"] == {"not a JSON object (Expecting value)": 1}
    assert report["dedup"]["exact"]["removed_files"] == 1
    kept = {r["meta"]["file_name"]: r["meta"] for r in iter_dir_records(out)}
    assert set(kept) == {"bisect.py", "m.rs"}
    assert kept["m.rs"]["language"] == "Rust" and kept["bisect.py"]["stars"] == 1
