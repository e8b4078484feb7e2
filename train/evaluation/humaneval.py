"""HumanEval pass@k for a training run, a Hugging Face folder, a completions file, or the canonical
solutions (a self-check of the harness, which must score pass@1 = 1.0).

    python -m train.evaluate_humaneval --run runs/neo-125m --samples-per-task 10 --temperature 0.2
    python -m train.evaluate_humaneval --hf models/gpt-neo-125M --limit 20
    python -m train.evaluate_humaneval --completions samples.jsonl     # {"task_id", "completion"} lines
    python -m train.evaluate_humaneval --canonical

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

from train.evaluation.code_eval import KS, append_summary, evaluate, read_problems, truncate
from train.evaluation.sandbox import SandboxUnavailableError, require_isolation


def load_completions(path: str | Path, problems: dict) -> dict[str, list[str]]:
    completions: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("task_id") not in problems:
                raise ValueError(f"{path}:{n}: unknown task_id {rec.get('task_id')!r}")
            completions[rec["task_id"]].append(truncate(rec["completion"]))
    return dict(completions)


def generate_completions(args, problems: dict) -> dict[str, list[str]]:
    from train.inference.decoding import make_completion_fn  # JAX only when a model is needed

    fn = make_completion_fn(run_dir=args.run, hf_dir=args.hf, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    ids = list(problems)
    n = args.samples_per_task
    out = fn([problems[t]["prompt"] for t in ids], n)
    if len(out) != len(ids) * n:
        raise ValueError(f"completion function returned {len(out)} completions, expected {len(ids) * n}")
    return {t: [truncate(c) for c in out[i * n:(i + 1) * n]] for i, t in enumerate(ids)}


def print_summary(summary: dict, model: str, seconds: float) -> None:
    cols = ["tasks", "samples"] + [f"pass@{k}" for k in KS if f"pass@{k}" in summary]
    print(f"\nHumanEval: {model}  ({seconds:.1f} s)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    print("| " + " | ".join(f"{summary[c]:.4f}" if isinstance(summary[c], float) else str(summary[c])
                            for c in cols) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_humaneval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="training run directory (latest checkpoint)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    src.add_argument("--canonical", action="store_true", help="score the reference solutions (harness self-check)")
    src.add_argument("--completions", help="JSONL with task_id and completion per line")
    parser.add_argument("--samples-per-task", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per sample")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    parser.add_argument("--out", help="write per-sample results here (JSONL)")
    parser.add_argument("--no-docs", action="store_true", help="do not append the summary to docs/evaluation.md")
    parser.add_argument("--docs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="free text for the docs row")
    parser.add_argument("--unsafe-no-isolation", action="store_true",
                        help="run samples without the OS sandbox (only where bubblewrap cannot run; "
                             "untrusted code then has this user's rights)")
    args = parser.parse_args(argv)
    if args.samples_per_task < 1:
        parser.error("--samples-per-task must be >= 1")

    t0 = time.monotonic()
    try:
        if not args.unsafe_no_isolation:
            require_isolation()  # before any model is loaded or sampled
        problems = read_problems()
        if args.limit is not None:
            problems = dict(list(problems.items())[:args.limit])
        if args.canonical:
            model = "canonical solutions"
            completions = {t: [truncate(p["canonical_solution"])] for t, p in problems.items()}
            note = args.note or "harness self-check"
        elif args.completions:
            model = Path(args.completions).name
            completions = load_completions(args.completions, problems)
            note = args.note
        else:
            model = str(args.run or args.hf)
            completions = generate_completions(args, problems)
            note = args.note
    except (ValueError, FileNotFoundError, KeyError, SandboxUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    rows, summary = evaluate(problems, completions, workers=args.workers, timeout=args.timeout,
                             unsafe_no_isolation=args.unsafe_no_isolation)
    seconds = time.monotonic() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    print_summary(summary, model, seconds)
    if not args.no_docs:
        sampled = not (args.canonical or args.completions)
        row = {"model": model, "tasks": summary["tasks"], "samples": summary["samples"],
               "temperature": args.temperature if sampled else "", "top_p": args.top_p if sampled else ""}
        row.update({f"pass@{k}": summary.get(f"pass@{k}", "") for k in KS})
        row["note"] = note
        path = append_summary(args.docs, row)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
