"""Decontamination's false positives on the stdlib and its recall on altered HumanEval copies.

    python bench/decontaminate.py            # ~15 s on a 2-core box

Prints, as JSON: the stdlib files (the default ``prepare`` corpus) removed at the shipped
parameters and the files over lower n-gram thresholds (so the margin is visible), the highest
n-gram shares, whether an ungated substring scan finds anything the candidate gate missed, the
scan's time, and for every HumanEval problem whether a verbatim, a re-indented (2 spaces), a
renamed (every local identifier) and a renamed + re-indented copy wrapped in a class is caught.
"""

from __future__ import annotations

import io
import json
import re
import time
import tokenize

from data_processing import decontaminate as D
from data_processing import ingest
from data_processing.prepare import default_source


def renamed(text: str) -> str:
    """Every identifier that is no keyword, builtin or attribute gets a suffix."""
    names = set()
    prev = ""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and tok.string not in D.KEEP_NAMES and prev != ".":
            names.add(tok.string)
        prev = tok.string
    if not names:
        return text
    return re.sub(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b", r"\1_renamed", text)


def reindent(text: str, unit: str = "  ") -> str:
    """4-space indentation levels as ``unit``."""
    return re.sub(r"^((?:    )+)", lambda m: unit * (len(m.group(1)) // 4), text, flags=re.M)


def wrap(text: str) -> str:
    """The code as a method of a class, with other code around it."""
    body = "\n".join("    " + line for line in text.splitlines())
    return f"import os\n\n\nclass Wrapper:\n    def other(self):\n        return os.sep\n\n{body}\n\n\nW = Wrapper()\n"


def stdlib_scan(index: D.BenchmarkIndex) -> dict:
    """Files removed from the stdlib, n-gram shares near the threshold, ungated substring hits."""
    records = list(ingest.iter_tree(default_source(), depth=1, root_repo="stdlib-root"))
    stats = D.DecontaminationStats()
    t0 = time.perf_counter()
    kept = sum(1 for _ in D.decontaminate_records(records, index, stats))
    seconds = time.perf_counter() - t0
    shares, ungated = [], []
    for r in records:
        name = f"{r['meta']['repo_name']}/{r['meta']['file_name']}"
        sol, _ = index.scores(D.python_tokens(r["text"]) if r["meta"]["language"] == "Python"
                              else D.regex_tokens(r["text"]))
        for i, hits in sol.items():
            p = index.problems[i]
            if len(p.solution_ngrams) >= D.MIN_NGRAMS:
                shares.append((hits / len(p.solution_ngrams), p.task_id, name))
        flat = D.normalise_whitespace(r["text"])
        ungated += [(p.task_id, name) for p in index.problems if any(n in flat for n in p.needles)]
    shares.sort(reverse=True)
    return {
        "files": len(records), "mb": round(sum(r["meta"]["size"] for r in records) / 1e6, 1),
        "removed": stats.as_dict()["removed"], "kept": kept, "seconds": round(seconds, 2),
        "mb_per_s": round(stats.bytes_in / 1e6 / seconds, 1),
        "files_over_share": {t: len({n for s, _, n in shares if s >= t}) for t in (0.4, 0.5, 0.6, 0.7, 0.8)},
        "top_shares": [(round(s, 3), t, n) for s, t, n in shares[:8]],
        "ungated_substring_hits": ungated,
    }


def recall(index: D.BenchmarkIndex) -> dict:
    """Per alteration: how many of the 164 problems' copies are caught, and by which test."""
    out: dict[str, dict] = {}
    for p in index.benchmarks["humaneval"].values():
        src = p["prompt"] + p["canonical_solution"]
        for kind, text in (("verbatim", src), ("reindented", reindent(src)), ("renamed", renamed(src)),
                           ("renamed_wrapped", wrap(reindent(renamed(src))))):
            kinds = {m.kind for m in index.match(text, python=True) if m.problem.task_id == p["task_id"]}
            row = out.setdefault(kind, {"substring": 0, "ngram": 0, "missed": []})
            if kinds:
                row["substring" if "substring" in kinds else "ngram"] += 1
            else:
                row["missed"].append(p["task_id"])
    for row in out.values():
        row["missed"] = {"count": len(row["missed"]), "examples": row["missed"][:10]}
    return out


def main() -> None:
    index = D.BenchmarkIndex(D.load_benchmarks())
    eligible = sum(len(p.solution_ngrams) >= D.MIN_NGRAMS for p in index.problems)
    print(json.dumps({"problems": len(index.problems), "ngram_eligible": eligible,
                      "solution_substring_eligible": sum(len(p.needles) == 2 for p in index.problems),
                      "stdlib": stdlib_scan(index), "recall": recall(index)}, indent=1))


if __name__ == "__main__":
    main()
