"""`python -m bench NAME [options]`: run one benchmark (or `all`) and print one JSON object.

Each benchmark starts what it needs on free ports in a throwaway $SDGATE_HOME, measures against
its baseline in the same run, and stops everything it started. Progress goes to stderr.

    python -m bench hit | miss | subscribe | singleflight | coldstart | memory | worker_path | gpu [--smoke] | progress | throughput | scale | fairness | img2img | continuous | lora | demo | all
    python -m bench NAME --help
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

BENCHMARKS = ("hit", "miss", "subscribe", "singleflight", "coldstart", "memory", "worker_path", "gpu", "progress", "throughput", "scale",
              "fairness", "img2img", "continuous", "lora", "demo")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS + ("all",):
        print(__doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    if name != "demo":  # every other bench measures the service with the fast random model, as before
        os.environ.setdefault("SDGATE_MODELS_FILE", str(Path(__file__).resolve().parents[1] / "configs" / "models-tiny.yaml"))
    module = importlib.import_module("bench.suite" if name == "all" else f"bench.{name}")
    figures = module.main(rest)
    if "machine" not in figures:
        from bench._common import machine

        figures = {"machine": machine(), **figures}
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
