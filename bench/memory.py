"""Memory of the whole local stack: PSS of every process `sdgate up` started, and their children.

PSS (proportional set size, /proc/PID/smaps_rollup) splits shared pages among the processes
that map them, so the sum over the stack is what the stack costs the machine. Measured idle
after `up`, then after 200 requests: 100 new prompts and 100 repeats, every fifth over HTTP.
The processes are those of the process groups LocalStack recorded plus all their descendants
(cluster.local._group_tree: Ray starts its workers in sessions of their own).

    python -m bench memory [--requests 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
import uuid
from collections import defaultdict
from typing import Any, Dict, List

from bench._common import ask, load_average, log, running_stack, summary_ms
from client.protocol import GenerationRequest
from cluster.local import LocalStack, _group_tree

TARGET_MIB = 2.5e9 / 2**20  # 2.5 GB = 2384 MiB (the stricter reading of the target)
# First match wins: (substring of the command line, role, group in the summary).
ROLES = (
    ("redis-server", "redis", "redis"),
    ("ray::ServeReplica:gateway", "gateway replica", "gateway replica"),
    ("ray::ServeReplica:workers", "worker (Ray task consumer)", "worker"),
    ("cluster.cli worker", "worker (sdgate worker)", "worker"),
    ("ray::ServeController", "serve controller", "serve controller + proxy"),
    ("ray::ProxyActor", "serve proxy", "serve controller + proxy"),
    ("gcs_server", "ray gcs_server", "ray core"),
    ("raylet", "ray raylet", "ray core"),
    ("ray::DashboardAgent", "ray dashboard agent", "ray dashboard"),
    ("dashboard/agent.py", "ray dashboard agent", "ray dashboard"),
    ("ray-dashboard-", "ray dashboard module process", "ray dashboard"),
    ("multiprocessing.forkserver", "ray dashboard forkserver", "ray dashboard"),
    ("multiprocessing.resource_tracker", "ray dashboard resource tracker", "ray dashboard"),
    ("dashboard/dashboard.py", "ray dashboard", "ray dashboard"),
    ("ray::RuntimeEnvAgent", "ray runtime-env agent", "ray core"),
    ("runtime_env/agent", "ray runtime-env agent", "ray core"),
    ("ray.util.client.server", "ray client server", "ray core"),
    ("log_monitor.py", "ray log monitor", "ray core"),
    ("monitor.py", "ray autoscaler monitor", "ray core"),
    ("ray::IDLE", "ray idle worker", "ray core"),
    ("bin/ray start", "ray start --block (cli)", "ray core"),
    ("ray::", "ray other", "ray core"),
)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _rollup_kib(pid: int) -> Dict[str, int]:
    """Pss, Rss and private (USS) in KiB from smaps_rollup; empty if the process is gone."""
    values: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    values[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {}
    return {"pss": values.get("Pss", 0), "rss": values.get("Rss", 0),
            "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)}


def role_of(cmdline: str) -> "tuple[str, str]":
    for needle, role, group in ROLES:
        if needle in cmdline:
            return role, group
    return "other", "other"


def snapshot(stack: LocalStack) -> Dict[str, Any]:
    """PSS of every process of the stack, per process, per role and per group (MiB)."""
    processes: List[Dict[str, Any]] = []
    for name, pgid in stack.processes.items():
        for pid in sorted(_group_tree(pgid)):
            sizes = _rollup_kib(pid)
            if not sizes:
                continue
            cmdline = _cmdline(pid)
            role, group = role_of(cmdline)
            processes.append({"pid": pid, "started_as": name, "role": role, "group": group,
                              "pss_mib": round(sizes["pss"] / 1024, 1), "rss_mib": round(sizes["rss"] / 1024, 1),
                              "uss_mib": round(sizes["uss"] / 1024, 1), "cmd": cmdline[:90]})
    by_group: Dict[str, float] = defaultdict(float)
    by_role: Dict[str, float] = defaultdict(float)
    for process in processes:
        by_group[process["group"]] += process["pss_mib"]
        by_role[process["role"]] += process["pss_mib"]
    total = sum(process["pss_mib"] for process in processes)
    return {"total_pss_mib": round(total, 1), "total_rss_mib": round(sum(p["rss_mib"] for p in processes), 1),
            "processes_count": len(processes),
            "by_group_pss_mib": {k: round(v, 1) for k, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "by_role_pss_mib": {k: round(v, 1) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
            "processes": sorted(processes, key=lambda p: -p["pss_mib"])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200, help="half new prompts, half repeats")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait before each snapshot")
    parser.add_argument("--processes", action="store_true", help="list every process in the figures")


def _http_request(port: int, prompt: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/images/generations", body=json.dumps({"prompt": prompt}).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
    finally:
        conn.close()


def drive(stack: LocalStack, requests: int) -> Dict[str, Any]:
    """`requests` requests: every even one a new prompt (miss), every odd one a repeat (hit)."""
    tag = uuid.uuid4().hex[:8]
    seen: List[str] = []
    times: Dict[str, List[float]] = defaultdict(list)
    for i in range(requests):
        if i % 2 == 0 or not seen:
            prompt = f"bench memory {tag} {i}: a harbour in the fog"
            seen.append(prompt)
            kind = "miss"
        else:
            prompt = seen[(i * 7) % len(seen)]
            kind = "hit"
        started = time.monotonic()
        if i % 5 == 4:
            _http_request(stack.gateway.http_port, prompt)
            kind += "_http"
        else:
            ask(stack.gateway.socket_port, GenerationRequest(prompt))
            kind += "_socket"
        times[kind].append((time.monotonic() - started) * 1000)
    return {kind: {"count": len(ms), "p50_ms": summary_ms(ms)["p50"]} for kind, ms in sorted(times.items())}


def measure(stack: LocalStack, args: argparse.Namespace) -> Dict[str, Any]:
    time.sleep(args.settle)
    idle = snapshot(stack)
    log(f"idle after up: {idle['total_pss_mib']} MiB PSS over {idle['processes_count']} processes")
    started = time.monotonic()
    counts = drive(stack, args.requests)
    log(f"{args.requests} requests in {time.monotonic() - started:.1f} s")
    time.sleep(args.settle)
    loaded = snapshot(stack)
    log(f"after {args.requests} requests: {loaded['total_pss_mib']} MiB PSS")
    if not args.processes:
        for figures in (idle, loaded):
            figures["processes"] = [{k: p[k] for k in ("role", "pid", "pss_mib")} for p in figures["processes"]]
    return {"idle_after_up": idle, f"after_{args.requests}_requests": loaded, "requests": counts,
            "target_mib": round(TARGET_MIB, 1),
            "targets": {"pss_lt_2.5GB_idle": idle["total_pss_mib"] < TARGET_MIB,
                        "pss_lt_2.5GB_after_requests": loaded["total_pss_mib"] < TARGET_MIB},
            "load_avg": load_average()}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    with running_stack() as stack:
        return measure(stack, args)
