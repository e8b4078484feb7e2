"""The server for operators, on 127.0.0.1: the API key (file, environment, constant-time check,
every route but /health), body and prompt size limits before any tokenizing, bad input always a
4xx naming the field with the server healthy and its memory back where it was, Prometheus
/metrics, and one job's failure never failing the jobs batched with it."""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_serve import PROMPTS, _free_port, hf_dir  # noqa: F401 - module fixture

KEY = "sk-operator-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _wait_healthy(url, proc, log, bound=180):
    deadline = time.time() + bound
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=10)
    log.seek(0)
    raise RuntimeError(log.read().decode())


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("ops")
    (d / "key").write_text(KEY + "\n")
    port = _free_port()
    log = open(d / "server.log", "w+b")  # noqa: SIM115
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "CODENEO_API_KEY": "not-this-one"}
    proc = subprocess.Popen([sys.executable, "-m", "train.serve", "--hf", str(hf_dir), "--port", str(port),
                             "--api-key-file", str(d / "key"), "--max-body-bytes", str(1 << 20)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc, log)
    yield url, proc
    proc.kill()
    proc.wait(timeout=10)
    log.close()


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _post(url, body, path="/v1/completions", headers=AUTH, timeout=60):
    kw = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    return httpx.post(url + path, headers={**headers, "Content-Type": "application/json"}, timeout=timeout, **kw)


def test_api_key_from_file_on_every_route_but_health(server):
    url, _ = server
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/docs", "/openapi.json", "/metrics", "/tokenizer_info"):
        assert httpx.get(url + path, timeout=10).status_code == 401, path
        assert httpx.get(url + path, headers={"Authorization": "Bearer not-this-one"}, timeout=10).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}x"}, timeout=10).status_code == 401
        assert httpx.get(url + path, headers=AUTH, timeout=10).status_code == 200, path
    assert _post(url, {"prompt": "x"}, "/tokenize", headers={}).status_code == 401
    r = _post(url, {"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer \u00e9".encode("latin-1")})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_key_resolution_and_constant_time_compare(tmp_path):
    from train.inference.http import key_matches, resolve_api_key

    (tmp_path / "k").write_text("from-file\n")
    assert resolve_api_key("flag", str(tmp_path / "k"), {"CODENEO_API_KEY": "env"}) == "flag"
    assert resolve_api_key(None, str(tmp_path / "k"), {"CODENEO_API_KEY": "env"}) == "from-file"
    assert resolve_api_key(None, None, {"CODENEO_API_KEY": "env"}) == "env"
    assert resolve_api_key(None, None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key(None, str(tmp_path / "empty"), {})
    assert key_matches("Bearer abc", "abc") and not key_matches("Bearer ab", "abc")
    assert not key_matches("Bearer abcd", "abc") and not key_matches("abc", "abc") and not key_matches("", "abc")
    assert not key_matches("Bearer \udcff", "abc")  # undecodable header bytes: no match, no error


def test_oversized_bodies_and_prompts_refused_before_tokenizing(server):
    url, proc = server
    before = _rss_mb(proc.pid)
    stop = threading.Event()
    health_ms = []

    def probe():  # /health must keep answering while the big requests are handled
        while not stop.is_set():
            t0 = time.perf_counter()
            httpx.get(url + "/health", timeout=30).raise_for_status()
            health_ms.append(1000 * (time.perf_counter() - t0))
            time.sleep(0.05)

    t = threading.Thread(target=probe)
    t.start()
    try:
        big = json.dumps({"prompt": "x" * 20_000_000, "max_tokens": 4})
        r = _post(url, big)
        assert r.status_code == 413 and "body" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: refused once the limit is crossed
            for _ in range(40):
                yield b" " * 65536

        r = httpx.post(url + "/v1/completions", headers=AUTH, content=chunks(), timeout=60)
        assert r.status_code == 413
        # Under the body limit but far more characters than the model's positions can hold.
        r = _post(url, {"prompt": "def f(x):\n" * 90_000, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "characters" in r.json()["error"]["message"]
        r = _post(url, {"prompt": "ab" * 1000, "max_tokens": 4})  # tokenized, then too many tokens
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = _post(url, {"prompt": "y" * 500_000}, "/tokenize")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    finally:
        stop.set()
        t.join()
    assert health_ms and max(health_ms) < 2000, health_ms
    assert _rss_mb(proc.pid) - before < 150
    assert _post(url, {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}).status_code == 200


BAD = [
    ('{"prompt": "\\ud800", "max_tokens": 2}', 400, "prompt"),
    ('{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', 400, "prompt.1"),
    ('{"prompt": "x", "stop": ["\\ud800"]}', 400, "stop.0"),
    ('{"prompt": "x", "model": "\\ud83d"}', 400, "model"),
    ('{"prompt": "x", "user": "\\ud800"}', 400, "user"),
    ('{"prompt": "x", "seed": 1208925819614629174706176}', 400, "seed"),
    ('{"prompt": "x", "seed": -1}', 400, "seed"),
    ('{"prompt": "x", "max_tokens": 1208925819614629174706176}', 400, "max_tokens"),
    ('{"prompt": "x", "n": 1208925819614629174706176}', 400, "n"),
    ('{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ('{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ('{"prompt": "x", "max_tokens": "many"}', 422, "max_tokens"),
    ('{"prompt": {"a": 1}}', 422, "prompt"),
    ('{"prompt": "x", "stop": 5}', 422, "stop"),
    ('{"prompt": "x", "logprobs": 99}', 400, "logprobs"),
    ('[1, 2]', 422, None),
    ('{"prompt": "x"', 400, None),
    ('\xff\xfe', 400, None),
]


def test_bad_input_is_4xx_and_never_fails_other_requests(server):
    url, proc = server
    before = _rss_mb(proc.pid)
    greedy = {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0}
    want = _post(url, greedy).json()["choices"][0]["text"]
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(_post, url, greedy) for _ in range(4)]
        bad = [(pool.submit(_post, url, body.encode("utf-8", "surrogatepass")), status, param)
               for body, status, param in BAD]
        for fut, status, param in bad:
            r = fut.result()
            assert r.status_code == status, (param, r.text)
            if param is not None:
                assert r.json()["error"]["param"] == param, r.text
        assert all(f.result().status_code == 200 and f.result().json()["choices"][0]["text"] == want for f in good)
    for seed in (0, 2**63 - 1):
        assert _post(url, {"prompt": "x", "max_tokens": 2, "seed": seed}).status_code == 200
    r = _post(url, b'{"prompt": "\\ud800"}', "/tokenize")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    assert _rss_mb(proc.pid) - before < 100


def test_metrics(server):
    url, _ = server
    assert _post(url, {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}).status_code == 200
    assert _post(url, {"prompt": "x", "best_of": 3}).status_code == 400
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['codeneo_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert samples['codeneo_requests_total{route="/v1/completions",status="400"}'] >= 1
    assert samples['codeneo_requests_total{route="/v1/models",status="401"}'] >= 1
    assert samples["codeneo_request_latency_seconds_count"] >= 1
    assert samples["codeneo_time_to_first_token_seconds_count"] >= 1
    assert samples["codeneo_time_to_first_token_seconds_sum"] <= samples["codeneo_request_latency_seconds_sum"]
    assert samples["codeneo_generated_tokens_total"] >= 8
    assert samples["codeneo_queue_depth"] == 0 and samples["codeneo_rows_running"] == 0


def test_a_failing_job_fails_alone(hf_dir):  # noqa: F811
    from train.inference.decoding import load_model
    from train.inference.server import Engine, Job

    engine = Engine(*load_model(hf_dir=str(hf_dir)))
    try:
        ids = engine.tok.encode(PROMPTS[0])
        good = Job(ids, 8, 0.0, 1.0, 0)
        bad = Job([1] * (engine.cfg.max_position_embeddings + 5), 8, 0.0, 1.0, 0)  # no room: the decoder raises
        engine._run_isolated(good.key(), [good, bad])
        assert good.future.result(timeout=0).tokens == 8
        with pytest.raises(ValueError, match="positions"):
            bad.future.result(timeout=0)
    finally:
        engine.close()


def test_guard_refuses_a_malformed_content_length_with_400():
    """A Content-Length that is not a number is bad input (400), not a body too large (413)."""
    import asyncio

    from train.inference.http import Guard

    async def app(scope, receive, send):  # reached only when the guard lets the request in
        raise AssertionError("the guard let a malformed request through")

    def call(length: bytes) -> tuple[int, dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/v1/completions", "headers": [(b"content-length", length)]}
        asyncio.run(Guard(app, api_key=None, max_body_bytes=100)(scope, receive, send))
        return sent[0]["status"], json.loads(sent[1]["body"])

    status, body = call(b"12abc")
    assert status == 400 and "Content-Length" in body["error"]["message"]
    assert call(b"1000")[0] == 413
