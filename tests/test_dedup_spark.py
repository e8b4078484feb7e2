"""Spark engine: the same kept records, clusters, report and output files as the local engine.

All tests share one ``local[2]`` session per test process (the ``spark`` fixture).
"""

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bench import dedup as bench
from data_processing import dedup
from data_processing.dedup import plan_dedup, write_kept
from data_processing.dedup import spark as dedup_spark
from data_processing.dedup.spark_components import connected_components
from data_processing.shards import iter_records, list_shards, write_shard

pytestmark = pytest.mark.spark

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Fields that describe the run rather than the result.
RUN_FIELDS = {"engine", "workers", "seconds", "mb_per_s", "spark"}


def rec(repo, name, text):
    return {"text": text, "meta": {"repo_name": repo, "file_name": name, "language": "Python",
                                   "license": "PSF-2.0", "size": len(text.encode("utf-8"))}}


def planted_records():
    """The benchmark's planted set, plus a family of 70 near copies of one file: its LSH buckets
    are bigger than ``ALL_PAIRS_MAX_MEMBERS``, so they are chained, not fully paired."""
    records, _, _ = bench.build_labelled_set(12, seed=3)
    base = (STDLIB / "textwrap.py").read_text()
    rng = random.Random(0)
    family = [rec(f"fork-{rng.randrange(10**6):06d}", "textwrap.py", base + f"\n# local change {i}\n")
              for i in range(70)]
    out = records + family
    random.Random(1).shuffle(out)
    return out


def write_mixed_shards(folder: Path, records) -> None:
    """Three shards, one per supported compression, in unsorted survivor order."""
    third = len(records) // 3
    write_shard(folder / "a.jsonl.zst", records[:third])
    write_shard(folder / "b.jsonl.gz", records[third : 2 * third])
    write_shard(folder / "c.jsonl", records[2 * third :])


def comparable(report):
    out = {k: v for k, v in report.items() if k not in RUN_FIELDS}
    out["near"] = {k: v for k, v in out["near"].items() if k != "peak_shingle_sets_in_memory"}
    return out


def test_same_records_clusters_and_report_as_local_engine(spark, tmp_path):
    records = planted_records()
    write_mixed_shards(tmp_path / "in", records)
    paths = list_shards(tmp_path / "in")
    local = plan_dedup(paths, workers=1, progress=False)
    plan = dedup_spark.plan_spark(spark, str(tmp_path / "in"), progress=False)

    rows = plan.clusters().join(plan.records.select("shard", "idx", "rank", "keep"), ["shard", "idx"]).collect()
    assert len(rows) == len(records)
    position = {(r.shard, r.idx): i for i, r in enumerate(sorted(rows, key=lambda r: (r.shard, r.idx)))}
    by_rank = {r.rank: position[(r.shard, r.idx)] for r in rows}
    keep = np.zeros(len(rows), bool)
    cluster = np.zeros(len(rows), np.int64)
    for r in rows:
        keep[position[(r.shard, r.idx)]] = r.keep
        cluster[position[(r.shard, r.idx)]] = by_rank[r.cluster]
    assert keep.tolist() == local.keep.tolist()
    assert cluster.tolist() == local.cluster.tolist()  # every record points at the same survivor

    # The family's buckets were chained (70 > 64 members) and still form one cluster of 70.
    assert local.report["near"]["largest_clusters"][0]["size"] == 70
    assert comparable(plan.report) == comparable(local.report)
    assert plan.report["near"]["removed_files"] > 70 and plan.report["exact"]["removed_files"] > 0
    stages = plan.report["spark"]["stage_seconds"]
    assert {"signatures", "exact", "lsh", "verify", "clusters"} <= set(stages)
    assert plan.report["spark"]["master"] == "local[2]"

    # Output: a failed write leaves nothing under the final name and no temporary folder.
    out = tmp_path / "out"
    with pytest.raises(Exception, match="injected failure writing shard 1"):
        dedup_spark.write_spark(plan, str(out), progress=False, fail_on_shard=1)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    # A rerun into a folder holding an earlier run's shards replaces them and removes stale ones.
    write_shard(out / "dedup-00007.jsonl.zst", records[:1])
    (out / "notes.txt").write_text("kept")
    dedup_spark.write_spark(plan, str(out), progress=False)
    write_kept(local, tmp_path / "local")
    got = sorted(p.name for p in out.iterdir())
    assert got == ["dedup-00000.jsonl.zst", "dedup-00001.jsonl.zst", "dedup-00002.jsonl.zst",
                   "dedup_report.json", "notes.txt"]
    for name in got[:3]:
        assert list(iter_records(out / name)) == list(iter_records(tmp_path / "local" / name))
        # The same zstd frame as the local writer, then one empty skippable frame.
        assert (out / name).read_bytes()[:-8] == (tmp_path / "local" / name).read_bytes()
    assert comparable(json.loads((out / "dedup_report.json").read_text())) == comparable(local.report)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def real_code(limit: int = 90):
    """Real local code with natural near duplicates: the stdlib's code-page tables and more."""
    files = sorted(STDLIB.glob("encodings/cp*.py"))[:40] + sorted(STDLIB.glob("*.py"))[:limit - 40]
    return [rec(p.parent.name if p.parent != STDLIB else "stdlib", p.name, p.read_text("utf-8")) for p in files]


def test_cli_on_real_code_with_file_uris_writes_what_local_writes(spark, tmp_path, capsys):
    records = real_code()
    write_shard(tmp_path / "in" / "part-0.jsonl.zst", records[::2])
    write_shard(tmp_path / "in" / "part-1.jsonl.zst", records[1::2])
    assert dedup.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "local"), "--workers", "1",
                       "--quiet"]) == 0
    args = ["--engine", "spark", "--input", (tmp_path / "in").as_uri(), "--output", (tmp_path / "spark").as_uri(),
            "--quiet"]
    assert dedup.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    local_report = json.loads((tmp_path / "local" / "dedup_report.json").read_text())
    spark_report = json.loads((tmp_path / "spark" / "dedup_report.json").read_text())
    assert summary["output"] == local_report["output"] == spark_report["output"]
    assert local_report["near"]["removed_files"] > 0  # the code pages really are near duplicates
    assert comparable(spark_report) == comparable(local_report)
    assert spark_report["engine"] == "spark" and spark_report["seconds"]["with_write"] > 0
    assert spark_report["spark"]["startup_seconds"] >= 0 and spark_report["spark"]["stage_seconds"]["write"] > 0
    names = sorted(p.name for p in (tmp_path / "local").glob("*.zst"))
    assert names == sorted(p.name for p in (tmp_path / "spark").glob("*.zst")) == [
        "dedup-00000.jsonl.zst", "dedup-00001.jsonl.zst"]
    for name in names:
        assert list(iter_records(tmp_path / "spark" / name)) == list(iter_records(tmp_path / "local" / name))


def test_bad_input_same_message_as_local_and_skip_bad(spark, tmp_path, capsys):
    records = real_code(12)
    write_shard(tmp_path / "in" / "a.jsonl.zst", records[:6])
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps(records[6]) + "\n{broken\n" + json.dumps(records[7]) + "\n"
                                             + '{"meta": {}}\n')
    messages = []
    for engine in ("local", "spark"):
        out = tmp_path / f"out-{engine}"
        assert dedup.main(["--engine", engine, "--input", str(tmp_path / "in"), "--output", str(out), "--quiet",
                           "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        messages.append(err[0])
        assert not out.exists() or not list(out.iterdir())
    assert messages[0] == messages[1] == f"error: {tmp_path / 'in' / 'b.jsonl'}:2: not a JSON object " \
        "(Expecting property name enclosed in double quotes)"
    reports = []
    for engine in ("local", "spark"):
        out = tmp_path / f"out-{engine}"
        assert dedup.main(["--engine", engine, "--input", str(tmp_path / "in"), "--output", str(out), "--quiet",
                           "--workers", "1", "--skip-bad"]) == 0
        reports.append(json.loads((out / "dedup_report.json").read_text()))
    assert reports[0]["bad_records"] == reports[1]["bad_records"] == {
        "not a JSON object (Expecting property name enclosed in double quotes)": 1,
        "record has no string field 'text'": 1}
    assert comparable(reports[0]) == comparable(reports[1]) and reports[1]["input"]["files"] == 8

    # Spark-only limits, refused up front with one line: hidden shard names, a root as output.
    write_shard(tmp_path / "hidden" / "_part.jsonl", records[:1])
    for args, expected in (
        (["--input", str(tmp_path / "hidden"), "--output", str(tmp_path / "o")],
         f"error: {tmp_path / 'hidden' / '_part.jsonl'}: Spark never reads files whose names start with"),
        (["--input", str(tmp_path / "in"), "--output", "/"], "error: /: the output must be a folder below"),
    ):
        assert dedup.main(["--engine", "spark", "--quiet", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected)


def test_connected_components_match_union_find(spark):
    rng = np.random.default_rng(0)
    n = 300
    ids = rng.permutation(n)  # a long path with shuffled ids needs several rounds
    edges = [(int(ids[i]), int(ids[i + 1])) for i in range(120)]
    edges += [(int(a), int(b)) for a, b in rng.integers(150, n, size=(60, 2)) if a != b]
    roots, rounds = connected_components(spark.createDataFrame(edges, "a long, b long"))
    got = {r.node: r.root for r in roots.collect()}
    expected = dedup.cluster_stage(edges, np.arange(n))
    touched = {x for e in edges for x in e}
    assert got == {x: int(expected[x]) for x in touched}
    assert rounds >= 2
