"""``python -m data_processing.dedup``: exact + near-duplicate removal over shards (the stages:
``data_processing/dedup/__init__.py``, docs/data.md).

    python -m data_processing.dedup --input DIR --output DIR [--threshold 0.85] [--workers N]
    python -m data_processing.dedup --engine spark [--master local[2]|spark://HOST:7077|yarn] \\
        --input URI --output URI [--threshold 0.85]       # the same stages on Spark, the same output
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from data_processing.atomic import write_json_atomic
from data_processing.dedup.local import Workers, plan_dedup, write_kept
from data_processing.dedup.params import DedupParams
from data_processing.shards import MAX_RECORD_BYTES, ShardError, list_shards


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
    p.add_argument("--against", default=None,
                   help="existing dedup output (folder or glob): keep only input records that duplicate none of it")
    p.add_argument("--engine", choices=("local", "spark"), default="local",
                   help="local: a process pool on this machine (default); spark: Spark jobs (dedup/spark.py)")
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
        against = list_shards(args.against) if args.against else []
        with Workers(args.workers) as pool:
            result = plan_dedup(paths, params, skip_bad=args.skip_bad, pool=pool, progress=not args.quiet,
                                against=against, max_record_bytes=args.max_record_bytes)
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
    from data_processing.dedup.spark_util import SparkUnavailableError, require_spark

    try:
        conf = _spark_conf(args.spark_conf)
        require_spark()
        from data_processing.dedup import spark

        report = spark.run(args.input, args.output, params, master=args.master, conf=conf,
                                 skip_bad=args.skip_bad, progress=not args.quiet, against=args.against)
    except (ShardError, SparkUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("input", "output", "mb_per_s")}))
    return 0
