"""Deduplication on Apache Spark: the local engine's stages as Spark jobs, the same kept records.

    python -m data_processing.dedup --engine spark [--master local[2]|spark://HOST:7077|yarn] \\
        --input URI --output URI [--threshold 0.85] [--skip-bad] [--spark-conf KEY=VALUE ...]

Stages (numbers as in ``dedup.py``), all distributed; the driver only lists shards, runs jobs
and collects aggregates for the report (never texts, signatures or shingle sets):

1. **signatures**: shards are read whole through Hadoop (``binaryFile``: local paths, ``gs://``,
   ``s3a://``, ``hdfs://``), parsed by ``shards.iter_records`` in ``mapInArrow`` and hashed by
   ``dedup.map_signatures`` and ``minhash.band_keys``, the local engine's own functions, so
   hashes and band keys are bit-identical. Records are then sorted by the survivor key
   ``(repo_name, file_name, shard, index)`` (names as UTF-8 bytes, whose order is code-point
   order, as Python compares ``str``) and numbered: that number, the *rank*, is the node id
   of every later stage, so "smallest id" means "survivor".
2. **exact**: a window over the exact hash; the lowest rank of each group survives.
3. **candidates**: band keys of exact survivors exploded to ``(band, key, rank)`` and grouped
   by bucket; buckets of up to ``minhash.ALL_PAIRS_MAX_MEMBERS`` are paired completely (a
   self-join), larger ones chained in rank order (a ``lag`` window), exactly the local rule,
   so candidate edges grow linearly with bucket size (at most 31.5 per member).
4. **verify**: shingle sets recomputed for candidate records only (each shard joined with its
   list of candidates), joined to both ends of every pair; exact Jaccard in numpy.
5. **clusters**: large-star / small-star connected components (``spark_components``); the
   component's smallest rank is its survivor, the root union-find picks locally.
6. **write**: each shard re-read and its kept records written unchanged, one output shard per
   input shard (``dedup-00000.jsonl.zst``, ...), into a hidden temporary folder beside the
   output that is moved into place only after every task succeeded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import zstandard

from data_processing import minhash
from data_processing.dedup.params import BATCH_BYTES, BATCH_RECORDS, DedupParams, map_signatures
from data_processing.dedup.report import DedupCounts, FilesBytes, build_report
from data_processing.dedup.spark_util import (
    ZSTD_SKIPPABLE_SEPARATOR,
    HadoopFS,
    checkpoint,
    glob_escape,
    hidden_to_spark,
    spark_info,
)
from data_processing.shards import BadRecordCounter, ShardError, iter_records, list_shards

SIGN_SCHEMA = ("shard int, idx int, repo binary, file binary, lang binary, size long, exact long, "
               "bands array<long>, error string, fatal boolean")
REPORT_NAME = "dedup_report.json"
SHARD_PREFIX = "dedup-"
SHARD_SUFFIX = ".jsonl.zst"


# ---------------------------------------------------------------------------- executor side
# These run in Spark's Python workers (``mapInArrow``): pyarrow batches in, pyarrow batches out.


def _names(values: list[str]):
    import pyarrow as pa

    # surrogatepass: a JSON "\ud800" escape makes a lone surrogate, which plain UTF-8 refuses.
    return pa.array([v.encode("utf-8", "surrogatepass") for v in values], pa.binary())


def _sign_schema():
    import pyarrow as pa

    return pa.schema([("shard", pa.int32()), ("idx", pa.int32()), ("repo", pa.binary()), ("file", pa.binary()),
                      ("lang", pa.binary()), ("size", pa.int64()), ("exact", pa.int64()),
                      ("bands", pa.list_(pa.int64())), ("error", pa.string()), ("fatal", pa.bool_())])


def _sign_records(shard: int, first: int, records: list[dict], params: DedupParams):
    """One Arrow batch of stage-1 rows for consecutive records ``first, first + 1, ...``."""
    import pyarrow as pa

    n = len(records)
    texts = [r["text"] for r in records]
    metas = [r["meta"] for r in records]
    exact, sigs = map_signatures(texts, params.num_perm, params.seed, params.shingle_words)
    keys = minhash.band_keys(sigs, params.bands, params.rows)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * params.bands)
    columns = [
        pa.array(np.full(n, shard, np.int32)),
        pa.array(np.arange(first, first + n, dtype=np.int32)),
        _names([str(m.get("repo_name", "")) for m in metas]),
        _names([str(m.get("file_name", "")) for m in metas]),
        _names([str(m.get("language", "unknown")) for m in metas]),
        pa.array(np.array([len(t.encode("utf-8")) for t in texts], np.int64)),
        pa.array(exact.view(np.int64)),
        pa.ListArray.from_arrays(offsets, pa.array(keys.view(np.int64).ravel())),
        pa.nulls(n, pa.string()),
        pa.nulls(n, pa.bool_()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=_sign_schema())


def _error_rows(shard: int, messages: list[str], fatal: bool):
    import pyarrow as pa

    n = len(messages)
    columns = [pa.array(np.full(n, shard, np.int32)), pa.array(np.full(n, -1, np.int32))]
    columns += [pa.nulls(n, pa.binary())] * 3 + [pa.nulls(n, pa.int64())] * 2 + [pa.nulls(n, pa.list_(pa.int64()))]
    columns += [pa.array(messages, pa.string()), pa.array([fatal] * n, pa.bool_())]
    return pa.RecordBatch.from_arrays(columns, schema=_sign_schema())


class _BadReasons(BadRecordCounter):
    """A ``BadRecordCounter`` that also keeps every reason, to be sent back as rows."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def add(self, reason: str, where: str) -> None:
        super().add(reason, where)
        self.reasons.append(reason)


def _sign_shard(shard: int, name: str, data: bytes, params: DedupParams, skip_bad: bool) -> Iterator:
    bad = _BadReasons()
    batch: list[dict] = []
    size = first = 0
    try:
        for i, record in enumerate(iter_records(name, fileobj=io.BytesIO(data), skip_bad=skip_bad, bad=bad)):
            if not batch:
                first = i
            batch.append(record)
            size += len(record["text"])
            if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                yield _sign_records(shard, first, batch, params)
                batch, size = [], 0
    except ShardError as err:
        # Only without skip_bad: the driver reports the first such error in input order and stops,
        # as the local engine stops at the first bad record it reads.
        yield _error_rows(shard, [str(err)], fatal=True)
        return
    if batch:
        yield _sign_records(shard, first, batch, params)
    if bad.reasons:
        yield _error_rows(shard, bad.reasons, fatal=False)


def _sign_files(batches, *, params: DedupParams, skip_bad: bool):
    """Stage 1 over ``(shard, name, content)`` rows: one input row is one whole shard."""
    for batch in batches:
        shard, name, content = (batch.column(c) for c in ("shard", "name", "content"))
        for j in range(batch.num_rows):
            yield from _sign_shard(shard[j].as_py(), name[j].as_py(), content[j].as_py(), params, skip_bad)


def _shingle_files(batches, *, k: int):
    """Stage 4 input: ``(rank, shingles)`` for the wanted records of each shard (uint64 bytes)."""
    import pyarrow as pa

    schema = pa.schema([("rank", pa.int64()), ("shingles", pa.binary())])
    for batch in batches:
        for row in batch.to_pylist():
            want = {w["idx"]: w["rank"] for w in row["want"]}
            ranks, sets = [], []
            for i, record in enumerate(iter_records(row["name"], fileobj=io.BytesIO(row["content"]), skip_bad=True)):
                if i in want:
                    ranks.append(want[i])
                    sets.append(minhash.shingle_hashes(record["text"], k).tobytes())
                    if len(sets) >= BATCH_RECORDS:
                        yield pa.RecordBatch.from_arrays([pa.array(ranks, pa.int64()), pa.array(sets, pa.binary())],
                                                         schema=schema)
                        ranks, sets = [], []
            if sets:
                yield pa.RecordBatch.from_arrays([pa.array(ranks, pa.int64()), pa.array(sets, pa.binary())],
                                                 schema=schema)


def _verify_pairs(batches, *, threshold: float):
    """Stage 4: keep the pairs whose exact Jaccard (``minhash.jaccard``) reaches ``threshold``."""
    import pyarrow as pa

    schema = pa.schema([("a", pa.int64()), ("b", pa.int64())])
    for batch in batches:
        a, b = batch.column("a").to_numpy(), batch.column("b").to_numpy()
        sa, sb = batch.column("sa").to_pylist(), batch.column("sb").to_pylist()
        ok = np.array([minhash.jaccard(np.frombuffer(x, np.uint64), np.frombuffer(y, np.uint64)) >= threshold
                       for x, y in zip(sa, sb, strict=True)], dtype=bool)
        yield pa.RecordBatch.from_arrays([pa.array(a[ok]), pa.array(b[ok])], schema=schema)


def compress_shard(lines: Iterator[str], level: int = 3) -> bytes:
    """zstd bytes of ``lines`` exactly as ``ShardWriter`` writes them (one frame, same level)."""
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=level).stream_writer(buf, closefd=False) as writer:
        for line in lines:
            writer.write(line.encode("utf-8"))
    return buf.getvalue()


def _write_files(batches, *, fail_on_shard: int | None = None):
    """Stage 6: one output row per input shard, its kept records compressed (see ``spark_util``)."""
    import pyarrow as pa

    schema = pa.schema([("shard", pa.int32()), ("value", pa.binary())])
    for batch in batches:
        for row in batch.to_pylist():
            drop = set(row["drop"] or ())
            if row["shard"] == fail_on_shard:  # test hook: a task dying half way through the write
                raise RuntimeError(f"injected failure writing shard {row['shard']}")
            records = iter_records(row["name"], fileobj=io.BytesIO(row["content"]), skip_bad=True)
            data = compress_shard(json.dumps(r, ensure_ascii=False) + "\n"
                                  for i, r in enumerate(records) if i not in drop)
            yield pa.RecordBatch.from_arrays([pa.array([row["shard"]], pa.int32()), pa.array([data], pa.binary())],
                                             schema=schema)


# ---------------------------------------------------------------------------- driver side


@dataclass
class SparkPlan:
    """Stages 1-5 on Spark: the per-record decisions (a DataFrame) and the report."""

    records: Any  # DataFrame: shard, idx, rank, rep, root, keep, size, lang, repo, file
    files: Any  # DataFrame: shard, name, content (one row per input shard, read lazily)
    shards: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    against_shards: int = 0  # leading entries of ``shards`` that are the existing corpus (never written)

    def clusters(self):
        """DataFrame ``(shard, idx, cluster)``: the rank of the survivor standing for each record."""
        from pyspark.sql import functions as F

        rep_root = self.records.where(F.col("rank") == F.col("rep")).select("rep", F.col("root").alias("cluster"))
        return self.records.join(rep_root, "rep").select("shard", "idx", "cluster")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[dedup spark] {msg}", file=sys.stderr, flush=True)


def _is_uri(path: str) -> bool:
    return "://" in path or path.startswith("file:")


def list_input(spark, source: str) -> tuple[list[str], list[str]]:
    """Input shards as ``(names, uris)`` in shard order.

    Local paths are listed exactly as the local engine lists them (so shard numbers, and with
    them the survivor tie-break, are the same); ``names`` are those paths, as error messages
    show them. Hadoop URIs are listed through Spark and named by their full URI.
    """
    fs = HadoopFS(spark)
    if _is_uri(source):
        listing = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                   .load(glob_escape(source) if fs.exists(source) else source).select("path"))
        found = sorted(r.path for r in listing.collect() if r.path.endswith(_shard_suffixes()))
        if not found:
            raise ShardError(f"{source}: no shards found (expected files ending in {', '.join(_shard_suffixes())})")
        return found, found
    names = list_shards(source)
    for name in names:
        if hidden_to_spark(os.path.basename(name)):
            raise ShardError(f"{name}: Spark never reads files whose names start with '.' or '_'; rename it")
    return names, [fs.qualify(os.path.abspath(n)) for n in names]


def _shard_suffixes() -> tuple[str, ...]:
    from data_processing.shards import SHARD_SUFFIXES

    return SHARD_SUFFIXES


def _files_frame(spark, names: list[str], uris: list[str]):
    """One row per shard: ``shard, name, content`` (bytes read through Hadoop when used)."""
    from pyspark.sql import functions as F

    listing = spark.createDataFrame([(u, s, n) for s, (n, u) in enumerate(zip(names, uris, strict=True))],
                                    "path string, shard int, name string")
    raw = spark.read.format("binaryFile").load([glob_escape(u) for u in uris])
    # Rows are matched to shard numbers by path; a path Spark spells differently would silently
    # drop a shard, so check every one is found (a listing only: no content is read).
    found = {r.path for r in raw.select("path").collect()}
    missing = [n for n, u in zip(names, uris, strict=True) if u not in found]
    if missing:
        raise ShardError(f"{missing[0]}: not found by Spark's file reader ({len(missing)} shards missing)")
    return raw.select("path", "content").join(F.broadcast(listing), "path").select("shard", "name", "content")


def _persist(df):
    """Cache ``df`` (memory, spilling to disk) once the next action computes it."""
    from pyspark import StorageLevel

    return df.persist(StorageLevel.MEMORY_AND_DISK)


def _signatures(spark, files, params: DedupParams, skip_bad: bool, n_against: int = 0):
    """Stage 1: signatures, then the survivor order as a number (the rank), each record's exact
    group survivor (``rep``) and group size; the first ``n_against`` shards (``--against``) rank
    before every other. Returns ``(nodes, bad_counts)``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    signed = _persist(files.mapInArrow(partial(_sign_files, params=params, skip_bad=skip_bad), SIGN_SCHEMA))
    # One job builds the cache and gathers the bad records: count per reason, first shard of each.
    errors = (signed.where(F.col("error").isNotNull()).groupBy("error", "fatal")
              .agg(F.count("*").alias("n"), F.min("shard").alias("shard")).collect())
    fatal = sorted((r.shard, r.error) for r in errors if r.fatal)
    if fatal and not skip_bad:
        signed.unpersist()
        raise ShardError(fatal[0][1])
    bad_counts = {r.error: int(r.n) for r in errors if not r.fatal}
    ranked = (signed.where(F.col("error").isNull()).drop("error", "fatal")
              # --against shards first: an old record always outranks a new one.
              .orderBy(F.col("shard") >= n_against, "repo", "file", "shard", "idx")
              # After a global sort the ids grow with the sort order (partition index in the high bits).
              .withColumn("rank", F.monotonically_increasing_id()))
    w_exact = Window.partitionBy("exact")
    nodes = checkpoint(ranked.withColumn("rep", F.min("rank").over(w_exact))
                       .withColumn("group_size", F.count("*").over(w_exact)))
    signed.unpersist()
    return nodes, bad_counts


def _exact_figures(nodes):
    """Stage 2: exact duplicates (the window of stage 1); aggregate figures only."""
    from pyspark.sql import functions as F

    dup = F.col("rank") != F.col("rep")
    return nodes.agg(F.count("*").alias("files"), F.sum("size").alias("bytes"),
                     F.sum(F.when(dup, 1).otherwise(0)).alias("removed_files"),
                     F.sum(F.when(dup, F.col("size")).otherwise(0)).alias("removed_bytes"),
                     F.sum(F.when(~dup & (F.col("group_size") > 1), 1).otherwise(0)).alias("groups")).first()


def _candidate_pairs(nodes):
    """Stage 3: buckets -> candidate pairs (a, b), a < b, by the local engine's rule (all pairs
    in buckets up to ``ALL_PAIRS_MAX_MEMBERS``, a chain in rank order above)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    bucket = Window.partitionBy("band", "key")
    exploded = (nodes.where(F.col("rank") == F.col("rep")).select("rank", F.posexplode("bands").alias("band", "key"))
                .withColumn("members", F.count("*").over(bucket)).where(F.col("members") > 1))
    exploded = checkpoint(exploded)
    small = exploded.where(F.col("members") <= minhash.ALL_PAIRS_MAX_MEMBERS).select("band", "key", "rank")
    pairs_small = (small.alias("x").join(small.alias("y"), ["band", "key"])
                   .where(F.col("x.rank") < F.col("y.rank"))
                   .select(F.col("x.rank").alias("a"), F.col("y.rank").alias("b")))
    pairs_big = (exploded.where(F.col("members") > minhash.ALL_PAIRS_MAX_MEMBERS)
                 .withColumn("prev", F.lag("rank").over(bucket.orderBy("rank")))
                 .where(F.col("prev").isNotNull()).select(F.col("prev").alias("a"), F.col("rank").alias("b")))
    return checkpoint(pairs_small.unionByName(pairs_big).distinct())


def _verified_pairs(files, nodes, pairs, params: DedupParams):
    """Stage 4: verify candidates on exact shingle sets (recomputed for candidates only).
    Returns ``(verified pairs, number of candidate records)``."""
    from pyspark.sql import functions as F

    cand = pairs.select(F.col("a").alias("rank")).unionByName(pairs.select(F.col("b").alias("rank"))).distinct()
    want = (nodes.join(cand, "rank").groupBy("shard")
            .agg(F.collect_list(F.struct("idx", "rank")).alias("want")))
    sets = checkpoint(files.join(want, "shard").mapInArrow(
        partial(_shingle_files, k=params.shingle_words), "rank long, shingles binary"))
    n_cand = sets.count()
    joined = (pairs.join(sets.select(F.col("rank").alias("a"), F.col("shingles").alias("sa")), "a")
              .join(sets.select(F.col("rank").alias("b"), F.col("shingles").alias("sb")), "b")
              .select("a", "b", "sa", "sb"))
    return checkpoint(joined.mapInArrow(partial(_verify_pairs, threshold=params.threshold), "a long, b long")), n_cand


def _clustered(spark, nodes, verified, n_verified: int):
    """Stage 5: connected components; the smallest rank of each is its survivor. Returns the
    records with ``root`` and ``keep``, and the large/small-star rounds it took."""
    from pyspark.sql import functions as F

    from data_processing.dedup.spark_components import connected_components

    roots, rounds = connected_components(verified) if n_verified else (None, 0)
    if roots is None:  # nothing verified: every exact survivor is its own root
        roots = spark.createDataFrame([], "node long, root long")
    records = checkpoint(
        nodes.drop("bands").join(roots.withColumnRenamed("node", "rank"), "rank", "left")
        .withColumn("root", F.coalesce("root", "rank"))
        .withColumn("keep", (F.col("rank") == F.col("rep")) & (F.col("root") == F.col("rank"))))
    return records, rounds


def _counted(df):
    return df, df.count()


def _first_counted(pair):
    return _counted(pair[0]), pair[1]


def plan_spark(
    spark,
    source: str,
    params: DedupParams | None = None,
    *,
    skip_bad: bool = False,
    progress: bool = True,
    against: str | None = None,
) -> SparkPlan:
    """Run stages 1-5 on Spark and decide which records survive (nothing is written).
    ``against``: an existing corpus, ranked before every input record (as the local engine does)."""
    params = (params or DedupParams()).resolved()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    old_names, old_uris = list_input(spark, against) if against else ([], [])
    names, uris = list_input(spark, source)
    n_against = len(old_names)
    names, uris = old_names + names, old_uris + uris
    files = _files_frame(spark, names, uris)
    seconds["list"] = time.perf_counter() - t
    _log(progress, f"{len(names)} shards listed in {seconds['list']:.1f} s")

    def timed(stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        seconds[stage] = time.perf_counter() - start
        return out

    nodes, bad_counts = timed("signatures", _signatures, spark, files, params, skip_bad, n_against)
    _log(progress, f"signatures: {seconds['signatures']:.1f} s")
    ex = timed("exact", _exact_figures, nodes)
    pairs, n_pairs = timed("lsh", lambda: _counted(_candidate_pairs(nodes)))
    _log(progress, f"{n_pairs} candidate pairs in {seconds['lsh']:.1f} s")
    (verified, n_verified), n_cand = timed("verify", lambda: _first_counted(
        _verified_pairs(files, nodes, pairs, params)))
    _log(progress, f"{n_verified} of {n_pairs} pairs verified in {seconds['verify']:.1f} s")
    records, rounds = timed("clusters", _clustered, spark, nodes, verified, n_verified)
    _log(progress, f"clusters in {rounds} large/small-star rounds, {seconds['clusters']:.1f} s")

    report = timed("report", _report, records, ex, params, bad_counts, len(names),
                   {"candidate_pairs": n_pairs, "verified_pairs": n_verified, "candidate_records": n_cand})
    elapsed = sum(seconds[k] for k in ("list", "signatures", "exact", "lsh", "verify", "clusters"))
    report["workers"] = spark.sparkContext.defaultParallelism
    report["seconds"] = {"signatures": seconds["list"] + seconds["signatures"], "exact": seconds["exact"],
                         "lsh": seconds["lsh"], "verify": seconds["verify"], "clusters": seconds["clusters"],
                         "total": elapsed}
    report["mb_per_s"] = report["input"]["bytes"] / 1e6 / max(elapsed, 1e-9)
    report["spark"] = {**spark_info(spark), "stage_seconds": seconds, "cc_rounds": rounds}
    plan = SparkPlan(records=records, files=files, shards=names, report=report, against_shards=n_against)
    if n_against:
        report["against"] = _against_report(plan)
        report["output"] = report["against"]["kept"]
    return plan


def _against_report(plan: SparkPlan) -> dict[str, Any]:
    """The local engine's ``report["against"]`` from one aggregate: where every new record went."""
    from pyspark.sql import functions as F

    n = plan.against_shards
    survivors = plan.records.select(F.col("rank").alias("cluster"), (F.col("shard") < n).alias("old_survivor"))
    rows = (plan.records.select("shard", "idx", "size", "keep").join(plan.clusters(), ["shard", "idx"])
            .join(survivors, "cluster"))
    new, keep, old_survivor = F.col("shard") >= n, F.col("keep"), F.col("old_survivor")
    masks = {"old": ~new, "new": new, "kept": new & keep, "removed_duplicate_of_against": new & ~keep & old_survivor,
             "removed_within_input": new & ~keep & ~old_survivor}
    aggs = [F.sum(F.when(m, v).otherwise(0)).alias(f"{k}_{u}") for k, m in masks.items()
            for u, v in (("files", F.lit(1)), ("bytes", F.col("size")))]
    r = rows.agg(*aggs).first()

    def count(k: str) -> dict[str, int]:
        return {"files": int(r[f"{k}_files"] or 0), "bytes": int(r[f"{k}_bytes"] or 0)}

    return {"shards": n, **count("old"), **{k: count(k) for k in masks if k != "old"}}


def _name(repo: bytes, file: bytes) -> str:
    return f"{repo.decode('utf-8', 'surrogatepass')}/{file.decode('utf-8', 'surrogatepass')}"


def _report(records, ex, params: DedupParams, bad_counts: dict[str, int], n_shards: int,
            near_counts: dict[str, int]) -> dict[str, Any]:
    """The local engine's report fields, from aggregates (small collects only)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    survivor = F.col("rank") == F.col("rep")
    near = survivor & (F.col("root") != F.col("rank"))

    def total(cond, value):
        return F.sum(F.when(cond, value).otherwise(0))

    # One job for every per-language and overall figure (totals are sums over languages).
    lang = records.groupBy("lang").agg(
        total(~survivor, 1).alias("exact_files"), total(~survivor, F.col("size")).alias("exact_bytes"),
        total(near, 1).alias("near_files"), total(near, F.col("size")).alias("near_bytes"),
        total(F.col("keep"), 1).alias("out_files"), total(F.col("keep"), F.col("size")).alias("out_bytes")).collect()
    sums = {k: sum(int(r[k]) for r in lang) for k in ("near_files", "near_bytes", "out_files", "out_bytes")}
    members = records.where(near)
    sizes = members.groupBy("root").agg((F.count("*") + 1).alias("size")).persist()
    histogram = {str(r["size"]): r["count"] for r in sizes.groupBy("size").count().orderBy("size").collect()}
    top = sizes.orderBy(F.desc("size"), "root").limit(10).collect()
    top_roots = [r.root for r in top]
    names = {r.rank: _name(r.repo, r.file)
             for r in records.where(F.col("rank").isin(top_roots)).select("rank", "repo", "file").collect()}
    first5 = (members.where(F.col("root").isin(top_roots))
              .withColumn("n", F.row_number().over(Window.partitionBy("root").orderBy("shard", "idx")))
              .where(F.col("n") <= 5).select("root", "n", "repo", "file").collect())
    examples: dict[int, list[tuple[int, str]]] = {}
    for r in first5:
        examples.setdefault(r.root, []).append((r.n, _name(r.repo, r.file)))
    sizes.unpersist()
    largest = [{"size": r["size"], "survivor": names[r.root],
                "examples": [name for _, name in sorted(examples.get(r.root, []))]} for r in top]
    by_language: dict[str, dict[str, dict[str, int]]] = {}
    for r in lang:
        for stage in ("exact", "near"):
            if r[f"{stage}_files"]:
                entry = by_language.setdefault(r.lang.decode("utf-8", "surrogatepass"), {})
                entry[stage] = {"files": int(r[f"{stage}_files"]), "bytes": int(r[f"{stage}_bytes"])}
    counts = DedupCounts(
        input=FilesBytes(int(ex.files), int(ex.bytes or 0)), shards=n_shards,
        exact_removed=FilesBytes(int(ex.removed_files or 0), int(ex.removed_bytes or 0)),
        duplicate_groups=int(ex.groups or 0),
        near_removed=FilesBytes(sums["near_files"], sums["near_bytes"]),
        output=FilesBytes(sums["out_files"], sums["out_bytes"]),
        candidate_pairs=near_counts["candidate_pairs"], verified_pairs=near_counts["verified_pairs"],
        candidate_records=near_counts["candidate_records"], peak_shingle_sets=None,
        cluster_size_histogram=histogram, largest_clusters=largest, removed_by_language=by_language,
        bad_records=bad_counts,
    )
    return build_report(counts, params, "spark")


def _tmp_beside(fs: HadoopFS, output: str) -> str:
    """A hidden, unique folder next to ``output`` (same filesystem, so the final move is a rename)."""
    parent, name = fs.parent_and_name(output)
    return f"{parent.rstrip('/')}/.{name}.tmp-{uuid.uuid4().hex[:12]}"


def write_spark(plan: SparkPlan, output: str, *, progress: bool = True, started: float | None = None,
                fail_on_shard: int | None = None) -> float:
    """Stage 6: write the kept records of shard ``i`` to ``output/dedup-{i:05d}.jsonl.zst`` and
    ``output/dedup_report.json``. Everything is written into a temporary folder beside
    ``output`` and moved into place only when the job succeeded; stale ``dedup-*`` shards of an
    earlier run are deleted, the report is moved last. ``started``: ``perf_counter()`` at the
    start of the run, for the report's ``seconds.with_write``. Returns the seconds taken."""
    from pyspark.sql import functions as F

    spark = plan.records.sparkSession
    fs = HadoopFS(spark)
    output = output if _is_uri(output) else os.path.abspath(output)
    tmp = _tmp_beside(fs, output)
    t = time.perf_counter()
    try:
        fs.set_write_checksum(tmp, False)
        drop = (plan.records.where(~F.col("keep")).groupBy("shard")
                .agg(F.collect_list("idx").alias("drop")))
        # The --against shards are read for the plan, never written.
        rows = (plan.files.where(F.col("shard") >= plan.against_shards).join(drop, "shard", "left")
                .mapInArrow(partial(_write_files, fail_on_shard=fail_on_shard), "shard int, value binary")
                .select("shard", F.col("value").cast("string").alias("value")))
        rows.write.partitionBy("shard").option("lineSep", ZSTD_SKIPPABLE_SEPARATOR).text(tmp)
        written = []
        for path, is_dir in fs.list(tmp):
            base = path.rstrip("/").rpartition("/")[2]
            if is_dir and base.startswith("shard="):
                shard = int(base.split("=", 1)[1])
                parts = [p for p, d in fs.list(path) if not d and p.rpartition("/")[2].startswith("part-")]
                if len(parts) != 1:
                    raise RuntimeError(f"{path}: expected one part file, found {len(parts)}")
                target = f"{tmp}/{SHARD_PREFIX}{shard - plan.against_shards:05d}{SHARD_SUFFIX}"
                fs.rename(parts[0], target)
                written.append(target.rpartition("/")[2])
            if not base.startswith(SHARD_PREFIX):  # the emptied shard=N folders, _SUCCESS, checksums
                fs.delete(path)
        inputs = len(plan.shards) - plan.against_shards
        if len(written) != inputs:
            raise RuntimeError(f"{tmp}: wrote {len(written)} shards for {inputs} inputs")
        seconds = time.perf_counter() - t
        plan.report["spark"]["stage_seconds"]["write"] = seconds
        if started is not None:
            plan.report["seconds"]["with_write"] = time.perf_counter() - started
        fs.write_bytes(f"{tmp}/{REPORT_NAME}", (json.dumps(plan.report, indent=2) + "\n").encode())
        _publish(fs, tmp, output, written)
    except BaseException:
        with contextlib.suppress(Exception):  # the job's own error is the one worth reporting
            fs.delete(tmp)
        raise
    _log(progress, f"{len(written)} shards written to {output} in {seconds:.1f} s")
    return seconds


def _publish(fs: HadoopFS, tmp: str, output: str, written: list[str]) -> None:
    """Move the finished temporary folder to ``output``: one rename when ``output`` is new; into
    an existing folder shard by shard, stale ``dedup-*`` shards deleted, the report last."""
    if not fs.exists(output):
        fs.mkdirs(fs.parent_and_name(output)[0])
        fs.rename(tmp, output)
        return
    for name in written:
        if fs.exists(f"{output}/{name}"):
            fs.delete(f"{output}/{name}", recursive=False)
        fs.rename(f"{tmp}/{name}", f"{output}/{name}")
    keep = set(written)
    for path, is_dir in fs.list(output):
        base = path.rpartition("/")[2]
        if not is_dir and base.startswith(SHARD_PREFIX) and base.endswith(SHARD_SUFFIX) and base not in keep:
            fs.delete(path, recursive=False)
    if fs.exists(f"{output}/{REPORT_NAME}"):
        fs.delete(f"{output}/{REPORT_NAME}", recursive=False)
    fs.rename(f"{tmp}/{REPORT_NAME}", f"{output}/{REPORT_NAME}")
    fs.delete(tmp)


def run(source: str, output: str, params: DedupParams, *, master: str | None = None,
        conf: dict[str, str] | None = None, skip_bad: bool = False, progress: bool = True,
        against: str | None = None) -> dict[str, Any]:
    """The CLI's ``--engine spark``: plan, write, report. Returns the report."""
    from data_processing.dedup.spark_util import get_session

    t0 = time.perf_counter()
    settings = {"spark.ui.showConsoleProgress": "true" if progress else "false", **(conf or {})}
    spark = get_session(master, settings)
    startup = time.perf_counter() - t0
    _log(progress, f"Spark {spark.version} on {spark.sparkContext.master} started in {startup:.1f} s")
    output = output if _is_uri(output) else os.path.abspath(output)
    HadoopFS(spark).parent_and_name(output)  # a bad --output fails now, not after the whole plan
    plan = plan_spark(spark, source, params, skip_bad=skip_bad, progress=progress, against=against)
    plan.report["spark"]["startup_seconds"] = startup
    write_spark(plan, output, progress=progress, started=t0)
    return plan.report
