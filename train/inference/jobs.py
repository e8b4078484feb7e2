"""What the completion engine passes around: a queued job, its finished completion, the text
of one decoding row (stop strings, streamed pieces), and settling a job's future once."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 4, 16)
TOKEN_BUCKETS = (16, 64, 256)


def bucket(n: int, buckets) -> int:
    """The smallest bucket that holds ``n`` (``n`` itself beyond the largest)."""
    for b in buckets:
        if n <= b:
            return b
    return n



@dataclass
class Job:
    """One completion (one prompt, one of its ``n`` choices) waiting for the worker. ``future``
    resolves to a ``Completion``; ``on_text``, when set, is called from the worker thread with
    each new piece of text as soon as it is final (streaming)."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stops: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # when the worker first had a token of this row (metrics)
    streamed: bool = False  # some text went out already: a rerun would send it twice

    def key(self):
        bucket_n = bucket(self.max_tokens, TOKEN_BUCKETS)
        return (self.temperature, self.top_p, bucket_n, self.seed if self.temperature > 0 else None)


@dataclass
class Completion:
    """A finished choice: its text (cut before a stop string, EOS dropped), why it ended
    (``stop``: EOS or a stop string; ``length``: ``max_tokens``), how many tokens it used and
    those tokens' ids (EOS kept: log probabilities cover it)."""

    text: str
    finish_reason: str
    tokens: int
    ids: list[int] = field(default_factory=list, compare=False)


class RowText:
    """The text of one generated row as its tokens arrive, and how much of it is final.

    ``feed`` returns the text that became final since the previous call. Until the row ends, it
    holds back replacement characters at the end (an incomplete UTF-8 character of byte-level
    BPE, completed by the next token) and any tail that could be the start of a stop string; so
    everything handed out is a prefix of the final text. A stop string ends the row as soon as
    no earlier-starting stop string could still complete: the same cut as generating to
    ``max_tokens`` and cutting the text before the first stop string.
    """

    def __init__(self, tok, stops: list[str], eos: int | None):
        self.tok, self.stops, self.eos = tok, [s for s in stops if s], eos
        self.ids: list[int] = []
        self.sent = ""
        self.result: Completion | None = None  # set once the row has ended

    def _text(self, ids: list[int], final: bool) -> str:
        from train.inference.decoding import decode_text

        text = decode_text(self.tok, ids, self.eos)
        return text if final else text.rstrip("\ufffd")

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the earliest stop string in ``text``, or None."""
        hits = [(i, i + len(s)) for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _open_start(self, text: str) -> int:
        """Where the earliest tail of ``text`` that a stop string could still complete begins
        (``len(text)`` when there is none)."""
        for i in range(max(0, len(text) - max((len(s) for s in self.stops), default=0)), len(text)):
            if any(s.startswith(text[i:]) for s in self.stops):
                return i
        return len(text)

    def feed(self, new_ids: list[int], ended: bool) -> str:
        """Add the row's new ids (``ended``: the decoder finished the row: EOS or ``max_tokens``);
        the newly final text. When the row ends (here or at a stop string) ``result`` is set."""
        if self.result is not None:
            return ""
        self.ids.extend(new_ids)
        text = self._text(self.ids, ended)
        stop = self._first_stop(text)
        if stop is not None and (ended or self._open_start(text) >= stop[0]):
            final = text[: stop[0]]
            # The fewest tokens whose text already holds the stop string: what the row used.
            lo, hi = 1, len(self.ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if len(self._text(self.ids[:mid], False)) >= stop[1]:
                    hi = mid
                else:
                    lo = mid + 1
            self.result = Completion(final, "stop", lo, self.ids[:lo])
        elif ended:
            final = text
            hit_eos = self.eos is not None and self.eos in self.ids
            self.result = Completion(final, "stop" if hit_eos else "length", len(self.ids), list(self.ids))
        else:
            final = text[: min(self._open_start(text), stop[0] if stop else len(text))]
        if not final.startswith(self.sent):  # cannot happen: byte-level BPE decodes prefix-consistently
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of {final!r}")
        delta, self.sent = final[len(self.sent):], final
        return delta


def settle(future: concurrent.futures.Future, result=None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless its request already gave up on it (timeout, 429)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
