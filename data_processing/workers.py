"""Worker processes for the loader, dedup and the token cache build: tasks go round-robin,
results come back in submission order.

Why not ``multiprocessing.Pool``: its workers share one task pipe guarded by a lock that an idle
worker holds while it waits for work, so a worker killed while idle (out of memory, an operator)
leaves the lock held and ``Pool.terminate`` blocks on it for good; ``terminate`` can also block
while its task thread is stuck mid-write of a large chunk (a CI run stalled 15 minutes there); and
the pool silently replaces a dead worker, losing its task. Here every worker has a pipe of its
own: a death is end-of-file on that pipe, reported at once, and closing kills processes without
taking any shared lock. (``concurrent.futures.ProcessPoolExecutor`` reports deaths too, but was
measured ~40% slower on the loader benchmark.)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


class WorkerDiedError(RuntimeError):
    """A worker process exited with tasks outstanding (killed for memory?)."""


def _serve(conn, initializer: Callable | None, initargs: tuple) -> None:
    """Worker main: run each task ``(id, fn, args)`` read from ``conn``, send ``(id, ok, value)`` back."""
    if initializer is not None:
        initializer(*initargs)
    tasks: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        # A thread that always drains the pipe: the parent may send the next task while this
        # worker is still sending the previous result, so neither side's write can block the other.
        try:
            while True:
                tasks.put(conn.recv())
        except (EOFError, OSError):
            tasks.put(None)  # the parent closed its end

    threading.Thread(target=read, daemon=True).start()
    while (task := tasks.get()) is not None:
        task_id, fn, args = task
        try:
            reply = (task_id, True, fn(*args))
        except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
            reply = (task_id, False, e)
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        except Exception as e:  # noqa: BLE001 - an unpicklable result or error
            conn.send((task_id, False, RuntimeError(f"worker could not send its result: {e!r}")))


class WorkerProcesses:
    """``n`` processes; ``submit(fn, *args)`` tasks, then ``result()`` them in the same order.

    ``fn`` must be picklable (a module-level function). Not thread-safe: one thread submits and
    collects (e.g. the loader's producer thread). ``context``: ``spawn`` whenever the parent runs
    threads (JAX, torch), which ``fork`` would break.
    """

    def __init__(self, n: int, initializer: Callable | None = None, initargs: tuple = (), context: str = "spawn"):
        if n < 1:
            raise ValueError(f"need at least one worker, got {n}")
        ctx = multiprocessing.get_context(context)
        self._workers = []
        for _ in range(n):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, args=(child, initializer, initargs), daemon=True)
            proc.start()
            child.close()  # only the worker keeps its end: its death is then EOF here
            self._workers.append((proc, parent))
        self._submitted = 0  # ids of submitted tasks: 0, 1, ...; task i goes to worker i % n
        self._collected = 0  # id of the next result to return
        self._closed = False

    @property
    def processes(self) -> list:
        return [proc for proc, _ in self._workers]

    def submit(self, fn: Callable, *args: Any) -> None:
        """Send ``fn(*args)`` to the next worker in turn (pickling errors are raised here)."""
        _, conn = self._workers[self._submitted % len(self._workers)]
        # A dead worker is reported by ``result`` when this task's turn comes, after the results
        # it sent before dying: every caller then sees the same order of results and error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send((self._submitted, fn, args))
        self._submitted += 1

    def result(self, timeout: float | None = None) -> Any:
        """The result of the oldest task not yet collected; ``TimeoutError`` if it is not ready
        within ``timeout`` seconds, ``WorkerDiedError`` if its worker is gone, the task's own
        exception if it raised."""
        if self._collected >= self._submitted:
            raise RuntimeError("no task outstanding")
        proc, conn = self._workers[self._collected % len(self._workers)]
        while True:
            try:
                ready = conn.poll(timeout)
                if ready:
                    task_id, ok, value = conn.recv()
            except (EOFError, OSError) as e:
                proc.join(timeout=1.0)
                raise WorkerDiedError(f"worker process {proc.pid} died (exit code {proc.exitcode})") from e
            if not ready:
                raise TimeoutError(f"no result within {timeout} s")
            if task_id < self._collected:
                continue  # a result abandoned by discard_pending
            self._collected += 1
            if not ok:
                raise value
            return value

    def imap(self, fn: Callable, items, window: int | None = None) -> Iterator:
        """Ordered ``map(fn, items)`` with at most ``window`` (default 2 per worker) tasks in
        flight, so a slow ``fn`` never makes ``items`` be read ahead into memory."""
        return self._ordered(((fn, (item,)) for item in items), window)

    def starmap(self, fn: Callable, items, window: int | None = None) -> Iterator:
        """Ordered ``fn(*args)`` for each ``args`` of ``items``, windowed like ``imap``."""
        return self._ordered(((fn, tuple(args)) for args in items), window)

    def _ordered(self, tasks, window: int | None) -> Iterator:
        window = window or 2 * len(self._workers)
        pending = 0
        try:
            for fn, args in tasks:
                self.submit(fn, *args)
                pending += 1
                if pending >= window:
                    yield self.result()
                    pending -= 1
            for _ in range(pending):
                yield self.result()
        finally:
            # Left early (an error, a break): later calls must not receive these results.
            self.discard_pending()

    def discard_pending(self) -> None:
        """Abandon every task submitted and not collected: their results are dropped as they come."""
        self._collected = self._submitted

    def close(self) -> None:
        """Stop every worker (terminate, then kill what is left) and wait for them; idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc, _ in self._workers:
            if proc.exitcode is None:
                proc.terminate()
        for proc, conn in self._workers:
            proc.join(timeout=5.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            conn.close()
