"""The global order's cost: memory per host for a large corpus, and read speed against the streaming loader.

* ``memory``: writes synthetic token cache entries for ``--docs`` documents (default 10M, in
  ``--units`` shards, ``--doc-tokens`` tokens each; placeholder shard files) into a temporary
  folder, builds a ``GlobalOrderLoader`` on them and reports the order's index bytes, the
  numpy memory still held and at peak while building (tracemalloc), the resident-set growth, the
  build time, and the read speed of global batches from that index; concat packing, then
  sliding windows; with ``--mixture``, the same with three languages drawn per document (the
  worst case for a mixture's runs: a run of same-language documents averages 1.5 documents)
  and ``data.mixture`` ``{python: 0.5, go: 0.3}``;
* ``speed``: ``TokenLoader(token_cache=...)`` against ``GlobalOrderLoader`` on the same cache of
  Python stdlib shards (written here), tokens per second for a few block / batch sizes (best of
  three alternating runs each).

Usage: ``python bench/global_order.py [memory|speed|both] [--docs N]``; the last line printed is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_processing.global_order import GlobalOrderLoader  # noqa: E402
from data_processing.packing import EncodeOptions  # noqa: E402
from data_processing.token_cache import (  # noqa: E402
    CACHE_VERSION,
    TokenCache,
    _write_entry,
    build_cache,
    entry_path,
    shard_identity,
    tokenizer_hash,
)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _tokenizer(root: Path, texts) -> Path:
    from tokenizer.train_tokenizer import save_tokenizer, train_bpe, wrap_fast

    save_tokenizer(wrap_fast(train_bpe(texts, vocab_size=512, progress=False)), root / "tokenizer")
    return root / "tokenizer"


MIX_LANGUAGES = ["Python", "Go", "Shell"]


def _synthetic_cache(root: Path, tok_dir: Path, docs: int, units: int, doc_tokens: int,
                     mixed: bool = False) -> TokenCache:
    """Cache entries as ``build_cache`` writes them, with random tokens (no tokenizing); ``mixed``:
    each document's language drawn from ``MIX_LANGUAGES``."""
    tok_hash = tokenizer_hash(tok_dir)
    rng = np.random.default_rng(0)
    shards = []
    per = docs // units
    for u in range(units):
        shard = root / "shards" / f"train-{u:05d}.jsonl"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_text("{}\n")  # a placeholder: only its identity is checked
        lengths = rng.integers(1, 2 * doc_tokens, per)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = rng.integers(0, 500, int(offsets[-1]), dtype=np.uint16)
        meta = {"version": CACHE_VERSION, "tokenizer_sha256": tok_hash, "shard": shard_identity(str(shard)),
                "num_lines": per, "num_docs": per, "num_tokens": int(offsets[-1]), "vocab_size": 512,
                "languages": MIX_LANGUAGES if mixed else ["Python"], "bad": {}, "unreadable": None}
        kinds = rng.integers(0, 3, per).astype(np.int16) if mixed else np.zeros(per, np.int16)
        _write_entry(entry_path(root / "cache", tok_hash, str(shard)),
                     {"tokens": tokens, "offsets": offsets, "kinds": kinds}, meta)
        shards.append(str(shard))
    return TokenCache(root / "cache", tok_dir, shards)


def memory(docs: int, units: int, doc_tokens: int, encode=None, mixture=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        tok_dir = _tokenizer(root, [p.read_text(encoding="utf-8", errors="replace")
                                    for p in sorted(stdlib.glob("*.py"))[:40]])
        t0 = time.perf_counter()
        cache = _synthetic_cache(root, tok_dir, docs, units, doc_tokens, mixed=bool(mixture))
        write_s = time.perf_counter() - t0
        rss0 = _rss()
        tracemalloc.start()
        t0 = time.perf_counter()
        loader = GlobalOrderLoader(cache, block_size=2048, global_batch_size=512, process_count=64,
                                   process_index=3, encode=encode, mixture=mixture)
        build_s = time.perf_counter() - t0
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = _rss()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 5:
            n += next(loader).size
        rate = n / (time.perf_counter() - t0)
        return {"docs": docs, "units": units, "doc_tokens_mean": doc_tokens, "rows_per_epoch": loader.rows_per_epoch,
                "index_bytes": loader.index_bytes, "bytes_per_doc": round(loader.index_bytes / docs, 2),
                "numpy_held_bytes": held, "numpy_peak_bytes_while_building": peak, "rss_growth_bytes": rss1 - rss0,
                "build_seconds": round(build_s, 2), "synthetic_write_seconds": round(write_s, 1),
                "tokens_per_second_8x2049_per_host": round(rate)}


def speed(total_tokens: int, repeats: int = 3) -> dict:
    from data_processing.loader import TokenLoader
    from data_processing.shards import write_shard

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 60_000)[:110]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        write_shard(root / "train" / "train-00000.jsonl.zst", [{"text": t} for t in texts[:60]])
        write_shard(root / "train" / "train-00001.jsonl.zst", [{"text": t} for t in texts[60:]])
        tok_dir = _tokenizer(root, texts)
        build_cache(root / "train", tok_dir, root / "cache", workers=1, progress=False)

        def rate(loader) -> float:
            next(loader)
            t0, n = time.perf_counter(), 0
            while n < total_tokens:
                n += next(loader).size
            return n / (time.perf_counter() - t0)

        for block, batch in ((128, 16), (1024, 32), (2048, 64)):
            a = b = 0.0
            for _ in range(repeats):  # alternating, best of each: other load on the machine only slows
                stream = TokenLoader(root / "train", tok_dir, block_size=block, batch_size_per_host=batch,
                                     token_cache=str(root / "cache"), num_workers=0)
                a = max(a, rate(stream))
                stream.close()
                b = max(b, rate(GlobalOrderLoader(str(root / "cache"), source=str(root / "train"),
                                                  tokenizer_path=tok_dir, block_size=block, global_batch_size=batch)))
            out[f"{block}x{batch}"] = {"token_loader_cached": round(a), "global_order": round(b)}
            print(f"block {block} batch {batch}: TokenLoader+cache {a / 1e6:.0f} M tokens/s, "
                  f"GlobalOrderLoader {b / 1e6:.0f} M tokens/s", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="both", choices=("memory", "speed", "both"))
    p.add_argument("--docs", type=int, default=10_000_000)
    p.add_argument("--units", type=int, default=100)
    p.add_argument("--doc-tokens", type=int, default=8, help="mean tokens per synthetic document (disk use)")
    p.add_argument("--tokens", type=int, default=40_000_000, help="tokens read per speed measurement")
    p.add_argument("--mixture", action="store_true", help="memory: three languages and data.mixture as well")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]}
    if args.what in ("speed", "both"):
        result["speed_tokens_per_second"] = speed(args.tokens)
    if args.what in ("memory", "both"):
        result["memory"] = memory(args.docs, args.units, args.doc_tokens)
        result["memory_windows"] = memory(args.docs, args.units, args.doc_tokens,
                                          EncodeOptions(window=2049, stride=1024))
    if args.what == "memory" and args.mixture:
        mixture = {"python": 0.5, "go": 0.3}
        result["memory_mixture"] = memory(args.docs, args.units, args.doc_tokens, mixture=mixture)
        result["memory_mixture_windows"] = memory(args.docs, args.units, args.doc_tokens,
                                                  EncodeOptions(window=2049, stride=1024), mixture)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
