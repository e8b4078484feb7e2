"""Keystrokes saved by line completion: ``python -m train.evaluate_completion --run RUN | --hf DIR
--data DATA_DIR/validation [--files N]``.

Replays held-out files as a developer typing them. Accounting (see ``replay``):

* a file of ``C`` characters costs ``C`` keystrokes without the model (one per character,
  newlines included);
* at the start of every non-empty line the model proposes the rest of the line from everything
  typed so far (the proposal is cut at its first newline); the longest prefix of the proposal
  that equals the start of the line's actual content is accepted with ONE keystroke when it is at
  least 2 characters long (accepting one character would save nothing); the remaining characters
  of the line and its newline are typed one by one;
* keystrokes saved (%) = 100 * (C - keystrokes) / C; exact line match (%) = non-empty lines whose
  proposal equals the line's content exactly / non-empty lines.

A model that always proposes the exact line types one keystroke per non-empty line plus the
newlines; one that proposes nothing types every character.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from data_processing.tokens import EOS_TOKEN
from train.evaluation.results_table import append_row


def replay(text: str, propose: Callable[[str], str]) -> dict:
    """Keystroke accounting of one file typed with ``propose(prefix_text) -> proposal``."""
    keystrokes = exact = lines = 0
    latencies: list[float] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        content = line.rstrip("\r\n")
        newline = len(line) - len(content)
        if content:
            lines += 1
            t0 = time.perf_counter()
            proposal = propose(text[:pos]).split("\n", 1)[0]
            latencies.append(time.perf_counter() - t0)
            exact += proposal == content
            match = 0
            for a, b in zip(proposal, content, strict=False):
                if a != b:
                    break
                match += 1
            keystrokes += (1 + len(content) - match) if match >= 2 else len(content)
        keystrokes += newline
        pos += len(line)
    return {"chars": len(text), "keystrokes": keystrokes, "lines": lines, "exact_lines": exact,
            "latencies": latencies}


def summarize(results: list[dict]) -> dict:
    chars = sum(r["chars"] for r in results)
    keys = sum(r["keystrokes"] for r in results)
    lines = sum(r["lines"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0
    return {"files": len(results), "chars": chars, "keystrokes": keys, "proposals": len(lat),
            "keystrokes_saved_pct": round(100.0 * (chars - keys) / max(chars, 1), 2),
            "exact_line_pct": round(100.0 * sum(r["exact_lines"] for r in results) / max(lines, 1), 2),
            "latency_mean_ms": round(1000 * sum(lat) / max(len(lat), 1), 2), "latency_p95_ms": round(1000 * p95, 2)}


def model_proposer(cfg, params, tok, *, max_new_tokens: int = 32, context_tokens: int | None = None):
    """``propose(prefix) -> rest of line`` by greedy decoding (the last ``context_tokens`` of the prefix)."""
    from train.inference.decoding import generate_ids

    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    limit = context_tokens or (cfg.max_position_embeddings - max_new_tokens)

    def propose(prefix: str) -> str:
        ids = tok.encode(prefix)[-limit:] if prefix else []
        if not ids:
            ids = [eos]
        gen = generate_ids(cfg, params, [ids], max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos)[0]
        return tok.decode([t for t in gen if t != eos]).split("\n", 1)[0]

    return propose


def iter_files(data: str, n: int | None):
    from data_processing.shards import iter_records

    count = 0
    for shard in sorted(Path(data).glob("*.jsonl.zst")):
        for rec in iter_records(str(shard)):
            yield rec["text"]
            count += 1
            if n is not None and count >= n:
                return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_completion", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run")
    src.add_argument("--hf")
    parser.add_argument("--data", required=True, help="folder of *.jsonl.zst shards (e.g. DATA/validation)")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="condition on the last N tokens typed (default: as many as fit)")
    parser.add_argument("--max-lines", type=int, default=None, help="replay only the first N lines of each file")
    parser.add_argument("--report", default="docs/evaluation.md", help="markdown table a row is appended to")
    args = parser.parse_args(argv)
    from train.inference.decoding import load_model

    cfg, params, tok = load_model(args.run, args.hf)
    propose = model_proposer(cfg, params, tok, max_new_tokens=args.max_new_tokens,
                             context_tokens=args.context_tokens)
    texts = iter_files(args.data, args.files)
    if args.max_lines:
        texts = ("".join(t.splitlines(keepends=True)[: args.max_lines]) for t in texts)
    results = [replay(text, propose) for text in texts]
    summary = {"model": args.run or args.hf, **summarize(results)}
    print(json.dumps(summary))
    if args.report:
        row = {"model": summary["model"], "files": summary["files"],
               "keystrokes saved %": summary["keystrokes_saved_pct"], "exact line %": summary["exact_line_pct"],
               "mean latency ms": summary["latency_mean_ms"], "p95 latency ms": summary["latency_p95_ms"]}
        append_row(args.report, "Keystrokes saved", row, "`python -m train.evaluate_completion`: held-out files "
                   "replayed as a developer typing them (greedy line proposals).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
