"""data_processing/workers.py: ordered results, errors, worker deaths and a close that cannot hang."""
import os
import signal
import threading
import time

import pytest

from data_processing.workers import WorkerDiedError, WorkerProcesses
from tests.helpers import wait_until

HANG = 300  # seconds: a bound against a hang only; spawning workers on a loaded CI box can take long


def _echo_after(value, delay):
    time.sleep(delay)
    if value == "boom":
        raise ValueError("bad task boom")
    return value, os.getpid()


def _exit_if_three(value):
    if value == 3:
        os._exit(3)  # as the kernel's OOM killer would leave it: no exception, no reply
    return value


def _echo_pair(value):
    return _echo_after(value, 0.0)


def _closes_within(pool, seconds):
    t = threading.Thread(target=pool.close, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


@pytest.fixture
def pool():
    p = WorkerProcesses(3, context="spawn")
    yield p
    p.close()


def test_results_in_submission_order_and_errors_reraised(pool):
    delays = [0.3, 0.0, 0.1, 0.0, 0.2, 0.0, 0.05]  # later tasks finish first
    for i, d in enumerate(delays):
        pool.submit(_echo_after, i, d)
    got = [pool.result(timeout=HANG) for _ in delays]
    assert [v for v, _ in got] == list(range(len(delays)))
    assert len({pid for _, pid in got}) == 3  # round-robin over the three workers
    pool.submit(_echo_after, "boom", 0.0)
    pool.submit(_echo_after, "after", 0.0)
    with pytest.raises(ValueError, match="bad task boom"):
        pool.result(timeout=HANG)
    assert pool.result(timeout=HANG)[0] == "after"  # an error does not stop the worker
    with pytest.raises(TimeoutError):
        pool.submit(_echo_after, "slow", 5.0)
        pool.result(timeout=0.1)


def test_discarded_results_are_never_returned(pool):
    for i in range(5):
        pool.submit(_echo_after, f"old{i}", 0.2)
    pool.result(timeout=HANG)
    pool.discard_pending()  # e.g. the loader restored another position
    for i in range(4):
        pool.submit(_echo_after, f"new{i}", 0.0)
    assert [pool.result(timeout=HANG)[0] for _ in range(4)] == ["new0", "new1", "new2", "new3"]


def test_imap_and_starmap_in_order_and_an_abandoned_map_leaves_nothing_behind(pool):
    items = [(i, 0.05 * (i % 3 == 0)) for i in range(10)]
    assert [v for v, _ in pool.starmap(_echo_after, items, window=4)] == list(range(10))
    first = pool.starmap(_echo_after, [(f"a{i}", 0.1) for i in range(6)])
    assert next(first)[0] == "a0"
    first.close()  # abandoned with tasks in flight
    assert [v for v, _ in pool.imap(_echo_pair, ["b0", "b1", "b2"])] == ["b0", "b1", "b2"]


def test_worker_killed_while_idle_is_reported_and_close_returns(pool):
    """The case that deadlocked multiprocessing.Pool.terminate: an idle worker killed."""
    pool.submit(_echo_after, "warm", 0.0)  # worker 0 is up and idle afterwards
    victim = pool.result(timeout=HANG)[1]
    os.kill(victim, signal.SIGKILL)
    dead = next(p for p in pool.processes if p.pid == victim)
    wait_until(lambda: dead.exitcode is not None, HANG, "the killed worker to exit")  # idle and dead, for sure
    with pytest.raises(WorkerDiedError, match=str(victim)):
        for i in range(3):
            pool.submit(_echo_after, i, 0.0)  # task 3 goes to the dead worker 0: its send or its result fails
        for _ in range(3):
            pool.result(timeout=HANG)
    assert _closes_within(pool, HANG)
    assert all(p.exitcode is not None for p in pool.processes)


def test_close_with_tasks_in_flight_stops_every_worker():
    pool = WorkerProcesses(2, context="spawn")
    for i in range(4):
        pool.submit(_echo_after, i, 10 * HANG)  # busy for longer than the close may take: it must stop them
    assert _closes_within(pool, HANG)
    assert all(p.exitcode is not None for p in pool.processes)
    pool.close()  # idempotent


def test_a_worker_dying_in_a_task_is_an_error_in_the_map_and_in_dedup():
    from data_processing.dedup import Workers

    with Workers(2) as workers:
        results = workers.imap(_exit_if_three, range(6))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(RuntimeError, match=r"dedup worker process died .*exit code 3"):
            next(results)
