"""Completion server throughput: ``python bench/serve.py [--quick] [--compare REF] [--rounds N]``.

Starts ``train.serve`` on a tiny random GPT-Neo (512-token byte-level tokenizer trained on a few
standard-library files) on 127.0.0.1, then sends greedy requests of mixed lengths (``max_tokens``
cycling through 8, 16, 32, 64: what continuous batching is for) one by one and from 1, 4 and 16
concurrent clients; reports requests/s and p50/p95 latency, and the time to the first streamed
text (p50/p95) of 64-token completions streamed from 4 clients at once.

``--compare REF`` also starts the server of git commit REF (exported with ``git archive`` into a
temporary folder) on the same model and measures both in alternating turns, ``--rounds`` times
(the order flips each round), so both see the same machine load; each figure is the median over
rounds. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
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


def _start(root: Path, folder: Path, log_path: Path):
    """A server from source tree ``root`` on a free port: (process, url, log file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--hf", str(folder), "--port", str(port),
                             "--queue-size", "256", "--timeout", "600"], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)})
    return proc, f"http://127.0.0.1:{port}", log


def _wait(url: str, proc) -> None:
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"server at {url} did not start")


class Client:
    """Requests against one server through one pooled connection set (creating an httpx client
    costs ~45 ms on this box, which would otherwise dominate the latencies measured)."""

    def __init__(self, url: str):
        import httpx

        self.url, self.http = url, httpx.Client(timeout=300, limits=httpx.Limits(max_connections=32))

    def one(self, job) -> float:
        prompt, max_tokens = job
        t0 = time.perf_counter()
        r = self.http.post(self.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                              "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - t0

    def first_text(self, prompt: str) -> float:
        """Seconds to the first event that carries text of a streamed 64-token completion."""
        t0, first = time.perf_counter(), float("nan")
        body = {"prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}
        with self.http.stream("POST", self.url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if first != first and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    first = time.perf_counter() - t0
        return first


def measure(client: Client, jobs: list, streams: list[str]) -> dict:
    """One turn: one by one, then 1, 4, 16 concurrent clients; streamed first text from 4 clients."""
    out = {}
    for name, clients in (("sequential", 1), ("c1", 1), ("c4", 4), ("c16", 16)):
        t0 = time.perf_counter()
        if name == "sequential":
            lat = [client.one(j) for j in jobs]
        else:
            with ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(client.one, jobs))
        wall = time.perf_counter() - t0
        out[name] = {"rps": len(jobs) / wall, "p50_ms": 1000 * pct(lat, 0.5), "p95_ms": 1000 * pct(lat, 0.95)}
    with ThreadPoolExecutor(4) as pool:
        firsts = list(pool.map(client.first_text, streams))
    out["stream64_c4"] = {"first_text_p50_ms": 1000 * pct(firsts, 0.5), "first_text_p95_ms": 1000 * pct(firsts, 0.95)}
    return out


def _median(turns: list[dict]) -> dict:
    return {k: {m: round(statistics.median(t[k][m] for t in turns), 1) for m in turns[0][k]} for k in turns[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare", default=None, help="git commit whose server to measure alongside")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    n_requests = 32 if args.quick else 64
    lengths = (8, 16, 32, 64)
    jobs = [(f"def f{i}(x):\n    return x +", lengths[i % len(lengths)]) for i in range(n_requests)]
    streams = [f"class C{i}:\n    def __init__(self" for i in range(8 if args.quick else 16)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        tiny_model(folder)
        roots = {"this": ROOT}
        if args.compare:
            ref = Path(tmp) / "ref"
            ref.mkdir()
            archive = subprocess.run(["git", "archive", args.compare], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(ref)], input=archive.stdout, check=True)
            roots[args.compare] = ref
        servers = {name: _start(root, folder, Path(tmp) / f"{name}.log") for name, root in roots.items()}
        try:
            clients = {}
            for name, (proc, url, _) in servers.items():
                _wait(url, proc)
                clients[name] = Client(url)
                measure(clients[name], jobs, streams)  # warm-up: compile every shape the turns use
            turns: dict[str, list] = {name: [] for name in servers}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    turns[name].append(measure(clients[name], jobs, streams))
                    print(f"round {r} {name}: {json.dumps(turns[name][-1])}", file=sys.stderr)
            results = {name: _median(t) for name, t in turns.items()}
        finally:
            for proc, _, log in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
    print(json.dumps({"bench": "serve", "requests": n_requests, "max_tokens": list(lengths), "rounds": args.rounds,
                      **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
