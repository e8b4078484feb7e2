"""Deduplication quality and speed: our local engine, our Spark engine (``local[2]``) and a plain
``datasketch`` MinHashLSH, on the same files in the same run; and a scaling series.

Builds a labelled set from real local files (the Python standard library): originals, planted
copies (exact, reformatted, comments stripped, identifiers renamed, a few lines edited) and
hard negatives (two different files behind the same long licence header). The label of a
pair is its *true* Jaccard similarity on word 5-gram shingle sets, computed here independently
of the engine (Python sets of ``\\w+`` 5-grams): duplicate when >= 0.85, distinct when < 0.70,
unlabelled (ignored) in between.

A labelled pair is predicted duplicate when a tool puts both files in the same cluster (so one
of them is removed). Precision = TP / (TP + FP), recall = TP / (TP + FN) over labelled pairs.
Throughput is input MB / wall seconds for the whole near-dedup decision (ours: reading the shard,
signatures on all cores, exact stage, LSH, verification, clusters; datasketch: shingling,
MinHash(256) with ``update_batch``, MinHashLSH(threshold=0.85) query + insert, one core).

Spark: ``plan_spark`` (stages 1-5, the same decisions as ``plan_dedup``) on the same shards;
the JVM start (``startup_seconds``) and a first tiny run that warms the JVM and the Python
workers (``warmup_seconds``) are timed apart from the measured run.

Scaling (``--scaling 1,2,4,8``): the input grows as prefixes of one shuffled pool of the planted
set plus real local code (``.py`` files of this interpreter's site-packages), ``--scaling-mb``
MB per step; each engine runs as its own process (``python -m data_processing.dedup --engine
...``, datasketch through this script) while its whole process tree is sampled for memory:
peak RSS of the tree, of the driver (the Python process we started) and, for Spark, of the JVM
(which in ``local`` mode also holds the executors).

    python bench/dedup.py [--quick] [--originals N] [--engines local,datasketch,spark] [--scaling 1,2,4,8]

The last printed line is one JSON object with every tool's figures.
"""

from __future__ import annotations

import argparse
import json
import keyword
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_processing.dedup import DedupParams, plan_dedup  # noqa: E402
from data_processing.shards import iter_dir_records, write_shard  # noqa: E402

THRESHOLD = 0.85
DISTINCT_BELOW = 0.70
SHARDS = 8  # every engine reads the same 8 shards (Spark parallelises over shards, not inside one)
ENGINES = ("local", "datasketch", "spark")
_WORD = re.compile(r"\w+")
_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")
_KEYWORDS = frozenset(keyword.kwlist) | {"self", "print"}


def true_jaccard(a: str, b: str, k: int = 5) -> float:
    """Reference Jaccard of word ``k``-gram sets, plain Python (independent of the engine)."""
    def shingles(text: str) -> set[tuple[str, ...]]:
        w = _WORD.findall(text)
        return {tuple(w[i : i + k]) for i in range(max(len(w) - k + 1, 1))}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def stdlib_files(
    n: int, min_bytes: int = 1500, max_bytes: int = 30000, seed: int = 0
) -> list[tuple[str, str]]:
    """``n`` (relative name, text) of stdlib .py files of moderate size, deterministic sample.

    Files of the ``encodings`` package are left out: they are near duplicates of each other,
    which would blur which pairs were planted.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "encodings/", "lib2to3/tests/data")) or "/data/" in rel:
            continue
        try:
            size = path.stat().st_size
            if min_bytes <= size <= max_bytes:
                found.append((rel, path.read_text("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    random.Random(seed).shuffle(found)
    return found[:n]


def reformat(text: str) -> str:
    """Same tokens, different layout: 2-space indents, spaces inside brackets, CRLF, no trailing
    whitespace (a formatter's or an editor's round trip)."""
    out = []
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        indent = (len(line) - len(stripped)) // 2
        line = " " * indent + stripped.replace("(", "( ").replace(")", " )").replace(",", " ,")
        out.append(line.rstrip())
    return "\r\n".join(out) + "\r\n"


def strip_comments(text: str) -> str:
    """Drop ``#`` comments (whole-line and trailing) - naive, like a quick copy-paste cleanup."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        out.append(re.sub(r"\s+#[^'\"]*$", "", line))
    return "\n".join(out) + "\n"


def rename_identifiers(text: str, rng: random.Random, count: int = 2) -> str:
    """Rename ``count`` identifiers, picked among those that are neither keywords nor very
    frequent (a renamed local or helper, not a global search-and-replace of ``self``)."""
    freq: dict[str, int] = {}
    for m in _IDENT.findall(text):
        if m not in _KEYWORDS:
            freq[m] = freq.get(m, 0) + 1
    pool = sorted(name for name, c in freq.items() if 2 <= c <= 6)
    for name in rng.sample(pool, min(count, len(pool))):
        text = re.sub(rf"\b{re.escape(name)}\b", name + "_renamed", text)
    return text


def edit_lines(text: str, rng: random.Random, edits: int = 3) -> str:
    """Change a few random lines: delete one, duplicate one, or append a short statement."""
    lines = text.splitlines()
    for _ in range(edits):
        if len(lines) < 3:
            break
        i = rng.randrange(len(lines))
        op = rng.randrange(3)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        else:
            lines[i] = lines[i] + f"  # edited {rng.randrange(1000)}"
    return "\n".join(lines) + "\n"


def licence_header() -> str:
    """A long real licence text as a comment block (the PSF licence shipped with Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lic = root / "LICENSE.txt"
    fallback = "Permission is hereby granted to use this file. " * 80
    text = lic.read_text("utf-8") if lic.is_file() else fallback
    lines = text.splitlines()[:120]
    return "\n".join("# " + line for line in lines) + "\n"


def build_labelled_set(
    n_originals: int, seed: int = 0
) -> tuple[list[dict], list[tuple[int, int, bool]], dict]:
    """Records (originals, planted copies, hard negatives) and labelled pairs ``(i, j, is_dup)``."""
    rng = random.Random(seed)
    files = stdlib_files(n_originals + n_originals // 4 * 2, seed=seed)
    originals, spare = files[:n_originals], files[n_originals:]
    records: list[dict] = []

    def add(repo: str, name: str, text: str) -> int:
        records.append({"text": text, "meta": {"repo_name": repo, "file_name": name, "language": "Python",
                                               "license": "PSF-2.0", "size": len(text.encode("utf-8"))}})
        return len(records) - 1

    pairs: list[tuple[int, int, bool]] = []
    kinds: dict[str, dict[str, int]] = {}

    def label(i: int, j: int, kind: str) -> None:
        jac = true_jaccard(records[i]["text"], records[j]["text"])
        entry = kinds.setdefault(kind, {"dup": 0, "distinct": 0, "unlabelled": 0})
        if jac >= THRESHOLD:
            pairs.append((i, j, True))
            entry["dup"] += 1
        elif jac < DISTINCT_BELOW:
            pairs.append((i, j, False))
            entry["distinct"] += 1
        else:
            entry["unlabelled"] += 1

    transforms = {
        "exact": lambda t: t,
        "reformatted": reformat,
        "comments_stripped": strip_comments,
        "identifiers_renamed": lambda t: rename_identifiers(t, rng),
        "lines_edited": lambda t: edit_lines(t, rng),
    }
    for k, (name, text) in enumerate(originals):
        o = add("original", name, text)
        # Each original gets two of the five copy kinds, so every kind is well represented.
        for kind in rng.sample(sorted(transforms), 2):
            c = add(f"copy-{kind}-{k}", name, transforms[kind](text))
            label(o, c, kind)
    header = licence_header()
    for k in range(0, len(spare) - 1, 2):
        a = add(f"licensed-{k}", spare[k][0], header + spare[k][1])
        b = add(f"licensed-{k + 1}", spare[k + 1][0], header + spare[k + 1][1])
        label(a, b, "hard_negative_same_licence")
    return records, pairs, kinds


def _clusters_from_edges(n: int, edges) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def score(cluster, pairs) -> dict[str, float]:
    """Precision and recall of "same cluster" against the labelled pairs."""
    tp = sum(1 for i, j, dup in pairs if dup and cluster[i] == cluster[j])
    fp = sum(1 for i, j, dup in pairs if not dup and cluster[i] == cluster[j])
    fn = sum(1 for i, j, dup in pairs if dup and cluster[i] != cluster[j])
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "tp": tp, "fp": fp, "fn": fn}


def write_input(records: list[dict], folder: str | os.PathLike, shards: int = SHARDS) -> list[str]:
    """The records as ``shards`` consecutive ``*.jsonl.zst`` shards; returns their paths in order."""
    size = -(-len(records) // shards)
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"bench-{s:05d}.jsonl.zst")
        write_shard(path, records[s * size : (s + 1) * size])
        paths.append(path)
    return paths


def run_ours(
    records: list[dict], workers: int | None, threshold: float = THRESHOLD
) -> tuple[list[int], float]:
    """Cluster ids from our engine, and wall seconds (shards already written, as in production)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_input(records, tmp)
        t0 = time.perf_counter()
        result = plan_dedup(paths, DedupParams(threshold=threshold), workers=workers, progress=False)
        seconds = time.perf_counter() - t0
    return result.cluster.tolist(), seconds


def start_spark(master: str = "local[2]"):
    """``(session, seconds to start it, whether it is new)``; raises ``SparkUnavailableError``
    without PySpark or Java."""
    from data_processing.dedup.spark_util import get_session, require_spark

    require_spark()
    from pyspark.sql import SparkSession

    fresh = SparkSession.getActiveSession() is None
    t0 = time.perf_counter()
    spark = get_session(master, {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"})
    return spark, time.perf_counter() - t0, fresh


def run_spark(records: list[dict], spark, threshold: float = THRESHOLD) -> tuple[list[int], float]:
    """Cluster ids (in record order) from the Spark engine, and wall seconds of stages 1-5."""
    from data_processing.dedup.spark import plan_spark

    with tempfile.TemporaryDirectory() as tmp:
        write_input(records, tmp)
        t0 = time.perf_counter()
        plan = plan_spark(spark, tmp, DedupParams(threshold=threshold), progress=False)
        seconds = time.perf_counter() - t0
        # Per-record cluster ids come back to the driver only here, to score them ("same cluster"
        # is all that is scored, so the survivor's rank is as good a label as any).
        size = -(-len(records) // SHARDS)
        cluster = [-1] * len(records)
        for r in plan.clusters().collect():
            cluster[r.shard * size + r.idx] = r.cluster
    return cluster, seconds


def run_datasketch(records: list[dict], threshold: float = THRESHOLD, num_perm: int = 256):
    """Cluster ids from a plain datasketch MinHashLSH run (query, then insert), and seconds."""
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    edges = []
    for i, record in enumerate(records):
        w = _WORD.findall(record["text"])
        shingles = {" ".join(w[k : k + 5]).encode("utf-8") for k in range(max(len(w) - 4, 1))}
        m = MinHash(num_perm=num_perm)
        m.update_batch(list(shingles))
        edges.extend((int(j), i) for j in lsh.query(m))
        lsh.insert(str(i), m)
    seconds = time.perf_counter() - t0
    return _clusters_from_edges(len(records), edges), seconds


def code_pool(seed: int = 0, min_bytes: int = 1500, max_bytes: int = 100_000) -> list[dict]:
    """Real local code: ``.py`` files of this interpreter's site-packages, as records (one
    repository per top-level package), in a seeded shuffled order."""
    root = Path(sysconfig.get_paths()["purelib"])
    records = []
    for path in sorted(root.rglob("*.py")):
        try:
            if not min_bytes <= path.stat().st_size <= max_bytes:
                continue
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root).as_posix()
        records.append({"text": text, "meta": {"repo_name": rel.split("/")[0], "file_name": rel,
                                               "language": "Python", "size": len(text.encode("utf-8"))}})
    random.Random(seed).shuffle(records)
    return records


def _tree_rss(proc) -> tuple[int, int, int]:
    """RSS bytes of ``proc``'s whole tree, of ``proc`` itself and of its ``java`` descendants."""
    import psutil

    total = own = java = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
            total += rss
            if p.pid == proc.pid:
                own = rss
            elif p.name() == "java":
                java += rss
        except psutil.Error:
            continue
    return total, own, java


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, its last stdout line, and peak RSS (MB) sampled every 0.1 s."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peaks = [0, 0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[:] = [max(a, b) for a, b in zip(peaks, _tree_rss(ps), strict=True)]
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-500:]}")
    mb = [round(p / 2**20, 1) for p in peaks]
    return {"wall_seconds": time.perf_counter() - t0, "last_line": out.strip().splitlines()[-1],
            "peak_rss_mb": mb[0], "driver_rss_mb": mb[1], "jvm_rss_mb": mb[2]}


def scaling_series(scales: list[int], step_mb: float, engines: list[str], seed: int = 0,
                   originals: int = 600) -> list[dict]:
    """Each engine on prefixes of ``k * step_mb`` MB of one pool (the planted set built from
    ``originals`` files, plus real code), each run in its own process."""
    planted, _, _ = build_labelled_set(originals, seed=seed)
    pool = planted + code_pool(seed)
    random.Random(seed).shuffle(pool)
    available = sum(r["meta"]["size"] for r in pool) / 1e6
    if available < max(scales) * step_mb * 0.95:  # fail before hours of runs, not after
        raise SystemExit(f"scaling: only {available:.1f} MB of code found for {max(scales)}x {step_mb} MB")
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for k in scales:
            records, size = [], 0
            for r in pool:
                if size >= k * step_mb * 1e6:
                    break
                records.append(r)
                size += r["meta"]["size"]
            folder = os.path.join(tmp, f"x{k}")
            write_input(records, folder)
            for engine in engines:
                if engine == "datasketch":
                    cmd = [sys.executable, __file__, "--datasketch-only", folder]
                else:
                    cmd = [sys.executable, "-m", "data_processing.dedup", "--engine", engine, "--input", folder,
                           "--output", os.path.join(tmp, f"out-{engine}-{k}"), "--quiet"]
                    if engine == "spark":
                        cmd += ["--master", "local[2]"]
                m = measure(cmd, env)
                row = {"scale": k, "engine": engine, "files": len(records), "mb": round(size / 1e6, 2),
                       "wall_seconds": round(m["wall_seconds"], 2), "peak_rss_mb": m["peak_rss_mb"],
                       "driver_rss_mb": m["driver_rss_mb"], "jvm_rss_mb": m["jvm_rss_mb"]}
                if engine == "datasketch":
                    row["seconds"] = round(json.loads(m["last_line"])["seconds"], 2)
                else:
                    report = json.loads(Path(tmp, f"out-{engine}-{k}", "dedup_report.json").read_text())
                    row["seconds"] = round(report["seconds"]["total"], 2)
                    row["kept"] = report["output"]["files"]
                    if engine == "spark":
                        row["startup_seconds"] = round(report["spark"]["startup_seconds"], 2)
                print(f"scaling: {json.dumps(row)}", flush=True)
                rows.append(row)
    return rows


def _datasketch_only(folder: str) -> None:
    """Scaling helper: datasketch on a folder of shards, in its own process; prints seconds."""
    records = list(iter_dir_records(folder))
    _, seconds = run_datasketch(records)
    print(json.dumps({"seconds": seconds, "files": len(records)}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller set (a couple of minutes on 2 cores)")
    p.add_argument("--originals", type=int, default=None, help="number of original files")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--skip-datasketch", action="store_true", help="same as leaving datasketch out of --engines")
    p.add_argument("--scaling", default="", help="input multiples for the scaling series, e.g. 1,2,4,8")
    p.add_argument("--scaling-mb", type=float, default=5.0, help="MB of input per scaling step")
    p.add_argument("--datasketch-only", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.datasketch_only:
        _datasketch_only(args.datasketch_only)
        return {}
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    if args.skip_datasketch and "datasketch" in engines:
        engines.remove("datasketch")
    n = args.originals or (150 if args.quick else 600)
    t0 = time.perf_counter()
    records, pairs, kinds = build_labelled_set(n, seed=args.seed)
    total_mb = sum(r["meta"]["size"] for r in records) / 1e6
    print(f"labelled set: {len(records)} files, {total_mb:.1f} MB, {len(pairs)} labelled pairs "
          f"({sum(d for *_, d in pairs)} duplicate), built in {time.perf_counter() - t0:.1f} s", flush=True)
    print("pairs by kind: " + json.dumps(kinds), flush=True)
    out: dict = {}
    if "local" in engines:
        cluster, secs = run_ours(records, args.workers)
        out["ours"] = {**score(cluster, pairs), "mb_per_s": total_mb / secs, "seconds": secs}
        print(f"ours: {json.dumps(out['ours'])}", flush=True)
    if "datasketch" in engines:
        cluster, secs = run_datasketch(records)
        out["datasketch"] = {**score(cluster, pairs), "mb_per_s": total_mb / secs, "seconds": secs}
        print(f"datasketch: {json.dumps(out['datasketch'])}", flush=True)
    if "spark" in engines:
        from data_processing.dedup.spark_util import SparkUnavailableError

        try:
            spark, startup, fresh = start_spark()
        except SparkUnavailableError as err:
            print(f"spark: not run ({err})", flush=True)
        else:
            # The first jobs of a new JVM pay class loading, JIT and Python worker start: timed apart.
            warmup = run_spark(records[:20], spark)[1] if fresh else 0.0
            cluster, secs = run_spark(records, spark)
            out["spark"] = {**score(cluster, pairs), "mb_per_s": total_mb / secs, "seconds": secs,
                            "startup_seconds": startup, "warmup_seconds": warmup, "master": "local[2]"}
            print(f"spark: {json.dumps(out['spark'])}", flush=True)
    out.update({"files": len(records), "mb": total_mb, "labelled_pairs": len(pairs),
                "duplicate_pairs": sum(d for *_, d in pairs), "threshold": THRESHOLD,
                "cpu_cores": os.cpu_count(), "shards": SHARDS})
    for tool in ("ours", "datasketch", "spark"):
        if tool in out:
            out[tool] = {k: round(v, 4) if isinstance(v, float) else v for k, v in out[tool].items()}
    out["mb"] = round(out["mb"], 3)
    if args.scaling:
        scaling_engines = [e for e in engines if e != "spark" or "spark" in out]
        out["scaling"] = scaling_series([int(k) for k in args.scaling.split(",")], args.scaling_mb,
                                        scaling_engines, args.seed)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
