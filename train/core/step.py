"""The train and eval steps: pure functions, jitted over the mesh with explicit shardings.

``train_step(state, batch)`` takes a global token batch ``[B, T + 1]`` (inputs are ``[:, :-1]``,
labels ``[:, 1:]``), splits it into ``grad_accum_steps`` micro-batches, accumulates fp32
gradients, and applies one AdamW update. Activations run in ``model.compute_dtype`` (bf16 by
default); master weights, optimizer state, logits for the loss and the loss itself are fp32.
The state is donated so its buffers are reused for the new state.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.config import Config, ModelConfig
from train.core import sharding
from train.core.loss import output_loss_sum, token_losses
from train.core.model import DTYPES, Transformer, init_params, mask_padded_vocab
from train.core.optimizer import learning_rate_schedule, make_optimizer


class TrainState(struct.PyTreeNode):
    step: jax.Array  # number of optimizer updates applied so far
    params: Any  # fp32 master weights
    opt_state: Any  # optax state (fp32)


def split_batch(tokens_BT1: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(inputs [B, T], labels [B, T], valid [B, T] fp32)`` of a token batch ``[B, T + 1]``.

    Negative ids are padding (sliding-window packing pads a file's last window with -1): they
    get no loss, and are fed to the model as id 0; padding only ever follows real tokens in a
    row, so causal attention keeps it out of every real position's prediction."""
    inputs_BT, labels_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    valid_BT = (labels_BT >= 0).astype(jnp.float32)
    return jnp.maximum(inputs_BT, 0), jnp.maximum(labels_BT, 0), valid_BT


def loss_sum_fn(params, tokens_BT1, cfg: ModelConfig, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """``(summed next-token cross entropy, number of real label tokens)`` of a batch ``[B, T + 1]``."""
    inputs_BT, labels_BT, valid_BT = split_batch(tokens_BT1)
    model = Transformer(cfg)
    deterministic = dropout_rng is None
    rngs = {} if deterministic else {"dropout": dropout_rng}
    if cfg.loss_chunk_size:
        h_BTD = model.apply({"params": params}, inputs_BT, None, deterministic, method=Transformer.hidden,
                            rngs=rngs)
        w_VD = model.apply({"params": params}, method=Transformer.output_embedding)
        total = output_loss_sum(h_BTD, w_VD, labels_BT, valid_BT, cfg.vocab_size,
                                min(cfg.loss_chunk_size, inputs_BT.shape[1]), DTYPES[cfg.compute_dtype])
    else:
        logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=deterministic, rngs=rngs)
        total = jnp.sum(token_losses(logits_BTV, labels_BT) * valid_BT)
    return total, jnp.sum(valid_BT)


def loss_fn(params, tokens_BT1, cfg: ModelConfig, dropout_rng=None) -> jax.Array:
    """Mean next-token cross entropy (fp32) over the real (non-padding) labels of ``[B, T + 1]``."""
    total, count = loss_sum_fn(params, tokens_BT1, cfg, dropout_rng)
    return total / jnp.maximum(count, 1.0)


def _uses_dropout(cfg: ModelConfig) -> bool:
    return max(cfg.embed_dropout, cfg.attention_dropout, cfg.resid_dropout) > 0


def train_step(state: TrainState, tokens_BT1: jax.Array, *, cfg: Config, tx: optax.GradientTransformation,
               schedule: optax.Schedule, seed: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update over the whole global batch; returns the new state and metrics
    (``loss`` = mean over the real label tokens of all micro-batches, ``grad_norm``, ``learning_rate``)."""
    mcfg = cfg.model
    accum = cfg.optimizer.grad_accum_steps
    B = tokens_BT1.shape[0]
    # Micro-batch i takes rows i, i + accum, ...: every data shard contributes to every
    # micro-batch, so splitting needs no communication.
    micro_ABT1 = tokens_BT1.reshape(B // accum, accum, -1).swapaxes(0, 1)
    micro_ABT1 = jax.lax.with_sharding_constraint(micro_ABT1, PartitionSpec(None, sharding.BATCH_AXES, None))
    base_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    # Gradients of the loss *sum*, divided once by the real-token count of the whole batch: the
    # exact mean even when padding makes micro-batches hold different numbers of real tokens.
    grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)

    def micro(carry, xs):
        loss_sum, count_sum, grad_sum = carry
        i, tokens = xs
        rng = jax.random.fold_in(base_rng, i) if _uses_dropout(mcfg) else None
        (loss, count), grads = grad_fn(state.params, tokens, mcfg, rng)
        grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
        return (loss_sum + loss, count_sum + count, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    if accum == 1:
        (loss_sum, count, grad_sum), _ = micro(init, (0, micro_ABT1[0]))
    else:
        (loss_sum, count, grad_sum), _ = jax.lax.scan(micro, init, (jnp.arange(accum), micro_ABT1))
    count = jnp.maximum(count, 1.0)
    loss = loss_sum / count
    grads = jax.tree_util.tree_map(lambda g: g / count, grad_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def row_loss_sums(params, tokens_BT1, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """``(summed loss [B], real label tokens [B])`` per row of ``[B, T + 1]``, without dropout;
    with ``loss_chunk_size`` the logits are never whole (the fused loss, mapped over rows)."""
    inputs_BT, labels_BT, valid_BT = split_batch(tokens_BT1)
    model = Transformer(cfg)
    if cfg.loss_chunk_size:
        h_BTD = model.apply({"params": params}, inputs_BT, None, True, method=Transformer.hidden)
        w_VD = model.apply({"params": params}, method=Transformer.output_embedding)
        chunk = min(cfg.loss_chunk_size, inputs_BT.shape[1])

        def one_row(h_TD, labels_T, valid_T):
            return output_loss_sum(h_TD[None], w_VD, labels_T[None], valid_T[None], cfg.vocab_size, chunk,
                                   DTYPES[cfg.compute_dtype])

        loss_B = jax.vmap(one_row)(h_BTD, labels_BT, valid_BT)
    else:
        logits_BTV = model.apply({"params": params}, inputs_BT, deterministic=True)
        loss_B = jnp.sum(token_losses(logits_BTV, labels_BT) * valid_BT, axis=1)
    return loss_B, jnp.sum(valid_BT, axis=1)


def eval_step(params, tokens_BT1: jax.Array, *, cfg: Config) -> dict[str, jax.Array]:
    """Summed token loss and token count of a validation batch, per row (``loss_sum_B``,
    ``tokens_B``: per-language losses are sums over rows) and in total (sums, so batches combine
    exactly); the same loss as training, so ``loss_chunk_size`` bounds the logits' memory here too."""
    loss_B, count_B = row_loss_sums(params, tokens_BT1, cfg.model)
    return {"loss_sum": jnp.sum(loss_B), "tokens": jnp.sum(count_B), "loss_sum_B": loss_B, "tokens_B": count_B}


def next_token_logits(params, tokens_BT: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """fp32 logits [B, T, V] with padding masked (used by tests and inspection tools)."""
    logits = Transformer(cfg).apply({"params": params}, tokens_BT)
    return mask_padded_vocab(logits.astype(jnp.float32), cfg.vocab_size)


class Compiled(struct.PyTreeNode):
    """Everything the trainer needs to run steps on a mesh."""

    mesh: Mesh = struct.field(pytree_node=False)
    state_shardings: Any = struct.field(pytree_node=False)
    batch_sharding: NamedSharding = struct.field(pytree_node=False)
    init: Any = struct.field(pytree_node=False)  # rng -> TrainState (sharded)
    train_step: Any = struct.field(pytree_node=False)  # (state, batch) -> (state, metrics)
    eval_step: Any = struct.field(pytree_node=False)  # (params, batch) -> sums
    abstract_state: Any = struct.field(pytree_node=False)  # ShapeDtypeStructs with shardings (restore target)
    state_from_params: Any = struct.field(pytree_node=False)  # params -> TrainState at step 0, fresh optimizer


def _boxed_init(cfg: Config, tx, rng, seq_len: int) -> TrainState:
    params = init_params(cfg.model, rng, seq_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def compile_steps(cfg: Config, mesh: Mesh) -> Compiled:
    """Build the jitted init/train/eval functions with in/out shardings from the logical rules.

    ``init(rng)`` creates parameters and optimizer state already sharded (never materialised on
    one device); ``train_step`` donates its state argument."""
    schedule = learning_rate_schedule(cfg.optimizer, cfg.schedule)
    tx = make_optimizer(cfg.optimizer, schedule)
    seq = min(8, cfg.model.max_position_embeddings)
    with sharding.rules_context():
        abstract = jax.eval_shape(functools.partial(_boxed_init, cfg, tx, seq_len=seq), jax.random.PRNGKey(0))
        logical = nn.get_partition_spec(abstract)
        state_sh = sharding.logical_to_sharding(logical, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def init(rng):
        return nn.meta.unbox(_boxed_init(cfg, tx, rng, seq))

    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init, jax.random.PRNGKey(0)), state_sh,
    )

    def wrapped_train(state, batch):
        with sharding.rules_context():
            return train_step(state, batch, cfg=cfg, tx=tx, schedule=schedule, seed=cfg.train.seed)

    def wrapped_eval(params, batch):
        with sharding.rules_context():
            return eval_step(params, batch, cfg=cfg)

    def from_params(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    jit_init = jax.jit(init, out_shardings=state_sh)
    jit_from_params = jax.jit(from_params, in_shardings=(state_sh.params,), out_shardings=state_sh)
    jit_train = jax.jit(wrapped_train, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                        donate_argnums=0)
    jit_eval = jax.jit(wrapped_eval, in_shardings=(state_sh.params, batch_sh), out_shardings=repl)

    def with_mesh(fn):
        @functools.wraps(fn)
        def run(*args):
            with jax.sharding.set_mesh(mesh):
                return fn(*args)

        run.lower = lambda *args: _lower(fn, mesh, *args)
        return run

    return Compiled(mesh=mesh, state_shardings=state_sh, batch_sharding=batch_sh, init=with_mesh(jit_init),
                    train_step=with_mesh(jit_train), eval_step=with_mesh(jit_eval), abstract_state=abstract_state,
                    state_from_params=with_mesh(jit_from_params))


def _lower(fn, mesh, *args):
    with jax.sharding.set_mesh(mesh):
        return fn.lower(*args)
