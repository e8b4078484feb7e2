"""Redaction on this interpreter's standard library: speed and what it finds, for review.

Ingests the stdlib as ``prepare`` does by default, runs ``data_processing.redact`` on every file
(timed on its own), and prints per kind the number of redactions, of files, and of findings
under ``test/``; ``--hits FILE`` writes every finding with 40 characters of context (a TSV:
kind, file, context) and ``--sample N`` prints N random findings per kind, which is how the
false-positive figures of docs/data.md were read (a finding is a false positive when it is not
what its placeholder says: not an e-mail address, an IP address, a key or a password).

    python bench/redact.py [--sample 40] [--hits hits.tsv] [--seed 0]

The last printed line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import time
from collections import Counter, defaultdict

from data_processing import ingest, redact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=0, help="print N random findings per kind")
    p.add_argument("--hits", default=None, help="write every finding (kind, file, context) to this TSV")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    records = list(ingest.iter_tree(sysconfig.get_paths()["stdlib"], root_repo="stdlib-root"))
    total = sum(len(r["text"].encode("utf-8")) for r in records)
    kept: Counter = Counter()
    hits: dict[str, list[tuple[str, str]]] = defaultdict(list)
    t0 = time.perf_counter()
    found = [(r, redact.find_spans(r["text"], kept)) for r in records]
    seconds = time.perf_counter() - t0
    for record, spans in found:
        name = f"{record['meta']['repo_name']}/{record['meta']['file_name']}"
        for s in spans:
            context = record["text"][max(0, s.start - 40):s.end + 10].replace("\n", "⏎").replace("\t", " ")
            hits[s.kind].append((name, context))
    summary = {kind: {"redactions": len(h), "files": len({n for n, _ in h}),
                      "under_test": sum(n.startswith("test/") or "/test" in n for n, _ in h)}
               for kind, h in sorted(hits.items())}
    rng = random.Random(args.seed)
    for kind, h in sorted(hits.items()):
        print(f"{kind}: {summary[kind]}")
        for name, context in rng.sample(h, min(args.sample, len(h))):
            print(f"    {name}  {context[:110]}")
    if args.hits:
        with open(args.hits, "w") as f:
            for kind, h in sorted(hits.items()):
                f.writelines(f"{kind}\t{n}\t{c}\n" for n, c in h)
    changed = sum(1 for _, spans in found if spans)
    print(json.dumps({"files": len(records), "mb": total / 1e6, "seconds": seconds, "mb_per_s": total / 1e6 / seconds,
                      "files_changed": changed, "kinds": summary, "kept_candidates": dict(sorted(kept.items()))}))


if __name__ == "__main__":
    main()
