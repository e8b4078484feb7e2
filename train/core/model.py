"""GPT-Neo (and GPT-2) in Flax: the same math as Hugging Face's PyTorch models.

Pure model code: no I/O, no data, no config files; it gets a ``ModelConfig``. Parameters and
activations are annotated with *logical* axis names (``vocab``, ``embed``, ``heads``, ``kv``,
``mlp`` for weights; ``act_*`` for activations); ``train/sharding.py`` maps them to mesh axes.

Array names carry their shapes: B batch, T query positions, S key positions, D width,
H heads, K head dim, F MLP width, V padded vocabulary.

GPT-Neo specifics (from the reference implementation): attention scores are NOT scaled by
1/sqrt(K); query and key are multiplied in fp32; "local" layers see only the last
``window_size`` positions (including their own); q/k/v projections have no bias.
GPT-2 specifics: scores scaled by 1/sqrt(K), q/k/v biases, every layer global.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from train.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str):
    return DTYPES[name]


def _init(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


def _residual_init(cfg: ModelConfig):
    """The layers that write into the residual stream (attention out_proj, MLP c_proj): GPT-2
    scales their init by 1/sqrt(2 x layers) so the stream's variance does not grow with depth
    (Radford et al. 2019; Hugging Face GPT-2's ``_init_weights``). GPT-Neo's reference does not."""
    if cfg.family != "gpt2":
        return _init(cfg)
    return nn.initializers.normal(stddev=cfg.initializer_range / math.sqrt(2 * cfg.num_layers))


def _partitioned(init, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, axes)


def activation_fn(name: str):
    """The MLP nonlinearity; ``gelu_new`` is the tanh approximation GPT-2/Neo use."""
    if name == "gelu_new":
        return gelu_tanh
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"model.activation: unknown activation {name!r}")


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """``jax.nn.gelu(x, approximate=True)`` whose backward pass keeps only ``x`` (autodiff of the
    formula keeps five ``[B, T, F]`` intermediates, the largest activations of the model) and
    recomputes the tanh, in fp32."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return jax.nn.gelu(x, approximate=True), x


def _gelu_tanh_bwd(x, g):
    x32 = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x32 + 0.044715 * x32 ** 3))
    d = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x32 * x32)
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in fp32 (returns fp32) whose backward pass keeps only the
    normalised input and the inverse standard deviation (autodiff keeps three fp32 ``[B, T, D]``
    arrays per norm)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    # A zero of x's dtype rides along so the backward pass can return dx in that dtype.
    return y, (xhat, rstd, scale, bias, jnp.zeros((), x.dtype))


def _layer_norm_bwd(eps, res, g):
    xhat, rstd, scale, bias, x_zero = res
    g = g.astype(jnp.float32)
    axes = tuple(range(g.ndim - 1))
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    gx = g * scale.astype(jnp.float32)
    dx = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
    return dx.astype(x_zero.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def attention_mask(q_pos_T: jax.Array, k_pos_S: jax.Array, window: int | None) -> jax.Array:
    """Boolean [T, S] mask: causal, and for local layers only the last ``window`` positions.
    Keys at negative positions are left padding (batched prompts of different lengths)."""
    allowed_TS = (k_pos_S[None, :] <= q_pos_T[:, None]) & (k_pos_S[None, :] >= 0)
    if window is not None:
        allowed_TS &= q_pos_T[:, None] - k_pos_S[None, :] < window
    return allowed_TS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """``softmax(where(mask, scores, lowest))`` over the last axis, returned in ``dtype``.

    Written with its own gradient so that the only thing kept for the backward pass is the
    returned probabilities (in ``dtype``, as the value matmul consumes them): autodiff of the
    plain expression keeps the broadcast mask, the masked scores, the exponentials and the fp32
    probabilities, four ``[B, H, T, S]`` arrays per layer (measured with ``bench/train_step.py
    --plan``: 5.2 GB instead of 0.8 GB per layer for 125M at 8 x 2048 in bf16)."""
    return _masked_softmax_fwd(scores, mask, dtype)[0]


def _masked_softmax_fwd(scores, mask, dtype):
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1).astype(dtype)
    return probs, probs


def _masked_softmax_bwd(dtype, probs, g):
    # d softmax: p * (g - sum(p * g)); masked positions have p == 0 and so get no gradient.
    p = probs.astype(jnp.float32)
    g = g.astype(jnp.float32)
    return p * (g - jnp.sum(p * g, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def local_attention_blocked(q_BTHK, k_BTHK, v_BTHK, positions_BT, window: int, scale: float, dtype,
                            dropout=lambda probs: probs) -> jax.Array:
    """Local (sliding-window) attention computed block by block: the queries of each block of
    ``window`` positions against the keys of that block and the one before, ``T x 2W`` scores
    instead of ``T x T`` (GPT-Neo's local layers see only the last ``window`` positions, so the
    rest of the square is masked work and memory). Same result as the masked full square; the
    mask still comes from the positions, so shifted positions (left padding) stay exact."""
    B, T, H, K = q_BTHK.shape
    n = T // window

    def blocks(x):  # [B, T, ...] -> [B, n, W, ...]
        return x.reshape(B, n, window, *x.shape[2:])

    def with_previous(x_BNW, fill):  # [B, n, W, ...] -> [B, n, 2W, ...]: block j-1 then block j
        pad = [(0, 0), (1, 0)] + [(0, 0)] * (x_BNW.ndim - 2)
        prev = jnp.pad(x_BNW, pad, constant_values=fill)[:, :-1]
        return jnp.concatenate([prev, x_BNW], axis=2)

    q_BNWHK = blocks(q_BTHK)
    k_BNSHK = with_previous(blocks(k_BTHK), 0)
    v_BNSHK = with_previous(blocks(v_BTHK), 0)
    q_pos_BNW = blocks(positions_BT)
    k_pos_BNS = with_previous(q_pos_BNW, -1)  # before the first block: negative = never attended
    mask_BNWS = jax.vmap(jax.vmap(attention_mask, in_axes=(0, 0, None)), in_axes=(0, 0, None))(
        q_pos_BNW, k_pos_BNS, window)
    scores_BNHWS = jnp.einsum("bnwhk,bnshk->bnhws", q_BNWHK, k_BNSHK, preferred_element_type=jnp.float32) * scale
    probs_BNHWS = dropout(masked_softmax(scores_BNHWS, mask_BNWS[:, :, None], dtype))
    out_BNWHK = jnp.einsum("bnhws,bnshk->bnwhk", probs_BNHWS, v_BNSHK)
    return out_BNWHK.reshape(B, T, H, K)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (like PyTorch's under autocast), returned in compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        scale = self.param("scale", _partitioned(nn.initializers.ones, ("embed",)), (cfg.hidden_size,),
                           _dtype(cfg.param_dtype))
        bias = self.param("bias", _partitioned(nn.initializers.zeros, ("embed",)), (cfg.hidden_size,),
                          _dtype(cfg.param_dtype))
        return layer_norm(x_BTD, scale, bias, cfg.layer_norm_epsilon).astype(_dtype(cfg.compute_dtype))


class Attention(nn.Module):
    """Multi-head causal self-attention, global or local, with an optional KV cache."""

    cfg: ModelConfig
    kind: str  # "global" or "local"

    @nn.compact
    def __call__(self, x_BTD, positions_BT, *, deterministic: bool, decode: bool):
        cfg = self.cfg
        H, K = cfg.num_heads, cfg.head_dim
        dtype, pdtype = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        gpt2 = cfg.family == "gpt2"

        def proj(name):
            # Explicit params + einsum (not DenseGeneral): the kernel keeps its [D, H, K] shape
            # and logical axes, so it can be sharded over heads without reshapes.
            kernel_DHK = self.param(f"{name}_kernel", _partitioned(_init(cfg), ("embed", "heads", "kv")),
                                    (cfg.hidden_size, H, K), pdtype)
            y_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, kernel_DHK.astype(dtype))
            if gpt2:
                bias_HK = self.param(f"{name}_bias", _partitioned(nn.initializers.zeros, ("heads", "kv")),
                                     (H, K), pdtype)
                y_BTHK = y_BTHK + bias_HK.astype(dtype)
            return y_BTHK

        q_BTHK = proj("q_proj")
        k_BTHK = proj("k_proj")
        v_BTHK = proj("v_proj")
        q_BTHK = nn.with_logical_constraint(q_BTHK, ("act_batch", "act_seq", "act_heads", None))
        k_BTHK = nn.with_logical_constraint(k_BTHK, ("act_batch", "act_seq", "act_heads", None))
        v_BTHK = nn.with_logical_constraint(v_BTHK, ("act_batch", "act_seq", "act_heads", None))

        window = cfg.window_size if self.kind == "local" else None
        q_pos_BT = positions_BT
        if decode:
            k_BSHK, v_BSHK, k_pos_BS = self._update_cache(k_BTHK, v_BTHK, positions_BT)
        else:
            k_BSHK, v_BSHK, k_pos_BS = k_BTHK, v_BTHK, positions_BT

        scale = K ** -0.5 if gpt2 else 1.0
        T = q_BTHK.shape[1]
        blocked = (cfg.attention_impl == "blocked" and window is not None and not decode
                   and window < T and T % window == 0)
        if blocked:
            drop = nn.Dropout(cfg.attention_dropout)
            out_BTHK = local_attention_blocked(q_BTHK, k_BSHK, v_BSHK, positions_BT, window, scale, dtype,
                                               dropout=lambda p: drop(p, deterministic=deterministic))
        elif cfg.attention_impl in ("dot_product", "cudnn") and not decode:
            # implementation=None is XLA's reference kernel (it materialises the square) in
            # every backend as of JAX 0.10: cuDNN's fused kernel must be asked for by name.
            if cfg.attention_impl == "cudnn" and jax.default_backend() != "gpu":
                raise ValueError(f"model.attention_impl: cudnn needs a CUDA GPU, this backend is "
                                 f"{jax.default_backend()} (use blocked)")
            out_BTHK = jax.nn.dot_product_attention(
                q_BTHK, k_BSHK, v_BSHK, scale=scale, is_causal=True,
                local_window_size=(window - 1, 0) if window is not None else None,
                implementation="cudnn" if cfg.attention_impl == "cudnn" else None,
            )
        else:
            mask_BTS = jax.vmap(attention_mask, in_axes=(0, 0, None))(q_pos_BT, k_pos_BS, window)
            # Scores in fp32 for both families: GPT-Neo's reference multiplies q and k in fp32,
            # and unscaled bf16 scores would lose precision.
            scores_BHTS = jnp.einsum(
                "bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32
            ) * scale
            probs_BHTS = masked_softmax(scores_BHTS, mask_BTS[:, None], dtype)
            self.sow("intermediates", "attention_probs", probs_BHTS)
            probs_BHTS = nn.Dropout(cfg.attention_dropout)(probs_BHTS, deterministic=deterministic)
            out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
        out_BTHK = nn.with_logical_constraint(out_BTHK, ("act_batch", "act_seq", "act_heads", None))
        out_kernel_HKD = self.param("out_proj_kernel", _partitioned(_residual_init(cfg), ("heads", "kv", "embed")),
                                    (H, K, cfg.hidden_size), pdtype)
        out_bias_D = self.param("out_proj_bias", _partitioned(nn.initializers.zeros, ("embed",)),
                                (cfg.hidden_size,), pdtype)
        out_BTD = jnp.einsum("bthk,hkd->btd", out_BTHK, out_kernel_HKD.astype(dtype)) + out_bias_D.astype(dtype)
        return nn.Dropout(cfg.resid_dropout)(out_BTD, deterministic=deterministic)

    def _update_cache(self, k_BTHK, v_BTHK, positions_BT):
        """Write this call's keys/values at the cache index; return the whole cache.

        The cache is allocated by a first call with the full length (see ``init_cache``);
        cached slots that were never written have position ``max_len`` so the causal mask
        hides them.
        """
        B, T, H, K = k_BTHK.shape
        is_initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, (B, T, H, K), k_BTHK.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, (B, T, H, K), v_BTHK.dtype)
        cached_pos = self.variable("cache", "cached_pos", lambda: jnp.full((B, T), 2**30, jnp.int32))
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:
            return k_BTHK, v_BTHK, positions_BT
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BTHK.astype(cached_k.value.dtype),
                                                      (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BTHK.astype(cached_v.value.dtype),
                                                      (0, i, 0, 0))
        cached_pos.value = jax.lax.dynamic_update_slice(
            cached_pos.value, positions_BT.astype(jnp.int32), (0, i)
        )
        index.value = i + T
        return cached_k.value, cached_v.value, cached_pos.value


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, *, deterministic: bool):
        cfg = self.cfg
        dtype, pdtype = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        h_BTF = nn.Dense(
            cfg.mlp_width, dtype=dtype, param_dtype=pdtype, name="c_fc",
            kernel_init=_partitioned(_init(cfg), ("embed", "mlp")),
            bias_init=_partitioned(nn.initializers.zeros, ("mlp",)),
        )(x_BTD)
        h_BTF = nn.with_logical_constraint(h_BTF, ("act_batch", "act_seq", "act_mlp"))
        h_BTF = activation_fn(cfg.activation)(h_BTF)
        out_BTD = nn.Dense(
            cfg.hidden_size, dtype=dtype, param_dtype=pdtype, name="c_proj",
            kernel_init=_partitioned(_residual_init(cfg), ("mlp", "embed")),
            bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
        )(h_BTF)
        return nn.Dropout(cfg.resid_dropout)(out_BTD, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig
    kind: str

    @nn.compact
    def __call__(self, x_BTD, positions_BT, deterministic: bool = True, decode: bool = False):
        attn = Attention(self.cfg, self.kind, name="attn")
        x_BTD = x_BTD + attn(LayerNorm(self.cfg, name="ln_1")(x_BTD), positions_BT,
                             deterministic=deterministic, decode=decode)
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(LayerNorm(self.cfg, name="ln_2")(x_BTD),
                                                 deterministic=deterministic)
        return nn.with_logical_constraint(x_BTD, ("act_batch", "act_seq", "act_embed"))


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """GPT-Neo / GPT-2 language model. ``__call__`` returns logits [B, T, V] in compute dtype
    with the padded vocabulary rows masked to a large negative value; ``hidden`` returns the
    final hidden states (used by the chunked loss)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdtype = _dtype(cfg.param_dtype)
        self.wte = self.param("wte", _partitioned(_init(cfg), ("vocab", "embed")),
                              (cfg.padded_vocab_size, cfg.hidden_size), pdtype)
        self.wpe = self.param("wpe", _partitioned(_init(cfg), (None, "embed")),
                              (cfg.max_position_embeddings, cfg.hidden_size), pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param("lm_head", _partitioned(_init(cfg), ("vocab", "embed")),
                                      (cfg.padded_vocab_size, cfg.hidden_size), pdtype)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(3, 4))
        self.blocks = [block(cfg, kind, name=f"h_{i}") for i, kind in enumerate(cfg.layer_kinds)]
        self.ln_f = LayerNorm(cfg, name="ln_f")
        self.drop = nn.Dropout(cfg.embed_dropout)

    def hidden(self, input_ids_BT, positions_BT=None, deterministic: bool = True, decode: bool = False):
        cfg = self.cfg
        dtype = _dtype(cfg.compute_dtype)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)
        # Gather from a replicated copy of the tables: a gather from a table sharded over
        # vocab and embed makes XLA replicate it anyway, less efficiently (SPMD "involuntary
        # full rematerialization"); one explicit all-gather per step is cheap at this size.
        wte_VD = nn.with_logical_constraint(self.wte, (None, None))
        wpe_PD = nn.with_logical_constraint(self.wpe, (None, None))
        x_BTD = jnp.take(wte_VD, input_ids_BT, axis=0) + jnp.take(wpe_PD, jnp.maximum(positions_BT, 0), axis=0)
        # The residual stream: in compute dtype, or fp32 as PyTorch autocast keeps it (each block's
        # bf16 output is then added in fp32; LayerNorm reads fp32 either way).
        stream = jnp.float32 if cfg.residual_dtype == "float32" else dtype
        x_BTD = nn.with_logical_constraint(x_BTD.astype(stream), ("act_batch", "act_seq", "act_embed"))
        x_BTD = self.drop(x_BTD, deterministic=deterministic)
        for block in self.blocks:
            x_BTD = block(x_BTD, positions_BT, deterministic, decode)
        return self.ln_f(x_BTD)

    def output_embedding(self):
        """[V, D] matrix of the output layer (the tied input embedding by default)."""
        return self.wte if self.cfg.tie_word_embeddings else self.lm_head

    def logits(self, h_BTD):
        """Logits [B, T, V] from hidden states; padded vocabulary rows are masked out."""
        cfg = self.cfg
        dtype = _dtype(cfg.compute_dtype)
        logits_BTV = jnp.einsum("btd,vd->btv", h_BTD, self.output_embedding().astype(dtype))
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("act_batch", "act_seq", "act_vocab"))
        return mask_padded_vocab(logits_BTV, cfg.vocab_size)

    def __call__(self, input_ids_BT, positions_BT=None, deterministic: bool = True, decode: bool = False):
        return self.logits(self.hidden(input_ids_BT, positions_BT, deterministic, decode))


def mask_padded_vocab(logits_BTV: jax.Array, vocab_size: int) -> jax.Array:
    """Set logits of padding rows (ids >= vocab_size) to the dtype's lowest value, so they never
    win a softmax, an argmax or a sample."""
    if logits_BTV.shape[-1] == vocab_size:
        return logits_BTV
    valid_V = jnp.arange(logits_BTV.shape[-1]) < vocab_size
    return jnp.where(valid_V, logits_BTV, jnp.finfo(logits_BTV.dtype).min)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Boxed (logically partitioned) parameters of a freshly initialised model."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return Transformer(cfg).init(rng, ids)["params"]


def init_cache(cfg: ModelConfig, params, batch_size: int, max_len: int):
    """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
    ids = jnp.zeros((batch_size, max_len), jnp.int32)
    variables = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), ids, decode=True)
    )
    return _empty_cache(variables["cache"])


def _empty_cache(cache_shapes):
    def make(path, s):
        name = path[-1].key
        if name == "cached_pos":
            return jnp.full(s.shape, 2**30, jnp.int32)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(make, cache_shapes)


def decode_step(cfg: ModelConfig, params, cache, input_ids_BT, positions_BT):
    """Run ``input_ids_BT`` through the model with the KV cache; returns (logits, new cache)."""
    logits_BTV, mutated = Transformer(cfg).apply(
        {"params": params, "cache": cache}, input_ids_BT, positions_BT, decode=True, mutable=["cache"]
    )
    return logits_BTV, mutated["cache"]

