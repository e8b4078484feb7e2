"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle"): the document-level transformation used in training and the prompt used to infill.

A document is cut at two character positions drawn uniformly into ``prefix, middle, suffix``
and rearranged with three sentinel tokens so that an ordinary left-to-right model learns to
write the middle after seeing both sides:

* PSM: ``<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|endoftext|>``
* SPM (the paper's "variant 2", as in BigCode's training code): ``<|fim_prefix|> <|fim_suffix|>
  suffix <|fim_middle|> prefix middle <|endoftext|>``; prefix and middle stay contiguous, so a
  PSM prompt and an SPM prompt both end where the middle starts.

Each piece is tokenized on its own (never across a cut), exactly as the prompt is at inference.
Only ``numpy`` is imported: worker processes load this module.
"""

from __future__ import annotations

import numpy as np

from data_processing.tokens import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX


def split_points(n_chars: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two character positions ``0 <= i <= j <= n_chars``, drawn uniformly and sorted."""
    i, j = sorted(int(x) for x in rng.integers(0, n_chars + 1, size=2))
    return i, j


def fim_pieces(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """``(prefix, middle, suffix)`` of ``text`` at uniformly drawn character split points."""
    i, j = split_points(len(text), rng)
    return text[:i], text[i:j], text[j:]


def arrange(prefix: list[int], middle: list[int], suffix: list[int], spm: bool,
            sentinels: tuple[int, int, int]) -> list[int]:
    """The FIM body from the three tokenized pieces and the sentinel ids ``(prefix, suffix,
    middle)``: PSM or SPM order (see the module docstring), without the ``<|endoftext|>``."""
    pre, suf, mid = sentinels
    if spm:
        return [pre, suf, *suffix, mid, *prefix, *middle]
    return [pre, *prefix, suf, *suffix, mid, *middle]


def infill_prompt(prefix: str, suffix: str) -> str:
    """The PSM prompt for infilling between ``prefix`` and ``suffix``: the model writes the
    middle after it and ends it with ``<|endoftext|>``."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"

