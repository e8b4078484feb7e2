"""Prepare a training corpus: ingest -> filter -> dedup -> train/validation split by repository.

    python -m data_processing.prepare --out DATA_DIR                # the local Python stdlib
    python -m data_processing.prepare --src ~/code --depth 2 --out DATA_DIR

Files that contain a benchmark problem (HumanEval by default, ``--decontaminate FILE`` for more)
are removed before dedup (``data_processing/decontaminate.py``).

Writes ``DATA_DIR/train/train-NNNNN.jsonl.zst``, ``DATA_DIR/validation/validation-NNNNN.jsonl.zst``
and ``DATA_DIR/report.json`` (fields documented in ``docs/data.md``). With no ``--src`` the
source is this Python installation's standard library (``site-packages`` excluded), where every
top-level package is one repository and the top-level modules together are ``stdlib-root``:
real code on every machine, no download.

The split is by repository, so no repository is on both sides; deduplication runs on the whole
corpus *before* the split and keeps one file per near-duplicate cluster, so no near duplicate
of a validation file is left in train.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_processing import decontaminate, filters, ingest, licenses, redact
from data_processing.atomic import write_json_atomic
from data_processing.benchmarks import BenchmarkFileError
from data_processing.dedup import DedupParams, Workers, plan_dedup
from data_processing.minhash import hash_bytes
from data_processing.shards import MAX_RECORD_BYTES, BadRecordCounter, ShardError, ShardSetWriter, iter_records

REPORT_VERSION = 1


class NothingToWriteError(ValueError):
    """Ingest and filters left no record: there is no corpus to split (the message says why)."""


def default_source() -> str:
    """This Python installation's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def repo_hash(repo: str, seed: int) -> float:
    """Deterministic position of a repository in [0, 1) for the split order."""
    return hash_bytes(f"{seed}:{repo}".encode()) / 2.0**64


def choose_validation(repo_bytes: dict[str, int], fraction: float, seed: int) -> list[str]:
    """Repositories for validation: walk repositories in ``repo_hash`` order and take each one
    that still fits under ``fraction`` of all bytes. Byte-based so one huge repository (the
    stdlib's ``test``) cannot swallow the validation side; at least one repository is taken
    whenever there are two or more and ``fraction > 0``."""
    if fraction <= 0 or len(repo_bytes) < 2:
        return []
    budget = fraction * sum(repo_bytes.values())
    chosen, used = [], 0
    for repo in sorted(repo_bytes, key=lambda r: (repo_hash(r, seed), r)):
        if used + repo_bytes[repo] <= budget:
            chosen.append(repo)
            used += repo_bytes[repo]
    if not chosen:
        chosen = [min(repo_bytes, key=lambda r: (repo_bytes[r], repo_hash(r, seed)))]
    return sorted(chosen)


def _count(table: dict[str, dict[str, int]], key: str, size: int) -> None:
    entry = table.setdefault(key, {"files": 0, "bytes": 0})
    entry["files"] += 1
    entry["bytes"] += size


def prepare(
    out: str | Path,
    *,
    sources: list[str] | None = None,
    depth: int = 1,
    hf_data_files: list[str] | None = None,
    hf_dataset: str | None = None,
    hf_allow_download: bool = False,
    shards: list[str] | None = None,
    skip_bad: bool = False,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
    filter_config: filters.FilterConfig | None = None,
    dedup_params: DedupParams | None = None,
    validation_fraction: float = 0.05,
    seed: int = 0,
    max_files: int | None = None,
    max_bytes: int | None = None,
    shard_size_mb: float = 64.0,
    workers: int | None = None,
    progress: bool = True,
    redact_pii: bool = True,
    license_policy: licenses.LicensePolicy | None = None,
    hf_config: str | None = None,
    hf_data_dir: str | None = None,
    blobs: str | None = None,
    decontaminate_files: list[str] | None = None,
    humaneval: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns the report (also written to report.json).

    Bad input shards (corrupt, truncated, empty, or with a bad line or one over
    ``max_record_bytes``) raise ``ShardError`` naming them, or are counted and skipped with
    ``skip_bad``; ``NothingToWriteError`` when no record is left to split, with nothing written.
    Files holding a HumanEval problem (unless ``humaneval`` is false) or one of a
    ``decontaminate_files`` benchmark's are removed; a bad benchmark file raises
    ``BenchmarkFileError`` before anything is written."""
    t0 = time.perf_counter()
    out = Path(out)
    work = out / ".work"
    stdlib_default = not sources and not hf_data_files and not hf_dataset and not shards
    if stdlib_default:
        sources = [default_source()]
    sources = sources or []
    filter_config = filter_config or filters.FilterConfig()
    dedup_params = (dedup_params or DedupParams()).resolved()
    shard_bytes = int(shard_size_mb * (1 << 20))
    # Benchmarks are read first: a bad file stops the run before anything is written.
    benchmarks = decontaminate.load_benchmarks(decontaminate_files or [], humaneval=humaneval)
    bench_index = decontaminate.BenchmarkIndex(benchmarks) if benchmarks else None

    # Ingest + filter stream straight into intermediate shards (texts never all in memory).
    istats, fstats, bad = ingest.IngestStats(), filters.FilterStats(), BadRecordCounter()

    def records():
        for src in sources:
            root_repo = "stdlib-root" if stdlib_default else None
            lic = "PSF-2.0" if stdlib_default else None
            yield from ingest.iter_tree(src, depth=depth, stats=istats, root_repo=root_repo, license_name=lic)
        if hf_data_files or hf_dataset:
            yield from ingest.iter_hf(data_files=hf_data_files, dataset=hf_dataset,
                                      allow_download=hf_allow_download, stats=istats,
                                      config=hf_config, data_dir=hf_data_dir, blobs=blobs)
        if shards:
            yield from ingest.iter_shards(shards, stats=istats, skip_bad=skip_bad, bad=bad,
                                          max_record_bytes=max_record_bytes)

    stream = ingest.capped(records(), max_files=max_files, max_bytes=max_bytes)
    lstats, rstats, dstats = licenses.LicenseStats(), redact.RedactStats(), decontaminate.DecontaminationStats()
    with Workers(workers) as pool:  # decontamination's matching, then dedup
        writer = _filter_to_shards(stream, work / "filtered", shard_bytes, progress=progress,
                                   license_policy=license_policy or licenses.LicensePolicy(), lstats=lstats,
                                   filter_config=filter_config, fstats=fstats, redact_pii=redact_pii, rstats=rstats,
                                   bench_index=bench_index, dstats=dstats, pool=pool)
        paths = writer.paths
        if not writer.count:
            shutil.rmtree(work, ignore_errors=True)
            raise NothingToWriteError(_nothing_left(out, istats, fstats, bad))
        t1 = time.perf_counter()

        # Our own intermediate shards are read without the record limit: their records came through
        # this process whole already (the limit guards what is read from input shards).
        result = plan_dedup(paths, dedup_params, pool=pool, progress=progress, max_record_bytes=None)
    t2 = time.perf_counter()

    split, languages = _write_split(out, paths, result, validation_fraction, seed, shard_bytes, istats)
    shutil.rmtree(work, ignore_errors=True)
    t3 = time.perf_counter()

    report = {
        "version": REPORT_VERSION,
        "sources": [*sources, *(hf_data_files or []), *([hf_dataset] if hf_dataset else []), *(shards or [])],
        "params": {
            "depth": depth, "validation_fraction": validation_fraction, "seed": seed,
            "max_files": max_files, "max_bytes": max_bytes, "shard_size_mb": shard_size_mb,
            "filters": asdict(filter_config), "dedup": asdict(dedup_params), "redact": redact_pii,
            "decontaminate": {"humaneval": humaneval, "files": list(decontaminate_files or [])},
        },
        "ingest": istats.as_dict(),
        "bad_records": dict(bad.counts),
        "licenses": lstats.as_dict(),
        "filters": fstats.as_dict(),
        "redact": rstats.as_dict() if redact_pii else {"enabled": False},
        "decontamination": dstats.as_dict() if bench_index else {"enabled": False},
        "dedup": result.report,
        "split": split,
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1]["train"]["bytes"])),
        "seconds": {"ingest_filter": t1 - t0, "dedup": t2 - t1, "split_write": t3 - t2, "total": t3 - t0},
    }
    write_json_atomic(out / "report.json", report)
    return report


def _filter_to_shards(stream, folder: Path, shard_bytes: int, *, progress: bool, license_policy, lstats,
                      filter_config, fstats, redact_pii: bool, rstats, bench_index=None, dstats=None,
                      pool=None) -> ShardSetWriter:
    """License filter -> quality filters -> decontamination -> redaction, streamed into
    intermediate shards (texts are never all in memory); returns the closed writer (its paths
    and count)."""
    stream = licenses.filter_records(stream, license_policy, lstats)
    if progress:
        stream = ingest.progress(stream, "ingest+filter")
    kept = filters.filter_records(stream, filter_config, fstats)
    if bench_index is not None:  # before redaction (no work on files that go) and before dedup and the split
        kept = decontaminate.decontaminate_records(kept, bench_index, dstats, pool=pool)
    if redact_pii:  # after the filters (nothing is redacted that is dropped), before dedup
        kept = redact.redact_records(kept, rstats)
    with ShardSetWriter(folder, "filtered", max_bytes=shard_bytes) as writer:
        for record in kept:
            writer.write(record)
    return writer


def _write_split(out: Path, paths: list[str], result, validation_fraction: float, seed: int, shard_bytes: int,
                 istats: ingest.IngestStats) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, int]]]]:
    """Split the dedup survivors by repository (seeded) and write the train and validation
    shards; returns the split figures and the per-language table of the report."""
    repo_bytes: dict[str, int] = {}
    for (repo, *_), size, keep in zip(result.keys, result.sizes, result.keep, strict=True):
        if keep:
            repo_bytes[repo] = repo_bytes.get(repo, 0) + int(size)
    validation = set(choose_validation(repo_bytes, validation_fraction, seed))

    split: dict[str, dict[str, Any]] = {}
    languages: dict[str, dict[str, dict[str, int]]] = {}
    keep = result.keep
    gid = 0
    with ShardSetWriter(out / "train", "train", max_bytes=shard_bytes) as train_w, \
            ShardSetWriter(out / "validation", "validation", max_bytes=shard_bytes) as val_w:
        for path in paths:
            for record in iter_records(path, max_record_bytes=None):
                if keep[gid]:
                    meta = record["meta"]
                    side = "validation" if meta["repo_name"] in validation else "train"
                    (val_w if side == "validation" else train_w).write(record)
                    size = meta["size"]
                    _count(languages.setdefault(meta["language"], {}), side, size)
                gid += 1
    for side, w in (("train", train_w), ("validation", val_w)):
        repos = sorted(validation) if side == "validation" else sorted(set(repo_bytes) - validation)
        split[side] = {"files": w.count, "bytes": sum(repo_bytes[r] for r in repos),
                       "repositories": len(repos), "shards": [str(Path(p).relative_to(out)) for p in w.paths]}
    split["validation"]["repository_names"] = sorted(validation)
    for lang in istats.languages:  # languages dropped entirely still get a row
        languages.setdefault(lang, {})
    for lang, table in languages.items():
        table.setdefault("train", {"files": 0, "bytes": 0})
        table.setdefault("validation", {"files": 0, "bytes": 0})
        table["ingested"] = istats.languages.get(lang, {"files": 0, "bytes": 0})
    return split, languages


def _nothing_left(out: Path, istats: ingest.IngestStats, fstats: filters.FilterStats, bad: BadRecordCounter) -> str:
    """One line saying why no record is left: what ingest kept, the filters dropped, was bad."""
    dropped = sum(entry["files"] for entry in fstats.dropped.values())
    return (f"{out}: no record left to write ({istats.files_kept} ingested of {istats.files_seen} seen, "
            f"{dropped} dropped by the filters, {bad.total} bad records skipped); nothing written")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", nargs="+", default=None, help="source trees (default: the Python stdlib)")
    p.add_argument("--out", required=True, help="DATA_DIR for train/, validation/ and report.json")
    p.add_argument("--depth", type=int, default=1, help="folder depth that names a repository")
    p.add_argument("--hf-data-files", nargs="+", default=None, help="local parquet/json/csv files")
    p.add_argument("--hf-dataset", default=None, help="hub dataset name (needs --hf-allow-download)")
    p.add_argument("--hf-allow-download", action="store_true")
    p.add_argument("--hf-config", default=None, help="dataset config (e.g. a language of The Stack v2)")
    p.add_argument("--hf-data-dir", default=None, help="subfolder of the dataset (e.g. data/Python)")
    p.add_argument("--blobs", default=None, help="local folder of The Stack v2 / Software Heritage blobs")
    p.add_argument("--shards", nargs="+", default=None,
                   help="existing shards (Code Clippy's or ours): folders, files or globs")
    p.add_argument("--skip-bad", action="store_true",
                   help="count and skip bad records and unreadable (corrupt, truncated, empty) shards in --shards")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help=f"a --shards line longer than this is a bad record, never read whole "
                        f"(default {MAX_RECORD_BYTES})")
    p.add_argument("--validation-fraction", type=float, default=0.05, help="of bytes, by repository")
    p.add_argument("--seed", type=int, default=0, help="seed of the repository split")
    p.add_argument("--max-files", type=int, default=None, help="stop ingest after N kept files")
    p.add_argument("--max-bytes", type=int, default=None, help="stop ingest after N bytes of text")
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="uncompressed MB per output shard")
    p.add_argument("--workers", type=int, default=None, help="processes for dedup (default: all cores)")
    p.add_argument("--threshold", type=float, default=0.85, help="near-duplicate Jaccard threshold")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--licenses", default="any", metavar="permissive|FILE|any",
                   help="keep files whose repository license is in this SPDX list (default: any)")
    p.add_argument("--keep-unknown-license", action="store_true",
                   help="with a license list, also keep files whose license is unknown")
    p.add_argument("--decontaminate", action="append", default=[], metavar="FILE.jsonl[.gz]",
                   help="also remove files holding this benchmark's problems (HumanEval format; repeatable)")
    p.add_argument("--no-decontaminate", action="store_true",
                   help="keep files holding HumanEval problems (removed by default); --decontaminate FILEs still apply")
    p.add_argument("--no-redact", action="store_true",
                   help="keep e-mails, IP addresses, keys and passwords (redaction is on by default)")
    filters.add_config_args(p)
    args = p.parse_args(argv)
    if args.max_record_bytes < 1:
        p.error(f"--max-record-bytes {args.max_record_bytes}: must be >= 1")
    try:
        policy = licenses.LicensePolicy(licenses.read_license_list(args.licenses), args.keep_unknown_license,
                                        args.licenses)
        report = prepare(
            args.out, sources=args.src, depth=args.depth, hf_data_files=args.hf_data_files,
            hf_dataset=args.hf_dataset, hf_allow_download=args.hf_allow_download,
            shards=args.shards, skip_bad=args.skip_bad, max_record_bytes=args.max_record_bytes,
            filter_config=filters.config_from_args(args),
            dedup_params=DedupParams(threshold=args.threshold, num_perm=args.num_perm),
            validation_fraction=args.validation_fraction, seed=args.seed, max_files=args.max_files,
            max_bytes=args.max_bytes, shard_size_mb=args.shard_size_mb, workers=args.workers,
            redact_pii=not args.no_redact, license_policy=policy,
            hf_config=args.hf_config, hf_data_dir=args.hf_data_dir, blobs=args.blobs,
            decontaminate_files=args.decontaminate, humaneval=not args.no_decontaminate,
        )
    except (ShardError, NothingToWriteError, BenchmarkFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {side: {k: report["split"][side][k] for k in ("files", "bytes", "repositories")}
               for side in ("train", "validation")}
    print(json.dumps({"split": summary, "seconds": round(report["seconds"]["total"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
