"""Completion server against a tiny model on 127.0.0.1: openai client == train.generate greedy,
streaming, concurrent batching, bad requests, SIGTERM drain; the keystrokes-saved measure."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from train.evaluate_completion import replay

PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Foo:\n    def __init__(self", "x = 1\ny ="]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_dir(tiny_corpus, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    _, tok_dir = tiny_corpus
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos)).eval()
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+b")  # noqa: SIM115
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--hf", str(hf_dir), "--port", str(port),
                             "--queue-size", "32", "--api-key", "sk-test"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        proc.wait(timeout=10)
        log.seek(0)
        raise RuntimeError(log.read().decode())
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    log.close()


def _client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", timeout=60, max_retries=0)


def _reference(hf_dir, prompt, n):
    from train.generate import generate_ids, load_model

    cfg, params, tok = _reference.cache.get(str(hf_dir)) or _reference.cache.setdefault(
        str(hf_dir), load_model(hf_dir=str(hf_dir)))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    gen = generate_ids(cfg, params, [tok.encode(prompt)], max_new_tokens=n, temperature=0.0, eos_id=eos)[0]
    return tok.decode([t for t in gen if t != eos])


_reference.cache = {}


def test_openai_client_greedy_equals_generate_and_stream(server, hf_dir):
    url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["codeneo"]
    for prompt in PROMPTS[:2]:
        got = client.completions.create(model="codeneo", prompt=prompt, max_tokens=16, temperature=0)
        assert got.object == "text_completion"
        assert got.choices[0].text == _reference(hf_dir, prompt, 16)
        assert got.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="codeneo", prompt=prompt, max_tokens=16, temperature=0, stream=True))
        assert streamed == got.choices[0].text
    many = client.completions.create(model="codeneo", prompt=PROMPTS[0], max_tokens=8, temperature=0.8, n=3,
                                     seed=7)
    again = client.completions.create(model="codeneo", prompt=PROMPTS[0], max_tokens=8, temperature=0.8, n=3,
                                      seed=7)
    assert len(many.choices) == 3 and [c.text for c in many.choices] == [c.text for c in again.choices]


def test_concurrent_greedy_equals_one_by_one(server):
    url, _ = server
    client = _client(url)
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // 4) for i in range(16)]

    def one(p):
        return client.completions.create(model="codeneo", prompt=p, max_tokens=10, temperature=0).choices[0].text

    alone = [one(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone


def test_bad_requests_get_4xx_and_server_stays_up(server):
    url, _ = server
    h = {"Authorization": "Bearer sk-test"}
    post = lambda body, **kw: httpx.post(url + "/v1/completions", headers=kw.get("headers", h),  # noqa: E731
                                         timeout=30, **({"content": body} if isinstance(body, str) else
                                                        {"json": body}))
    assert post({"prompt": "x"}, headers={}).status_code == 401
    assert post("{not json").status_code in (400, 422)
    assert post({"prompt": "x", "max_tokens": "many"}).status_code == 422
    r = post({"prompt": "x", "max_tokens": 100000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = post({"prompt": "x " * 400, "max_tokens": 4})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = post({"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]
    r = post({"prompt": "x", "n": 99})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"


def test_stop_strings(server):
    url, _ = server
    client = _client(url)
    full = client.completions.create(model="codeneo", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text = full.choices[0].text
    if len(text) >= 3:
        stop = text[2]
        cut = client.completions.create(model="codeneo", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_sigterm_drains_in_flight(server):
    url, proc = server
    client = _client(url)
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(client.completions.create, model="codeneo", prompt=p, max_tokens=16, temperature=0)
                for p in PROMPTS]
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futs]
    assert all(r.choices for r in results)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining


def test_keystrokes_exact_and_empty_proposer():
    text = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    lines = text.splitlines(keepends=True)

    def exact(prefix):
        done = prefix.count("\n")
        return lines[done].rstrip("\n") if done < len(lines) else ""

    res = replay(text, exact)
    nonempty = sum(1 for ln in lines if ln.strip("\n"))
    assert res["chars"] == len(text)
    assert res["keystrokes"] == len(text) - sum(len(ln.rstrip("\n")) for ln in lines) + nonempty
    assert res["exact_lines"] == nonempty
    nothing = replay(text, lambda prefix: "")
    assert nothing["keystrokes"] == len(text) and nothing["exact_lines"] == 0


def test_interact_loop_multiline_and_settings():
    from train.interact import run

    lines = iter([":temp 0.5", ":len 7", "def f(x):", "    return", "", ":bogus", ":quit"])
    seen, out = [], []

    def complete(text, **settings):
        seen.append((text, dict(settings)))
        return " x"

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    run(complete, {"temperature": 0.0, "max_new_tokens": 64}, read=read, write=out.append)
    assert seen == [("def f(x):\n    return\n", {"temperature": 0.5, "max_new_tokens": 7})]
    assert "def f(x):\n    return\n x" in out and any("unknown command" in o for o in out)


def test_queue_full_429_and_timeout_504_without_model():
    import queue
    from concurrent.futures import Future
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from train.serve import create_app

    class Stub:
        cfg = SimpleNamespace(max_position_embeddings=64)
        tok = SimpleNamespace(encode=lambda s: [1] * len(s))
        eos = 0
        batches = 0

        def __init__(self, full):
            self.full, self.queue = full, queue.Queue()

        def submit(self, job):
            if self.full:
                raise queue.Full
            return Future()  # never answered

    for full, status in ((True, 429), (False, 504)):
        app = create_app(Stub(full), request_timeout=0.2)
        with TestClient(app) as c:
            assert c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4}).status_code == status
            assert c.get("/health").json()["status"] == "ok"


def test_evaluate_completion_cli_on_validation(hf_dir, tiny_corpus, tmp_path, capsys):
    import json

    from train.evaluate_completion import main

    data_dir, _ = tiny_corpus
    report = tmp_path / "evaluation.md"
    assert main(["--hf", str(hf_dir), "--data", str(data_dir / "validation"), "--files", "1", "--max-lines", "8",
                 "--context-tokens", "24", "--max-new-tokens", "16", "--report", str(report)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["files"] == 1 and 0 < out["proposals"] <= 8 and 0.0 <= out["keystrokes_saved_pct"] <= 100.0
    assert {"exact_line_pct", "latency_mean_ms", "latency_p95_ms"} <= out.keys()
    assert report.read_text().count(f"| {hf_dir} | 1 |") == 1
