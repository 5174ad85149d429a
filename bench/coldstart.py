"""Cold start: `sdgate up` to the first image, and a worker process's start to its first task.

- up, cold: a fresh $SDGATE_HOME, so the worker builds the tiny model on the way up.
- up, model cached: a fresh home holding only the built model (empty image cache, so the
  startup probe is a real render, not a cache hit).
- after each up, the first boot-client image of a new prompt (`python client/boot.py`, as a
  user runs it: interpreter start, connect, miss, PNG written).
- worker: `python -m cluster.cli worker` against a running redis-server; a task is submitted
  the moment the process is spawned, timed until its result arrives (cold and model cached).
- up again in the model-cached home after `down`: the startup probe is then a cache hit.
- up in Ray worker mode (the worker is a Serve task consumer), model cached; --no-ray skips it.

LocalStack.up() returns only after one image went end to end, so its wall time is "up to first
image". The OS page cache is warm in every case (Python, torch and Ray files were read before).

    python -m bench coldstart [--no-ray]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from bench._common import REPO, free_port, load_average, log, new_stack, sdgate_home, short_home
from celery_bridge.config import CeleryConfig
from celery_bridge.tiny_model import TINY_MODEL_DIR
from client.protocol import GenerationRequest
from cluster.local import find_redis_server, port_in_use, wait_until


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray worker-mode stack")


def boot_client_image(port: int, out: Path) -> float:
    """Seconds for `python client/boot.py NEW_PROMPT` to exit with a PNG written."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "client" / "boot.py"),
                             f"coldstart first image {uuid.uuid4().hex[:8]}", "--port", str(port), "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env, cwd="/")
    elapsed = time.monotonic() - started
    if result.returncode != 0 or not result.stdout.strip().endswith(".png"):
        raise RuntimeError(f"boot client failed ({result.returncode}): {result.stderr[-500:]}")
    return elapsed


def up_to_first_image(home: Path, worker_mode: str) -> Dict[str, Any]:
    """One `up` in `home`: wall time, when each step finished, the first boot-client image, `down`."""
    stack = new_stack(home, worker_mode)
    model_cached = (home / "models" / TINY_MODEL_DIR / "model_index.json").exists()
    steps: Dict[str, float] = {}
    with sdgate_home(home):
        started = time.monotonic()

        def step(line: str) -> None:
            steps[line.split(" on ")[0].replace(" ", "_")] = round(time.monotonic() - started, 2)
            log(f"  {line}")

        try:
            stack.up(log=step)
            up_s = time.monotonic() - started
            log(f"{worker_mode} stack up in {up_s:.1f} s (model cached before: {model_cached})")
            first_s = boot_client_image(stack.gateway.socket_port, home / "images")
        finally:
            stack.down(log=lambda line: log(f"  {line}"))
    worker_log = home / "logs" / "worker-0.log"
    loads = re.findall(r"loaded in ([0-9.]+) s", worker_log.read_text(errors="replace")) if worker_log.exists() else []
    return {"worker_mode": worker_mode, "model_cached_before": model_cached, "up_to_first_image_s": round(up_s, 2),
            "steps_done_at_s": steps, "first_boot_client_image_s": round(first_s, 2),
            "worker_pipeline_load_s": float(loads[-1]) if loads else None}


def worker_to_first_task(redis_url: str, home: Path) -> Dict[str, Any]:
    """Spawn `sdgate worker`, submit a task at once, and time until its result comes back."""
    from celery_bridge.producer import GenerationProducer, new_task_id

    # Its listener thread outlives close() by up to a second and would warn when redis stops.
    logging.getLogger("celery_bridge.producer").setLevel(logging.ERROR)

    model_cached = (home / "models" / TINY_MODEL_DIR / "model_index.json").exists()
    producer = GenerationProducer(CeleryConfig(redis_url=redis_url))
    from celery_bridge.models import load_catalogue

    request = load_catalogue().fill(GenerationRequest(f"coldstart worker {uuid.uuid4().hex[:8]}")).normalized()
    task_id = new_task_id(request.cache_key())
    log_path = home / "worker.log"
    env = dict(os.environ, SDGATE_HOME=str(home), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.monotonic()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "worker", "--broker", redis_url],
                                   cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        future = producer.watch(task_id)
        producer.submit(request, task_id)
        result = future.result(timeout=300)
        elapsed = time.monotonic() - started
        if not result.ok:
            raise RuntimeError(f"the worker failed the task: {result.error_message}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: exactly the worker we started
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        producer.close()
    loaded = re.search(r"loaded in ([0-9.]+) s", log_path.read_text(errors="replace"))
    return {"model_cached_before": model_cached, "start_to_first_result_s": round(elapsed, 2),
            "pipeline_load_s": float(loaded.group(1)) if loaded else None, "first_task_pipeline_ms": result.pipeline_ms}


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    load_before = load_average()
    homes = []
    try:
        # 1. `sdgate up` in a fresh home: the worker builds the tiny model.
        cold_home = short_home("sdgb-cold-")
        homes.append(cold_home)
        up_cold = up_to_first_image(cold_home, "celery")
        models = cold_home / "models"

        def home_with_model(prefix: str) -> Path:
            home = short_home(prefix)
            homes.append(home)
            shutil.copytree(models, home / "models")
            return home

        # 2. The same with the model already built (fresh image cache, so the probe renders).
        warm_home = home_with_model("sdgb-warm-")
        up_warm = up_to_first_image(warm_home, "celery")
        # 2b. `up` again in that home: the startup probe's image is now in the cache, so `up`
        # returns without waiting for the worker, and the first user image may wait for it instead.
        up_again = up_to_first_image(warm_home, "celery")
        # 3. A worker process joining a running redis, cold and with the model built.
        redis_dir = Path(tempfile.mkdtemp(prefix="sdgb-redis-"))
        homes.append(redis_dir)
        port = free_port()
        redis_server = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                         str(redis_dir), "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: port_in_use(port), 20, "redis-server")
            url = f"redis://127.0.0.1:{port}/0"
            empty = short_home("sdgb-wk-")
            homes.append(empty)
            worker_cold = worker_to_first_task(url, empty)
            log(f"worker (cold) start to first result: {worker_cold['start_to_first_result_s']} s")
            worker_warm = worker_to_first_task(url, home_with_model("sdgb-wk-"))
            log(f"worker (model cached) start to first result: {worker_warm['start_to_first_result_s']} s")
        finally:
            redis_server.terminate()
            redis_server.wait(10)
        # 4. Ray worker mode, model cached.
        up_ray: Optional[Dict[str, Any]] = None
        if not args.no_ray:
            up_ray = up_to_first_image(home_with_model("sdgb-ray-"), "ray")
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    return {"up_cold": up_cold, "up_model_cached": up_warm, "up_again_same_home": up_again,
            "up_ray_worker_mode_model_cached": up_ray,
            "worker_cold": worker_cold, "worker_model_cached": worker_warm,
            "load_avg_before": load_before, "load_avg_after": load_average()}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench coldstart", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return measure(parser.parse_args(argv))
