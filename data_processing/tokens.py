"""The token contract every stage shares: end-of-text, padding, FIM sentinels, control codes, and
reading a tokenizer's file. Everyone imports these from here; nobody spells the strings again.

- Every document is followed by ``EOS_TOKEN`` (training, evaluation, prompts after a document).
- ``PAD_ID`` (-1) marks positions without a label (sliding-window padding); the loss skips them.
- Fill-in-the-middle sentinels and per-language control codes are special tokens a run adds
  (``train/interop/vocab.py``) when its data options need them.
"""

from __future__ import annotations

import os
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
PAD_ID = -1

FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)


class TokenizerFileError(ValueError):
    """A tokenizer folder or file is missing, unreadable, or breaks the contract; names the path."""


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Rows of a model's embedding for ``vocab_size`` tokens: rounded up to a multiple of
    ``multiple`` (128 by default, for matmul tiling); the padding rows are masked everywhere."""
    return -(-vocab_size // multiple) * multiple


def control_token(language: str) -> str:
    """The control-code token of a language: ``<|python|>``, ``<|c++|>``, ..."""
    return f"<|{language.lower()}|>"


def sentinel_ids(tokenizer) -> tuple[int, int, int] | None:
    """Ids of the three FIM sentinels in a ``tokenizers.Tokenizer``, or None if any is missing."""
    ids = [tokenizer.token_to_id(t) for t in FIM_TOKENS]
    return None if any(i is None for i in ids) else (int(ids[0]), int(ids[1]), int(ids[2]))


def tokenizer_file(tokenizer_path: str | os.PathLike) -> str:
    """``tokenizer.json`` inside a tokenizer folder (or the file itself)."""
    path = os.fspath(tokenizer_path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a tokenizer folder or file)")
    return path


def load_tokenizer_file(tokenizer_path: str | os.PathLike):
    """``(tokenizers.Tokenizer, end-of-text id)`` from ``tokenizer.json``; error if it lacks EOS."""
    from tokenizers import Tokenizer

    path = tokenizer_file(tokenizer_path)
    tokenizer = Tokenizer.from_file(path)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{path}: tokenizer has no {EOS_TOKEN!r} token, needed between documents")
    return tokenizer, int(eos_id)


def tokenizer_info(path: str | os.PathLike) -> tuple[int, int]:
    """(vocabulary size incl. added tokens, end-of-text id) of the tokenizer folder at ``path``:
    a ``tokenizer.json``, or a GPT-2 style ``vocab.json`` + ``merges.txt`` folder."""
    folder = Path(path)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eos, size = tok.token_to_id(EOS_TOKEN), tok.get_vocab_size(with_added_tokens=True)
    elif (folder / "vocab.json").exists():
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(folder))
        eos, size = fast.convert_tokens_to_ids(EOS_TOKEN), len(fast)
    else:
        raise TokenizerFileError(f"{path} has no tokenizer.json (train one with python -m tokenizer.train_tokenizer)")
    if eos is None:
        raise TokenizerFileError(f"{path} has no {EOS_TOKEN} token")
    return size, int(eos)
