"""The loop's standard hooks: evaluation on fixed batches, checkpoints, the best checkpoint.

Each is a small object whose ``__call__(loop)`` is registered with ``TrainLoop.add_hook``; the
NaN stop is the loop's own metrics check (``TrainLoop.flush``), which runs before every hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from train import config as C
from train.core import sharding
from train.core.checkpoint import Checkpointer, gather_host_states


def evaluate(compiled, params, val_batches: list[np.ndarray]) -> dict[str, float]:
    """Mean token loss and perplexity over the fixed validation batches."""
    total, tokens = 0.0, 0.0
    for host_batch in val_batches:
        out = compiled.eval_step(params, sharding.global_batch(host_batch, compiled.mesh))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class EvalHook:
    """Evaluates the fixed validation batches, logs the result and hands it to ``on_result``
    (e.g. the best-checkpoint keeper)."""

    def __init__(self, val_batches: list[np.ndarray], *, is_main: bool,
                 on_result: Callable[[Any, dict[str, float]], None] | None = None):
        self.val_batches = val_batches
        self.is_main = is_main
        self.on_result = on_result
        self.last: dict[str, float] = {}

    def __call__(self, loop) -> None:
        self.last = evaluate(loop.compiled, loop.state.params, self.val_batches)
        loop.log({"step": loop.step, **self.last, "tokens": loop.step * loop.tokens_per_step})
        if self.is_main:
            print(f"[eval] step {loop.step}: loss {self.last['eval_loss']:.4f} "
                  f"perplexity {self.last['perplexity']:.2f}", flush=True)
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
