"""The benchmarks' own parts: the floor server answers hits exactly as the gateway would, and a
benchmark run through `python -m bench` prints one JSON object of figures."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from bench.floor_server import FloorServer
from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from tests.resolve import key_of
from serve_app.store import SQLiteImageStore
from tests.services import REPO


def test_floor_server_sends_the_stored_png_and_refuses_misses(tmp_path):
    store = SQLiteImageStore(tmp_path / "images.db", max_bytes=1 << 20)
    hit = GenerationRequest("a stored image", seed=1)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    store.put(key_of(hit), png, {"key": key_of(hit)})
    server = FloorServer(0, store)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as conn:
            reply = protocol.exchange(conn, hit, timeout=10)
            assert reply.png == png and reply.meta["key"] == key_of(hit)
            with pytest.raises(ProtocolError) as refused:
                protocol.exchange(conn, GenerationRequest("never stored"), timeout=10)
            assert "not cached" in refused.value.message
            assert protocol.exchange(conn, hit, timeout=10).png == png, "the connection serves on after a miss"
    finally:
        server.shutdown()
        server.server_close()
        store.close()


def test_bench_prints_one_json_object_of_figures(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "worker_path", "--images", "3"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "SDGATE_HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["images"] == 3 and figures["machine"]["cpus"] >= 1
    assert figures["worker_task_ms_p50"] > 0 and figures["bare_pipeline_ms_p50"] > 0


def test_bench_without_a_known_name_shows_the_list():
    run = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "worker_path" in run.stderr


def test_gpu_bench_smoke_runs_the_worker_path_on_its_own_model(tmp_path):
    """The GPU script's code path on CPU: its worker must serve the random pipeline it built."""
    run = subprocess.run([sys.executable, "-m", "bench", "gpu", "--smoke", "--images", "2", "--batches", "1,2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "SDGATE_HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["smoke"] is True and figures["worker_images_per_s"] > 0
    assert set(figures["bare_by_batch"]) == {"1", "2"}
    assert figures["bare_by_batch"]["2"]["worker_images_per_s"] > 0, "the worker's batcher ran at batch 2"
    assert figures["worker_best_batch_size"] in (1, 2) and figures["speedup"] > 0
    assert 0 <= figures["max_pixel_difference_batched_vs_alone"] <= 8
    progress = figures["progress"]  # the progress overhead measurement, on the same runner
    assert set(progress["render_ms_p50"]) == {"off", "progress", "previews"}
    assert all(ms > 0 for ms in progress["callback_ms_per_render_p50"].values()), "the step callback ran"
    continuous = figures["continuous"]  # bench continuous's comparison, on the same runner
    assert all(continuous[name] > 0 for name in ("saturated_speedup", "p95_ratio_at_80", "solo_ratio"))
    assert continuous["continuous_active_mean"] > 1, "requests shared the loop's iterations"
    lora = figures["lora"]  # bench lora's switch cost, on the same pipeline with two random LoRAs
    assert lora["switch_ms_p50"] > 0 and lora["render_ms_p50"] > 0 and lora["base_reloads"] == 0


def test_http_floor_server_sends_the_stored_png_in_the_images_api_shape(tmp_path):
    """The HTTP floor answers a hit exactly as the gateway's HTTP route would, and refuses misses."""
    store = SQLiteImageStore(tmp_path / "images.db", max_bytes=1 << 20)
    key = key_of(GenerationRequest("a stored image", seed=1))
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    store.put(key, png, {"key": key})
    store.close()
    server = subprocess.Popen([sys.executable, "-m", "bench.http_floor_server", "--db", str(tmp_path / "images.db"),
                               "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[-1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for attempt in range(100):  # uvicorn starts serving the bound socket a moment after the line
            try:
                conn.request("POST", "/v1/images/generations", body=json.dumps({"prompt": "a stored image", "seed": 1}))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        response = conn.getresponse()
        assert response.status == 200
        answer = json.loads(response.read())
        assert base64.b64decode(answer["data"][0]["b64_json"]) == png
        assert answer["sdgate"]["key"] == key
        conn.request("POST", "/v1/images/generations", body=json.dumps({"prompt": "never stored"}))
        response = conn.getresponse()
        assert response.status == 404 and "not cached" in json.loads(response.read())["error"]["message"]
    finally:
        server.terminate()
        server.wait(10)


def test_celery_floor_round_trips_a_bare_task_through_a_real_worker_and_stops_it(redis_server):
    """bench/celery_floor.py: a real `celery worker` with sdgate's settings answers each task, its
    result is stored as Celery stores sdgate's, and the worker is gone when the bench is done."""
    import redis

    from bench import celery_floor

    with celery_floor.floor_worker(redis_server.url) as worker:
        rows = celery_floor.timed_round_trips(redis_server.url, 4, result_chars=1000)
    assert worker.poll() is not None, "the floor's worker outlived the bench"
    assert len(rows) == 4
    for row in rows:
        assert 0 < row["send_to_body_ms"] < row["send_to_result_ms"]
    stored = json.loads(redis.Redis.from_url(redis_server.url).get(f"celery-task-meta-{rows[-1]['task_id']}"))
    assert stored["status"] == "SUCCESS" and stored["result"]["png"] == "A" * 1000
