"""Log probabilities, echo, token-id prompts, /tokenize, /detokenize, /v1/models, editors'
settings (many stop strings, FIM sentinels written in the prompt, unimplemented fields refused)
against a tiny random GPT-Neo, in process."""

import jax
import numpy as np
import pytest

from data_processing.fim import infill_prompt
from tests.test_serve import PROMPTS, fim_hf_dir, hf_dir  # noqa: F401 - module fixtures


@pytest.fixture(scope="module")
def app(hf_dir):  # noqa: F811
    from fastapi.testclient import TestClient

    from train.inference.decoding import load_model
    from train.inference.server import Engine, create_app

    cfg, params, tok = load_model(hf_dir=str(hf_dir))
    # fp32 compute (an HF folder loads as bf16): the scores can then be compared to 1e-5.
    engine = Engine(cfg.__class__(**{**cfg.__dict__, "compute_dtype": "float32"}), params, tok)
    with TestClient(create_app(engine)) as client:
        yield client, engine
    engine.close()


def _reference_logp(engine, ids):
    """log_softmax of the model's fp32 logits over ``ids`` (no cache, no padding): [T, V]."""
    from train.core.step import next_token_logits

    logits = next_token_logits(engine.params, np.asarray([ids], np.int32), cfg=engine.cfg)[0]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def _post(client, body, status=200):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_echo_scores_the_prompt_like_the_model(app):
    client, engine = app
    prompt = PROMPTS[2]
    ids = engine.tok.encode(prompt)
    got = _post(client, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5, "temperature": 0})
    choice = got["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and got["usage"]["completion_tokens"] == 0
    assert "".join(lp["tokens"]) == prompt and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = _reference_logp(engine, ids)
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=2e-5)
    for t, top in enumerate(lp["top_logprobs"][1:], start=1):
        assert len(top) <= 5 and list(top.values()) == sorted(top.values(), reverse=True)
        assert max(top.values()) == pytest.approx(float(ref[t - 1].max()), abs=2e-5)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(prompt[o:].startswith(tk) for o, tk in zip(offsets, lp["tokens"], strict=True))
    # The same prompt as token ids, alone and in a list of prompts: the same numbers.
    as_ids = _post(client, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 5})["choices"][0]
    assert as_ids["logprobs"]["token_logprobs"] == lp["token_logprobs"] and as_ids["text"] == prompt
    two = _post(client, {"prompt": [engine.tok.encode(PROMPTS[0]), ids], "max_tokens": 0, "echo": True,
                         "logprobs": 1})["choices"]
    assert [c["index"] for c in two] == [0, 1]
    np.testing.assert_allclose(two[1]["logprobs"]["token_logprobs"][1:], lp["token_logprobs"][1:], atol=1e-6)
    assert two[0]["text"] == PROMPTS[0]


def test_echoed_logprobs_are_decoded_off_the_event_loop(app, monkeypatch):
    """A long echoed prompt with logprobs decodes thousands of pieces: that work runs in the
    tokenizer pool, never on the thread that serves /health."""
    import threading

    from train.inference import logprobs as LP

    client, _ = app
    threads, field = [], LP.logprobs_field

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return field(*args, **kwargs)

    monkeypatch.setattr(LP, "logprobs_field", recording)
    body = {"prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 0, "echo": True, "logprobs": 3}
    assert len(_post(client, body)["choices"]) == 2
    assert len(threads) == 2 and all(t.startswith("codeneo-tokenize") for t in threads), threads


def test_logprobs_of_generated_tokens_and_lm_eval_shape(app):
    client, engine = app
    prompt = PROMPTS[0]
    ids = engine.tok.encode(prompt)
    plain = _post(client, {"prompt": prompt, "max_tokens": 6, "temperature": 0})["choices"][0]
    echoed = _post(client, {"prompt": ids, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1,
                            "seed": 1234})["choices"][0]
    assert echoed["text"] == prompt + plain["text"]
    lp = echoed["logprobs"]
    gen = engine.tok.encode(prompt + plain["text"])[len(ids):]
    assert len(lp["tokens"]) == len(ids) + 6
    full = ids + gen
    if len(full) == len(lp["tokens"]):  # re-tokenizing the text may merge differently; then skip this check
        ref = _reference_logp(engine, full)
        np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[t - 1, full[t]] for t in range(1, len(full))],
                                   atol=2e-5)
    # Greedy tokens are the most likely ones: lm-eval's is_greedy test holds for the completion.
    for tlp, top in zip(lp["token_logprobs"][len(ids):], lp["top_logprobs"][len(ids):], strict=True):
        assert len(top) == 1 and tlp == max(top.values())
    # Without echo: the completion's tokens only, offsets counted in the completion's text.
    only = _post(client, {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0})["choices"][0]
    assert only["text"] == plain["text"] and len(only["logprobs"]["tokens"]) == 6
    assert only["logprobs"]["token_logprobs"] == lp["token_logprobs"][len(ids):]
    assert only["logprobs"]["text_offset"][0] == 0 and all(t == {} for t in only["logprobs"]["top_logprobs"])


def test_bad_logprob_and_prompt_inputs_are_4xx(app):
    client, engine = app
    cases = [
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 2, engine.vocab_size]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [1, 2], "suffix": "x"}, "suffix"),
        ({"prompt": "x", "echo": True, "stream": True}, "echo"),
        ({"prompt": [1] * (engine.cfg.max_position_embeddings + 1), "echo": True, "max_tokens": 0}, "prompt"),
    ]
    for body, param in cases:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(param), r.text
    assert client.post("/v1/completions", json={"prompt": [1, "a"]}).status_code == 422
    assert client.get("/health").json()["status"] == "ok"


def test_tokenize_detokenize_and_models(app):
    client, engine = app
    positions = engine.cfg.max_position_embeddings
    r = client.post("/tokenize", json={"prompt": PROMPTS[1], "add_special_tokens": False})
    assert r.status_code == 200
    assert r.json() == {"count": len(engine.tok.encode(PROMPTS[1])), "max_model_len": positions,
                        "tokens": engine.tok.encode(PROMPTS[1])}
    back = client.post("/detokenize", json={"tokens": r.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPTS[1]}
    assert client.post("/detokenize", json={"tokens": [engine.vocab_size]}).json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"text": "x"}).status_code == 422
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == positions
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "codeneo" and model["max_model_len"] == positions


def test_many_stop_strings_and_refused_fields(app):
    client, engine = app
    full = _post(client, {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})["choices"][0]["text"]
    stops = [f"\x00never{i}" for i in range(31)]
    if len(full) >= 3:
        stops.append(full[2])
        cut = _post(client, {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": stops})
        assert cut["choices"][0]["text"] == full[: full.index(full[2])]
    r = client.post("/v1/completions", json={"prompt": "x", "stop": [str(i) for i in range(33)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    for name, value in (("best_of", 2), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5),
                        ("frequency_penalty", 1), ("top_k", 5), ("foo", 1),
                        ("stream_options", {"include_usage": True})):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, name: value})
        assert r.status_code == 400, name
        assert r.json()["error"]["param"] == name and r.json()["error"]["message"].startswith(name)
    # Harmless fields, and unimplemented ones at their "off" value, are accepted.
    ok = {"prompt": "x", "max_tokens": 1, "user": "me", "presence_penalty": 0, "frequency_penalty": 0.0,
          "best_of": 1, "logit_bias": {}}
    assert client.post("/v1/completions", json=ok).status_code == 200


def test_fim_sentinels_written_in_the_prompt_are_the_special_tokens(fim_hf_dir):  # noqa: F811
    from fastapi.testclient import TestClient

    from train.inference.decoding import load_model
    from train.inference.server import Engine, create_app

    engine = Engine(*load_model(hf_dir=str(fim_hf_dir)))
    try:
        with TestClient(create_app(engine)) as client:
            prefix, suffix = "def add(a, b):\n    c = ", "\n    return c\n"
            rendered = infill_prompt(prefix, suffix)  # what Continue / Tabby send with their FIM template
            tokens = client.post("/tokenize", json={"prompt": rendered}).json()["tokens"]
            assert tokens[0] == 512 and 513 in tokens and tokens[-1] == 514  # single sentinel tokens
            body = {"max_tokens": 12, "temperature": 0}
            by_template = _post(client, {**body, "prompt": rendered})["choices"][0]["text"]
            by_suffix = _post(client, {**body, "prompt": prefix, "suffix": suffix})["choices"][0]["text"]
            assert by_template == by_suffix
    finally:
        engine.close()
