"""`python -m bench all`: memory, hit, miss and singleflight on one shared stack, then coldstart.

One stack keeps the whole run under ten minutes on a 2-vCPU machine: memory is measured first
(idle right after `up`, then after its 200 requests), then the hit, miss and single-flight
benchmarks run on the same stack, and a last memory snapshot is taken after all of them.
coldstart starts (and stops) stacks of its own. Each part runs with its default options.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict

from bench import coldstart, hit, memory, miss, singleflight
from bench._common import load_average, log, machine, running_stack

SHARED = (("memory", memory), ("hit", hit), ("miss", miss), ("singleflight", singleflight))


def _defaults(module) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([])


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__.splitlines()[0])
    parser.add_argument("--no-coldstart", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures: Dict[str, Any] = {"machine": machine()}
    with running_stack() as stack:
        figures["stack_up_s"] = round(stack.up_seconds, 1)
        for name, module in SHARED:
            log(f"== {name}")
            figures[name] = module.measure(stack, _defaults(module))
        snapshot = memory.snapshot(stack)
        figures["memory"]["after_all_benchmarks"] = {k: snapshot[k] for k in (
            "total_pss_mib", "total_rss_mib", "by_group_pss_mib")}
    if not args.no_coldstart:
        log("== coldstart")
        figures["coldstart"] = coldstart.measure(_defaults(coldstart))
    figures["targets"] = {f"{name}.{target}": met for name in ("hit", "miss", "singleflight", "memory")
                          for target, met in figures[name].get("targets", {}).items()}
    figures["total_s"] = round(time.monotonic() - started, 1)
    figures["load_avg_end"] = load_average()
    return figures
