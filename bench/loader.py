"""Loader throughput: ``TokenLoader`` against the Hugging Face way of Code Clippy / ``run_clm_flax.py``.

All read the same ``*.jsonl.zst`` shards (Python stdlib source, written here) with the same
tokenizer, in the same run on the same machine, cold (tokenizing) and cached separately:

* peer (cold): ``datasets.load_dataset("json", streaming=True)`` -> ``map(tokenize,
  batched=True)`` with ``PreTrainedTokenizerFast`` -> ``group_texts`` (concatenate and cut into
  blocks), batched into numpy arrays as the training loop would;
* ours, cold: ``TokenLoader`` tokenizing live (EOS between documents, shuffle buffer, worker
  processes, prefetch);
* ours, cache build: ``data_processing.token_cache.build_cache`` (all cores), timed on its own;
* ours, cached: ``TokenLoader(token_cache=...)`` reading that cache (same batches as cold);
* peer, cached: ``run_clm_flax.py``'s own cache: ``load_dataset("json")`` (not streaming) ->
  ``map(tokenize)`` -> ``map(group_texts)``, Arrow files written once (timed as the peer's cache
  build), then a second start that finds them and reads shuffled numpy batches.

Each side is timed from construction to its last batch over about one pass of the corpus.
The last line printed is one JSON object: ``tokens_per_second`` / ``speedup`` are the cold
loader against the cold peer (``peer_tokens_per_second``); ``cached_tokens_per_second``,
``cached_speedup`` (over the cold peer), ``cache_build_tokens_per_second``,
``peer_cached_tokens_per_second``, ``cpu_count`` and the 1-minute load average before and
after. Usage: ``python bench/loader.py [--quick] [--num-workers N] [--no-peer-cache]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_processing.loader import TokenLoader  # noqa: E402
from data_processing.shards import write_shard  # noqa: E402
from data_processing.token_cache import build_cache  # noqa: E402

EOS = "<|endoftext|>"


def stdlib_files(limit_bytes: int) -> list[Path]:
    """Python stdlib source files (sorted, so every run reads the same corpus) up to a size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= limit_bytes:
            break
    return files


def build_shards(out: Path, limit_bytes: int, num_shards: int) -> tuple[list[str], int]:
    """Write stdlib files as ``num_shards`` zstd shards; returns the paths and the text bytes."""
    files = stdlib_files(limit_bytes)
    records = [
        {"text": f.read_text(encoding="utf-8", errors="replace"), "meta": {"path": str(f)}} for f in files
    ]
    paths = []
    for s in range(num_shards):
        path = out / f"stdlib-{s:03d}.jsonl.zst"
        write_shard(path, records[s::num_shards])
        paths.append(str(path))
    return paths, sum(len(r["text"].encode()) for r in records)


def train_tokenizer(out: Path, vocab_size: int) -> Path:
    """A byte-level BPE with ``<|endoftext|>`` trained on a slice of the stdlib (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((f.read_text(errors="replace") for f in stdlib_files(3_000_000)), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def run_peer(shards: list[str], tokenizer_dir: Path, block_size: int, batch_size: int) -> tuple[int, float]:
    """The ``run_clm_flax.py`` pipeline on a ``datasets`` stream; returns (tokens, seconds)."""
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token=EOS)
    ds = load_dataset("json", data_files=shards, split="train", streaming=True)

    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        # As in run_clm_flax.py: concatenate everything, drop the remainder, cut into blocks.
        concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    ds = ds.map(tokenize, batched=True, remove_columns=["text", "meta"])
    ds = ds.map(group_texts, batched=True)
    tokens = 0
    rows: list[list[int]] = []
    for example in ds:
        rows.append(example["input_ids"])
        if len(rows) == batch_size:
            tokens += np.asarray(rows, dtype=np.int32).size
            rows = []
    return tokens, time.perf_counter() - start


def run_peer_cached(
    shards: list[str], tokenizer_dir: Path, block_size: int, batch_size: int, cache_dir: Path
) -> tuple[int, float, float]:
    """``run_clm_flax.py`` with its Arrow cache: ``(tokens, seconds reading, seconds building)``.

    The first start tokenizes and writes the cache (the build); the second start is what a rerun
    pays: ``load_dataset`` + both ``map`` calls answered from the cache, then shuffled batches
    gathered as ``run_clm_flax.data_loader`` does (``dataset[indices]`` -> numpy)."""
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    def start() -> tuple[object, float]:
        t0 = time.perf_counter()
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token=EOS)
        raw = load_dataset("json", data_files=shards, split="train", cache_dir=str(cache_dir))

        def tokenize(examples):
            return tokenizer(examples["text"])

        def group_texts(examples):
            concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
            total = (len(concatenated["input_ids"]) // block_size) * block_size
            return {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}

        tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
        return tokenized.map(group_texts, batched=True), t0

    lm, t0 = start()
    build_s = time.perf_counter() - t0
    lm, t0 = start()
    perm = np.random.default_rng(0).permutation(len(lm))
    tokens = 0
    for i in range(len(perm) // batch_size):
        batch = lm[perm[i * batch_size : (i + 1) * batch_size]]
        tokens += np.asarray(batch["input_ids"], dtype=np.int32).size
    return tokens, time.perf_counter() - t0, build_s


def run_loader(
    shards: list[str],
    tokenizer_dir: Path,
    block_size: int,
    batch_size: int,
    num_workers: int,
    num_batches: int,
    token_cache: Path | None = None,
) -> tuple[int, float]:
    """``TokenLoader`` (live, or reading ``token_cache``) for ``num_batches`` batches; returns
    (tokens, seconds)."""
    start = time.perf_counter()
    tokens = 0
    with TokenLoader(
        shards,
        tokenizer_dir,
        block_size=block_size,
        batch_size_per_host=batch_size,
        num_workers=num_workers,
        shuffle_buffer=1000,
        prefetch=4,
        token_cache=str(token_cache) if token_cache else None,
    ) as loader:
        for _ in range(num_batches):
            tokens += next(loader).size
    return tokens, time.perf_counter() - start


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 MB corpus instead of 24 MB")
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB of source text")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: train one)")
    parser.add_argument("--no-peer-cache", action="store_true", help="skip the peer's Arrow-cache run")
    args = parser.parse_args(argv)
    mb = args.mb if args.mb is not None else (2.0 if args.quick else 24.0)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp_path = Path(tmp)
        shards, text_bytes = build_shards(tmp_path / "shards", int(mb * 1e6), num_shards=8)
        tokenizer_dir = args.tokenizer or train_tokenizer(tmp_path / "tok", args.vocab_size)
        peer_tokens, peer_s = run_peer(shards, tokenizer_dir, args.block_size, args.batch_size)
        # About one pass over the corpus: the peer's token count, cut to whole batches.
        num_batches = max(1, peer_tokens // (args.batch_size * (args.block_size + 1)))
        tokens, seconds = run_loader(
            shards, tokenizer_dir, args.block_size, args.batch_size, args.num_workers, num_batches
        )
        build = build_cache(shards, tokenizer_dir, tmp_path / "cache", progress=False)
        cached_tokens, cached_s = run_loader(
            shards, tokenizer_dir, args.block_size, args.batch_size, args.num_workers, num_batches,
            token_cache=tmp_path / "cache",
        )
        peer_cached = None
        if not args.no_peer_cache:
            peer_cached = run_peer_cached(shards, tokenizer_dir, args.block_size, args.batch_size, tmp_path / "hf")
    rate, peer_rate, cached_rate = tokens / seconds, peer_tokens / peer_s, cached_tokens / cached_s
    result = {
        "tokens_per_second": round(rate),
        "peer_tokens_per_second": round(peer_rate),
        "speedup": round(rate / peer_rate, 2),
        "cold_tokens_per_second": round(rate),
        "cached_tokens_per_second": round(cached_rate),
        "cached_speedup": round(cached_rate / peer_rate, 2),
        "cache_build_tokens_per_second": round(build.tokens_built / build.seconds),
        "cache_build_seconds": round(build.seconds, 2),
        "peer_cached_tokens_per_second": round(peer_cached[0] / peer_cached[1]) if peer_cached else None,
        "peer_cache_build_seconds": round(peer_cached[2], 2) if peer_cached else None,
        "cpu_count": cpu_cores(),
        "cpu_cores": cpu_cores(),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "num_workers": args.num_workers,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "vocab_size": args.vocab_size if args.tokenizer is None else None,
        "mb": round(text_bytes / 1e6, 2),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "cached_seconds": round(cached_s, 3),
        "peer_tokens": peer_tokens,
        "peer_seconds": round(peer_s, 2),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
