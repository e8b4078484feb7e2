"""Completion server against a tiny model on 127.0.0.1: openai client == train.generate greedy,
streaming per decode segment, early stop, fill-in-the-middle, concurrent batching, bad requests,
SIGTERM drain; the keystrokes-saved measure."""

import json
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

from data_processing.fim import infill_prompt
from data_processing.tokens import FIM_TOKENS
from tests.helpers import wait_until
from train.evaluation.completion import replay

PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Foo:\n    def __init__(self", "x = 1\ny ="]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_neo(folder, eos: int, vocab_size: int = 512) -> None:
    """Save a random 2-layer GPT-Neo with 128 positions in ``folder``."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos)).eval().save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_dir(tiny_corpus, tmp_path_factory):
    from transformers import AutoTokenizer

    _, tok_dir = tiny_corpus
    d = tmp_path_factory.mktemp("hf")
    _tiny_neo(d, AutoTokenizer.from_pretrained(tok_dir).convert_tokens_to_ids("<|endoftext|>"))
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def fim_hf_dir(tiny_corpus, tmp_path_factory):
    """The tiny model with a tokenizer extended by the three FIM sentinels (special tokens
    512-514) and the Python control code (515); the model's 520-row vocabulary covers them.
    Untrained: its middles mean nothing."""
    from transformers import AutoTokenizer

    _, tok_dir = tiny_corpus
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.add_tokens(list(FIM_TOKENS), special_tokens=True) == 3
    assert tok.add_tokens(["<|python|>"], special_tokens=True) == 1  # a control code, id 515
    d = tmp_path_factory.mktemp("fim")
    _tiny_neo(d, tok.convert_tokens_to_ids("<|endoftext|>"), vocab_size=520)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+b")  # noqa: SIM115
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--hf", str(hf_dir), "--port", str(port),
                             "--queue-size", "32", "--api-key", "sk-test", "--no-warmup"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        # Loading and compiling take seconds on a laptop and minutes on a loaded CI box: wait for
        # the condition (or the process dying), with a bound only against a hang.
        wait_until(healthy, 300, "the server to report healthy")
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        proc.wait(timeout=60)
        log.seek(0)
        raise RuntimeError(f"{err}; its log:\n{log.read().decode()}") from None
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    log.close()


def _client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", timeout=60, max_retries=0)


def _reference(hf_dir, prompt, n):
    from train.inference.decoding import generate_ids, load_model

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
    for prompt, n in ((PROMPTS[0], 16), (PROMPTS[1], 16), (PROMPTS[1], 64)):
        got = client.completions.create(model="codeneo", prompt=prompt, max_tokens=n, temperature=0)
        assert got.object == "text_completion"
        assert got.choices[0].text == _reference(hf_dir, prompt, n)
        assert got.choices[0].finish_reason in ("stop", "length")
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="codeneo", prompt=prompt, max_tokens=n, temperature=0, stream=True))
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
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert r.json()["error"]["message"].startswith("suffix: this model was not trained with fill-in-the-middle")
    assert post({"prompt": "x", "suffix": "", "max_tokens": 2}).status_code == 200  # nothing after the gap: ignored
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


def _sse(url, body):
    """(text chunks per choice index, finish reasons, whether [DONE] came) of a streamed request."""
    texts, reasons, done = {}, {}, False
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": "Bearer sk-test"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            if choice["text"]:
                texts.setdefault(choice["index"], []).append(choice["text"])
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons, done


def _post(url, body):
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-test"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_stream_arrives_per_segment_and_adds_up(server):
    from train.inference.decoding import SEGMENT_TOKENS

    url, _ = server
    body = {"prompt": PROMPTS[2], "max_tokens": 64, "temperature": 0}
    whole = _post(url, body)
    used = whole["usage"]["completion_tokens"]
    assert used > 2 * SEGMENT_TOKENS  # long enough to need several segments
    texts, reasons, done = _sse(url, body)
    assert "".join(texts[0]) == whole["choices"][0]["text"]
    assert reasons == {0: whole["choices"][0]["finish_reason"]} and done
    # One event per segment at most (not per token, not one at the end).
    assert 2 <= len(texts[0]) <= -(-used // SEGMENT_TOKENS)
    # Two choices (n=2, seeded sampling) interleave in one stream, each adding up to its text.
    body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0.9, "seed": 5, "n": 2}
    whole = _post(url, body)
    texts, reasons, _ = _sse(url, body)
    assert ["".join(texts.get(i, [])) for i in (0, 1)] == [c["text"] for c in whole["choices"]]
    assert reasons == {c["index"]: c["finish_reason"] for c in whole["choices"]}


def test_stop_string_stops_early_with_the_same_text(server, hf_dir):
    from train.inference.decoding import SEGMENT_TOKENS, decode_text, generate_ids, load_model

    url, _ = server
    cfg, params, tok = _reference.cache.get(str(hf_dir)) or _reference.cache.setdefault(
        str(hf_dir), load_model(hf_dir=str(hf_dir)))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    prompt = PROMPTS[2]
    ids = generate_ids(cfg, params, [tok.encode(prompt)], max_new_tokens=64, temperature=0.0, eos_id=eos)[0]
    assert len(ids) == 64 and eos not in ids
    full = decode_text(tok, ids, eos)
    after = len(decode_text(tok, ids[:SEGMENT_TOKENS + 4], eos))  # a stop string first seen in segment 2
    stop = next(full[i:i + 2] for i in range(after, len(full) - 2) if full.index(full[i:i + 2]) == i)
    want = full[: full.index(stop)]
    segments = httpx.get(url + "/health", timeout=5).json()["segments"]
    got = _post(url, {"prompt": prompt, "max_tokens": 64, "temperature": 0, "stop": [stop, "\x00never"]})
    assert got["choices"][0]["text"] == want and got["choices"][0]["finish_reason"] == "stop"
    used = got["usage"]["completion_tokens"]
    assert decode_text(tok, ids[: used - 1], eos).find(stop) < 0 <= decode_text(tok, ids[:used], eos).find(stop)
    # The batch ended with the segment that completed the stop string, not after 64 tokens.
    assert httpx.get(url + "/health", timeout=5).json()["segments"] - segments == -(-used // SEGMENT_TOKENS) < 4
    texts, reasons, _ = _sse(url, {"prompt": prompt, "max_tokens": 64, "temperature": 0, "stop": stop})
    assert "".join(texts.get(0, [])) == want and reasons == {0: "stop"}


@pytest.fixture(scope="module")
def fim_app(fim_hf_dir):
    """An in-process engine + app over the FIM model (so a test can watch what reaches the model)."""
    from fastapi.testclient import TestClient

    from train.inference.decoding import load_model
    from train.inference.server import Engine, create_app

    engine = Engine(*load_model(hf_dir=str(fim_hf_dir)))
    with TestClient(create_app(engine)) as client:
        yield client, engine
    engine.close()


def test_fim_suffix_feeds_exactly_the_infill_prompt(fim_app, monkeypatch):
    from train.inference import decoding as generate

    client, engine = fim_app
    tok, eos = engine.tok, engine.eos
    prefix, suffix = "def add(a, b):\n    c = ", "\n    return c\n"
    infill = tok.encode(infill_prompt(prefix, suffix))
    pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in FIM_TOKENS)
    assert (pre, suf, mid) == (512, 513, 514)
    assert infill == [pre, *tok.encode(prefix), suf, *tok.encode(suffix), mid]  # sentinels are single tokens
    from train.inference.batching import SlotDecoder

    fed = []
    admit_many = SlotDecoder.admit_many

    def spy(self, rows):  # every prompt enters the engine's slot cache here
        fed.append([list(r[1]) for r in rows])
        return admit_many(self, rows)

    monkeypatch.setattr(SlotDecoder, "admit_many", spy)
    assert client.get("/health").json()["fill_in_the_middle"] is True
    body = {"prompt": prefix, "suffix": suffix, "max_tokens": 24, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert fed == [[infill]]  # one row: the PSM prompt, nothing else
    ref = generate.generate_ids(engine.cfg, engine.params, [infill], max_new_tokens=24, eos_id=eos)[0]
    assert r.json()["choices"][0]["text"] == generate.decode_text(tok, ref, eos)
    assert r.json()["usage"]["prompt_tokens"] == len(infill)
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == r.json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "prompt": "x = 1\n" * 60})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_engine_hands_out_text_while_decoding(fim_app):
    from train.inference.decoding import SEGMENT_TOKENS
    from train.inference.server import Job

    _, engine = fim_app
    seen = []
    start = engine.segments
    job = Job(engine.tok.encode(PROMPTS[2]), 64, 0.0, 1.0, 0,
              on_text=lambda text: seen.append((engine.segments - start, text)))
    done = engine.submit(job).result(timeout=120)
    assert done.tokens > 2 * SEGMENT_TOKENS and "".join(t for _, t in seen) == done.text
    # The first text left the worker after the first segment, then after each later one.
    assert [k for k, _ in seen][:3] == [1, 2, 3]
    # A request given up after its first text (client gone) stops costing segments: the 16-token
    # job queued behind it runs beside it or right after it, never after its 64 tokens.
    start = engine.segments
    gone = Job(job.ids, 64, 0.0, 1.0, 0, on_text=lambda _text: gone.future.cancel())
    engine.submit(gone)
    assert engine.submit(Job(job.ids, 16, 0.0, 1.0, 0)).result(timeout=120).tokens == 16
    assert gone.future.cancelled() and engine.segments - start <= 2


def test_generate_cli_suffix(fim_hf_dir, hf_dir, capsys, monkeypatch):
    from train.inference import decoding as generate

    prefix, suffix = "x = 1\ny = ", "\nprint(x + y)\n"
    fed = []
    real = generate.generate_ids
    monkeypatch.setattr(generate, "generate_ids", lambda cfg, params, prompts, **kw: fed.append(prompts) or real(
        cfg, params, prompts, **kw))
    args = ["--prompt", prefix, "--suffix", suffix, "--temperature", "0", "--max-new-tokens", "12"]
    assert generate.main(["--hf", str(fim_hf_dir), *args]) == 0
    cfg, params, tok = generate.load_model(hf_dir=str(fim_hf_dir))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert fed == [[tok.encode(infill_prompt(prefix, suffix))]]
    middle = generate.decode_text(tok, real(cfg, params, fed[0], max_new_tokens=12, eos_id=eos)[0], eos)
    assert capsys.readouterr().out == prefix + middle + suffix + "\n"
    assert generate.main(["--hf", str(hf_dir), *args]) == 2
    assert "--suffix: this model was not trained with fill-in-the-middle" in capsys.readouterr().err


def test_language_control_code_leads_the_prompt(fim_hf_dir, fim_app, capsys, monkeypatch):
    from train.inference import decoding as generate

    fed = []
    real = generate.generate_ids
    monkeypatch.setattr(generate, "generate_ids", lambda cfg, params, prompts, **kw: fed.append(prompts) or real(
        cfg, params, prompts, **kw))
    _, _, tok = generate.load_model(hf_dir=str(fim_hf_dir))
    args = ["--hf", str(fim_hf_dir), "--prompt", "import os\n", "--temperature", "0", "--max-new-tokens", "4"]
    assert generate.main([*args, "--language", "Python"]) == 0
    assert fed[-1] == [[515, *tok.encode("import os\n")]]
    assert generate.main([*args, "--language", "python", "--suffix", "\n"]) == 0
    assert fed[-1] == [[515, *tok.encode(infill_prompt("import os\n", "\n"))]]  # code first, as in training
    capsys.readouterr()
    assert generate.main([*args, "--language", "Rust"]) == 2
    assert "language: this model has no control code <|rust|>" in capsys.readouterr().err

    client, _ = fim_app
    ok = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 4, "temperature": 0,
                                              "language": "python"})
    assert ok.status_code == 200
    plain = tok.encode("<|python|>x = ")
    assert ok.json()["choices"][0]["text"] == generate.decode_text(
        tok, real(*generate.load_model(hf_dir=str(fim_hf_dir))[:2], [plain], max_new_tokens=4,
                  eos_id=tok.eos_token_id)[0], tok.eos_token_id)
    bad = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 4, "language": "Rust"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "language"


def test_row_text_holds_back_incomplete_characters_and_stop_prefixes():
    from train.inference.server import Completion, RowText

    class Bytes:  # one token per byte, decoded like byte-level BPE (broken UTF-8 -> U+FFFD)
        def decode(self, ids, clean_up_tokenization_spaces=False):
            return bytes(ids).decode("utf-8", "replace")

    def run(text, chunk, stops, eos=None):
        ids = list(text.encode()) + ([eos] if eos is not None else [])
        row, deltas = RowText(Bytes(), stops, eos), []
        for i in range(0, len(ids), chunk):
            deltas.append(row.feed(ids[i:i + chunk], ended=i + chunk >= len(ids)))
            if row.result is not None:
                break
        return row.result, deltas

    text = "héllo → wörld ✓ end"
    for chunk in (1, 2, 3, 5):
        result, deltas = run(text, chunk, [])
        assert result == Completion(text, "length", len(text.encode()))
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
        assert sum(1 for d in deltas if d) > 1
        result, deltas = run(text, chunk, ["wör"])
        assert result.text == "".join(deltas) == "héllo → " and result.finish_reason == "stop"
        assert result.tokens == len("héllo → wör".encode())  # the fewest tokens that hold the stop string
        assert run(text, chunk, [], eos=0)[0] == Completion(text, "stop", len(text.encode()) + 1)
    for chunk in (1, 2, 4):  # the earliest-starting stop string wins, even if it completes later
        assert run("abcXd", chunk, ["bcX", "c"])[0] == Completion("a", "stop", 4)
        assert run("abcd", chunk, ["bcX", "c"])[0] == Completion("ab", "stop", 3)
        result, deltas = run("ab\ndef x", chunk, ["\ndef "])
        assert result.text == "".join(deltas) == "ab" and all("\n" not in d for d in deltas)


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
    from train.inference.interact import run

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

    from train.inference.server import create_app

    class Stub:
        cfg = SimpleNamespace(max_position_embeddings=64, vocab_size=10)
        tok = SimpleNamespace(encode=lambda s: [1] * len(s))
        eos = 0
        batches = 0
        segments = 0
        fim = False
        vocab_size = 10
        max_token_chars = 1
        tokenizer_pool = None  # the event loop's default executor

        def __init__(self, full):
            self.full, self.queue = full, queue.Queue()

        def submit_all(self, jobs):
            if self.full:
                raise queue.Full
            return [Future() for _ in jobs]  # never answered

    for full, status in ((True, 429), (False, 504)):
        app = create_app(Stub(full), request_timeout=0.2)
        with TestClient(app) as c:
            assert c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4}).status_code == status
            assert c.get("/health").json()["status"] == "ok"


def test_evaluate_completion_cli_on_validation(hf_dir, tiny_corpus, tmp_path, capsys):
    import json

    from train.evaluation.completion import main

    data_dir, _ = tiny_corpus
    report = tmp_path / "evaluation.md"
    assert main(["--hf", str(hf_dir), "--data", str(data_dir / "validation"), "--files", "1", "--max-lines", "8",
                 "--context-tokens", "24", "--max-new-tokens", "16", "--report", str(report)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["files"] == 1 and 0 < out["proposals"] <= 8 and 0.0 <= out["keystrokes_saved_pct"] <= 100.0
    assert {"exact_line_pct", "latency_mean_ms", "latency_p95_ms"} <= out.keys()
    assert report.read_text().count(f"| {hf_dir} | 1 |") == 1
