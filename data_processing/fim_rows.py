"""Fill-in-the-middle on assembled rows, the way BigCode's Megatron-LM applies it (``permute``
in ``megatron/data/gpt_dataset.py`` with ``fim_split_sample`` = ``<|endoftext|>``): the rows of
the global order are cut from the packed token stream first, then each row is split at its
``<|endoftext|>`` tokens into segments and each segment is drawn for FIM on its own.

A drawn segment is decoded to text, cut at two uniformly drawn character positions
(``data_processing.fim.fim_pieces``), each piece tokenized on its own and laid out as
``DocumentEncoder.encode`` does (PSM or SPM, ``data_processing.fim.arrange``). EOS and padding
tokens stay where they are; a segment's leading control code stays in front, outside the
rearrangement. The row keeps its ``T`` tokens:

* longer: the difference is cut from the end of the suffix piece; when the suffix has no more
  tokens than that, the segment stays unchanged (as Megatron does);
* shorter: the row is padded with ``PAD_ID`` (-1) at its end, as windows packing pads, and the
  loss ignores -1 labels (``train.core.step.split_batch``). Megatron pads inside the suffix;
  a -1 there would be an input (embedded as id 0) that every later token of the row attends
  to, while at the row's end no real token sees it.

The draws of a segment come from a generator keyed by ``(seed, epoch, global row, segment
number, FIM_ROW_KEY)``, so a row's result depends on nothing but its place in the global
sequence: the same for any process count and after a resume. Only ``numpy`` is imported; the
tokenizer (a ``tokenizers.Tokenizer``) is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_processing.fim import arrange, fim_pieces
from data_processing.tokens import PAD_ID

__all__ = ["FIM_ROW_KEY", "RowFim", "fim_rows", "segments"]

FIM_ROW_KEY = 0x66696D  # "fim": keeps these draws apart from other generators keyed by the same numbers


@dataclass(frozen=True)
class RowFim:
    """The fixed inputs of FIM on rows: the tokenizer, the rates and seed, the special ids."""

    tokenizer: Any  # tokenizers.Tokenizer: decodes a segment, encodes its pieces
    rate: float  # fraction of segments rearranged (data.fim_rate)
    spm_rate: float  # of those, the fraction in SPM order (data.fim_spm_rate)
    seed: int
    eos_id: int
    sentinels: tuple[int, int, int]  # ids of <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>
    heads: frozenset[int] = frozenset()  # control-code ids: a segment's leading one stays in front


def segments(row_T: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each non-empty run of tokens between EOS and padding tokens."""
    body = np.concatenate([[False], (row_T != eos_id) & (row_T >= 0), [False]]).astype(np.int8)
    edges = np.diff(body)
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _draw(row_T: np.ndarray, key: list[int], fim: RowFim, texts: list[str]) -> list[tuple[int, int, int, bool]]:
    """The segments of one row drawn for FIM, as ``(start of the body, end, first piece in
    texts, spm)``; their three text pieces are appended to ``texts``."""
    drawn = []
    for s, (lo, hi) in enumerate(segments(row_T, fim.eos_id)):
        rng = np.random.default_rng([*key, s, FIM_ROW_KEY])
        if rng.random() >= fim.rate:
            continue
        lo += int(row_T[lo]) in fim.heads  # the control code stays in front
        if lo == hi:
            continue
        text = fim.tokenizer.decode(row_T[lo:hi].tolist(), skip_special_tokens=False)
        pieces = fim_pieces(text, rng)
        drawn.append((lo, hi, len(texts), bool(rng.random() < fim.spm_rate)))
        texts.extend(pieces)
    return drawn


def _fit(prefix: list[int], middle: list[int], suffix: list[int], n: int) -> list[int] | None:
    """The suffix cut so that the FIM body (3 sentinels more) is at most ``n`` tokens; None
    when the suffix cannot absorb the excess (Megatron then keeps the segment unchanged)."""
    excess = len(prefix) + len(middle) + len(suffix) + 3 - n
    if excess <= 0:
        return suffix
    return suffix[: len(suffix) - excess] if len(suffix) > excess else None


def fim_rows(rows_BT: np.ndarray, epochs_B: np.ndarray, global_rows_B: np.ndarray, fim: RowFim) -> np.ndarray:
    """``rows_BT`` (int32 ``[B, T]``) with FIM applied per segment (see the module docstring);
    row ``b`` draws with the key ``(fim.seed, epochs_B[b], global_rows_B[b])``. A new array;
    every row keeps ``T`` tokens, padded with -1 at its end where segments got shorter."""
    texts: list[str] = []
    plans = [_draw(row_T, [fim.seed, int(e), int(g)], fim, texts)
             for row_T, e, g in zip(rows_BT, epochs_B, global_rows_B, strict=True)]
    if not texts:
        return rows_BT.copy()
    encode = getattr(fim.tokenizer, "encode_batch_fast", fim.tokenizer.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    out_BT = np.full_like(rows_BT, PAD_ID)
    for b, (row_T, drawn) in enumerate(zip(rows_BT, plans, strict=True)):
        parts, at = [], 0
        for lo, hi, first, spm in drawn:
            prefix, middle, suffix = ids[first : first + 3]
            suffix = _fit(prefix, middle, suffix, hi - lo)
            if suffix is not None:
                parts += [row_T[at:lo], np.asarray(arrange(prefix, middle, suffix, spm, fim.sentinels), row_T.dtype)]
                at = hi
        parts.append(row_T[at:])
        row = np.concatenate(parts)
        out_BT[b, : len(row)] = row
    return out_BT
