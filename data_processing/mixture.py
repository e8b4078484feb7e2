"""Language mixture weights for the global data order (``data.mixture``).

``{python: 0.5, javascript: 0.2}`` draws half of the training rows from Python and a fifth from
JavaScript; the unnamed languages share the rest (``1 -`` the named sum) by their natural share,
or ``other: W`` gives them weight ``W`` together (``other: 0.0`` drops them). Weights are then
normalised, so with ``other`` they are relative.

The weights are quantised to ``PERIOD`` slots (largest remainder) and laid out in one fixed
period by smooth weighted round robin, so the language of global row ``i`` is
``schedule[i % PERIOD]`` and the number of rows of a language before ``i`` is a closed form
(full periods times its slots, plus a prefix count in the last period): no replay, no state
beyond the global row count. Pure numpy; no JAX, nothing of ``train``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["OTHER", "PERIOD", "MixtureSchedule", "language_key", "resolve_weights", "weights_problem"]

OTHER = "other"  # the key for every language the mixture does not name
PERIOD = 4096  # rows per period of the schedule: weights are quantised to 1/4096
UNKNOWN = "unknown"  # the name of documents without meta.language


def language_key(language: str | None) -> str:
    """A corpus language as a mixture key: lower case (``Python`` -> ``python``), ``unknown`` for None."""
    return language.lower() if language else UNKNOWN


def weights_problem(mixture: Mapping) -> str | None:
    """Why ``mixture`` (as read from the config) is unusable, in words completing "expected ...
    got", or None when it is fine. The corpus is not needed (see ``resolve_weights``)."""
    keys = [str(k).lower() for k in mixture]
    if any(not k for k in keys) or len(set(keys)) != len(keys):
        return "language names that are non-empty and distinct ignoring case"
    values = list(mixture.values())
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
           for v in values):
        return "finite weights >= 0"
    named = sum(v for k, v in zip(keys, values, strict=True) if k != OTHER)
    if OTHER in keys and sum(values) <= 0:
        return "weights with a positive sum"
    if OTHER not in keys and named > 1 + 1e-9:
        return "named weights summing to at most 1 (the rest is shared by natural share), or an explicit other:"
    return None


def resolve_weights(mixture: Mapping[str, float], rows: Mapping[str, int]) -> dict[str, float]:
    """The normalised weight of every corpus language (``rows``: full rows per language key).

    Raises a one-line ``ValueError`` naming ``data.mixture`` for a language the corpus does not
    have, a weighted language without one full row, or weights that leave nothing to draw."""
    mixture = {str(k).lower(): float(v) for k, v in mixture.items()}
    named = {k: v for k, v in mixture.items() if k != OTHER}
    missing = sorted(set(named) - set(rows))
    if missing:
        raise ValueError(f"data.mixture: language {missing[0]!r} is not in the training corpus "
                         f"(it has: {', '.join(sorted(rows))})")
    rest = mixture.get(OTHER, max(0.0, 1.0 - sum(named.values())))
    unnamed = [k for k in sorted(rows) if k not in named]
    natural = sum(rows[k] for k in unnamed)
    weights = {k: named.get(k, rest * rows[k] / natural if natural else 0.0) for k in sorted(rows)}
    empty = sorted(k for k, w in weights.items() if w > 0 and rows[k] == 0)
    if empty:
        raise ValueError(f"data.mixture: language {empty[0]!r} has weight {weights[empty[0]]:g} but not one full "
                         "row of block_size + 1 tokens in the training corpus")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("data.mixture: the weights give no language of the training corpus a positive share")
    return {k: w / total for k, w in weights.items()}


def allocate(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """Slots per language (int64, summing to ``period``) by largest remainder; ties to the lower index."""
    exact = np.asarray(weights, np.float64) * period
    slots = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(exact)), -(exact - slots)))
    slots[order[: period - int(slots.sum())]] += 1
    return slots


def smooth_schedule(slots: np.ndarray) -> np.ndarray:
    """One period's languages (int16 ``[sum(slots)]``) by smooth weighted round robin: each slot
    goes to the language furthest behind its share, so any window of the period holds each
    language's share to within about one row."""
    period = int(slots.sum())
    credit = np.zeros(len(slots), np.int64)
    out = np.empty(period, np.int16)
    for j in range(period):
        credit += slots
        pick = int(np.argmax(credit))  # the first maximum: ties to the lower index
        credit[pick] -= period
        out[j] = pick
    return out


class MixtureSchedule:
    """The language of every global row and its index within that language's sequence.

    ``languages``: the language keys (sorted), ``slots``: rows per period of each. Row ``i`` is
    language ``schedule[i % P]``, the ``rank[i % P] + (i // P) * slots[L]``-th row drawn from it."""

    def __init__(self, languages: list[str], weights: Mapping[str, float], period: int = PERIOD):
        self.languages = list(languages)
        self.period = period
        self.slots = allocate([weights.get(k, 0.0) for k in self.languages], period)
        self.schedule = smooth_schedule(self.slots)
        self.rank = np.empty(period, np.int64)
        for lang in range(len(self.languages)):
            at = np.flatnonzero(self.schedule == lang)
            self.rank[at] = np.arange(len(at))

    def at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(language index, row index within the language)`` of global rows ``positions`` (int64)."""
        q = np.asarray(positions, np.int64)
        periods, j = np.divmod(q, self.period)
        lang = self.schedule[j].astype(np.int64)
        return lang, periods * self.slots[lang] + self.rank[j]

    def counts(self, n: int) -> np.ndarray:
        """Rows of each language (int64 ``[languages]``) among global rows ``0 .. n-1``: closed form."""
        full, part = divmod(int(n), self.period)
        return full * self.slots + np.bincount(self.schedule[:part], minlength=len(self.languages))

    def state(self) -> dict[str, int]:
        """The quantised mixture (slots per period of every drawn language), for the loader state."""
        return {k: int(s) for k, s in zip(self.languages, self.slots, strict=True) if s}
