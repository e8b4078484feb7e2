"""The dedup report (``dedup_report.json``): one builder for both engines. Each engine computes
the counts its own way (numpy arrays, Spark aggregates) and hands them here, so the two reports
have the same fields, meanings and order."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from data_processing import minhash
from data_processing.dedup.params import DedupParams

SURVIVOR_RULE = "lowest (repo_name, file_name), then (shard, record index)"


@dataclass
class FilesBytes:
    """A count of files and their UTF-8 bytes."""

    files: int = 0
    bytes: int = 0


@dataclass
class DedupCounts:
    """What a plan found, engine-independent."""

    input: FilesBytes
    shards: int
    exact_removed: FilesBytes
    duplicate_groups: int
    near_removed: FilesBytes
    output: FilesBytes
    candidate_pairs: int
    verified_pairs: int
    candidate_records: int
    peak_shingle_sets: int | None  # the local engine's streaming peak; Spark spreads sets over tasks
    cluster_size_histogram: dict[str, int]  # cluster size (members + survivor) -> clusters
    largest_clusters: list[dict[str, Any]]  # {"size", "survivor", "examples"}, largest first, at most 10
    removed_by_language: dict[str, dict[str, dict[str, int]]]  # language -> stage -> {"files", "bytes"}
    bad_records: dict[str, int] = field(default_factory=dict)


def build_report(counts: DedupCounts, params: DedupParams, engine: str) -> dict[str, Any]:
    """The report's common fields; engines add ``workers``, ``seconds``, ``mb_per_s`` (and ``spark``)."""
    return {
        "engine": engine,
        "input": {**asdict(counts.input), "shards": counts.shards},
        "exact": {"removed_files": counts.exact_removed.files, "removed_bytes": counts.exact_removed.bytes,
                  "duplicate_groups": counts.duplicate_groups},
        "near": {
            "candidate_pairs": counts.candidate_pairs,
            "verified_pairs": counts.verified_pairs,
            "candidate_records": counts.candidate_records,
            "peak_shingle_sets_in_memory": counts.peak_shingle_sets,
            "clusters": sum(counts.cluster_size_histogram.values()),
            "removed_files": counts.near_removed.files,
            "removed_bytes": counts.near_removed.bytes,
            "cluster_size_histogram": counts.cluster_size_histogram,
            "largest_clusters": counts.largest_clusters,
        },
        "output": asdict(counts.output),
        "removed_by_language": dict(sorted(counts.removed_by_language.items())),
        "params": {**asdict(params), "p_candidate_at_threshold":
                   minhash.candidate_probability(params.threshold, params.bands, params.rows)},
        "survivor_rule": SURVIVOR_RULE,
        "bad_records": dict(counts.bad_records),
    }
