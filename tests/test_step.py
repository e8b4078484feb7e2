import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_config
from train.core import model as M
from train.core import sharding, step


def _tokens(seed=0, batch=8, length=33):
    return np.random.RandomState(seed).randint(0, 300, (batch, length)).astype(np.int32)


def test_loss_is_mean_token_cross_entropy():
    cfg = tiny_config()
    params = M.init_params(cfg.model, jax.random.PRNGKey(0))
    tokens = _tokens()
    logits = np.asarray(M.Transformer(cfg.model).apply({"params": params}, tokens[:, :-1]), np.float64)[..., :300]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    want = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    got = float(step.loss_fn(params, jnp.asarray(tokens), cfg.model))
    assert got == pytest.approx(want, rel=1e-5)
    # A fresh model is close to uniform over the 300 real tokens, not the 384 padded ones.
    assert abs(got - np.log(300)) < 0.1


def test_chunked_loss_equals_full_loss_and_gradients():
    cfg = tiny_config()
    chunked = tiny_config("model.loss_chunk_size=12")
    params = M.init_params(cfg.model, jax.random.PRNGKey(0))
    tokens = jnp.asarray(_tokens())
    full_loss, full_grads = jax.value_and_grad(step.loss_fn)(params, tokens, cfg.model)
    ch_loss, ch_grads = jax.value_and_grad(step.loss_fn)(params, tokens, chunked.model)
    assert float(ch_loss) == pytest.approx(float(full_loss), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ch_grads), jax.tree_util.tree_leaves(full_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # Evaluation runs the same (chunked, gradient-free) loss.
    full_eval, ch_eval = step.eval_step(params, tokens, cfg=cfg), step.eval_step(params, tokens, cfg=chunked)
    assert float(ch_eval["loss_sum"]) == pytest.approx(float(full_eval["loss_sum"]), rel=1e-6)
    assert float(ch_eval["loss_sum"]) / float(ch_eval["tokens"]) == pytest.approx(float(full_loss), rel=1e-6)


def _train(cfg, batches, n_devices=1):
    mesh = sharding.make_mesh(cfg, jax.devices()[:n_devices])
    compiled = step.compile_steps(cfg, mesh)
    state = compiled.init(jax.random.PRNGKey(0))
    out = []
    for b in batches:
        state, metrics = compiled.train_step(state, sharding.global_batch(b, mesh))
        out.append({k: float(v) for k, v in metrics.items()})
    return state, out


def test_gradient_accumulation_matches_one_big_batch_and_logs_mean_loss():
    batches = [_tokens(i) for i in range(2)]
    s1, m1 = _train(tiny_config("optimizer.learning_rate=1e-3"), batches, n_devices=2)
    s4, m4 = _train(tiny_config("optimizer.learning_rate=1e-3", "optimizer.grad_accum_steps=4"), batches, 2)
    # The logged loss is the mean over all micro-batches, i.e. the full-batch loss.
    np.testing.assert_allclose([m["loss"] for m in m4], [m["loss"] for m in m1], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s4.params), jax.tree_util.tree_leaves(s1.params), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    assert int(s4.step) == 2
    assert m1[0]["learning_rate"] == pytest.approx(1e-3)


def test_bf16_compute_tracks_fp32_and_keeps_fp32_master_weights():
    batches = [_tokens(i) for i in range(3)]
    s32, m32 = _train(tiny_config("optimizer.learning_rate=1e-3"), batches)
    s16, m16 = _train(tiny_config("optimizer.learning_rate=1e-3", "model.compute_dtype=bfloat16"), batches)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.opt_state) if x.ndim)
    np.testing.assert_allclose([m["loss"] for m in m16], [m["loss"] for m in m32], rtol=2e-2)
    assert m16[-1]["loss"] != m32[-1]["loss"]  # really computed in bf16


def test_eval_step_sums_combine_exactly():
    cfg = tiny_config()
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    compiled = step.compile_steps(cfg, mesh)
    state = compiled.init(jax.random.PRNGKey(0))
    tokens = _tokens()
    out = compiled.eval_step(state.params, sharding.global_batch(tokens, mesh))
    assert float(out["tokens"]) == 8 * 32
    mean = float(out["loss_sum"]) / float(out["tokens"])
    assert mean == pytest.approx(float(step.loss_fn(state.params, jnp.asarray(tokens), cfg.model)), rel=1e-5)
