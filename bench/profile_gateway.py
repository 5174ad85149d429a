"""Where a gateway replica spends its time under load: py-spy on the replica while clients run.

Starts a stack, renders the hit prompts, then runs closed-loop clients against the socket or
HTTP path while `py-spy record` samples the gateway replica (and, with --proxy, the Serve HTTP
proxy). Prints one JSON object: the busiest functions by own time and by inclusive time, per
sampled process; the raw collapsed stacks are kept with --out.

    python -m bench.profile_gateway [--kind socket|http|miss] [--clients 32] [--seconds 10] [--proxy] [--worker]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict

from bench import _clients
from bench._common import ask, load_average, log, running_stack, summary_ms
from bench.hit import PROMPTS
from bench.memory import snapshot
from bench.miss import timed_misses
from client.protocol import GenerationRequest


def summarize(collapsed: Path, top: int) -> Dict[str, Any]:
    """Own and inclusive sample shares per function from py-spy's collapsed ("raw") output."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
                  if " (" in frame else frame for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    share = lambda counter: [{"fn": fn, "pct": round(100 * n / total, 1)} for fn, n in counter.most_common(top)]
    return {"samples": total, "own": share(own), "inclusive": share(inclusive)}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("socket", "http", "miss"), default="socket",
                        help="hits over the socket or HTTP, or sequential misses over the socket")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--proxy", action="store_true", help="also sample the Serve HTTP proxy")
    parser.add_argument("--worker", action="store_true", help="also sample the Celery worker")
    parser.add_argument("--idle", action="store_true", help="include idle (waiting) threads")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="keep the collapsed stacks in this folder")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sdgate-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    figures: Dict[str, Any] = {"kind": args.kind, "clients": args.clients, "seconds": args.seconds}
    with running_stack() as stack:
        for prompt in PROMPTS:
            ask(stack.gateway.socket_port, GenerationRequest(prompt))
        roles = {p["role"]: p["pid"] for p in snapshot(stack)["processes"]}
        targets = {"gateway": roles["gateway replica"]}
        if args.proxy:
            targets["proxy"] = roles["serve proxy"]
        if args.worker:
            targets["worker"] = roles["worker (sdgate worker)"]
        port = stack.gateway.http_port if args.kind == "http" else stack.gateway.socket_port
        load: Dict[str, Any] = {}
        if args.kind == "miss":
            def misses() -> None:
                rows = []
                deadline = time.monotonic() + args.seconds + 3
                while time.monotonic() < deadline:
                    rows += timed_misses(port, 10, 64, 2, f"profile-{len(rows)}-{time.monotonic()}")
                load["req_per_s"] = round(len(rows) / (args.seconds + 3), 1)
                load["overhead_ms_p50"] = summary_ms([r["e2e_ms"] - r["pipeline_ms"] for r in rows])["p50"]
            runner = threading.Thread(target=misses)
        else:
            runner = threading.Thread(target=lambda: load.update(_clients.closed_loop(
                args.kind, port, PROMPTS, args.clients, args.seconds + 2, warmup_s=1.0)))
        runner.start()
        time.sleep(2.0)  # clients spawned, connected and warm
        spies = {name: subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                                         "--rate", str(args.rate), "--format", "raw", "--nonblocking",
                                         "--output", str(out / f"{name}.txt"), *(["--idle"] if args.idle else [])],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name, pid in targets.items()}
        for name, spy in spies.items():
            _, err = spy.communicate(timeout=args.seconds + 60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy on {name} failed: {err[-500:]}")
        runner.join()
        figures.update({k: v for k, v in load.items() if k in ("req_per_s", "overhead_ms_p50")})
        for name in targets:
            figures[name] = summarize(out / f"{name}.txt", args.top)
    figures["collapsed_stacks"] = str(out) if args.out else None
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    figures["load_avg"] = load_average()
    log(f"profiled {', '.join(targets)} under {args.kind} load")
    return figures


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
