"""Dedup against an existing corpus (``--against OLD``): new records that duplicate an old one,
exactly or nearly, are dropped whatever their names; new records are deduplicated among
themselves as usual; the old corpus is read, never written."""

import json
import sysconfig
from pathlib import Path

import pytest

from data_processing import dedup, minhash
from data_processing.dedup import DedupParams, plan_dedup
from data_processing.shards import iter_dir_records, write_shard
from tests.helpers import code_record, near_copy

STDLIB = Path(sysconfig.get_paths()["stdlib"])
OLD_NAMES = ["bisect.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py"]
NEW_NAMES = ["glob.py", "json/decoder.py", "calendar.py"]


@pytest.fixture
def old_and_new(tmp_path):
    """OLD: a deduplicated corpus (the dedup CLI's output). NEW: exact and near copies of OLD files
    under names that sort *before* the originals, a near-duplicate pair of new files, and new files."""
    texts = {n: (STDLIB / n).read_text() for n in OLD_NAMES + NEW_NAMES}
    write_shard(tmp_path / "old_in" / "a.jsonl.zst", [code_record("m-old", n, texts[n]) for n in OLD_NAMES])
    assert dedup.main(["--input", str(tmp_path / "old_in"), "--output", str(tmp_path / "old"), "--workers", "1",
                       "--quiet"]) == 0
    new = [
        code_record("a-copy", "bisect.py", texts["bisect.py"].replace("    ", "\t")),  # exact (whitespace only)
        code_record("a-fork", "heapq_fork.py", near_copy(texts["heapq.py"])),  # near
        code_record("z-new", "glob.py", texts["glob.py"]),
        code_record("b-new", "glob_fork.py", near_copy(texts["glob.py"], 25)),  # near copy of a *new* file
        code_record("z-new", "json/decoder.py", texts["json/decoder.py"]),
    ]
    write_shard(tmp_path / "new" / "a.jsonl.zst", new[:3])
    write_shard(tmp_path / "new" / "b.jsonl.zst", new[3:] + [code_record("z-new", "calendar.py", texts["calendar.py"])])
    return tmp_path / "old", tmp_path / "new"


def _names(records):
    return sorted((r["meta"]["repo_name"], r["meta"]["file_name"]) for r in records)


def test_keeps_only_records_new_to_the_old_corpus(old_and_new, tmp_path, capsys):
    """Copies of old files go even though their names sort first; the new near pair keeps its
    survivor; the report says where every new record went; OLD is untouched."""
    old, new = old_and_new
    old_before = {p.name: p.read_bytes() for p in old.iterdir()}
    out = tmp_path / "out"
    assert dedup.main(["--input", str(new), "--against", str(old), "--output", str(out), "--workers", "1",
                       "--quiet"]) == 0
    kept = _names(iter_dir_records(out))
    assert kept == [("b-new", "glob_fork.py"), ("z-new", "calendar.py"), ("z-new", "json/decoder.py")]
    assert sorted(p.name for p in out.glob("*.jsonl.zst")) == ["dedup-00000.jsonl.zst", "dedup-00001.jsonl.zst"]
    report = json.loads((out / "dedup_report.json").read_text())
    against = report["against"]
    assert against["shards"] == 1 and against["files"] == len(OLD_NAMES) and against["new"]["files"] == 6
    assert against["kept"]["files"] == 3 and report["output"] == against["kept"]
    assert against["removed_duplicate_of_against"]["files"] == 2
    assert against["removed_within_input"]["files"] == 1
    assert report["exact"]["removed_files"] == 1 and report["near"]["removed_files"] == 2
    assert {p.name: p.read_bytes() for p in old.iterdir()} == old_before
    assert json.loads(capsys.readouterr().out)["output"]["files"] == 3


def test_no_kept_record_is_a_near_duplicate_of_old_or_of_each_other(old_and_new):
    """Brute force over all pairs on exact shingle sets: below the threshold everywhere."""
    old, new = old_and_new
    result = plan_dedup([str(p) for p in sorted(new.glob("*.jsonl.zst"))], workers=1, progress=False,
                        against=[str(p) for p in sorted(old.glob("*.jsonl.zst"))])
    n_old = sum(result.shard_counts[:result.against_shards])
    texts = [r["text"] for p in result.paths for r in iter_dir_records(p)]
    sets = [minhash.shingle_hashes(t, DedupParams().shingle_words) for t in texts]
    kept_new = [i for i in range(n_old, len(texts)) if result.keep[i]]
    for i in kept_new:
        for j in [*range(n_old), *kept_new]:
            if j != i:
                assert minhash.jaccard(sets[i], sets[j]) < DedupParams().threshold, (i, j)


def test_same_kept_set_as_a_run_without_against_when_nothing_overlaps(old_and_new, tmp_path):
    """Against an unrelated corpus, the kept set is what a plain run keeps (same rule, same order)."""
    _, new = old_and_new
    write_shard(tmp_path / "other" / "o.jsonl.zst", [code_record("o", "x.py", (STDLIB / "csv.py").read_text())])
    new_paths = [str(p) for p in sorted(new.glob("*.jsonl.zst"))]
    plain = plan_dedup(new_paths, workers=1, progress=False)
    against = plan_dedup(new_paths, workers=1, progress=False, against=[str(tmp_path / "other" / "o.jsonl.zst")])
    assert against.keep[1:].tolist() == plain.keep.tolist()


def test_unreadable_against_is_one_line_exit_2(old_and_new, tmp_path, capsys):
    """--against naming no shards: one line naming it, exit 2, nothing written."""
    _, new = old_and_new
    out = tmp_path / "out"
    assert dedup.main(["--input", str(new), "--against", str(tmp_path / "missing"), "--output", str(out),
                       "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    assert not out.exists()


def _comparable(report):
    """The report without the fields that describe the run rather than the result."""
    out = {k: v for k, v in report.items() if k not in {"engine", "workers", "seconds", "mb_per_s", "spark"}}
    out["near"] = {k: v for k, v in out["near"].items() if k != "peak_shingle_sets_in_memory"}
    return out


@pytest.mark.spark
def test_spark_engine_keeps_and_writes_what_local_does(spark, old_and_new, tmp_path):
    """--engine spark --against: the same kept records, output shards and report as the local engine."""
    from data_processing.dedup import spark as dedup_spark

    old, new = old_and_new
    assert dedup.main(["--input", str(new), "--against", str(old), "--output", str(tmp_path / "local"),
                       "--workers", "1", "--quiet"]) == 0
    plan = dedup_spark.plan_spark(spark, str(new), progress=False, against=str(old))
    dedup_spark.write_spark(plan, str(tmp_path / "spark"), progress=False)
    local_report = json.loads((tmp_path / "local" / "dedup_report.json").read_text())
    spark_report = json.loads((tmp_path / "spark" / "dedup_report.json").read_text())
    assert spark_report["against"] == local_report["against"] and spark_report["against"]["kept"]["files"] == 3
    assert _comparable(spark_report) == _comparable(local_report)
    shards = sorted(p.name for p in (tmp_path / "local").glob("*.jsonl.zst"))
    assert shards == sorted(p.name for p in (tmp_path / "spark").glob("*.jsonl.zst"))
    for name in shards:
        assert list(iter_dir_records(tmp_path / "spark" / name)) == list(iter_dir_records(tmp_path / "local" / name))
