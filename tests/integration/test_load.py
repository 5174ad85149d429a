"""Load and admission on the real local stack: many clients on cached images, and the bound on
pending misses (new misses are refused with `busy` at once while hits keep being served)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from tests.integration.harness import ask, connect, slow_request, wait_for

pytestmark = pytest.mark.integration
MAX_PENDING_MISSES = 3


@pytest.fixture(scope="module")
def stack(shared_stack):
    return shared_stack.with_gateway(max_pending_misses=MAX_PENDING_MISSES, request_timeout_s=120)


def test_two_hundred_concurrent_clients_on_cached_images(stack):
    prompts = [GenerationRequest(f"popular image {i}", seed=i) for i in range(10)]
    for request in prompts:
        ask(stack, request)
    errors, latencies = [], []

    def client(index: int):
        try:
            with connect(stack, timeout=60) as conn:
                for n in range(5):
                    started = time.perf_counter()
                    protocol.exchange(conn, prompts[(index + n) % len(prompts)], timeout=60)
                    latencies.append(time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - counted
            errors.append(exc)

    with ThreadPoolExecutor(200) as pool:
        list(pool.map(client, range(200)))
    assert errors == [] and len(latencies) == 1000, errors[:3]
    latencies.sort()
    print(f"\n[load] 200 clients x 5 cached requests: 1000 answered, 0 errors, "
          f"p50 {latencies[500] * 1000:.0f} ms, p99 {latencies[990] * 1000:.0f} ms")


def test_pending_misses_over_the_bound_get_busy_at_once_while_hits_continue(stack):
    hit = GenerationRequest("a hit during overload", seed=4)
    ask(stack, hit)
    replies, refusals = [], []

    def miss(index: int):
        request = slow_request(stack, f"overload {index}", seconds=2)
        sent = time.monotonic()
        try:
            replies.append(ask(stack, request, timeout=240))
        except ProtocolError as exc:
            refusals.append((exc.code, time.monotonic() - sent))

    slow_request(stack, "calibrate before the burst", seconds=1)
    threads = [threading.Thread(target=miss, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(refusals) >= 8 - MAX_PENDING_MISSES, 60, "the misses over the bound refused")
    assert ask(stack, hit).statuses[0]["state"] == protocol.STATUS_CACHED, "hits are served during overload"
    for thread in threads:
        thread.join(300)
    assert len(replies) + len(refusals) == 8
    assert len(replies) >= MAX_PENDING_MISSES, "the misses within the bound are rendered"
    assert {code for code, _ in refusals} == {protocol.E_BUSY}
    assert len(refusals) >= 8 - MAX_PENDING_MISSES
    assert all(took < 3 for _, took in refusals), f"busy is answered at once: {refusals}"
