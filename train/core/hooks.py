"""The loop's standard hooks: evaluation on fixed batches, checkpoints, the best checkpoint.

Each is a small object whose ``__call__(loop)`` is registered with ``TrainLoop.add_hook``; the
NaN stop is the loop's own metrics check (``TrainLoop.flush``), which runs before every hook.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from train import config as C
from train.core import sharding
from train.core.checkpoint import Checkpointer, gather_host_states


@dataclasses.dataclass
class EvalSet:
    """A fixed held-out set in global batches: this process's rows of each (``local``), the
    global row index of every row of each batch (``index``, -1 = padding) and every row's
    language (``language``). Per-language losses need enough tokens: ``min_language_tokens``."""

    local: list[np.ndarray]
    index: list[np.ndarray]
    language: list[str]
    min_language_tokens: int = 2048


def evaluate(compiled, params, eval_set: EvalSet) -> dict[str, float]:
    """Mean token loss and perplexity over the held-out set, and ``eval_loss/<language>`` for
    each language with at least ``min_language_tokens`` held-out tokens (sums in float64, per
    row, so the figures do not depend on how rows are batched or sharded)."""
    loss_by: dict[str, float] = {}
    tokens_by: dict[str, float] = {}
    for host_batch, index_B in zip(eval_set.local, eval_set.index, strict=True):
        out = compiled.eval_step(params, sharding.global_batch(host_batch, compiled.mesh))
        loss_B = np.asarray(out["loss_sum_B"], np.float64)
        count_B = np.asarray(out["tokens_B"], np.float64)
        for row, loss, count in zip(index_B.tolist(), loss_B.tolist(), count_B.tolist(), strict=True):
            if row >= 0:
                language = eval_set.language[row].lower()
                loss_by[language] = loss_by.get(language, 0.0) + loss
                tokens_by[language] = tokens_by.get(language, 0.0) + count
    tokens = sum(tokens_by.values())
    loss = sum(loss_by.values()) / max(tokens, 1.0)
    out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}
    for language in sorted(loss_by):
        if tokens_by[language] >= eval_set.min_language_tokens:
            out[f"eval_loss/{language}"] = loss_by[language] / tokens_by[language]
    return out


class EvalHook:
    """Evaluates the held-out set, logs the result and hands it to ``on_result`` (e.g. the
    best-checkpoint keeper)."""

    def __init__(self, eval_set: EvalSet, *, is_main: bool,
                 on_result: Callable[[Any, dict[str, float]], None] | None = None):
        self.eval_set = eval_set
        self.is_main = is_main
        self.on_result = on_result
        self.last: dict[str, float] = {}

    def __call__(self, loop) -> None:
        self.last = evaluate(loop.compiled, loop.state.params, self.eval_set)
        loop.log({"step": loop.step, **self.last, "tokens": loop.step * loop.tokens_per_step})
        if self.is_main:
            langs = ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in self.last.items() if k.startswith("eval_loss/"))
            print(f"[eval] step {loop.step}: loss {self.last['eval_loss']:.4f} "
                  f"perplexity {self.last['perplexity']:.2f}" + (f" ({langs})" if langs else ""), flush=True)
        if self.on_result is not None:
            self.on_result(loop, self.last)


class CheckpointHook:
    """Saves the state, every host's data position and ``meta`` every ``save_every`` steps and,
    forced, after the last step when that step is not saved yet."""

    def __init__(self, ckpt: Checkpointer, *, loader_state: Callable[[], Any], meta: Callable[[int], dict],
                 saved_step: int | None):
        self.ckpt = ckpt
        self.loader_state = loader_state
        self.meta = meta
        self.saved_step = saved_step

    def __call__(self, loop) -> None:
        self.save(loop)

    def at_end(self, loop) -> None:
        if loop.step != self.saved_step:
            self.save(loop, force=True)

    def save(self, loop, force: bool = False) -> None:
        host_states = gather_host_states(self.loader_state())
        self.ckpt.save(loop.step, loop.state, host_states, self.meta(loop.step), force=force)
        self.saved_step = loop.step
        loop.last_good_checkpoint = f"step {loop.step} in {self.ckpt.directory}"


class BestCheckpoint:
    """Keeps the one checkpoint with the lowest value of ``metric`` (e.g. eval_loss) in
    ``RUN/checkpoints/best/``, beside the last-N checkpoints; survives resumes."""

    def __init__(self, run_dir: str | Path, metric: str, meta: Callable[[int], dict]):
        self.metric = metric
        self.meta = meta
        self.ckpt = Checkpointer(Path(run_dir) / "checkpoints" / "best", keep=1, async_save=False)
        self.value = math.inf
        if self.ckpt.latest_step() is not None:
            self.value = float(self.ckpt.restore_meta(None).get(metric, math.inf))

    def offer(self, loop, results: dict[str, float]) -> bool:
        """Save ``loop.state`` when ``results[metric]`` beats the best so far; True when it did."""
        if self.metric not in results:
            raise C.ConfigError(f"checkpoint.keep_best: no metric {self.metric!r} (have {', '.join(results)})")
        if not results[self.metric] < self.value:
            return False
        self.value = results[self.metric]
        self.ckpt.save(loop.step, loop.state, {}, {**self.meta(loop.step), **results}, force=True)
        return True

    def close(self) -> None:
        self.ckpt.close()
