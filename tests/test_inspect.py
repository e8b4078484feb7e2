"""train.inspect on a tiny random GPT-Neo folder: attention maps are the model's own probabilities."""

import re

import numpy as np
import pytest

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from tokenizer.train_tokenizer import save_tokenizer, train_bpe, wrap_fast

    d = tmp_path_factory.mktemp("tiny_neo")
    texts = [TEXT * 3, "import os\nfor i in range(10):\n    print(i)\n", "class A:\n    pass\n"] * 20
    save_tokenizer(wrap_fast(train_bpe(texts, vocab_size=300, progress=False)), d)
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                       attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64,
                       bos_token_id=0, eos_token_id=0)
    GPTNeoForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def result(hf_dir, tmp_path_factory):
    from train.inference.decoding import load_model
    from train.reports.model_inspect import inspect_model

    cfg, params, tok = load_model(hf_dir=str(hf_dir))
    out = tmp_path_factory.mktemp("inspect")
    return cfg, params, inspect_model(cfg, params, tok, TEXT, out, k=3)


def test_attention_is_causal_and_windowed(result):
    cfg, _, res = result
    T = len(res["ids"])
    assert cfg.window_size + 2 < T
    assert cfg.layer_kinds == ("global", "local")
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    for layer, probs in enumerate(res["attention"]):
        assert probs.shape == (cfg.num_heads, T, T)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.all(probs[:, k > q] == 0)
        if cfg.layer_kinds[layer] == "local":
            assert np.all(probs[:, q - k >= cfg.window_size] == 0)
            assert np.all(probs[:, (q - k < cfg.window_size) & (k <= q)] > 0)
        else:
            assert np.all(probs[:, k <= q] > 0)  # global: sees all earlier positions


def test_attention_matches_torch(result, hf_dir):
    import torch
    from transformers import GPTNeoForCausalLM

    _, _, res = result
    model = GPTNeoForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        o = model(torch.tensor([res["ids"]]), output_attentions=True)
    for ours, theirs in zip(res["attention"], o.attentions, strict=True):
        np.testing.assert_allclose(ours, theirs[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(res["logits"], o.logits[0].numpy(), atol=1e-3)


def test_tables_and_page(result):
    cfg, params, res = result
    names = {r["name"]: r for r in res["params"]}
    assert names["wpe"]["shape"] == (64, 32) and names["wpe"]["count"] == 64 * 32
    assert "vocab->tensor" in names["wte"]["sharding"]
    assert sum(r["count"] for r in res["params"]) == sum(int(np.prod(x.shape)) for x in
                                                       __import__("jax").tree_util.tree_leaves(params))
    np.testing.assert_allclose(np.diag(res["cos"]), 1.0, atol=1e-5)
    assert res["cos"].shape == (64, 64)
    p = res["top_p"]
    assert p.shape == (len(res["ids"]), 3) and np.all(np.diff(p, axis=1) <= 0) and np.all(p.sum(1) <= 1 + 1e-9)
    assert np.all(res["top_ids"] < cfg.vocab_size)
    page_path = res["page"]
    page = page_path.read_text()
    refs = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page)
    assert "positional.png" in refs and "top_k.png" in refs
    assert sum(r.startswith("attention_layer") for r in refs) == cfg.num_layers
    for ref in refs:
        assert (page_path.parent / ref).read_bytes()[:4] == b"\x89PNG"
    assert "<script" not in page


def test_cli(hf_dir, tmp_path):
    from train.reports.model_inspect import main

    main(["--hf", str(hf_dir), "--text", "x = 1", "--out", str(tmp_path), "--top-k", "2"])
    assert (tmp_path / "index.html").exists() and (tmp_path / "attention_layer1.png").exists()


@pytest.mark.slow
def test_run_checkpoint(hf_dir, tmp_path):
    """--run: the latest checkpoint of a run directory and the run's tokenizer."""
    import jax

    from tests.helpers import tiny_config
    from train import config as C
    from train.core import sharding
    from train.core.checkpoint import Checkpointer
    from train.core.step import compile_steps
    from train.reports.model_inspect import main

    run = tmp_path / "run"
    cfg = tiny_config(f"tokenizer.path={hf_dir}", "train.batch_size=1", "mesh.data=1")
    C.save(cfg, run)
    compiled = compile_steps(cfg, sharding.make_mesh(cfg, jax.devices()[:1]))
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(1, compiled.init(jax.random.PRNGKey(0)), {}, {"step": 1})
    ckpt.wait()
    ckpt.close()
    out = tmp_path / "out"
    main(["--run", str(run), "--text", TEXT, "--out", str(out)])
    assert (out / "index.html").exists() and (out / f"attention_layer{cfg.model.num_layers - 1}.png").exists()
