"""Next-token cross entropy: per-token losses from logits, and the output layer fused with its loss.

Pure functions; ``train/step.py`` picks one by ``model.loss_chunk_size``. Array names carry their
shapes as in ``train/model.py`` (N chunks, C positions per chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_losses(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """Per-token cross entropy in fp32, [B, T]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    label_logit_BT = jnp.take_along_axis(logits_BTV, labels_BT[..., None], axis=-1)[..., 0]
    return log_z_BT - label_logit_BT


def _chunk_logits(h_BCD, w_VD, vocab_size: int, dtype):
    """fp32 logits of one chunk, padded vocabulary rows at the lowest fp32 value."""
    logits_BCV = jnp.einsum("bcd,vd->bcv", h_BCD.astype(dtype), w_VD.astype(dtype),
                            preferred_element_type=jnp.float32)
    if w_VD.shape[0] != vocab_size:
        logits_BCV = jnp.where(jnp.arange(w_VD.shape[0]) < vocab_size, logits_BCV, jnp.finfo(jnp.float32).min)
    return logits_BCV


def _chunks(x_BT, chunk: int):
    """[B, T, ...] -> [N, B, C, ...], the last chunk padded with zeros (zero ``valid``: no loss)."""
    B, T = x_BT.shape[:2]
    n = -(-T // chunk)
    pad = [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x_BT.ndim - 2)
    return jnp.pad(x_BT, pad).reshape(B, n, chunk, *x_BT.shape[2:]).swapaxes(0, 1)


def _unchunk(x_NBC, T: int):
    N, B, C = x_NBC.shape[:3]
    return x_NBC.swapaxes(0, 1).reshape(B, N * C, *x_NBC.shape[3:])[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def output_loss_sum(h_BTD, w_VD, labels_BT, valid_BT, vocab_size: int, chunk: int, dtype) -> jax.Array:
    """Sum over tokens of ``valid * cross_entropy(h @ w.T, labels)``, ``chunk`` positions at a time.

    The output layer fused with its loss: the fp32 logits ``[B, T, V]`` never exist at once, only
    ``[B, chunk, V]``. Under differentiation the forward pass also computes the gradients (the
    loss is the last op, so its cotangent is one scalar): each chunk's logits are used for the
    loss, turned into ``softmax - onehot`` and multiplied back into the two gradients while they
    are still in cache, and nothing of them is kept or recomputed for the backward pass (a
    checkpointed chunked loss recomputes the ``[B, T, V]`` matmul: a third more output-layer work).
    """
    def body(total, xs):
        h_BCD, labels_BC, valid_BC = xs
        losses_BC = token_losses(_chunk_logits(h_BCD, w_VD, vocab_size, dtype), labels_BC)
        return total + jnp.sum(losses_BC * valid_BC), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (_chunks(h_BTD, chunk), _chunks(labels_BT, chunk), _chunks(valid_BT, chunk)))
    return total


def _output_loss_sum_fwd(h_BTD, w_VD, labels_BT, valid_BT, vocab_size, chunk, dtype):
    w_c = w_VD.astype(dtype)

    def body(carry, xs):
        total, dw_DV = carry
        h_BCD, labels_BC, valid_BC = xs
        logits_BCV = _chunk_logits(h_BCD, w_VD, vocab_size, dtype)
        max_BC = jnp.max(logits_BCV, axis=-1, keepdims=True)
        exp_BCV = jnp.exp(logits_BCV - max_BC)
        sum_BC = jnp.sum(exp_BCV, axis=-1, keepdims=True)
        label_logit_BC = jnp.take_along_axis(logits_BCV, labels_BC[..., None], axis=-1)[..., 0]
        losses_BC = (max_BC + jnp.log(sum_BC))[..., 0] - label_logit_BC
        onehot_BCV = jnp.arange(logits_BCV.shape[-1]) == labels_BC[..., None]
        # d(loss sum)/d(logits) = (softmax - onehot) * valid, fed to both matmuls in compute dtype.
        dlogits_BCV = ((exp_BCV / sum_BC - onehot_BCV) * valid_BC[..., None]).astype(dtype)
        dh_BCD = jnp.einsum("bcv,vd->bcd", dlogits_BCV, w_c, preferred_element_type=jnp.float32)
        # As [D, V] = h.T @ dlogits: XLA's CPU backend would otherwise transpose dlogits (the
        # big operand) for a [V, BC] @ [BC, D] matmul; the small result is transposed once below.
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD.astype(dtype), dlogits_BCV,
                                   preferred_element_type=jnp.float32)
        return (total + jnp.sum(losses_BC * valid_BC), dw_DV), dh_BCD.astype(h_BTD.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_VD.shape[::-1], jnp.float32))
    (total, dw_DV), dh_NBCD = jax.lax.scan(
        body, init, (_chunks(h_BTD, chunk), _chunks(labels_BT, chunk), _chunks(valid_BT, chunk)))
    return total, (_unchunk(dh_NBCD, h_BTD.shape[1]), dw_DV.T.astype(w_VD.dtype))


def _output_loss_sum_bwd(vocab_size, chunk, dtype, residuals, g):
    dh_BTD, dw_VD = residuals
    return (g * dh_BTD).astype(dh_BTD.dtype), (g * dw_VD).astype(dw_VD.dtype), None, None


output_loss_sum.defvjp(_output_loss_sum_fwd, _output_loss_sum_bwd)
