"""serve_app.fair_pool: one tenant's burst of leads does not queue another's behind it."""

from __future__ import annotations

import threading
import time

from serve_app.fair_pool import FairPool


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def test_jobs_are_taken_round_robin_by_tenant_and_in_order_within_one():
    pool = FairPool(1)
    gate, running, order = threading.Event(), threading.Event(), []
    pool.submit("a", lambda: (running.set(), gate.wait()))  # holds the only thread while the backlog builds
    assert running.wait(10)
    for n in range(5):
        pool.submit("a", order.append, f"a{n}")
    pool.submit("b", order.append, "b0")
    pool.submit("b", order.append, "b1")
    pool.submit("c", order.append, "c0")
    gate.set()
    wait_until(lambda: len(order) == 8)
    assert order[:5] == ["a0", "b0", "c0", "a1", "b1"], order
    assert [x for x in order if x.startswith("a")] == [f"a{n}" for n in range(5)]
    pool.shutdown()


def test_a_failing_job_does_not_stop_the_pool():
    pool = FairPool(1)
    ran = threading.Event()
    pool.submit("a", lambda: 1 / 0)
    pool.submit("a", ran.set)
    assert ran.wait(10)
    pool.shutdown()
