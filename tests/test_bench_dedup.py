"""The dedup benchmark runs end to end, and our engine meets its quality target on a planted set."""

import json

import pytest

from bench import dedup as bench


def test_smallest_benchmark_prints_one_json_line(capsys):
    out = bench.main(["--quick", "--originals", "10", "--workers", "1", "--engines", "local,datasketch"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    parsed = json.loads(last)
    assert parsed == json.loads(json.dumps(out))
    for tool in ("ours", "datasketch"):
        for key in ("precision", "recall", "mb_per_s"):
            assert parsed[tool][key] >= 0 and (key == "mb_per_s" or parsed[tool][key] <= 1)
        assert parsed[tool]["tp"] + parsed[tool]["fn"] == parsed["duplicate_pairs"]
    assert parsed["threshold"] == 0.85 and parsed["files"] > 10 and parsed["mb"] > 0
    assert parsed["cpu_cores"] >= 1 and parsed["labelled_pairs"] > parsed["duplicate_pairs"] > 0


def test_labels_are_true_jaccard_and_cover_every_kind():
    records, pairs, kinds = bench.build_labelled_set(12)
    assert {"exact", "reformatted", "comments_stripped", "identifiers_renamed", "lines_edited",
            "hard_negative_same_licence"} <= set(kinds)
    for i, j, dup in pairs:
        jac = bench.true_jaccard(records[i]["text"], records[j]["text"])
        assert (jac >= 0.85) if dup else (jac < 0.70)
    # Hard negatives really share a long header and are still labelled distinct.
    neg = [(i, j) for i, j, dup in pairs if records[i]["meta"]["repo_name"].startswith("licensed-")]
    assert neg and all(not dup for i, j, dup in pairs if (i, j) in neg)
    assert all(records[i]["text"][:2000] == records[j]["text"][:2000] for i, j in neg)


def test_our_engine_precision_and_recall_on_planted_set():
    records, pairs, _ = bench.build_labelled_set(40, seed=1)
    cluster, _ = bench.run_ours(records, workers=1)
    s = bench.score(cluster, pairs)
    assert s["tp"] + s["fn"] >= 50
    assert s["precision"] >= 0.99 and s["recall"] >= 0.97, s


@pytest.mark.spark
def test_spark_engine_in_benchmark_scores_like_ours(spark, capsys):
    out = bench.main(["--quick", "--originals", "10", "--workers", "1", "--engines", "local,spark"])
    parsed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert parsed == json.loads(json.dumps(out)) and "datasketch" not in parsed
    # The same decisions, so the same score on every labelled pair.
    for key in ("precision", "recall", "tp", "fp", "fn"):
        assert parsed["spark"][key] == parsed["ours"][key]
    assert parsed["spark"]["tp"] > 0 and parsed["spark"]["mb_per_s"] > 0
    # The session already ran other tests here, so there is nothing to warm up.
    assert parsed["spark"]["startup_seconds"] >= 0 and parsed["spark"]["warmup_seconds"] >= 0


def test_scaling_series_measures_each_engine_in_its_own_process():
    # Two tiny steps of the local engine and datasketch: sizes grow, memory and times are measured.
    rows = bench.scaling_series([1, 2], 0.3, ["local", "datasketch"], originals=20)
    assert [(r["scale"], r["engine"]) for r in rows] == [(1, "local"), (1, "datasketch"), (2, "local"),
                                                          (2, "datasketch")]
    assert rows[2]["mb"] >= 0.6 * 0.95 and rows[0]["mb"] >= 0.3 * 0.95 and rows[2]["files"] > rows[0]["files"]
    for r in rows:
        assert r["peak_rss_mb"] >= r["driver_rss_mb"] > 10 and r["seconds"] > 0 and r["wall_seconds"] > r["seconds"]
    assert rows[0]["kept"] <= rows[0]["files"]
