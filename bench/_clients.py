"""Load generators: closed-loop clients in separate processes (or threads), stdlib + client only.

Each client owns one connection, warms it up, waits at a barrier with the others, then sends
request after request until the window ends. Only requests that start and finish inside the
measured window count, so throughput is completions per second of window.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import multiprocessing
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from client import protocol
from client.protocol import GenerationRequest

HTTP_PATH = "/v1/images/generations"
WARMUP_REQUESTS = 3


def socket_caller(port: int) -> Callable[[str], int]:
    """One boot-client connection; the call sends a request and returns the PNG's size."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(prompt: str) -> int:
        reply = protocol.exchange(sock, GenerationRequest(prompt), timeout=120)
        return len(reply.png)

    return call


def http_caller(port: int) -> Callable[[str], int]:
    """One keep-alive HTTP/1.1 connection to the Images API; decodes the PNG like a client would."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(prompt: str) -> int:
        conn.request("POST", HTTP_PATH, body=json.dumps({"prompt": prompt}).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return len(base64.b64decode(json.loads(body)["data"][0]["b64_json"]))

    return call


CALLERS = {"socket": socket_caller, "http": http_caller}


def _closed_loop(kind: str, port: int, prompts: Sequence[str], offset: int, barrier, start_at, window_s: float,
                 results) -> None:
    errors: List[str] = []
    latencies: List[float] = []
    try:
        call = CALLERS[kind](port)
        for i in range(WARMUP_REQUESTS):
            call(prompts[(offset + i) % len(prompts)])
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errors.append(f"warm-up: {exc!r}")
        call = None
    barrier.wait()  # everyone connected and warm
    barrier.wait()  # the parent has set the window
    begin = start_at.value
    end = begin + window_s
    i = offset
    while call is not None:
        prompt = prompts[i % len(prompts)]
        i += 1
        t0 = time.monotonic()
        try:
            call(prompt)
        except Exception as exc:  # noqa: BLE001 - counted, and the client stops (its connection is suspect)
            errors.append(repr(exc)[:200])
            break
        t1 = time.monotonic()
        if t0 >= begin and t1 <= end:
            latencies.append((t1 - t0) * 1000)
        if t1 >= end:
            break
    results.put({"latencies_ms": latencies, "errors": errors})


def closed_loop(kind: str, port: int, prompts: Sequence[str], clients: int, window_s: float, warmup_s: float = 1.0,
                mode: str = "process", probe: Optional[Callable[[], Dict[str, float]]] = None) -> Dict[str, Any]:
    """`clients` closed-loop clients for warmup_s + window_s; figures of the window only.

    `probe` (e.g. CPU seconds per server process) is read at the window's start and end; the
    differences come back as `probe_delta`.
    """
    if mode == "process":
        context = multiprocessing.get_context("spawn")
        barrier, start_at, results = context.Barrier(clients + 1), context.Value("d", 0.0), context.Queue()
        workers = [context.Process(target=_closed_loop, args=(kind, port, prompts, k, barrier, start_at, window_s,
                                                              results), daemon=True) for k in range(clients)]
    else:
        barrier, results = threading.Barrier(clients + 1), queue.SimpleQueue()
        start_at = type("Start", (), {"value": 0.0})()
        workers = [threading.Thread(target=_closed_loop, args=(kind, port, prompts, k, barrier, start_at, window_s,
                                                               results), daemon=True) for k in range(clients)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=300)  # every client is connected and warm
    start_at.value = time.monotonic() + warmup_s
    barrier.wait(timeout=60)  # go: warm up together, then the window
    probe_delta = None
    if probe is not None:
        time.sleep(max(0.0, start_at.value - time.monotonic()))
        first = probe()
        time.sleep(max(0.0, start_at.value + window_s - time.monotonic()))
        probe_delta = {name: value - first[name] for name, value in probe().items()}
    collected = [results.get(timeout=window_s + warmup_s + 180) for _ in workers]
    for worker in workers:
        worker.join(30)
    latencies = [ms for one in collected for ms in one["latencies_ms"]]
    errors = [e for one in collected for e in one["errors"]]
    return {"clients": clients, "window_s": window_s, "completed": len(latencies),
            "req_per_s": round(len(latencies) / window_s, 1), "latencies_ms": latencies, "errors": errors[:5],
            "error_count": len(errors), "probe_delta": probe_delta}


def _one_shot(port: int, request: Dict[str, Any], barrier, results) -> None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        barrier.wait()
        sent = time.monotonic()
        reply = protocol.exchange(sock, GenerationRequest(**request), timeout=300)
        done = time.monotonic()
        results.put({"sent": sent, "done": done, "png_sha": hashlib.sha256(reply.png).hexdigest(),
                     "pipeline_ms": float(reply.meta.get("pipeline_ms", 0.0)),
                     "states": [s.get("state") for s in reply.statuses]})
        sock.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put({"error": repr(exc)[:300]})


def simultaneous(port: int, request: GenerationRequest, clients: int) -> List[Dict[str, Any]]:
    """`clients` processes, each connected first, send the same request at one barrier release."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(clients), context.Queue()
    workers = [context.Process(target=_one_shot, args=(port, request.to_dict(), barrier, results), daemon=True)
               for _ in range(clients)]
    for worker in workers:
        worker.start()
    collected = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(30)
    return collected
