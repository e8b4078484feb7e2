"""Hugging Face <-> Flax weights for GPT-Neo and GPT-2, and the matching configs.

State dicts are plain ``{name: numpy array}`` (from ``model.state_dict()`` or safetensors), so
this module needs neither torch nor a hub. Vocabulary padding rows exist only on the Flax side:
they are added (zeros) on import and stripped on export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from train.config import ModelConfig

# Config fields of ModelConfig that depend on the family's Hugging Face config.
_NEO_ACT = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu"}


def model_config_from_hf(hf: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """A ``ModelConfig`` with the architecture of a Hugging Face ``config.json`` dict."""
    base = base or ModelConfig()
    kind = hf.get("model_type")
    if kind == "gpt_neo":
        layers: list[str] = []
        for pattern, repeat in hf["attention_types"]:
            layers.extend(list(pattern) * repeat)
        fields = dict(
            family="gpt_neo", vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
            hidden_size=hf["hidden_size"], num_layers=hf["num_layers"], num_heads=hf["num_heads"],
            intermediate_size=hf.get("intermediate_size") or 0, attention_layers=tuple(layers),
            window_size=hf["window_size"], activation=hf.get("activation_function", "gelu_new"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            embed_dropout=hf.get("embed_dropout", 0.0), attention_dropout=hf.get("attention_dropout", 0.0),
            resid_dropout=hf.get("resid_dropout", 0.0), initializer_range=hf.get("initializer_range", 0.02),
        )
    elif kind == "gpt2":
        fields = dict(
            family="gpt2", vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
            hidden_size=hf["n_embd"], num_layers=hf["n_layer"], num_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 0, attention_layers=("global",),
            activation=hf.get("activation_function", "gelu_new"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            embed_dropout=hf.get("embd_pdrop", 0.0), attention_dropout=hf.get("attn_pdrop", 0.0),
            resid_dropout=hf.get("resid_pdrop", 0.0), initializer_range=hf.get("initializer_range", 0.02),
        )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError("config.json: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                             "reorder_and_upcast_attn) are not supported")
    else:
        raise ValueError(f"config.json: model_type {kind!r} is not supported (expected gpt_neo or gpt2)")
    if fields["activation"] not in _NEO_ACT:
        raise ValueError(f"config.json: activation_function {fields['activation']!r} is not supported")
    return dataclasses.replace(base, **fields)


def hf_config_dict(cfg: ModelConfig, eos_token_id: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``transformers.GPTNeoConfig`` / ``GPT2Config`` of this model."""
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    if cfg.family == "gpt_neo":
        kinds = list(cfg.layer_kinds)
        pattern = list(cfg.attention_layers)
        if len(kinds) % len(pattern) == 0:
            attention_types = [[pattern, len(kinds) // len(pattern)]]
        else:
            attention_types = [[[k], 1] for k in kinds]
        return dict(
            model_type="gpt_neo", vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
            hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size or None, attention_types=attention_types,
            window_size=cfg.window_size, activation_function=cfg.activation,
            layer_norm_epsilon=cfg.layer_norm_epsilon, embed_dropout=cfg.embed_dropout,
            attention_dropout=cfg.attention_dropout, resid_dropout=cfg.resid_dropout,
            initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=eos, eos_token_id=eos,
        )
    return dict(
        model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size or None, activation_function=cfg.activation,
        layer_norm_epsilon=cfg.layer_norm_epsilon, embd_pdrop=cfg.embed_dropout,
        attn_pdrop=cfg.attention_dropout, resid_pdrop=cfg.resid_dropout,
        initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=eos, eos_token_id=eos,
    )


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    if w.shape[0] > rows:
        raise ValueError(f"embedding has {w.shape[0]} rows, more than the padded vocabulary {rows}")
    return np.concatenate([w, np.zeros((rows - w.shape[0], w.shape[1]), w.dtype)]) if w.shape[0] < rows else w


def _get(sd: dict[str, np.ndarray], name: str) -> np.ndarray:
    for candidate in (name, f"transformer.{name}", name.removeprefix("transformer.")):
        if candidate in sd:
            return np.asarray(sd[candidate])
    raise KeyError(f"state dict: missing weight {name!r}")


def _ln(sd, prefix):
    return {"scale": _get(sd, f"{prefix}.weight"), "bias": _get(sd, f"{prefix}.bias")}


def hf_to_params(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Flax parameters (plain nested dict of numpy arrays) from a Hugging Face state dict."""
    D, H, K = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    wte = _get(sd, "wte.weight")
    if wte.shape != (cfg.vocab_size, D):
        raise ValueError(f"state dict: wte has shape {wte.shape}, config expects ({cfg.vocab_size}, {D})")
    params: dict[str, Any] = {
        "wte": _pad_rows(wte, cfg.padded_vocab_size),
        "wpe": _get(sd, "wpe.weight"),
        "ln_f": _ln(sd, "ln_f"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = _pad_rows(np.asarray(sd["lm_head.weight"]), cfg.padded_vocab_size)
    for i in range(cfg.num_layers):
        p = f"h.{i}"
        if cfg.family == "gpt_neo":
            a = f"{p}.attn.attention"
            attn = {f"{n}_kernel": _get(sd, f"{a}.{n}.weight").T.reshape(D, H, K)
                    for n in ("q_proj", "k_proj", "v_proj")}
            attn["out_proj_kernel"] = _get(sd, f"{a}.out_proj.weight").T.reshape(H, K, D)
            attn["out_proj_bias"] = _get(sd, f"{a}.out_proj.bias")
            mlp = {n: {"kernel": _get(sd, f"{p}.mlp.{n}.weight").T, "bias": _get(sd, f"{p}.mlp.{n}.bias")}
                   for n in ("c_fc", "c_proj")}
        else:  # GPT-2 Conv1D weights are stored [in, out] already.
            w = _get(sd, f"{p}.attn.c_attn.weight")
            b = _get(sd, f"{p}.attn.c_attn.bias")
            attn = {}
            for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
                attn[f"{n}_kernel"] = w[:, j * D:(j + 1) * D].reshape(D, H, K)
                attn[f"{n}_bias"] = b[j * D:(j + 1) * D].reshape(H, K)
            attn["out_proj_kernel"] = _get(sd, f"{p}.attn.c_proj.weight").reshape(H, K, D)
            attn["out_proj_bias"] = _get(sd, f"{p}.attn.c_proj.bias")
            mlp = {n: {"kernel": _get(sd, f"{p}.mlp.{n}.weight"), "bias": _get(sd, f"{p}.mlp.{n}.bias")}
                   for n in ("c_fc", "c_proj")}
        params[f"h_{i}"] = {"ln_1": _ln(sd, f"{p}.ln_1"), "attn": attn, "ln_2": _ln(sd, f"{p}.ln_2"), "mlp": mlp}
    return params


def params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face state dict (numpy, padding rows stripped) from Flax parameters."""
    D, V = cfg.hidden_size, cfg.vocab_size
    p = {k: v for k, v in params.items()}
    a = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    sd: dict[str, np.ndarray] = {
        "transformer.wte.weight": a(p["wte"])[:V],
        "transformer.wpe.weight": a(p["wpe"]),
        "transformer.ln_f.weight": a(p["ln_f"]["scale"]),
        "transformer.ln_f.bias": a(p["ln_f"]["bias"]),
    }
    sd["lm_head.weight"] = a(p["lm_head"])[:V] if not cfg.tie_word_embeddings else sd["transformer.wte.weight"]
    for i in range(cfg.num_layers):
        h = p[f"h_{i}"]
        pre = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            sd[f"{pre}.{ln}.weight"] = a(h[ln]["scale"])
            sd[f"{pre}.{ln}.bias"] = a(h[ln]["bias"])
        attn, mlp = h["attn"], h["mlp"]
        if cfg.family == "gpt_neo":
            for n in ("q_proj", "k_proj", "v_proj"):
                sd[f"{pre}.attn.attention.{n}.weight"] = a(attn[f"{n}_kernel"]).reshape(D, D).T.copy()
            sd[f"{pre}.attn.attention.out_proj.weight"] = a(attn["out_proj_kernel"]).reshape(D, D).T.copy()
            sd[f"{pre}.attn.attention.out_proj.bias"] = a(attn["out_proj_bias"])
            for n in ("c_fc", "c_proj"):
                sd[f"{pre}.mlp.{n}.weight"] = a(mlp[n]["kernel"]).T.copy()
                sd[f"{pre}.mlp.{n}.bias"] = a(mlp[n]["bias"])
        else:
            sd[f"{pre}.attn.c_attn.weight"] = np.concatenate(
                [a(attn[f"{n}_kernel"]).reshape(D, D) for n in ("q_proj", "k_proj", "v_proj")], axis=1)
            sd[f"{pre}.attn.c_attn.bias"] = np.concatenate(
                [a(attn[f"{n}_bias"]).reshape(D) for n in ("q_proj", "k_proj", "v_proj")])
            sd[f"{pre}.attn.c_proj.weight"] = a(attn["out_proj_kernel"]).reshape(D, D)
            sd[f"{pre}.attn.c_proj.bias"] = a(attn["out_proj_bias"])
            for n in ("c_fc", "c_proj"):
                sd[f"{pre}.mlp.{n}.weight"] = a(mlp[n]["kernel"])
                sd[f"{pre}.mlp.{n}.bias"] = a(mlp[n]["bias"])
    return sd
