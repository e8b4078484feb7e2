"""Dedup engine: exact + near stages, deterministic survivors, report, bad input, reruns."""

import json
import sysconfig
from pathlib import Path

import pytest

from data_processing import dedup
from data_processing.dedup import DedupParams, plan_dedup
from data_processing.shards import ShardWriter, iter_dir_records, iter_records, write_shard
from tests.helpers import code_record, near_copy

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = ["bisect.py", "heapq.py", "textwrap.py", "shlex.py", "fnmatch.py", "json/decoder.py", "glob.py"]


@pytest.fixture
def corpus():
    texts = {n: (STDLIB / n).read_text() for n in NAMES}
    records = [code_record("m-orig", n, t) for n, t in texts.items()]
    records += [
        code_record("z-exact", "bisect.py", texts["bisect.py"].replace("\n", "\r\n").replace("    ", "\t")),
        code_record("z-exact", "bisect_again.py", texts["bisect.py"]),
        code_record("a-near", "heapq_fork.py", near_copy(texts["heapq.py"])),  # sorts first: survives its cluster
        code_record("z-near", "textwrap.py", near_copy(texts["textwrap.py"], 20)),
        code_record("z-near", "textwrap2.py", near_copy(texts["textwrap.py"], 25)),
        code_record("z-far", "shlex.py", near_copy(texts["shlex.py"], 2)),  # half the lines changed: not a duplicate
    ]
    return records


def kept_names(records, result):
    pairs = zip(records, result.keep, strict=True)
    return sorted((r["meta"]["repo_name"], r["meta"]["file_name"]) for r, k in pairs if k)


def test_exact_and_near_with_documented_survivors(tmp_path, corpus):
    write_shard(tmp_path / "a.jsonl.zst", corpus)
    result = plan_dedup([str(tmp_path / "a.jsonl.zst")], workers=1, progress=False)
    kept = kept_names(corpus, result)
    assert ("a-near", "heapq_fork.py") in kept and ("m-orig", "heapq.py") not in kept
    assert ("m-orig", "bisect.py") in kept
    assert not any(repo == "z-exact" for repo, _ in kept)
    assert ("m-orig", "textwrap.py") in kept and not any(repo == "z-near" for repo, _ in kept)
    assert ("z-far", "shlex.py") in kept and ("m-orig", "shlex.py") in kept
    rep = result.report
    assert rep["input"]["files"] == len(corpus)
    assert rep["exact"]["removed_files"] == 2 and rep["exact"]["duplicate_groups"] == 1
    assert rep["near"]["removed_files"] == 3 and rep["near"]["clusters"] == 2
    assert rep["output"]["files"] == len(corpus) - 5
    assert rep["near"]["cluster_size_histogram"] == {"2": 1, "3": 1}
    assert rep["removed_by_language"]["Python"]["exact"]["files"] == 2
    assert rep["removed_by_language"]["Python"]["near"]["files"] == 3
    top = rep["near"]["largest_clusters"][0]
    assert top == {"size": 3, "survivor": "m-orig/textwrap.py",
                   "examples": ["z-near/textwrap.py", "z-near/textwrap2.py"]}
    assert rep["params"]["bands"] * rep["params"]["rows"] <= rep["params"]["num_perm"]
    assert rep["params"]["p_candidate_at_threshold"] >= 0.99
    assert 0 < rep["near"]["peak_shingle_sets_in_memory"] <= rep["near"]["candidate_records"]
    # Every record points at the survivor standing for it.
    assert all(result.keep[c] for c in result.cluster)


def test_kept_set_independent_of_order_sharding_and_workers(tmp_path, corpus):
    write_shard(tmp_path / "one" / "a.jsonl.zst", corpus)
    base = plan_dedup([str(tmp_path / "one" / "a.jsonl.zst")], workers=1, progress=False)
    rev = corpus[::-1]
    write_shard(tmp_path / "two" / "a.jsonl.gz", rev[:5])
    write_shard(tmp_path / "two" / "b.jsonl", rev[5:])
    paths = [str(tmp_path / "two" / "a.jsonl.gz"), str(tmp_path / "two" / "b.jsonl")]
    other = plan_dedup(paths, workers=2, progress=False)
    assert kept_names(rev, other) == kept_names(corpus, base)
    assert other.report["workers"] == 2


def test_threshold_parameter(tmp_path, corpus):
    write_shard(tmp_path / "a.jsonl.zst", corpus)
    path = str(tmp_path / "a.jsonl.zst")
    strict = plan_dedup([path], DedupParams(threshold=0.99), workers=1, progress=False)
    assert strict.report["near"]["removed_files"] == 0
    assert strict.report["exact"]["removed_files"] == 2


def test_cli_writes_kept_records_unchanged_and_report(tmp_path, corpus):
    write_shard(tmp_path / "in" / "a.jsonl.zst", corpus[:8])
    write_shard(tmp_path / "in" / "b.jsonl.zst", corpus[8:])
    out = tmp_path / "out"
    assert dedup.main(["--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1"]) == 0
    got = list(iter_dir_records(out))
    assert len(got) == len(corpus) - 5
    assert all(r in corpus for r in got)
    assert sorted(p.name for p in out.glob("*.zst")) == ["dedup-00000.jsonl.zst", "dedup-00001.jsonl.zst"]
    report = json.loads((out / "dedup_report.json").read_text())
    for key in ("input", "exact", "near", "output", "params", "seconds", "mb_per_s", "survivor_rule"):
        assert key in report
    assert report["mb_per_s"] > 0 and report["output"]["files"] == len(got)


def test_cli_bad_input_one_line_and_no_partial_output(tmp_path, corpus, capsys):
    write_shard(tmp_path / "in" / "a.jsonl.zst", corpus[:3])
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps(corpus[3]) + "\n{broken\n")
    out = tmp_path / "out"
    assert dedup.main(["--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'in' / 'b.jsonl'}:2: not a JSON object" in err[0]
    assert not out.exists() or not list(out.iterdir())
    assert dedup.main(["--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1",
                       "--skip-bad"]) == 0
    report = json.loads((out / "dedup_report.json").read_text())
    assert report["input"]["files"] == 4 and sum(report["bad_records"].values()) == 1


def test_interrupted_run_reruns_cleanly(tmp_path, corpus, monkeypatch):
    write_shard(tmp_path / "in" / "a.jsonl.zst", corpus[:6])
    write_shard(tmp_path / "in" / "b.jsonl.zst", corpus[6:])
    out = tmp_path / "out"
    write_shard(out / "dedup-00009.jsonl.zst", corpus[:1])  # stale shard of an older run
    real_write = ShardWriter.write
    calls = {"n": 0}

    def crash(self, record):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        real_write(self, record)

    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--workers", "1"]
    monkeypatch.setattr(ShardWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        dedup.main(args)
    # The shard being written when the run died is not under its final name.
    assert not (out / "dedup-00001.jsonl.zst").exists()
    assert not (out / "dedup_report.json").exists()
    monkeypatch.setattr(ShardWriter, "write", real_write)
    assert dedup.main(args) == 0
    assert sorted(p.name for p in out.glob("*.zst")) == ["dedup-00000.jsonl.zst", "dedup-00001.jsonl.zst"]
    assert sum(1 for p in out.glob("*.zst") for _ in iter_records(p)) == len(corpus) - 5


def _square(x):
    return x * x


def test_worker_pool_keeps_order_and_bounds_read_ahead():
    consumed = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield i

    with dedup.Workers(2) as pool:
        it = pool.imap(_square, items(), window=3)
        assert next(it) == 0
        assert len(consumed) <= 4  # never the whole input queued
        assert list(it) == [i * i for i in range(1, 40)]


def test_stage_functions_are_pure_and_follow_the_survivor_rule():
    import numpy as np

    exact_h = np.array([7, 3, 7, 5, 3, 7], dtype=np.uint64)
    rank = np.array([4, 5, 0, 1, 2, 3])
    keep, rep, sizes = dedup.exact_stage(exact_h, rank)
    assert keep.tolist() == [False, False, True, True, True, False]
    assert rep.tolist() == [2, 4, 2, 3, 4, 2]
    assert sorted(sizes.tolist()) == [1, 2, 3]
    roots = dedup.cluster_stage([(3, 4), (4, 2)], rank)
    assert roots.tolist() == [0, 1, 2, 2, 2, 5]  # rank 0 (record 2) wins the 3-member cluster
    sigs = np.array([[1, 2], [1, 2], [9, 9], [1, 2]], dtype=np.uint32)
    live = np.array([True, True, True, False])
    assert dedup.candidate_stage(sigs, live, bands=2, rows=1).tolist() == [[0, 1]]


def test_big_bucket_chain_follows_survivor_order_not_input_order():
    import numpy as np

    sigs = np.zeros((100, 16), dtype=np.uint32)  # one giant bucket
    live = np.ones(100, dtype=bool)
    rank = np.arange(100)[::-1].copy()  # survivor order is the reverse of input order
    pairs = dedup.candidate_stage(sigs, live, bands=1, rows=16, rank=rank)
    assert len(pairs) == 99 and all(b - a == 1 for a, b in pairs.tolist())
    perm = np.random.default_rng(0).permutation(100)
    shuffled = dedup.candidate_stage(sigs, live, 1, 16, rank=rank[perm])
    # Same neighbours by survivor rank, whatever the input order.
    as_ranks = sorted(tuple(sorted(rank[perm][p].tolist())) for p in shuffled)
    assert as_ranks == sorted(tuple(sorted(rank[p].tolist())) for p in pairs)
