"""Loader throughput: ``TokenLoader`` against the Hugging Face way of Code Clippy / ``run_clm_flax.py``.

Both read the same ``*.jsonl.zst`` shards (Python stdlib source, written here) with the same
tokenizer, in the same run on the same machine:

* peer: ``datasets.load_dataset("json", streaming=True)`` -> ``map(tokenize, batched=True)``
  with ``PreTrainedTokenizerFast`` -> ``group_texts`` (concatenate and cut into blocks), batched
  into numpy arrays as the training loop would;
* ours: ``TokenLoader`` (EOS between documents, shuffle buffer, worker processes, prefetch).

Each side is timed from construction to its last batch over about one pass of the corpus.
The last line printed is one JSON object (``tokens_per_second``, ``peer_tokens_per_second``,
``speedup``, ``cpu_cores``, ...). Usage: ``python bench/loader.py [--quick] [--num-workers N]``.
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


def run_loader(
    shards: list[str],
    tokenizer_dir: Path,
    block_size: int,
    batch_size: int,
    num_workers: int,
    num_batches: int,
) -> tuple[int, float]:
    """``TokenLoader`` for ``num_batches`` batches; returns (tokens, seconds)."""
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
    args = parser.parse_args(argv)
    mb = args.mb if args.mb is not None else (2.0 if args.quick else 24.0)

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
    result = {
        "tokens_per_second": round(tokens / seconds),
        "peer_tokens_per_second": round(peer_tokens / peer_s),
        "speedup": round((tokens / seconds) / (peer_tokens / peer_s), 2),
        "cpu_cores": cpu_cores(),
        "num_workers": args.num_workers,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "vocab_size": args.vocab_size if args.tokenizer is None else None,
        "mb": round(text_bytes / 1e6, 2),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "peer_tokens": peer_tokens,
        "peer_seconds": round(peer_s, 2),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
