"""Decontamination: files holding a benchmark problem (verbatim, re-indented, renamed, wrapped) go;
ordinary code stays; the report names them; bad benchmark files are one line and exit 2."""

from __future__ import annotations

import gzip
import json
import re
import sysconfig
from pathlib import Path

import pytest

from data_processing import decontaminate as D
from data_processing import prepare
from data_processing import report as DR
from data_processing.benchmarks import BenchmarkFileError, read_problem_file
from data_processing.shards import iter_dir_records, write_shard
from tests.helpers import code_record

TASK = "HumanEval/129"  # minPath: a long solution (many n-grams, many identifiers to rename)

USER_PROBLEM = {
    "task_id": "Mine/0",
    "prompt": "def interleave_runs(xs: list, ys: list) -> list:\n    \"\"\"Interleave two lists.\"\"\"\n",
    "canonical_solution": ("    merged = []\n    for left, right in zip(xs, ys):\n        merged.append(left * 3)\n"
                           "        merged.append(right - 7)\n    merged.extend(xs[len(ys):])\n"
                           "    merged.extend(ys[len(xs):])\n    return sorted(merged, reverse=True)\n"),
    "test": "def check(candidate):\n    assert candidate([], []) == []\n",
    "entry_point": "interleave_runs",
}


@pytest.fixture(scope="module")
def index() -> D.BenchmarkIndex:
    return D.BenchmarkIndex(D.load_benchmarks())


@pytest.fixture(scope="module")
def problem(index) -> dict:
    return index.benchmarks["humaneval"][TASK]


def _source(problem: dict) -> str:
    return problem["prompt"] + problem["canonical_solution"]


def _reindent(text: str, unit: str) -> str:
    """Every 4-space indentation level as ``unit``."""
    return re.sub(r"^((?:    )+)", lambda m: unit * (len(m.group(1)) // 4), text, flags=re.M)


def _rename(text: str) -> str:
    """Every local identifier of minPath's solution renamed (and the function itself)."""
    names = {"minPath": "shortest_walk", "grid": "board", "k": "steps", "n": "size", "val": "best",
             "i": "row", "j": "col", "temp": "around", "ans": "walk"}
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m.group(1)], text)


def _kinds(index, text: str) -> set[tuple[str, str]]:
    return {(m.problem.task_id, m.kind) for m in index.match(text, python=True)}


def test_verbatim_solution_is_caught(index, problem):
    text = "import os\n\n" + _source(problem) + "\n\nprint(minPath([[1]], 1))\n"
    assert (TASK, "substring") in _kinds(index, text)
    assert (TASK, "substring") in _kinds(index, problem["canonical_solution"])  # the body alone


@pytest.mark.parametrize("unit", ["\t", "  "])
def test_reindented_copy_is_caught(index, problem, unit):
    text = _reindent(_source(problem), unit)
    assert text != _source(problem)
    assert (TASK, "substring") in _kinds(index, text)


def test_renamed_copy_is_caught_by_ngrams(index, problem):
    text = _reindent(_rename(_source(problem)), "  ")
    assert "board" in text and "grid" not in text
    assert _kinds(index, text) == {(TASK, "ngram")}
    assert (TASK, "ngram") in {(m.problem.task_id, m.kind) for m in index.match(text, python=False)}  # regex tokens


def test_copy_wrapped_in_a_class_is_caught(index, problem):
    body = "\n".join("    " + line for line in _source(problem).splitlines())
    text = ("import math\n\n\nclass Solver:\n    '''Puzzles.'''\n\n    def other(self):\n        return math.pi\n\n"
            + body.replace("def minPath(grid, k)", "def minPath(self, grid, k)") + "\n\n\nSOLVER = Solver()\n")
    assert (TASK, "substring") in _kinds(index, text)
    renamed = _rename(text)  # wrapped and renamed: the n-grams still see it
    assert (TASK, "ngram") in _kinds(index, renamed)


def test_every_humaneval_problem_is_caught_copied_reindented_or_wrapped(index):
    """All 164, not one long problem: a threshold change that loses the short ones fails here."""
    missed = []
    for task, prob in index.benchmarks["humaneval"].items():
        src = _source(prob)
        wrapped = "import math\n\nclass Solver:\n" + "\n".join("    " + ln for ln in src.splitlines()) + "\n"
        for how, text in (("verbatim", src), ("tabs", _reindent(src, "\t")), ("2 spaces", _reindent(src, "  ")),
                          ("wrapped", wrapped)):
            if task not in {m.problem.task_id for m in index.match(text, python=True)}:
                missed.append((task, how))
    assert len(index.benchmarks["humaneval"]) == 164 and missed == []


def test_ordinary_code_is_kept(index):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # statistics.py held the highest n-gram share of any stdlib file (0.64 of HumanEval/152's).
    for name in ("statistics.py", "inspect.py", "textwrap.py", "heapq.py", "bisect.py"):
        assert index.match((stdlib / name).read_text("utf-8"), python=True) == [], name
    assert index.match("def add(x, y):\n    return x + y\n", python=True) == []  # a trivial one-liner
    assert index.match("", python=True) == [] and index.match("x", python=False) == []


def test_user_benchmark_file(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps(USER_PROBLEM) + "\n")
    index = D.BenchmarkIndex(D.load_benchmarks([path], humaneval=False))
    assert list(index.benchmarks) == ["mine"]
    copy = "x = 1\n" + USER_PROBLEM["prompt"] + USER_PROBLEM["canonical_solution"]
    assert [(m.problem.task_id, m.kind) for m in index.match(copy, python=True)] == [("Mine/0", "substring")]


def _write_benchmark(path: Path, problems: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def test_cli_on_shards_writes_kept_records_and_report(tmp_path, problem):
    bench = _write_benchmark(tmp_path / "mine.jsonl", [USER_PROBLEM])
    records = [code_record("a", "ok.py", "def f(a):\n    return [a] * 3\n"),
               code_record("a", "he.py", _reindent(_source(problem), "\t")),
               code_record("b", "mine.py", USER_PROBLEM["prompt"] + USER_PROBLEM["canonical_solution"]),
               code_record("b", "renamed.py", _rename(_source(problem)))]
    write_shard(tmp_path / "in" / "x-00000.jsonl.zst", records)
    out = tmp_path / "out"
    assert D.main(["--input", str(tmp_path / "in"), "--output", str(out), "--decontaminate", str(bench)]) == 0
    assert [r["meta"]["file_name"] for r in iter_dir_records(out)] == ["ok.py"]
    report = json.loads((out / "decontamination_report.json").read_text())
    removed_bytes = records[1]["meta"]["size"] + records[3]["meta"]["size"]
    assert report["benchmarks"]["humaneval"] == {"problems": 164, "files_removed": 2, "bytes_removed": removed_bytes}
    assert report["benchmarks"]["mine"]["files_removed"] == 1
    got = {(r["repo"], r["path"], r["benchmark"], tuple(r["task_ids"]), r["match"]) for r in report["removed"]}
    assert got == {("a", "he.py", "humaneval", (TASK,), "substring"),
                   ("b", "mine.py", "mine", ("Mine/0",), "substring"),
                   ("b", "renamed.py", "humaneval", (TASK,), "ngram")}
    assert report["files"] == 4 and report["files_removed"] == 3


def test_prepare_end_to_end(tmp_path, problem):
    bench = _write_benchmark(tmp_path / "mine.jsonl", [USER_PROBLEM])
    src = tmp_path / "src"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = {"alpha/stats.py": (stdlib / "statistics.py").read_text("utf-8"),
             "alpha/copied.py": "import sys\n\n" + _source(problem),
             "beta/heap.py": (stdlib / "heapq.py").read_text("utf-8"),
             "beta/user.py": USER_PROBLEM["prompt"] + USER_PROBLEM["canonical_solution"],
             "gamma/tw.py": (stdlib / "textwrap.py").read_text("utf-8")}
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out = tmp_path / "data"
    assert prepare.main(["--src", str(src), "--out", str(out), "--decontaminate", str(bench), "--workers", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    dec = report["decontamination"]
    assert dec["benchmarks"]["humaneval"]["files_removed"] == 1 and dec["benchmarks"]["mine"]["files_removed"] == 1
    assert {(r["repo"], r["path"]) for r in dec["removed"]} == {("alpha", "copied.py"), ("beta", "user.py")}
    kept = {r["meta"]["file_name"] for side in ("train", "validation") for r in iter_dir_records(out / side)}
    assert kept == {"stats.py", "heap.py", "tw.py"}
    assert report["params"]["decontaminate"] == {"humaneval": True, "files": [str(bench)]}
    page = DR.write_report(out, tmp_path / "page").read_text()  # the HTML data report shows them
    assert "Decontamination" in page and "copied.py" in page and "HumanEval/129" in page and "Mine/0" in page
    assert DR.dropped_series(report)["decontaminate:humaneval"]["files"] == 1

    off = tmp_path / "off"
    assert prepare.main(["--src", str(src), "--out", str(off), "--no-decontaminate", "--workers", "1"]) == 0
    assert json.loads((off / "report.json").read_text())["decontamination"] == {"enabled": False}


@pytest.mark.parametrize(("content", "expected"), [
    ('{"task_id": "x", "prompt": "p"}\n', ":1: missing field 'canonical_solution'"),
    ('{"task_id": "x", "prompt": "p", "canonical_solution": "s"}\n{bad\n', ":2: not JSON"),
    ('[1, 2]\n', ":1: not a JSON object"),
    ('{"task_id": "x", "prompt": 3, "canonical_solution": "s"}\n', ":1: field 'prompt' is not a string"),
    ("\n", ": no problems in the file"),
])
def test_bad_benchmark_file_is_one_line_and_exit_2(tmp_path, capsys, content, expected):
    bench = tmp_path / "bad.jsonl"
    bench.write_text(content)
    with pytest.raises(BenchmarkFileError, match=re.escape(expected)):
        read_problem_file(bench, D.REQUIRED)
    src = tmp_path / "src" / "r"
    src.mkdir(parents=True)
    (src / "a.py").write_text("x = 1\n")
    out = tmp_path / "data"
    assert prepare.main(["--src", str(src.parent), "--out", str(out), "--decontaminate", str(bench)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bench}{expected}" in err
    assert not out.exists()  # nothing half-written
    write_shard(tmp_path / "in" / "x-00000.jsonl.zst", [code_record("a", "a.py", "x = 1\n")])
    assert D.main(["--input", str(tmp_path / "in"), "--output", str(out), "--decontaminate", str(bench)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()


def test_missing_benchmark_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert prepare.main(["--src", str(tmp_path), "--out", str(tmp_path / "d"), "--decontaminate", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such benchmark file"


def test_worker_pool_gives_the_serial_result(index, problem, monkeypatch):
    from data_processing.dedup import Workers
    from data_processing.workers import WorkerProcesses

    monkeypatch.setattr(D, "BATCH_BYTES", 200)  # several batches, results paired back in order
    records = [code_record("r", f"f{i}.py", f"def f{i}(a):\n    return a + {i}\n" * 5) for i in range(12)]
    records[3] = code_record("r", "copy.py", _source(problem))
    records[9] = code_record("r", "renamed.py", _rename(_source(problem)))
    runs = []
    # fork (prepare's pool on Linux) and spawn (when JAX or torch is loaded: another str hash seed)
    for pool in (None, Workers(2), WorkerProcesses(2, context="spawn")):
        stats = D.DecontaminationStats()
        try:
            kept = [r["meta"]["file_name"] for r in D.decontaminate_records(records, index, stats, pool=pool)]
        finally:
            if pool is not None:
                pool.close()
        runs.append((kept, stats.removed, stats.files))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] == [f"f{i}.py" for i in range(12) if i not in (3, 9)] and runs[0][2] == 12
