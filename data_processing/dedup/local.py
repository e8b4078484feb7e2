"""The local engine: stages 1-6 of ``data_processing.dedup`` over a process pool on this machine."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_processing import minhash
from data_processing.dedup.params import BATCH_BYTES, BATCH_RECORDS, DedupParams, map_shingles, map_signatures
from data_processing.dedup.report import DedupCounts, FilesBytes, build_report
from data_processing.dedup.stages import candidate_stage, cluster_stage, exact_stage, survivor_ranks
from data_processing.shards import MAX_RECORD_BYTES, BadRecordCounter, ShardWriter, iter_records
from data_processing.workers import WorkerDiedError, WorkerProcesses


@dataclass
class DedupResult:
    """Outcome of planning: which records (in input order) are kept, and the report."""

    keep: np.ndarray  # bool, one per record in (shard, index) order
    shard_counts: list[int]  # records per input shard, in ``paths`` order
    paths: list[str]
    keys: list[tuple[str, str, int, int]]
    sizes: np.ndarray  # UTF-8 bytes of each record's text
    cluster: np.ndarray  # global index of the survivor standing for each record (itself if kept)
    report: dict[str, Any] = field(default_factory=dict)
    against_shards: int = 0  # leading entries of ``paths`` that are the existing corpus (never written)

    def kept_indices(self, shard: int) -> np.ndarray:
        """Indices, within shard number ``shard``, of its kept records."""
        start = sum(self.shard_counts[:shard])
        return np.flatnonzero(self.keep[start : start + self.shard_counts[shard]])


class Workers:
    """Worker processes over all cores (``workers`` > 1) or plain in-process ``map``.

    ``fork`` starts workers in milliseconds (``spawn`` costs ~1 s per worker re-importing numpy,
    which dominated small runs), but forking a process that already runs JAX's or torch's
    threads can deadlock, so ``spawn`` is used whenever one of those is imported. A worker that
    dies (killed for memory) is an error naming it, not a run that waits forever, as it was with
    ``multiprocessing.Pool``, which silently replaces the worker and loses its task.
    """

    def __init__(self, workers: int | None):
        self.n = workers or os.cpu_count() or 1
        threaded = any(m in sys.modules for m in ("jax", "torch", "tensorflow"))
        method = "fork" if sys.platform == "linux" and not threaded else "spawn"
        self._pool = WorkerProcesses(self.n, context=method) if self.n > 1 else None

    def imap(self, fn: Callable, items, window: int | None = None) -> Iterator:
        """Ordered ``map`` with at most ``window`` (default 2 per worker) tasks in flight:
        ``Pool.imap`` would drain ``items`` as fast as it can read them, queueing the whole
        corpus's texts in memory when workers are slower than the reader."""
        if self._pool is None:
            return map(fn, items)
        return self._reporting_deaths(self._pool.imap(fn, items, window))

    def starmap(self, fn: Callable, items) -> list:
        if self._pool is None:
            return [fn(*args) for args in items]
        return list(self._reporting_deaths(self._pool.starmap(fn, items)))

    @staticmethod
    def _reporting_deaths(results: Iterator) -> Iterator:
        try:
            yield from results
        except WorkerDiedError as e:
            raise RuntimeError(f"a dedup worker process died (killed for memory?): {e}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batches(paths: Sequence[str], skip_bad: bool, bad: BadRecordCounter | None, sink: Callable | None = None,
             wanted: set[int] | None = None, max_record_bytes: int | None = MAX_RECORD_BYTES) -> Iterator[list[str]]:
    """Texts of all records in (shard, index) order, in batches; ``sink(shard, idx, record)``
    sees each record first. With ``wanted`` only records whose global index is in it are sent."""
    batch: list[str] = []
    size = 0
    gid = 0
    for s, path in enumerate(paths):
        for i, record in enumerate(iter_records(path, skip_bad=skip_bad, bad=bad, max_record_bytes=max_record_bytes)):
            if sink is not None:
                sink(s, i, record)
            if wanted is None or gid in wanted:
                batch.append(record["text"])
                size += len(record["text"])
                if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                    yield batch
                    batch, size = [], 0
            gid += 1
    if batch:
        yield batch


@dataclass
class _Signed:
    """Stage 1's output: per-record keys, sizes, languages, exact hashes and signatures."""

    keys: list[tuple[str, str, int, int]]
    sizes: np.ndarray
    languages: list[str]
    shard_counts: list[int]
    exact_h: np.ndarray
    sigs: np.ndarray


def _sign(paths: list[str], params: DedupParams, pool: Workers, skip_bad: bool, bad: BadRecordCounter,
          progress: bool, max_record_bytes: int | None) -> _Signed:
    """Stage 1: map signatures (spread over the pool; ordered results keep determinism)."""
    t0 = time.perf_counter()
    keys: list[tuple[str, str, int, int]] = []
    sizes: list[int] = []
    languages: list[str] = []
    shard_counts = [0] * len(paths)
    read_bytes = [0]  # running total for the progress bar (summing `sizes` per batch is quadratic)

    def sink(s: int, i: int, record: dict) -> None:
        meta = record["meta"]
        keys.append((str(meta.get("repo_name", "")), str(meta.get("file_name", "")), s, i))
        sizes.append(len(record["text"].encode("utf-8")))
        read_bytes[0] += sizes[-1]
        languages.append(str(meta.get("language", "unknown")))
        shard_counts[s] += 1

    fn = partial(map_signatures, num_perm=params.num_perm, seed=params.seed, k=params.shingle_words)
    exact_parts, sig_parts = [], []
    with tqdm(desc="dedup signatures", unit=" files", disable=None if progress else True) as bar:
        for exact, sigs in pool.imap(fn, _batches(paths, skip_bad, bad, sink, max_record_bytes=max_record_bytes)):
            exact_parts.append(exact)
            sig_parts.append(sigs)
            bar.update(len(exact))
            bar.set_postfix_str(f"{read_bytes[0] / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s")
    return _Signed(
        keys=keys, sizes=np.array(sizes, dtype=np.int64), languages=languages, shard_counts=shard_counts,
        exact_h=np.concatenate(exact_parts) if exact_parts else np.zeros(0, np.uint64),
        sigs=np.concatenate(sig_parts) if sig_parts else np.zeros((0, params.num_perm), np.uint32),
    )


def _verify(paths: list[str], pairs: np.ndarray, params: DedupParams, pool: Workers,
            max_record_bytes: int | None) -> tuple[list, int]:
    """Stage 4: verify candidates on exact shingle sets, recomputed for candidates only and
    streamed in input order: a pair (a, b), a < b, is verified as soon as b arrives, and a set
    is dropped after its last partner, so only "open" candidates are held. Returns the verified
    pairs and the most sets held at once."""
    partners: dict[int, list[int]] = {}
    free_at: dict[int, list[int]] = {}
    last_use: dict[int, int] = {}
    for a, b in pairs.tolist():
        partners.setdefault(b, []).append(a)
        last_use[a] = max(last_use.get(a, a), b)
        last_use.setdefault(b, b)
    for x, last in last_use.items():
        free_at.setdefault(last, []).append(x)
    verified: list[tuple[int, int]] = []
    peak_sets = 0
    cand_list = np.unique(pairs).tolist()
    if not cand_list:
        return verified, peak_sets
    it = iter(cand_list)
    shingles: dict[int, np.ndarray] = {}
    fn = partial(map_shingles, k=params.shingle_words)
    batches = _batches(paths, True, None, wanted=set(cand_list), max_record_bytes=max_record_bytes)
    for sets in pool.imap(fn, batches):
        for s in sets:
            gid = next(it)
            shingles[gid] = s
            peak_sets = max(peak_sets, len(shingles))
            for a in partners.get(gid, ()):
                if minhash.jaccard(shingles[a], s) >= params.threshold:
                    verified.append((a, gid))
            for x in free_at.get(gid, ()):
                del shingles[x]
    return verified, peak_sets


def _clusters(signed: _Signed, roots: np.ndarray, exact_keep: np.ndarray, near_keep: np.ndarray,
              rank: np.ndarray) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The cluster size histogram and the 10 largest clusters (survivor and 5 example names)."""
    def name(i: int) -> str:
        return f"{signed.keys[i][0]}/{signed.keys[i][1]}"

    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(exact_keep & ~near_keep):
        members.setdefault(int(roots[i]), []).append(int(i))
    clusters = sorted(members.items(), key=lambda kv: (-len(kv[1]), rank[kv[0]]))
    sizes = [len(m) + 1 for _, m in clusters]
    histogram = {str(s): sizes.count(s) for s in sorted(set(sizes))}
    largest = [{"size": len(m) + 1, "survivor": name(root), "examples": [name(i) for i in m[:5]]}
               for root, m in clusters[:10]]
    return histogram, largest


def _removed_by_language(signed: _Signed, exact_keep: np.ndarray, in_clusters: np.ndarray) -> dict:
    by_language: dict[str, dict[str, dict[str, int]]] = {}
    for stage, mask in (("exact", ~exact_keep), ("near", in_clusters)):
        for i in np.flatnonzero(mask):
            entry = by_language.setdefault(signed.languages[i], {}).setdefault(stage, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += int(signed.sizes[i])
    return by_language


def plan_dedup(
    paths: Sequence[str],
    params: DedupParams | None = None,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    bad: BadRecordCounter | None = None,
    pool: Workers | None = None,
    progress: bool = True,
    against: Sequence[str] = (),
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> DedupResult:
    """Run stages 1-5 over ``paths`` and decide which records survive (nothing is written).

    ``against``: shards of an existing (deduplicated) corpus. They go through the same stages
    ahead of ``paths`` and outrank every new record, so a new record survives only when it is
    neither an exact nor a near duplicate of an old one (nor of a surviving new one). A line over
    ``max_record_bytes`` is a bad record (pass the same limit to ``write_kept``)."""
    params = (params or DedupParams()).resolved()
    against = list(against)
    paths = against + list(paths)
    bad = bad if bad is not None else BadRecordCounter()
    own_pool = pool is None
    pool = pool or Workers(workers)
    t = [time.perf_counter()]
    try:
        signed = _sign(paths, params, pool, skip_bad, bad, progress, max_record_bytes)
        rank = survivor_ranks(signed.keys, sum(signed.shard_counts[:len(against)]))
        t.append(time.perf_counter())
        # Stage 2: shuffle by exact hash; the lowest-ranked record of each group survives.
        exact_keep, exact_rep, group_sizes = exact_stage(signed.exact_h, rank)
        t.append(time.perf_counter())
        # Stage 3: band keys of exact survivors, shuffled into buckets -> candidate pairs.
        pairs = candidate_stage(signed.sigs, exact_keep, params.bands, params.rows, rank)
        t.append(time.perf_counter())
        verified, peak_sets = _verify(paths, pairs, params, pool, max_record_bytes)
        t.append(time.perf_counter())
        # Stage 5: union-find clusters; each root is its cluster's survivor.
        n = len(signed.keys)
        roots = cluster_stage(verified, rank)
        near_keep = exact_keep & (roots == np.arange(n))
        cluster = roots[exact_rep] if n else roots
        t.append(time.perf_counter())
    finally:
        if own_pool:
            pool.close()
    report = _report(signed, params, bad, rank, roots, exact_keep, near_keep, group_sizes, pairs, verified, peak_sets)
    elapsed = t[5] - t[0]
    report["workers"] = pool.n
    report["seconds"] = {name: t[i + 1] - t[i] for i, name in enumerate(("signatures", "exact", "lsh", "verify",
                                                                         "clusters"))}
    report["seconds"]["total"] = elapsed
    report["mb_per_s"] = report["input"]["bytes"] / 1e6 / max(elapsed, 1e-9)
    result = DedupResult(keep=near_keep, shard_counts=signed.shard_counts, paths=paths, keys=signed.keys,
                         sizes=signed.sizes, cluster=cluster, report=report, against_shards=len(against))
    if against:
        report["against"] = against_report(result)
        report["output"] = report["against"]["kept"]
    return result


def against_report(result: DedupResult) -> dict[str, Any]:
    """``report["against"]``: the existing corpus's size, and what became of the new records: kept,
    removed as duplicates of the existing corpus (their survivor is an old record), or removed as
    duplicates of each other."""
    n_old = sum(result.shard_counts[:result.against_shards])
    index = np.arange(result.keep.size)
    new = index >= n_old

    def count(mask: np.ndarray) -> dict[str, int]:
        return {"files": int(mask.sum()), "bytes": int(result.sizes[mask].sum())}

    return {
        "shards": result.against_shards,
        **count(~new),
        "new": count(new),
        "kept": count(new & result.keep),
        "removed_duplicate_of_against": count(new & ~result.keep & (result.cluster < n_old)),
        "removed_within_input": count(new & ~result.keep & (result.cluster >= n_old)),
    }


def _report(signed: _Signed, params: DedupParams, bad: BadRecordCounter, rank, roots, exact_keep, near_keep,
            group_sizes, pairs, verified, peak_sets) -> dict[str, Any]:
    """The shared report of the local plan's arrays."""
    size = signed.sizes
    in_clusters = exact_keep & ~near_keep
    histogram, largest = _clusters(signed, roots, exact_keep, near_keep, rank)
    counts = DedupCounts(
        input=FilesBytes(len(signed.keys), int(size.sum())), shards=len(signed.shard_counts),
        exact_removed=FilesBytes(int((~exact_keep).sum()), int(size[~exact_keep].sum())),
        duplicate_groups=int((group_sizes > 1).sum()),
        near_removed=FilesBytes(int(in_clusters.sum()), int(size[in_clusters].sum())),
        output=FilesBytes(int(near_keep.sum()), int(size[near_keep].sum())),
        candidate_pairs=int(len(pairs)), verified_pairs=len(verified), candidate_records=int(np.unique(pairs).size),
        peak_shingle_sets=peak_sets, cluster_size_histogram=histogram, largest_clusters=largest,
        removed_by_language=_removed_by_language(signed, exact_keep, in_clusters), bad_records=dict(bad.counts),
    )
    return build_report(counts, params, "local")


def _filter_shard(src: str, dst: str, kept: list[int], skip_bad: bool,
                  max_record_bytes: int | None = MAX_RECORD_BYTES) -> tuple[int, int]:
    wanted = set(kept)
    with ShardWriter(dst) as writer:
        for i, record in enumerate(iter_records(src, skip_bad=skip_bad, max_record_bytes=max_record_bytes)):
            if i in wanted:
                writer.write(record)
    return writer.count, writer.bytes_written


def write_kept(result: DedupResult, out_dir: str | os.PathLike, *, skip_bad: bool = False,
               pool: Workers | None = None, max_record_bytes: int | None = MAX_RECORD_BYTES) -> list[str]:
    """Stage 6: write kept records of input shard ``i`` to ``out_dir/dedup-{i:05d}.jsonl.zst``
    (one map task per shard; ``--against`` shards are not inputs and are not written), and delete
    stale ``dedup-*`` shards of an earlier run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skip = result.against_shards  # the existing corpus is read, never rewritten
    tasks = [(src, str(out / f"dedup-{s - skip:05d}.jsonl.zst"), result.kept_indices(s).tolist(), skip_bad,
              max_record_bytes)
             for s, src in enumerate(result.paths) if s >= skip]
    own = pool is None
    pool = pool or Workers(1)
    try:
        pool.starmap(_filter_shard, tasks)
    finally:
        if own:
            pool.close()
    written = {Path(t[1]).name for t in tasks}
    for old in out.glob("dedup-*.jsonl.zst"):
        if old.name not in written:
            old.unlink()
    return [t[1] for t in tasks]
