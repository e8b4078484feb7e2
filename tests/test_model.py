"""The Flax model against Hugging Face PyTorch (fp32), both directions, both families."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers import tiny_hf_gpt2, tiny_hf_gpt_neo
from train.config import ModelConfig
from train.core import model as M
from train.interop import convert

FP32 = ModelConfig(compute_dtype="float32")


def _flax_logits(cfg, params, ids):
    return np.asarray(M.Transformer(cfg).apply({"params": params}, jnp.asarray(ids)))[..., : cfg.vocab_size]


@pytest.mark.parametrize("make_hf", [tiny_hf_gpt_neo, tiny_hf_gpt2], ids=["gpt_neo", "gpt2"])
def test_hf_to_flax_logits_match(make_hf):
    hf = make_hf()
    cfg = convert.model_config_from_hf(hf.config.to_dict(), FP32)
    params = convert.hf_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    # 40 positions > window 8: the local layers' window matters.
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(_flax_logits(cfg, params, ids), ref, atol=1e-4, rtol=0)


def test_local_window_changes_logits():
    """Guards the test above: with the window ignored the logits must differ, so parity is
    really checking the local attention."""
    hf = tiny_hf_gpt_neo()
    cfg = convert.model_config_from_hf(hf.config.to_dict(), FP32)
    params = convert.hf_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 40))
    all_global = cfg.__class__(**{**cfg.__dict__, "attention_layers": ("global",)})
    diff = np.abs(_flax_logits(cfg, params, ids) - _flax_logits(all_global, params, ids))
    assert diff[:, :8].max() < 1e-5 and diff[:, 8:].max() > 1e-3


@pytest.mark.parametrize("family", ["gpt_neo", "gpt2"])
def test_flax_to_hf_logits_match(family):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    layers = ("global", "local") if family == "gpt_neo" else ("global",)
    cfg = ModelConfig(family=family, vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, window_size=8,
                      max_position_embeddings=64, attention_layers=layers, compute_dtype="float32")
    import jax

    params = jax.tree_util.tree_map(np.asarray, M.init_params(cfg, jax.random.PRNGKey(1)))
    params = __import__("flax").linen.meta.unbox(params)
    sd = convert.params_to_hf(params, cfg)
    assert sd["transformer.wte.weight"].shape == (300, 64)  # padding rows stripped
    hf_cfg = convert.hf_config_dict(cfg)
    hf_cfg.pop("model_type")
    hf = (GPTNeoForCausalLM(GPTNeoConfig(**hf_cfg)) if family == "gpt_neo"
          else GPT2LMHeadModel(GPT2Config(**hf_cfg))).eval()
    missing, unexpected = hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing)
    ids = np.random.RandomState(1).randint(0, 300, (2, 40))
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(_flax_logits(cfg, params, ids), ref, atol=1e-4, rtol=0)
    # and back again, bit-identical
    again = convert.hf_to_params(sd, cfg)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(again), jax.tree_util.tree_leaves(params),
                            strict=True):
        rows = cfg.vocab_size if jax.tree_util.keystr(path) == "['wte']" else None  # padding is not exported
        np.testing.assert_array_equal(a[:rows], np.asarray(b)[:rows])


def test_padded_vocab_is_masked_and_multiple_of_128():
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=16,
                      compute_dtype="float32")
    assert cfg.padded_vocab_size == 384
    import jax

    params = M.init_params(cfg, jax.random.PRNGKey(0))
    logits = np.asarray(M.Transformer(cfg).apply({"params": params}, jnp.zeros((1, 5), jnp.int32)))
    assert logits.shape == (1, 5, 384)
    assert (logits[..., 300:] <= np.finfo(np.float32).min / 2).all()
    probs = np.asarray(jax.nn.softmax(logits, -1))
    assert probs[..., 300:].max() == 0.0


@pytest.mark.parametrize("make_hf", [tiny_hf_gpt_neo, tiny_hf_gpt2], ids=["gpt_neo", "gpt2"])
def test_kv_cache_decoding_equals_full_forward(make_hf):
    hf = make_hf()
    cfg = convert.model_config_from_hf(hf.config.to_dict(), FP32)
    params = convert.hf_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 30))
    full = _flax_logits(cfg, params, ids)
    cache = M.init_cache(cfg, params, 2, 32)
    pos = np.broadcast_to(np.arange(30), (2, 30))
    logits, cache = M.decode_step(cfg, params, cache, jnp.asarray(ids[:, :20]), jnp.asarray(pos[:, :20]))
    steps = [np.asarray(logits)]
    for t in range(20, 30):
        logits, cache = M.decode_step(cfg, params, cache, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, 1)[..., : cfg.vocab_size], full, atol=1e-4, rtol=0)


def test_dot_product_attention_and_remat_match_einsum():
    hf = tiny_hf_gpt_neo()
    cfg = convert.model_config_from_hf(hf.config.to_dict(), FP32)
    params = convert.hf_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    ids = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 40))
    ref = _flax_logits(cfg, params, ids)
    for change in ({"attention_impl": "dot_product"}, {"remat": "full"}, {"remat": "dots"}):
        other = cfg.__class__(**{**cfg.__dict__, **change})
        np.testing.assert_allclose(_flax_logits(other, params, ids), ref, atol=1e-5, rtol=0, err_msg=str(change))


@pytest.mark.parametrize("make_hf", [tiny_hf_gpt_neo, tiny_hf_gpt2], ids=["gpt_neo", "gpt2"])
def test_loss_gradients_match_hf(make_hf):
    """Backward parity, not just forward: our gradients of the mean next-token loss equal
    PyTorch autograd's through Hugging Face's model, mapped by the same converter as the weights."""
    import jax

    from train.core.step import loss_fn

    hf = make_hf()
    cfg = convert.model_config_from_hf(hf.config.to_dict(), FP32)
    params = convert.hf_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 41))
    hf.zero_grad()
    hf(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.backward()
    hf_grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                for name, p in hf.named_parameters()}
    hf_grads.update({k: v.numpy() for k, v in hf.state_dict().items() if k not in hf_grads})  # buffers
    ref = convert.hf_to_params(hf_grads, cfg)
    ours = jax.grad(loss_fn)(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(tokens), cfg)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(ours):
        want = np.asarray(flat_ref[path])
        np.testing.assert_allclose(np.asarray(g), want, atol=1e-6 + 1e-4 * np.abs(want).max(), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_masked_softmax_gradient_and_what_backward_keeps():
    import jax

    rng = np.random.RandomState(0)
    scores = jnp.asarray(rng.randn(2, 3, 12, 12), jnp.float32)
    pos = jnp.arange(12)
    mask = M.attention_mask(pos, pos, 5)[None, None]
    g = jnp.asarray(rng.randn(2, 3, 12, 12), jnp.float32)

    def plain(s):
        return jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)

    ours = jax.vjp(lambda s: M.masked_softmax(s, mask, jnp.float32), scores)
    ref = jax.vjp(plain, scores)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-7)
    np.testing.assert_allclose(ours[1](g)[0], ref[1](g)[0], atol=1e-6)
    assert float(jnp.abs(jnp.where(mask, 0.0, ours[1](g)[0])).max()) == 0.0  # masked scores get no gradient

    # In bf16 the backward pass keeps one bf16 [B, H, T, S] array per layer, nothing else that size.
    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64,
                      window_size=8, compute_dtype="bfloat16", attention_impl="einsum")
    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
    ids = jax.ShapeDtypeStruct((3, 48), jnp.int32)
    closure = jax.eval_shape(
        lambda p, x: jax.vjp(lambda q: M.Transformer(cfg).apply({"params": q}, x).astype(jnp.float32).sum(), p)[1],
        params, ids)
    square = [leaf.dtype for leaf in jax.tree_util.tree_leaves(closure) if leaf.shape[-2:] == (48, 48)]
    assert square == [jnp.bfloat16] * cfg.num_layers


@pytest.mark.parametrize("T", [32, 40, 8])
def test_blocked_local_attention_equals_masked_square(T):
    """attention_impl=blocked computes local layers over window blocks (T x 2W scores): same logits
    and gradients as the full masked square, also with shifted positions (left padding); lengths
    that are not a multiple of the window (40) or not above it (8) fall back to the square."""
    import dataclasses

    import jax

    from train.core.step import loss_fn

    hf = tiny_hf_gpt_neo()
    cfg = convert.model_config_from_hf(hf.config.to_dict(), FP32)
    blocked = dataclasses.replace(cfg, attention_impl="blocked")
    params = jax.tree_util.tree_map(jnp.asarray, convert.hf_to_params(
        {k: v.numpy() for k, v in hf.state_dict().items()}, cfg))
    ids = jnp.asarray(np.random.RandomState(7).randint(0, cfg.vocab_size, (2, T)))
    pos = jnp.asarray(np.stack([np.arange(T), np.arange(T) - 5]))  # row 1: five left-padding positions

    @functools.partial(jax.jit, static_argnums=0)  # compiled: op-by-op Flax is slow on CPU
    def logits(c, params, ids, pos):
        return M.Transformer(c).apply({"params": params}, ids, pos)

    positions = jnp.broadcast_to(jnp.arange(T), ids.shape)
    np.testing.assert_allclose(logits(blocked, params, ids, positions), logits(cfg, params, ids, positions),
                               atol=1e-5, rtol=0)
    square, blocks = (np.asarray(logits(c, params, ids, pos)) for c in (cfg, blocked))
    np.testing.assert_allclose(blocks[1, 5:], square[1, 5:], atol=1e-5, rtol=0)
    tokens = jnp.asarray(np.random.RandomState(8).randint(0, cfg.vocab_size, (2, T + 1)))
    grad = jax.jit(jax.grad(loss_fn), static_argnums=2)
    g_square, g_blocks = (grad(params, tokens, c) for c in (cfg, blocked))
    for a, b in zip(jax.tree_util.tree_leaves(g_blocks), jax.tree_util.tree_leaves(g_square), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_and_layer_norm_gradients_match_autodiff_and_keep_less(dtype):
    import jax

    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(3, 5, 16) * 2, dtype)
    g = jnp.asarray(rng.randn(3, 5, 16), jnp.float32)
    scale, bias = jnp.asarray(rng.rand(16) + 0.5, jnp.float32), jnp.asarray(rng.randn(16), jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2

    def ln_ref(x, s, b):
        x = x.astype(jnp.float32)
        c = x - x.mean(-1, keepdims=True)
        return c * jax.lax.rsqrt(jnp.square(c).mean(-1, keepdims=True) + 1e-5) * s + b

    out, vjp = jax.vjp(lambda *a: M.layer_norm(*a, 1e-5), x, scale, bias)
    ref_out, ref_vjp = jax.vjp(ln_ref, x, scale, bias)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for ours, ref in zip(vjp(g), ref_vjp(g), strict=True):
        assert ours.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol * 10, rtol=tol)

    out, vjp = jax.vjp(M.gelu_tanh, x)
    ref_out, ref_vjp = jax.vjp(lambda x: jax.nn.gelu(x, approximate=True), x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
    (ours,), (ref,) = vjp(g.astype(dtype)), ref_vjp(g.astype(dtype))
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)

    def kept(f, *args):
        return sum(leaf.size for leaf in jax.tree_util.tree_leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args)))

    assert kept(M.gelu_tanh, x) == x.size < kept(lambda x: jax.nn.gelu(x, approximate=True), x)
    assert kept(lambda *a: M.layer_norm(*a, 1e-5), x, scale, bias) < kept(ln_ref, x, scale, bias)


def test_gpt2_residual_projections_start_scaled_by_depth():
    """GPT-2 from scratch: attention out_proj and MLP c_proj ~ N(0, 0.02 / sqrt(2 L)), as Hugging
    Face GPT-2 initialises them; every other matrix (and all of GPT-Neo's) ~ N(0, 0.02)."""
    import flax.linen as nn
    import jax

    from tests.helpers import tiny_config
    from train.core.model import init_params

    cases = (("gpt2", "[global]", 0.02 / np.sqrt(2 * 8)), ("gpt_neo", "[global, local]", 0.02))
    for family, layers, expected in cases:
        cfg = tiny_config(f"model.family={family}", f"model.attention_layers={layers}", "model.num_layers=8",
                          "model.hidden_size=128", "model.num_heads=4").model
        params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0)))
        block = params["h_0"]
        out_proj = np.asarray(block["attn"]["out_proj_kernel"])
        c_proj = np.asarray(block["mlp"]["c_proj"]["kernel"])
        c_fc = np.asarray(block["mlp"]["c_fc"]["kernel"])
        assert out_proj.std() == pytest.approx(expected, rel=0.05)
        assert c_proj.std() == pytest.approx(expected, rel=0.05)
        assert c_fc.std() == pytest.approx(0.02, rel=0.05)


def test_fp32_residual_stream_is_closer_to_fp32_than_a_bf16_stream():
    """model.residual_dtype=float32 keeps the residual stream in fp32 under bf16 compute (as PyTorch
    autocast does): its hidden states are closer to the all-fp32 model's than a bf16 stream's."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from tests.helpers import tiny_config
    from train.core.model import Transformer, init_params

    ref_cfg = tiny_config("model.compute_dtype=float32").model
    params = nn.meta.unbox(init_params(ref_cfg, jax.random.PRNGKey(0)))
    ids = (jnp.arange(64)[None] * 7) % ref_cfg.vocab_size
    ref = Transformer(ref_cfg).apply({"params": params}, ids, method=Transformer.hidden)
    errors = {}
    for stream in ("compute", "float32"):
        cfg = tiny_config("model.compute_dtype=bfloat16", f"model.residual_dtype={stream}").model
        h = Transformer(cfg).apply({"params": params}, ids, method=Transformer.hidden)
        errors[stream] = float(jnp.abs(h.astype(jnp.float32) - ref).mean())
    assert 0 < errors["float32"] < errors["compute"], errors
