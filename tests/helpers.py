"""Small shared builders for tests (tiny configs, tiny Hugging Face models)."""

from __future__ import annotations

from train import config as C

TINY_OVERRIDES = [
    "model.vocab_size=300", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.window_size=8", "model.max_position_embeddings=64", "data.block_size=32",
    "train.batch_size=8", "model.compute_dtype=float32", "schedule.warmup_steps=0",
    "model.loss_chunk_size=0",  # the plain loss, which the chunked-loss tests compare against
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


def byte_level_bpe(texts, vocab_size: int, extra_special: tuple[str, ...] = ()):
    """A GPT-2 style byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` in about a
    second, with ``<|endoftext|>`` and ``extra_special`` as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if extra_special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    return tok


def hf_folder(model, tokenizer_dir, out):
    """Save a tiny Hugging Face ``model`` with the tokenizer files of ``tokenizer_dir`` into ``out``."""
    import shutil

    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def stdlib_texts(limit_bytes: int) -> list[str]:
    """Texts of the standard library's top-level modules, in name order, until ``limit_bytes``."""
    import sysconfig
    from pathlib import Path

    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= limit_bytes:
            break
    return texts


def stdlib_documents(n: int, *, source_bytes: int, lengths: tuple[int, int], header: str = "# doc {i} é 🙂\n",
                     seed: int = 0) -> list[str]:
    """``n`` distinct documents of varied length: a numbered ``header`` (``{i}``) followed by a
    random slice, ``lengths`` = [low, high) characters, of the stdlib text up to ``source_bytes``."""
    import numpy as np

    source = "".join(stdlib_texts(source_bytes))
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(*lengths))
        start = int(rng.integers(0, len(source) - length))
        docs.append(header.format(i=i) + source[start : start + length])
    return docs


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition()`` until it returns a true value, which is returned. ``timeout`` is a
    generous bound against a hang, never the expected duration: a loaded CI box may be many times
    slower than a laptop. Raises ``TimeoutError`` naming ``what``; ``condition`` may raise itself
    to stop the wait early (a server process that died will never become healthy)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def code_record(repo: str, name: str, text: str) -> dict:
    """A shard record of Python ``text`` as ingest writes it (repository, file, language, license, size)."""
    return {"text": text, "meta": {"repo_name": repo, "file_name": name, "language": "Python",
                                   "license": "PSF-2.0", "size": len(text.encode("utf-8"))}}


def near_copy(text: str, every: int = 30) -> str:
    """A near duplicate of ``text``: every ``every``-th line gets a trailing comment (Jaccard well above 0.85)."""
    lines = text.splitlines()
    return "\n".join(line + "  # changed" if i % every == 0 else line for i, line in enumerate(lines)) + "\n"


def write_language_shards(folder, counts: dict[str, int], *, shards: int = 3, lengths: tuple[int, int] = (200, 1200),
                          seed: int = 0) -> list[dict]:
    """Shards under ``folder`` of ``counts[language]`` documents each (stdlib text slices headed
    ``# <language> doc i``), the languages interleaved in a seeded order and split over ``shards``
    files (``s0.jsonl.zst`` ...); returns the records in corpus order."""
    from pathlib import Path

    import numpy as np

    from data_processing.shards import write_shard

    texts = stdlib_documents(sum(counts.values()), source_bytes=150_000, lengths=lengths, header="", seed=seed)
    languages = [language for language, n in counts.items() for _ in range(n)]
    np.random.default_rng(seed).shuffle(languages)
    records = [{"text": f"# {language} doc {i}\n{text}", "meta": {"repo_name": f"r{i}", "language": language}}
               for i, (language, text) in enumerate(zip(languages, texts, strict=True))]
    per = -(-len(records) // shards)
    for s in range(shards):
        write_shard(Path(folder) / f"s{s}.jsonl.zst", records[s * per : (s + 1) * per])
    return records
