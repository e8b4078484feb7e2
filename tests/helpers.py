"""Small shared builders for tests (tiny configs, tiny Hugging Face models)."""

from __future__ import annotations

from train import config as C

TINY_OVERRIDES = [
    "model.vocab_size=300", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.window_size=8", "model.max_position_embeddings=64", "data.block_size=32",
    "train.batch_size=8", "model.compute_dtype=float32", "schedule.warmup_steps=0",
]


def tiny_config(*overrides: str) -> C.Config:
    """configs/tiny.yaml shrunk further, fp32, with extra ``--set`` style overrides."""
    return C.load("configs/tiny.yaml", TINY_OVERRIDES + list(overrides))


def tiny_hf_gpt_neo(vocab_size: int = 300, seed: int = 0):
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4, window_size=8,
        attention_types=[[["global", "local"], 2]], max_position_embeddings=64,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )
    return GPTNeoForCausalLM(cfg).eval()


def tiny_hf_gpt2(vocab_size: int = 300, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(cfg).eval()
