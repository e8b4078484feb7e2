"""Where the live (cold) loader path spends CPU: each stage run alone over a whole corpus.

CPU seconds (user + system of this process, the tokenizer's threads included), not wall time,
so that other jobs on a shared machine do not skew the shares. Stages: reading the
shards, the document stream (JSON, host split, shuffle buffer), pickling texts to a worker,
loading the tokenizer, ``encode_batch_fast``, ids -> numpy, pickling tokens back, packing.
The last line printed is one JSON object (seconds per stage, shares, tokens per CPU second of
the tokenizer). Usage: ``python bench/loader_stages.py [--mb 24] [--tokenizer DIR]``; without
``--tokenizer`` it writes the same shards and trains the same tokenizer as ``bench/loader.py``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import sys
import tempfile
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def profile(shard_dir: Path, tokenizer_dir: Path, chunk: int = 256) -> dict:
    """CPU seconds of each stage over the shards in ``shard_dir``."""
    import numpy as np

    from data_processing.docstream import EPOCH_END, DocStream
    from data_processing.packing import DocumentEncoder, Packer
    from data_processing.shards import iter_lines, list_shards
    from data_processing.sources import ShardSource

    seconds: dict[str, float] = {}
    t = _cpu()
    for path in list_shards(shard_dir):
        for _ in iter_lines(path):
            pass
    seconds["read_zstd_lines"] = _cpu() - t
    t = _cpu()
    stream = DocStream(ShardSource(shard_dir), seed=0, shuffle_buffer=1000, max_epochs=1)
    docs = []
    while True:
        try:
            doc = stream.next_doc()
        except StopIteration:
            break
        if doc is not EPOCH_END:
            docs.append(doc)
    seconds["docstream_json_shuffle"] = _cpu() - t
    t = _cpu()
    chunks = [pickle.loads(pickle.dumps(docs[i : i + chunk])) for i in range(0, len(docs), chunk)]
    seconds["pickle_texts"] = _cpu() - t
    t = _cpu()
    encoder = DocumentEncoder(tokenizer_dir)
    seconds["load_tokenizer"] = _cpu() - t
    t = _cpu()
    encodings = [encoder._encode([d.text for d in c], add_special_tokens=False) for c in chunks]
    seconds["tokenizer"] = _cpu() - t
    t = _cpu()
    eos = np.array([encoder.eos_id], np.int32)
    arrays = [np.concatenate([x for e in es for x in (np.asarray(e.ids, np.int32), eos)]) for es in encodings]
    seconds["ids_to_numpy"] = _cpu() - t
    t = _cpu()
    arrays = [pickle.loads(pickle.dumps(a)) for a in arrays]
    seconds["pickle_tokens"] = _cpu() - t
    t = _cpu()
    for _ in Packer(((None, None, a) for a in arrays), block_size=1024, batch_size=8):
        pass
    seconds["pack"] = _cpu() - t
    tokens = sum(len(a) for a in arrays)
    total = sum(seconds.values())
    return {
        "cpu_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "share": {k: round(v / total, 4) for k, v in seconds.items()},
        "tokens": tokens,
        "tokenizer_tokens_per_cpu_second": round(tokens / seconds["tokenizer"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of source text")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: train one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.loader import build_shards, train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        build_shards(Path(tmp) / "shards", int(args.mb * 1e6), num_shards=8)
        tokenizer_dir = args.tokenizer or train_tokenizer(Path(tmp) / "tok", args.vocab_size)
        result = profile(Path(tmp) / "shards", tokenizer_dir)
    for name, value in result["cpu_seconds"].items():
        print(f"{name:24s} {value:7.2f} CPU s  {100 * result['share'][name]:5.1f}%", flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
