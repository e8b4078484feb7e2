"""Exact and near-duplicate removal over shards, written as map / shuffle stages.

Stages (each a pure function of its inputs, so a cluster engine can run the same steps; see
``docs/data.md``):

1. **map signatures** - per record: key ``(repo_name, file_name, shard, index)``, size, a
   64-bit hash of the whitespace-normalised text, and a MinHash signature. Only these leave the
   map: memory is bounded by signatures, never by texts.
2. **shuffle exact** - group by the exact hash; one survivor per group.
3. **map band keys -> shuffle buckets** - LSH band hashes of the exact survivors; records
   sharing a bucket become candidate pairs.
4. **verify** - the candidates' shingle sets are recomputed from the shards (only for records
   in some candidate pair) and pairs with exact Jaccard >= threshold are kept.
5. **clusters** - union-find over verified pairs; connected components are clusters.
6. **map filter** - every shard is re-read and its kept records written unchanged.

Survivor rule (exact groups and near clusters alike): the member with the lowest
``(repo_name, file_name)``, ties broken by input position ``(shard path, record index)``.
It depends only on the records, never on timing or worker count, so any engine reproduces the
same kept set.

    python -m data_processing.dedup --input DIR --output DIR [--threshold 0.85] [--workers N]
    python -m data_processing.dedup --engine spark [--master local[2]|spark://HOST:7077|yarn] \\
        --input URI --output URI [--threshold 0.85]       # the same stages on Spark, the same output
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_processing import minhash
from data_processing.shards import (
    MAX_RECORD_BYTES,
    BadRecordCounter,
    ShardError,
    ShardWriter,
    iter_records,
    list_shards,
)
from data_processing.workers import WorkerDiedError, WorkerProcesses

BATCH_RECORDS = 64
BATCH_BYTES = 1 << 20  # small batches keep all workers busy on small inputs


@dataclass
class DedupParams:
    """Near-duplicate parameters; ``bands``/``rows`` default to ``minhash.choose_bands``."""

    threshold: float = 0.85
    num_perm: int = 128
    bands: int | None = None
    rows: int | None = None
    seed: int = 1
    shingle_words: int = minhash.SHINGLE_WORDS
    lsh_target: float = 0.99

    def resolved(self) -> DedupParams:
        if self.bands is None or self.rows is None:
            self.bands, self.rows = minhash.choose_bands(self.threshold, self.num_perm, self.lsh_target)
        return self


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

    def kept_indices(self, shard: int) -> np.ndarray:
        """Indices, within shard number ``shard``, of its kept records."""
        start = sum(self.shard_counts[:shard])
        return np.flatnonzero(self.keep[start : start + self.shard_counts[shard]])


def normalise_whitespace(text: str) -> str:
    """Text with every whitespace run replaced by one space and the ends stripped."""
    return " ".join(text.split())


_WHITESPACE = re.compile(r"\s")  # the characters str.split() splits on
_PIECE_CHARS = 1 << 18


def exact_hash(text: str) -> int:
    """``hash_bytes`` of the UTF-8 ``normalise_whitespace(text)``, computed over pieces of the
    text cut at whitespace: ``split()`` of a whole 10 MB text holds a word object per word,
    about 8 times the text in memory."""
    digest = hashlib.blake2b(digest_size=8)
    lo, n, sep = 0, len(text), ""
    while lo < n:
        hi = lo + _PIECE_CHARS
        if hi < n:
            found = _WHITESPACE.search(text, hi)
            hi = found.start() if found else n
        words = text[lo:hi].split()
        if words:
            digest.update((sep + " ".join(words)).encode("utf-8"))
            sep = " "
        lo = hi
    return int.from_bytes(digest.digest(), "little")


def map_signatures(texts: list[str], num_perm: int, seed: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 for a batch of texts: uint64 exact hashes (whitespace-normalised blake2b) and
    ``(n, num_perm)`` uint32 MinHash signatures. Every engine calls this one function, so their
    hashes and signatures are bit-identical."""
    exact = np.array([exact_hash(t) for t in texts], dtype=np.uint64)
    sigs = np.stack([minhash.signature(minhash.shingle_hashes(t, k), num_perm, seed) for t in texts])
    return exact, sigs


def _map_shingles(texts: list[str], k: int) -> list[np.ndarray]:
    return [minhash.shingle_hashes(t, k) for t in texts]


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


def _survivor_ranks(keys: list[tuple[str, str, int, int]]) -> np.ndarray:
    """Rank of every record under the survivor order (lowest rank survives)."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys))
    return rank


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving; roots are the lowest-ranked member."""

    def __init__(self, rank: np.ndarray):
        self.parent = np.arange(rank.size)
        self.rank = rank

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The lower-ranked root wins, so every root *is* its cluster's survivor.
            if self.rank[rb] < self.rank[ra]:
                ra, rb = rb, ra
            self.parent[rb] = ra


def exact_stage(exact_h: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle by exact hash. Returns ``keep`` (the lowest-ranked record of each hash group),
    ``rep`` (each record's group survivor) and the group sizes."""
    n = exact_h.size
    order = np.lexsort((rank, exact_h))
    first = np.ones(n, dtype=bool)
    first[1:] = exact_h[order][1:] != exact_h[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    # Each record's survivor is the first of its run in the sorted order.
    rep = np.empty(n, dtype=np.int64)
    rep[order] = order[np.flatnonzero(first)[np.cumsum(first) - 1]] if n else order
    return keep, rep, np.diff(np.append(np.flatnonzero(first), n))


def candidate_stage(sigs: np.ndarray, live: np.ndarray, bands: int, rows: int,
                    rank: np.ndarray | None = None) -> np.ndarray:
    """Map band keys of the ``live`` (bool mask) records and shuffle them into buckets; returns
    unique candidate pairs ``(a, b), a < b`` of global record indices.

    Records are bucketed in ``rank`` (survivor-key) order, so the chain used for very large
    buckets links the same neighbours whatever the input order or engine.
    """
    idx = np.flatnonzero(live)
    if idx.size == 0:
        return np.zeros((0, 2), np.int64)
    if rank is not None:
        idx = idx[np.argsort(rank[idx], kind="stable")]
    pairs = idx[minhash.bucket_pairs(minhash.band_keys(sigs[idx], bands, rows))]
    return np.unique(np.sort(pairs, axis=1), axis=0) if pairs.size else pairs


def cluster_stage(edges: list[tuple[int, int]], rank: np.ndarray) -> np.ndarray:
    """Connected components of the verified pairs; returns each record's root, which is the
    lowest-ranked member of its component (the survivor)."""
    uf = UnionFind(rank)
    for a, b in edges:
        uf.union(a, b)
    return np.array([uf.find(i) for i in range(rank.size)], dtype=np.int64)


def plan_dedup(
    paths: Sequence[str],
    params: DedupParams | None = None,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    bad: BadRecordCounter | None = None,
    pool: Workers | None = None,
    progress: bool = True,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> DedupResult:
    """Run stages 1-5 over ``paths`` and decide which records survive (nothing is written).
    A line over ``max_record_bytes`` is a bad record (pass the same limit to ``write_kept``)."""
    params = (params or DedupParams()).resolved()
    paths = list(paths)
    bad = bad if bad is not None else BadRecordCounter()
    own_pool = pool is None
    pool = pool or Workers(workers)
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

    try:
        # Stage 1: map signatures (spread over the pool; ordered results keep determinism).
        fn = partial(map_signatures, num_perm=params.num_perm, seed=params.seed, k=params.shingle_words)
        exact_parts, sig_parts = [], []
        with tqdm(desc="dedup signatures", unit=" files", disable=None if progress else True) as bar:
            for exact, sigs in pool.imap(fn, _batches(paths, skip_bad, bad, sink, max_record_bytes=max_record_bytes)):
                exact_parts.append(exact)
                sig_parts.append(sigs)
                bar.update(len(exact))
                bar.set_postfix_str(f"{read_bytes[0] / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s")
        n = len(keys)
        exact_h = np.concatenate(exact_parts) if exact_parts else np.zeros(0, np.uint64)
        sigs = (np.concatenate(sig_parts) if sig_parts else np.zeros((0, params.num_perm), np.uint32))
        size_arr = np.array(sizes, dtype=np.int64)
        rank = _survivor_ranks(keys)
        t1 = time.perf_counter()

        # Stage 2: shuffle by exact hash; the lowest-ranked record of each group survives.
        exact_keep, exact_rep, group_sizes = exact_stage(exact_h, rank)
        t2 = time.perf_counter()

        # Stage 3: band keys of exact survivors, shuffled into buckets -> candidate pairs.
        pairs = candidate_stage(sigs, exact_keep, params.bands, params.rows, rank)
        t3 = time.perf_counter()

        # Stage 4: verify candidates on exact shingle sets, recomputed for candidates only and
        # streamed in input order: a pair (a, b), a < b, is verified as soon as b arrives, and a
        # set is dropped after its last partner, so only "open" candidates are held.
        cand = np.unique(pairs)
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
        if cand.size:
            cand_list = cand.tolist()
            it = iter(cand_list)
            shingles: dict[int, np.ndarray] = {}
            fn2 = partial(_map_shingles, k=params.shingle_words)
            batches = _batches(paths, True, None, wanted=set(cand_list), max_record_bytes=max_record_bytes)
            for sets in pool.imap(fn2, batches):
                for s in sets:
                    gid = next(it)
                    shingles[gid] = s
                    peak_sets = max(peak_sets, len(shingles))
                    for a in partners.get(gid, ()):
                        if minhash.jaccard(shingles[a], s) >= params.threshold:
                            verified.append((a, gid))
                    for x in free_at.get(gid, ()):
                        del shingles[x]
        t4 = time.perf_counter()

        # Stage 5: union-find clusters; each root is its cluster's survivor.
        roots = cluster_stage(verified, rank)
        near_keep = exact_keep & (roots == np.arange(n))
        cluster = roots[exact_rep] if n else roots
        t5 = time.perf_counter()
    finally:
        if own_pool:
            pool.close()

    def name(i: int) -> str:
        return f"{keys[i][0]}/{keys[i][1]}"

    in_clusters = exact_keep & ~near_keep
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(in_clusters):
        members.setdefault(int(roots[i]), []).append(int(i))
    clusters = sorted(members.items(), key=lambda kv: (-len(kv[1]), rank[kv[0]]))
    cluster_sizes = [len(m) + 1 for _, m in clusters]
    by_language: dict[str, dict[str, dict[str, int]]] = {}
    for stage, mask in (("exact", ~exact_keep), ("near", in_clusters)):
        for i in np.flatnonzero(mask):
            entry = by_language.setdefault(languages[i], {}).setdefault(stage, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += int(size_arr[i])
    total_bytes = int(size_arr.sum())
    elapsed = t5 - t0
    report = {
        "input": {"files": n, "bytes": total_bytes, "shards": len(paths)},
        "exact": {
            "removed_files": int((~exact_keep).sum()),
            "removed_bytes": int(size_arr[~exact_keep].sum()),
            "duplicate_groups": int((group_sizes > 1).sum()),
        },
        "near": {
            "candidate_pairs": int(len(pairs)),
            "verified_pairs": len(verified),
            "candidate_records": int(cand.size),
            "peak_shingle_sets_in_memory": peak_sets,
            "clusters": len(clusters),
            "removed_files": int(in_clusters.sum()),
            "removed_bytes": int(size_arr[in_clusters].sum()),
            "cluster_size_histogram": {str(s): cluster_sizes.count(s) for s in sorted(set(cluster_sizes))},
            "largest_clusters": [
                {"size": len(m) + 1, "survivor": name(root), "examples": [name(i) for i in m[:5]]}
                for root, m in clusters[:10]
            ],
        },
        "output": {"files": int(near_keep.sum()), "bytes": int(size_arr[near_keep].sum())},
        "removed_by_language": dict(sorted(by_language.items())),
        "params": {**asdict(params), "p_candidate_at_threshold":
                   minhash.candidate_probability(params.threshold, params.bands, params.rows)},
        "survivor_rule": "lowest (repo_name, file_name), then (shard, record index)",
        "bad_records": dict(bad.counts),
        "engine": "local",
        "workers": pool.n,
        "seconds": {"signatures": t1 - t0, "exact": t2 - t1, "lsh": t3 - t2, "verify": t4 - t3,
                    "clusters": t5 - t4, "total": elapsed},
        "mb_per_s": total_bytes / 1e6 / max(elapsed, 1e-9),
    }
    return DedupResult(keep=near_keep, shard_counts=shard_counts, paths=paths, keys=keys, sizes=size_arr,
                       cluster=cluster, report=report)


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
    (one map task per shard), and delete stale ``dedup-*`` shards of an earlier run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(src, str(out / f"dedup-{s:05d}.jsonl.zst"), result.kept_indices(s).tolist(), skip_bad, max_record_bytes)
             for s, src in enumerate(result.paths)]
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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary name and rename it, like the shards."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _spark_conf(items: list[str]) -> dict[str, str]:
    conf = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--spark-conf {item!r}: expected KEY=VALUE")
        conf[key] = value
    return conf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder (or glob) of input shards; a Hadoop URI with --engine spark")
    p.add_argument("--output", required=True, help="output folder; a Hadoop URI with --engine spark")
    p.add_argument("--engine", choices=("local", "spark"), default="local",
                   help="local: a process pool on this machine (default); spark: Spark jobs (dedup_spark.py)")
    p.add_argument("--master", default=None,
                   help="Spark master (local[2], spark://HOST:7077, yarn); default: spark-submit's, else local[*]")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE", help="Spark setting (repeatable)")
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores; local engine)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help=f"a line longer than this is a bad record, never read whole (default {MAX_RECORD_BYTES})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if not 0 < args.threshold <= 1:
        p.error(f"--threshold {args.threshold}: must be in (0, 1]")
    if args.max_record_bytes < 1:
        p.error(f"--max-record-bytes {args.max_record_bytes}: must be >= 1")
    if args.engine == "spark" and args.max_record_bytes != MAX_RECORD_BYTES:
        p.error(f"--max-record-bytes: the spark engine reads with the default limit {MAX_RECORD_BYTES} only")
    params = DedupParams(args.threshold, args.num_perm, args.bands, args.rows, args.seed)
    if args.engine == "spark":
        return _main_spark(args, params)
    t0 = time.perf_counter()
    try:
        paths = list_shards(args.input)
        with Workers(args.workers) as pool:
            result = plan_dedup(paths, params, skip_bad=args.skip_bad, pool=pool, progress=not args.quiet,
                                max_record_bytes=args.max_record_bytes)
            write_kept(result, args.output, skip_bad=args.skip_bad, pool=pool, max_record_bytes=args.max_record_bytes)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = result.report
    report["seconds"]["with_write"] = time.perf_counter() - t0
    write_json_atomic(Path(args.output) / "dedup_report.json", report)
    print(json.dumps({k: report[k] for k in ("input", "output", "mb_per_s")}))
    return 0


def _main_spark(args: argparse.Namespace, params: DedupParams) -> int:
    """``--engine spark``: one-line errors for a missing PySpark/Java or bad input, exit 2."""
    from data_processing.spark_util import SparkUnavailableError, require_spark

    try:
        conf = _spark_conf(args.spark_conf)
        require_spark()
        from data_processing import dedup_spark

        report = dedup_spark.run(args.input, args.output, params, master=args.master, conf=conf,
                                 skip_bad=args.skip_bad, progress=not args.quiet)
    except (ShardError, SparkUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("input", "output", "mb_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
