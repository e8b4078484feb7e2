"""Decontamination: remove every file that contains a benchmark problem (HumanEval by default).

As BigCode's decontamination of The Stack / StarCoder's data (bigcode-dataset/decontamination),
a file goes when it holds a problem's canonical solution, by either of two tests:

* **substring**: after collapsing every whitespace run to one space, the file contains the
  problem's solution (when it is at least ``MIN_CHARS`` normalised characters: a one-liner such
  as ``return x + y`` is in every corpus) or its prompt + solution. Re-indented copies (tabs,
  4 -> 2 spaces) and copies wrapped in other code (a class, a script) are caught.
* **ngram**: identifier-insensitive token n-grams. Code becomes a token sequence without
  comments or layout, in which every identifier is ``ID`` but keywords, builtins, attribute
  names, literals and operators are kept; a file that holds at least ``THRESHOLD`` of the
  distinct ``N``-grams of a problem's solution is a copy with renamed variables. Only problems
  whose solution has at least ``MIN_NGRAMS`` distinct n-grams are tested this way (a short
  solution's few n-grams, made generic by the placeholders, are in unrelated code).

    python -m data_processing.decontaminate --input SHARDS --output DIR [--decontaminate FILE.jsonl[.gz] ...]

Speed: every file is tokenised with a regular expression (about 10 MB/s; Python's ``tokenize`` is
pure Python on 3.11 and ran at 1.7 MB/s on the stdlib, longer than the rest of ``prepare``
together); n-grams are hashed with numpy and looked up in one index of all problems' n-grams.
Only a Python file that is already a candidate (half of some problem's n-grams) is tokenised
again with ``tokenize``, whose tokens decide; a file ``tokenize`` rejects keeps the regex tokens.
``prepare`` runs the matching in its worker processes, in batches, while it goes on ingesting.
In ``prepare`` the stage is on by default (``--no-decontaminate`` drops the HumanEval set); the
counts and the removed files go to ``report.json["decontamination"]`` (docs/data.md).
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import io
import json
import keyword
import pickle
import re
import sys
import time
import tokenize
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_processing.atomic import atomic_dir, write_json_atomic
from data_processing.benchmarks import BenchmarkFileError, humaneval_path, read_problem_file
from data_processing.shards import ShardError, ShardSetWriter, iter_dir_records

N = 10  # tokens per n-gram (BigCode's n-gram decontamination uses 10- and 13-grams)
THRESHOLD = 0.8  # fraction of a solution's distinct n-grams a file must hold (docs/data.md: measured)
MIN_NGRAMS = 10  # a solution with fewer distinct n-grams is tested by substring only
MIN_CHARS = 50  # a solution shorter than this (normalised) is matched only with its prompt
CANDIDATE = 0.5  # regex-token score from which a Python file is re-tokenised with ``tokenize``
REQUIRED = ("task_id", "prompt", "canonical_solution")  # all decontamination reads of a problem

# Names kept as themselves: renaming a variable never renames a keyword or a builtin.
KEEP_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))
# One alternation, no groups, so ``findall`` (C speed) returns whole tokens: comments (dropped
# after), strings (optional prefix, triple-quoted first), names, numbers, operators.
_TOKEN = re.compile(r"""
    \#[^\n]*
  | [rRbBuUfF]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | [^\W\d]\w*
  | (?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?[jJlL]?|0[xXoObB][\da-fA-F_]+
  | \.\.\.|\*\*=?|//=?|->|<<=?|>>=?|[-+*/%&|^=<>!:@]=|[^\s\w]
""", re.VERBOSE)
_QUOTES = ("'", '"')
_SKIP = frozenset({tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                   tokenize.ENCODING, tokenize.ENDMARKER})
_STRING_NOISE = re.compile(r"[\s'\"]")
_BASE = np.uint64(0x100000001B3)  # FNV prime: any odd multiplier mixes the window


def normalise_whitespace(text: str) -> str:
    """Every whitespace run as one space, no leading or trailing space."""
    return " ".join(text.split())


def _norm(kind: str, text: str, prev: str) -> str:
    """A token as the n-grams see it: identifiers (not keywords, builtins or attributes) are
    ``ID``; string literals lose their quotes and whitespace (a formatter may change both)."""
    if kind == "name":
        return text if text in KEEP_NAMES or prev == "." else "ID"
    if kind == "string":
        return "S" + _STRING_NOISE.sub("", text)
    return text


def _regex_kind(token: str) -> str:
    """``string``, ``name`` or ``op``/``number`` (kept as they are) of a regex token."""
    if token[-1] in _QUOTES:
        return "string"
    first = token[0]
    return "name" if first.isalpha() or first == "_" else "op"


def regex_tokens(text: str) -> list[str]:
    """Normalised tokens of any language's code by regular expression, comments dropped."""
    raw = [t for t in _TOKEN.findall(text) if t[0] != "#"]
    memo: dict[str, str] = {}  # tokens repeat: normalise each distinct one once, look up the rest

    def first(t: str) -> str:
        memo[t] = _norm(_regex_kind(t), t, "")
        return memo[t]

    get = memo.get  # a C-level lookup per token, no Python call unless the token is new
    # After "." a token is an attribute name, kept as itself (``_norm``'s rule, without the call).
    return [t if prev == "." else get(t) or first(t) for t, prev in zip(raw, ["", *raw], strict=False)]


def _python_token_stream(text: str) -> Iterator[tuple[str, str, int]]:
    """``(kind, text, offset)`` of Python's own tokens, layout and comments dropped; raises
    ``SyntaxError`` / ``tokenize.TokenError`` on code ``tokenize`` cannot read."""
    line_starts = [0]
    for line in io.StringIO(text):
        line_starts.append(line_starts[-1] + len(line))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in _SKIP:
            continue
        kind = {tokenize.NAME: "name", tokenize.STRING: "string", tokenize.NUMBER: "number"}.get(tok.type, "op")
        yield kind, tok.string, line_starts[tok.start[0] - 1] + tok.start[1]


def python_tokens(text: str, start: int = 0) -> list[str]:
    """Normalised tokens by Python's ``tokenize`` of those starting at or after offset ``start``;
    the regex tokens when ``tokenize`` cannot read the text."""
    try:
        out, prev = [], ""
        for kind, token, offset in _python_token_stream(text):
            if offset >= start:
                out.append(_norm(kind, token, prev))
            prev = token
        return out
    except (SyntaxError, tokenize.TokenError):
        return regex_tokens(text[start:])


def ngram_hashes(tokens: Sequence[str], n: int = N) -> np.ndarray:
    """uint64 hash of every window of ``n`` tokens (empty when there are fewer tokens)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    ids = np.array([hash(t) for t in tokens], dtype=np.int64).view(np.uint64)
    count = len(tokens) - n + 1
    out = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the point of a multiplicative hash
        for k in range(n):
            out = out * _BASE + ids[k:k + count]
    return out


@dataclass
class Problem:
    """One benchmark problem as matched: its needles and its n-gram sets."""

    benchmark: str
    task_id: str
    needles: list[str]  # normalised solution (when long enough) and prompt + solution
    solution_ngrams: frozenset[int]
    all_ngrams: frozenset[int]  # prompt + solution: decides which files the substring test reads


def make_problem(benchmark: str, problem: dict[str, Any]) -> Problem:
    """A problem's needles and n-grams (the solution's n-grams from tokenizing prompt + solution
    together, so its first line is indented as in the file it came from)."""
    prompt, solution = problem["prompt"], problem["canonical_solution"]
    needles = [normalise_whitespace(prompt + solution)]
    if len(normalise_whitespace(solution)) >= MIN_CHARS:
        needles.insert(0, normalise_whitespace(solution))
    sol = ngram_hashes(python_tokens(prompt + solution, start=len(prompt)))
    every = ngram_hashes(python_tokens(prompt + solution))
    return Problem(benchmark, problem["task_id"], needles, frozenset(sol.tolist()), frozenset(every.tolist()))


@dataclass
class Match:
    """A file's hit on one problem: ``substring`` or ``ngram`` (with the fraction held)."""

    problem: Problem
    kind: str
    score: float


class BenchmarkIndex:
    """Every problem of every benchmark, with one n-gram hash -> problems index."""

    def __init__(self, benchmarks: dict[str, dict[str, dict[str, Any]]]):
        self.benchmarks = benchmarks
        self.problems = [make_problem(name, p) for name, probs in benchmarks.items() for p in probs.values()]
        self._owners: dict[int, list[int]] = {}
        for i, problem in enumerate(self.problems):
            for h in problem.all_ngrams:
                self._owners.setdefault(h, []).append(i)
        self._keys = np.array(sorted(self._owners), dtype=np.uint64)

    def scores(self, tokens: Sequence[str]) -> tuple[Counter, Counter]:
        """Distinct solution and prompt+solution n-grams of each problem (by index) in ``tokens``."""
        hashes = ngram_hashes(tokens)
        hits: list[int] = []
        if len(self._keys) and len(hashes):  # sorted keys: a vectorised binary search per n-gram
            pos = np.minimum(np.searchsorted(self._keys, hashes), len(self._keys) - 1)
            hits = np.unique(hashes[self._keys[pos] == hashes]).tolist()
        sol, every = Counter(), Counter()
        for h in hits:
            for i in self._owners[h]:
                every[i] += 1
                if h in self.problems[i].solution_ngrams:
                    sol[i] += 1
        return sol, every

    def _candidates(self, tokens: Sequence[str]) -> dict[int, float]:
        """Problems of which ``tokens`` hold at least ``CANDIDATE`` of the n-grams, with the
        solution n-gram fraction (0 when the solution has too few n-grams to be scored)."""
        sol, every = self.scores(tokens)
        out = {}
        for i in set(sol) | set(every):
            p = self.problems[i]
            frac = sol[i] / len(p.solution_ngrams) if len(p.solution_ngrams) >= MIN_NGRAMS else 0.0
            if frac >= CANDIDATE or every[i] / max(len(p.all_ngrams), 1) >= CANDIDATE:
                out[i] = frac
        return out

    def match(self, text: str, python: bool) -> list[Match]:
        """The problems ``text`` contains, best test first (substring, then n-gram)."""
        candidates = self._candidates(regex_tokens(text))
        if candidates and python:  # the exact tokens decide; regex ones only pick the files
            candidates = self._candidates(python_tokens(text))
        if not candidates:
            return []
        flat = normalise_whitespace(text)
        found = []
        for i, frac in sorted(candidates.items()):
            p = self.problems[i]
            if any(needle in flat for needle in p.needles):
                found.append(Match(p, "substring", 1.0))
            elif frac >= THRESHOLD:
                found.append(Match(p, "ngram", round(frac, 3)))
        return found


def benchmark_name(path: str | Path, taken: Iterable[str]) -> str:
    """A benchmark's name in the report: the file's name without ``.jsonl[.gz]``, made unique."""
    name = re.sub(r"(\.jsonl)?(\.gz)?$", "", Path(path).name) or "benchmark"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def load_benchmarks(files: Sequence[str | Path] = (), humaneval: bool = True) -> dict[str, dict[str, dict]]:
    """``{benchmark: {task_id: problem}}``: HumanEval (unless ``humaneval`` is false) and each
    file; raises ``BenchmarkFileError`` (one line, file:line and field) for a bad file."""
    out: dict[str, dict[str, dict]] = {}
    if humaneval:
        out["humaneval"] = read_problem_file(humaneval_path(), REQUIRED)
    for path in files:
        out[benchmark_name(path, out)] = read_problem_file(path, REQUIRED)
    return out


@dataclass
class DecontaminationStats:
    """Counts for ``report.json["decontamination"]``: per benchmark, and every removed file."""

    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: int = 0
    bytes_in: int = 0
    files_removed: int = 0
    bytes_removed: int = 0
    removed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "params": {"ngram": N, "threshold": THRESHOLD, "min_ngrams": MIN_NGRAMS, "min_chars": MIN_CHARS},
            "benchmarks": self.benchmarks,
            "files": self.files,
            "files_removed": self.files_removed,
            "bytes_removed": self.bytes_removed,
            "removed": self.removed,
            "seconds": self.seconds,
            "mb_per_s": self.bytes_in / 1e6 / max(self.seconds, 1e-9),
        }


def _record_removal(stats: DecontaminationStats, meta: dict[str, Any], size: int, matches: list[tuple]) -> None:
    """Count a removed file once per benchmark it contains, and list it with its task ids
    (``matches``: ``(benchmark, task_id, kind, score)``)."""
    stats.files_removed += 1
    stats.bytes_removed += size
    by_benchmark: dict[str, list[tuple]] = {}
    for m in matches:
        by_benchmark.setdefault(m[0], []).append(m)
    for name, ms in by_benchmark.items():
        stats.benchmarks[name]["files_removed"] += 1
        stats.benchmarks[name]["bytes_removed"] += size
        stats.removed.append({
            "path": meta.get("file_name"), "repo": meta.get("repo_name"), "benchmark": name,
            "task_ids": [task_id for _, task_id, _, _ in ms],
            "match": "substring" if any(kind == "substring" for _, _, kind, _ in ms) else "ngram",
            "ngram_score": max(score for _, _, _, score in ms),
        })


# One task's worth of texts: big enough that a task's pickling and pipe overhead is small, small
# enough that a few tasks in flight per worker hold little memory.
BATCH_BYTES = 1 << 20
_INDEXES: dict[str, BenchmarkIndex] = {}  # per process: the index of a task's benchmarks, built once


class Pool(Protocol):
    """What ``decontaminate_records`` needs of a worker pool (``data_processing.dedup.Workers``)."""

    def imap(self, fn: Callable, items: Iterable) -> Iterator: ...


def match_batch(digest: str, blob: bytes, items: list[tuple[str, bool]]) -> tuple[list[list[tuple]], float]:
    """``(benchmark, task_id, kind, score)`` of every match of each ``(text, is_python)``, and the
    seconds it took. Runs in a worker: the benchmarks come as a pickled ``blob`` (bytes: no
    pickling work per task) and the index is built from them once per process, never sent: its
    n-gram hashes use ``hash(str)``, whose seed differs in a spawned process."""
    t0 = time.perf_counter()
    index = _INDEXES.get(digest)
    if index is None:
        index = _INDEXES[digest] = BenchmarkIndex(pickle.loads(blob))
    found = [[(m.problem.benchmark, m.problem.task_id, m.kind, m.score) for m in index.match(text, python)]
             for text, python in items]
    return found, time.perf_counter() - t0


def _batches(records: Iterable[dict[str, Any]], held: deque) -> Iterator[list[tuple[str, bool]]]:
    """Records grouped into ``BATCH_BYTES`` tasks of ``(text, is_python)``; each batch's records
    are appended to ``held`` to be paired with its results, which come back in order."""
    batch: list[dict[str, Any]] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record["text"])
        if size >= BATCH_BYTES:
            held.append(batch)
            yield [(r["text"], r["meta"].get("language") == "Python") for r in batch]
            batch, size = [], 0
    if batch:
        held.append(batch)
        yield [(r["text"], r["meta"].get("language") == "Python") for r in batch]


def decontaminate_records(records: Iterable[dict[str, Any]], index: BenchmarkIndex, stats: DecontaminationStats,
                          pool: Pool | None = None) -> Iterator[dict[str, Any]]:
    """Pass on the records that contain no benchmark problem, in order; count and list the
    others. With a ``pool`` the matching runs in its worker processes (the caller's process goes
    on reading and filtering), else here."""
    for name, problems in index.benchmarks.items():
        stats.benchmarks.setdefault(name, {"problems": len(problems), "files_removed": 0, "bytes_removed": 0})
    blob = pickle.dumps(index.benchmarks)
    digest = hashlib.blake2b(blob, digest_size=16).hexdigest()
    _INDEXES.setdefault(digest, index)  # matched here (no pool, or one worker): no unpickling
    task = partial(match_batch, digest, blob)
    held: deque = deque()
    for found, seconds in (pool.imap if pool is not None else map)(task, _batches(records, held)):
        stats.seconds += seconds
        for record, matches in zip(held.popleft(), found, strict=True):
            meta = record["meta"]
            size = int(meta.get("size") or len(record["text"].encode("utf-8")))
            stats.files += 1
            stats.bytes_in += size
            if matches:
                _record_removal(stats, meta, size, matches)
            else:
                yield record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder, file or glob of input shards")
    p.add_argument("--output", required=True,
                   help="folder for decontaminated-NNNNN.jsonl.zst and decontamination_report.json")
    p.add_argument("--decontaminate", action="append", default=[], metavar="FILE.jsonl[.gz]",
                   help="also remove this benchmark's problems (HumanEval format; repeatable)")
    p.add_argument("--no-humaneval", action="store_true", help="do not remove HumanEval's problems")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    args = p.parse_args(argv)
    if args.no_humaneval and not args.decontaminate:
        p.error("--no-humaneval needs at least one --decontaminate FILE")
    stats = DecontaminationStats()
    try:
        index = BenchmarkIndex(load_benchmarks(args.decontaminate, humaneval=not args.no_humaneval))
        records = iter_dir_records(args.input, skip_bad=args.skip_bad)
        with atomic_dir(args.output) as tmp:  # the output folder appears whole or not at all
            with ShardSetWriter(tmp, "decontaminated", max_bytes=int(args.shard_size_mb * (1 << 20))) as writer:
                for record in decontaminate_records(records, index, stats):
                    writer.write(record)
            write_json_atomic(tmp / "decontamination_report.json", stats.as_dict())
    except (ShardError, BenchmarkFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"files": writer.count, "files_removed": stats.files_removed,
                      "by_benchmark": {k: v["files_removed"] for k, v in stats.benchmarks.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
