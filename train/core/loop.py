"""The training loop: step the compiled train step over host batches and run hooks.

The loop knows steps, metrics and hooks, nothing else: evaluation, checkpoints, the best
checkpoint and HumanEval are hooks (``add_hook(fn, every=N)``, as levanter's trainer does),
registered by whoever wires the run (``train/run.py``). Metrics stay on the device until a flush
(every ``log_every`` steps and before any hook), which is also where a NaN/Inf loss stops the run:
no hook ever sees, saves or evaluates a state whose loss has not been checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from train.core import sharding


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, bad data, mismatched tokenizer); the message says why."""


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (preemptible TPUs)."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught: leave them alone.
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class Hook:
    """``fn(loop)`` after every ``every``-th step; with ``at_end`` also once after the last step."""

    fn: Callable[[TrainLoop], None]
    every: int
    at_end: bool = False


class TrainLoop:
    """Owns the train state while it steps; hooks read ``loop.state`` / ``loop.step`` and write
    records through ``loop.log``."""

    def __init__(self, compiled, state, batches: Iterator[np.ndarray], *, tokens_per_step: int, log_every: int,
                 log: Callable[[dict[str, Any]], None], rates: Callable[[int], dict[str, Any]],
                 on_metrics: Callable[[int, dict[str, Any]], None] | None = None):
        self.compiled = compiled
        self.state = state
        self.step = int(state.step)
        self.batches = batches
        self.tokens_per_step = tokens_per_step
        self.log_every = log_every
        self.log = log
        self._rates = rates
        self._on_metrics = on_metrics
        self.hooks: list[Hook] = []
        self.history: list[dict[str, Any]] = []
        self.last_good_checkpoint: str | None = None  # set by the checkpoint hook, named in a NaN stop
        self._pending: list[tuple[int, dict]] = []
        self._t0 = time.time()

    def add_hook(self, fn: Callable[[TrainLoop], None], *, every: int, at_end: bool = False) -> None:
        """Run ``fn(loop)`` after every ``every``-th step (``every`` <= 0: never, but ``at_end``)."""
        self.hooks.append(Hook(fn, every, at_end))

    def run(self, end: int, stop: StopSignal | None = None) -> int:
        """Step until ``end`` (or a stop signal), then run the ``at_end`` hooks; returns the step."""
        while self.step < end:
            host_batch = next(self.batches)
            self.state, metrics = self.compiled.train_step(
                self.state, sharding.global_batch(host_batch, self.compiled.mesh))
            self.step += 1
            self._pending.append((self.step, metrics))
            self._after_step()
            if stop is not None and stop.received:
                print(f"[train] {stop.received} received: saving step {self.step} and exiting", flush=True)
                break
        self.flush()
        for hook in self.hooks:
            if hook.at_end:
                hook.fn(self)
        return self.step

    def _after_step(self) -> None:
        if self.step % self.log_every == 0:
            self.flush()
        for hook in self.hooks:
            if hook.every > 0 and self.step % hook.every == 0:
                self.flush()  # a hook never sees a state whose loss is unchecked
                hook.fn(self)

    def flush(self) -> None:
        """Fetch the metrics of the steps since the last flush (one host sync), check, log them."""
        if not self._pending:
            return
        fetched = jax.device_get([m for _, m in self._pending])
        steps = [s for s, _ in self._pending]
        self._pending = []
        losses = [float(m["loss"]) for m in fetched]
        for s, loss in zip(steps, losses, strict=True):
            if not math.isfinite(loss):
                raise TrainingError(f"step {s}: loss is {loss}; stopping. "
                                    f"Last good checkpoint: {self.last_good_checkpoint or 'none'}")
        rates = self._rates(len(steps))
        # One time for the whole flush: every step in it was done by then. A clock read per record
        # would date the first records earlier than the last, as if those steps took no time.
        elapsed_s = round(time.time() - self._t0, 3)
        for s, m in zip(steps, fetched, strict=True):
            record = {"step": s, "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                      "grad_norm": float(m["grad_norm"]), "tokens": s * self.tokens_per_step, **rates,
                      "elapsed_s": elapsed_s}
            self.log(record)
            self.history.append(record)
        if self._on_metrics is not None:
            self._on_metrics(len(steps), self.history[-1])
