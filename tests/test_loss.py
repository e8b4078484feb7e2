"""The output layer fused with its loss (train/loss.py) against autodiff of the plain loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.core.loss import output_loss_sum, token_losses

B, T, D, V_PAD, V = 3, 10, 16, 40, 37  # 3 padded vocabulary rows, T not a multiple of the chunks


def _inputs(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (V_PAD, D)) * 0.3
    labels = jax.random.randint(k[2], (B, T), 0, V)
    valid = jnp.ones((B, T)).at[0, 6:].set(0.0).at[2, :3].set(0.0)  # padding positions: no loss
    return h, w, labels, valid


def _reference(h, w, labels, valid, dtype=jnp.float32):
    logits = jnp.einsum("btd,vd->btv", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    logits = jnp.where(jnp.arange(V_PAD) < V, logits, jnp.finfo(jnp.float32).min)
    return jnp.sum(token_losses(logits, labels) * valid)


@pytest.mark.parametrize("chunk", [T, 4, 3, 1])
def test_fused_loss_and_gradients_equal_autodiff(chunk):
    h, w, labels, valid = _inputs()
    want, (want_dh, want_dw) = jax.value_and_grad(_reference, (0, 1))(h, w, labels, valid)

    def fused(h, w):
        return output_loss_sum(h, w, labels, valid, V, chunk, jnp.float32)

    # Scaled by 3: the backward pass must use the incoming cotangent, not assume 1.
    got, (dh, dw) = jax.value_and_grad(lambda h, w: 3.0 * fused(h, w), (0, 1))(h, w)
    assert float(got) == pytest.approx(3.0 * float(want), rel=1e-6)
    assert float(fused(h, w)) == pytest.approx(float(want), rel=1e-6)  # the primal alone (eval)
    np.testing.assert_allclose(dh, 3.0 * want_dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, 3.0 * want_dw, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(dh)[0, 6:] == 0) and np.all(np.asarray(dw)[V:] == 0)  # no loss, no gradient
    assert dh.dtype == h.dtype and dw.dtype == w.dtype


def test_fused_loss_bf16_compute_keeps_fp32_parameter_gradient():
    h, w, labels, valid = _inputs(1)
    h16 = h.astype(jnp.bfloat16)
    want, (want_dh, want_dw) = jax.value_and_grad(_reference, (0, 1))(h16.astype(jnp.float32), w, labels, valid)
    got, (dh, dw) = jax.value_and_grad(
        lambda h, w: output_loss_sum(h, w, labels, valid, V, 4, jnp.bfloat16), (0, 1))(h16, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert float(got) == pytest.approx(float(want), rel=2e-2)
    for a, b in ((dh, want_dh), (dw, want_dw)):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
