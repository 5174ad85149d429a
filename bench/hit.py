"""Cache hits: sdgate's socket and HTTP paths against the floor (bench/floor_server.py).

20 prompts are rendered once, so every measured request is a hit. For each server: latency at
1 client (sequential requests on one connection), and throughput at 8 and 32 closed-loop
clients, each its own connection and, by default, its own process. The levels are interleaved
(floor, socket, http at 1 client, then at 8, ...) and the whole sweep repeated (--rounds), so a
change in machine load hits all three alike; throughput is the median round's. With the
clients on the same 2 vCPUs, throughput partly measures the clients; `server_cpu_ms_per_req`
(CPU seconds of the serving processes over the window, per request) does not.

    python -m bench hit [--window 4] [--rounds 3] [--clients 1,8,32] [--client-mode process|thread]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from bench import _clients
from bench._common import REPO, ask, free_port, load_average, log, running_stack, summary_ms
from client.protocol import GenerationRequest
from bench.memory import _cmdline, role_of
from cluster.local import LocalStack, _group_tree, port_in_use, wait_until

PROMPTS = [f"bench hit {i}: a lighthouse on a cliff at dusk" for i in range(20)]
TARGETS = ("floor", "socket", "http")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, default=4.0, help="measured seconds per level and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--client-mode", choices=("process", "thread"), default="process")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the median round's throughput counts")


def start_floor(stack: LocalStack) -> "tuple[subprocess.Popen, int]":
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.floor_server", "--db", str(stack.paths.cache_db),
                                "--port", str(port), "--max-bytes", str(stack.gateway.cache_max_bytes)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_until(lambda: process.poll() is None and port_in_use(port), 30, "the floor server")
    return process, port


def cpu_seconds(pids: Dict[str, int]) -> Dict[str, float]:
    """User + system CPU seconds each process has used so far (all its threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    return used


def server_pids(stack: LocalStack) -> Dict[str, Dict[str, int]]:
    """The processes that serve a hit: the gateway replica (socket), plus the Serve proxy (HTTP)."""
    roles: Dict[str, int] = {}
    for pgid in stack.processes.values():
        for pid in _group_tree(pgid):
            roles.setdefault(role_of(_cmdline(pid))[0], pid)
    return {"socket": {"gateway_replica": roles["gateway replica"]},
            "http": {"gateway_replica": roles["gateway replica"], "serve_proxy": roles["serve proxy"]}}


def measure(stack: LocalStack, args: argparse.Namespace) -> Dict[str, Any]:
    levels = [int(n) for n in str(args.clients).split(",")]
    # 1. Render every prompt once; from here on every request is a hit.
    started = time.monotonic()
    for prompt in PROMPTS:
        ask(stack.gateway.socket_port, GenerationRequest(prompt))
    log(f"rendered {len(PROMPTS)} prompts in {time.monotonic() - started:.1f} s")
    floor, floor_port = start_floor(stack)
    ports = {"floor": floor_port, "socket": stack.gateway.socket_port, "http": stack.gateway.http_port}
    pids = dict(server_pids(stack), floor={"floor_server": floor.pid})
    results: Dict[str, Dict[str, Any]] = {target: {} for target in TARGETS}
    runs: Dict[str, List[Dict[str, Any]]] = {}
    load_before = load_average()
    try:
        # 2. Rounds of: each level, each server in turn. A load spike from elsewhere on the
        # machine then spoils one round of all three servers, not one server of all rounds.
        for round_index in range(args.rounds):
            for clients in levels:
                for target in TARGETS:
                    run = _clients.closed_loop("http" if target == "http" else "socket", ports[target], PROMPTS,
                                               clients, args.window, args.warmup, args.client_mode,
                                               probe=lambda: cpu_seconds(pids[target]))
                    runs.setdefault(f"{target}/c{clients}", []).append(run)
                    latency = summary_ms(run["latencies_ms"])
                    log(f"round {round_index} {target:6s} {clients:2d} clients: {run['req_per_s']:8.1f} req/s, "
                        f"p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms, errors {run['error_count']}")
    finally:
        floor.terminate()
        floor.wait(10)
    # 3. Per server and level: the median round's throughput, latencies pooled over the rounds.
    for key, rounds in runs.items():
        target, level = key.split("/")
        latency = summary_ms([ms for run in rounds for ms in run["latencies_ms"]])
        errors = [e for run in rounds for e in run["errors"]]
        results[target][level] = {
            "req_per_s": statistics.median(run["req_per_s"] for run in rounds),
            "req_per_s_rounds": [run["req_per_s"] for run in rounds],
            "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
            # CPU the serving processes spent per request: what the server costs, whatever the clients took.
            "server_cpu_ms_per_req": round(1000 * sum(sum(run["probe_delta"].values()) for run in rounds)
                                           / max(1, sum(run["completed"] for run in rounds)), 4),
            **({"server_cpu_ms_per_req_by_process": {
                name: round(1000 * sum(run["probe_delta"][name] for run in rounds)
                            / max(1, sum(run["completed"] for run in rounds)), 4)
                for name in rounds[0]["probe_delta"]}} if len(rounds[0]["probe_delta"]) > 1 else {}),
            "completed": sum(run["completed"] for run in rounds),
            "errors": sum(run["error_count"] for run in rounds), **({"error_sample": errors[:3]} if errors else {}),
        }
    return {"prompts": len(PROMPTS), "client_mode": args.client_mode, "window_s": args.window,
            "rounds": args.rounds, **results,
            "ratios": _ratios(results, levels), "targets": _targets(results, levels),
            "load_avg_before": load_before, "load_avg_after": load_average()}


def _ratios(results: Dict[str, Dict[str, Any]], levels: List[int]) -> Dict[str, Optional[float]]:
    ratios: Dict[str, Optional[float]] = {}
    for target in ("socket", "http"):
        for clients in levels:
            mine, floor = results[target][f"c{clients}"], results["floor"][f"c{clients}"]
            if clients == 1:
                ratios[f"{target}_p50_vs_floor"] = _div(mine["p50_ms"], floor["p50_ms"])
                ratios[f"{target}_p99_vs_floor"] = _div(mine["p99_ms"], floor["p99_ms"])
            ratios[f"{target}_c{clients}_throughput_vs_floor"] = _div(mine["req_per_s"], floor["req_per_s"])
            ratios[f"{target}_c{clients}_server_cpu_per_req_vs_floor"] = _div(mine["server_cpu_ms_per_req"],
                                                                             floor["server_cpu_ms_per_req"])
    return ratios


def _targets(results: Dict[str, Dict[str, Any]], levels: List[int]) -> Dict[str, Any]:
    ratios = _ratios(results, levels)
    targets: Dict[str, Any] = {}
    if 1 in levels:
        value = ratios["socket_p50_vs_floor"]
        targets["socket_hit_p50_within_2x_floor"] = value is not None and value <= 2.0
    if 32 in levels:
        value = ratios["socket_c32_throughput_vs_floor"]
        targets["socket_hit_c32_throughput_ge_0.5x_floor"] = value is not None and value >= 0.5
    return targets


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench hit", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    with running_stack() as stack:
        return measure(stack, args)
