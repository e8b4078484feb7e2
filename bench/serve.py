"""Completion server throughput: ``python bench/serve.py [--quick]``.

Starts ``train.serve`` on a tiny random GPT-Neo (512-token byte-level tokenizer trained on a few
standard-library files) on 127.0.0.1, then sends the same greedy requests one by one (baseline)
and from 1, 4 and 16 concurrent clients; reports requests/s and p50/p95 latency. Then streams
greedy 64-token completions one at a time and reports when the first text event arrived and
when the stream ended (p50). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path) -> None:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    sys.path.insert(0, str(ROOT))
    from tokenizer.train_tokenizer import save_tokenizer, train_bpe, wrap_fast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    tok = wrap_fast(train_bpe(iter(texts), vocab_size=512, progress=False))
    save_tokenizer(tok, folder)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    GPTNeoForCausalLM(GPTNeoConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                                   attention_types=[[["global", "local"], 1]], window_size=8,
                                   max_position_embeddings=128, bos_token_id=eos,
                                   eos_token_id=eos)).save_pretrained(folder)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import httpx

    n_requests = 16 if args.quick else 64
    max_tokens = 16 if args.quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        tiny_model(folder)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--hf", str(folder), "--port", str(port),
                                 "--queue-size", "256"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            prompts = [f"def f{i}(x):\n    return x +" for i in range(n_requests)]
            # One pooled client for every request: creating an httpx client costs ~45 ms on this
            # box (SSL context), which would otherwise dominate the latencies measured.
            client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=32))

            def one(p):
                t0 = time.perf_counter()
                r = client.post(url + "/v1/completions", json={"prompt": p, "max_tokens": max_tokens,
                                                               "temperature": 0})
                r.raise_for_status()
                return time.perf_counter() - t0

            with ThreadPoolExecutor(16) as pool:  # warm-up: compile every batch bucket once
                for c in (1, 4, 16):
                    list(pool.map(one, prompts[:c]))
            results = {}
            for name, clients in (("sequential", 1), ("c1", 1), ("c4", 4), ("c16", 16)):
                t0 = time.perf_counter()
                if name == "sequential":
                    lat = [one(p) for p in prompts]
                else:
                    with ThreadPoolExecutor(clients) as pool:
                        lat = list(pool.map(one, prompts))
                wall = time.perf_counter() - t0
                results[name] = {"clients": clients, "requests": len(prompts), "rps": round(len(prompts) / wall, 2),
                                 "p50_ms": round(1000 * pct(lat, 0.5), 1), "p95_ms": round(1000 * pct(lat, 0.95), 1)}
                print(f"{name:>10}: {results[name]}", file=sys.stderr)

            def streamed(p):
                # Time to the first event that carries text, and to the end of the stream.
                t0, first = time.perf_counter(), None
                body = {"prompt": p, "max_tokens": 64, "temperature": 0, "stream": True}
                with client.stream("POST", url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                            first = time.perf_counter() - t0
                return first if first is not None else float("nan"), time.perf_counter() - t0

            streamed(prompts[0])  # warm-up: the 64-token bucket
            times = [streamed(p) for p in prompts[: 8 if args.quick else 32]]
            results["stream64"] = {"requests": len(times),
                                   "first_text_p50_ms": round(1000 * pct([a for a, _ in times], 0.5), 1),
                                   "end_p50_ms": round(1000 * pct([b for _, b in times], 0.5), 1)}
            print(f"{'stream64':>10}: {results['stream64']}", file=sys.stderr)
            client.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    print(json.dumps({"bench": "serve", "max_tokens": max_tokens, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
