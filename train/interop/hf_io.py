"""Read and write Hugging Face model folders (config.json + model.safetensors) without torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from data_processing.atomic import atomic_dir
from train.config import ModelConfig
from train.interop import convert


def load_hf_folder(path: str | os.PathLike, base: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, Flax params) from a local GPT-Neo / GPT-2 folder (safetensors or pytorch_model.bin)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    cfg = convert.model_config_from_hf(json.loads(cfg_file.read_text()), base)
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.numpy import load_file

        sd: dict[str, np.ndarray] = {}
        for f in files:
            sd.update(load_file(str(f)))
    elif (path / "pytorch_model.bin").exists():
        import torch

        sd = {k: v.float().numpy() for k, v in torch.load(path / "pytorch_model.bin", map_location="cpu").items()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    return cfg, convert.hf_to_params(sd, cfg)


def save_hf_folder(out: str | os.PathLike, cfg: ModelConfig, params, *, tokenizer_dir: str | None = None,
                   eos_token_id: int | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (no padding rows) and the tokenizer files
    into ``out`` atomically (a temporary folder renamed into place)."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    out = Path(out)
    with atomic_dir(out) as tmp:
        sd = convert.params_to_hf(params, cfg)
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight")  # transformers re-ties it to wte on load
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_kwargs = convert.hf_config_dict(cfg, eos_token_id)
        hf_cfg = AutoConfig.for_model(hf_kwargs.pop("model_type"), **hf_kwargs)
        hf_cfg.architectures = ["GPTNeoForCausalLM" if cfg.family == "gpt_neo" else "GPT2LMHeadModel"]
        hf_cfg.save_pretrained(tmp)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    return out
