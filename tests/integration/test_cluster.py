"""A multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a head with no GPU and
two nodes advertising one GPU each. Worker placement, gateway placement on the head, node loss,
and autoscaling of the gateway (on socket load) and of the workers (on queued plus in-progress
tasks, celery_bridge.autoscaling), with real Redis, Celery and Serve.

The tests share one cluster and run in file order: placement, scaling, metrics, then node loss.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from client import protocol
from client.protocol import GenerationRequest
from celery_bridge import consumer
from celery_bridge.producer import GenerationProducer, new_task_id
from celery_bridge.tiny_model import save_tiny_variant
from serve_app import gateway
from serve_app.placement import ingress_node_resources
from celery_bridge.models import SLEEP_SOURCE, queue_for
from tests.integration import harness
from tests.resolve import resolved
from tests.integration.conftest import celery_config
from tests.services import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
QUEUE = "cluster-q"
MODEL_B = "tiny-b"
WORKER_DEPLOYMENT = "GenerationConsumer"
# The scaling test's renders: the sleep stand-in (celery_bridge/sleep_model.py), which takes this long
# and no CPU, so its windows hold however loaded the machine is (a CPU render sized by a measured
# step ran about 20x over its estimate on the project's CI under the suite's load, past its time limit).
SLOW_MODEL, SLOW_RENDER_MS = "slow", 24000
# The node-loss test's: long enough that the node goes while its worker is inside one (removed
# within a poll of the task's start), short enough that the four of them end soon after.
SHORT_MODEL, SHORT_RENDER_MS = "short", 5000


wait_for = functools.partial(harness.wait_for, interval=0.5)  # Serve's status is an RPC: ask twice a second


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    home = tmp_path_factory.mktemp("cluster-home")
    saved = dict(os.environ)
    # Two models: `tiny` (the default) and MODEL_B, another tiny model; every node reads this catalogue.
    catalogue = home / "models.yaml"
    catalogue.write_text(yaml.safe_dump({"default": "tiny", "models": [
        {"name": "tiny", "source": "tiny", "defaults": {"width": 64, "height": 64, "steps": 2},
         "limits": {"max_side": 2048, "max_steps": 150}},
        {"name": MODEL_B, "source": str(save_tiny_variant(home / MODEL_B, seed=7)), "scale_from_zero": True},
        {"name": SLOW_MODEL, "source": f"{SLEEP_SOURCE}{SLOW_RENDER_MS}"},
        {"name": SHORT_MODEL, "source": f"{SLEEP_SOURCE}{SHORT_RENDER_MS}"}]}))
    os.environ.update(SDGATE_HOME=str(home), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0",
                      RAY_metrics_report_interval_ms="1000", SDGATE_MODELS_FILE=str(catalogue))
    ray_cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "gcs_server_port": free_port(), "resources": ingress_node_resources(),
        "include_dashboard": True, "dashboard_port": free_port(), "dashboard_host": "127.0.0.1"})
    gpu_nodes = [ray_cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    ray_cluster.gpu_nodes = gpu_nodes
    yield ray_cluster
    serve.shutdown()
    ray.shutdown()
    ray_cluster.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def producer(redis_server):
    producer = GenerationProducer(celery_config(redis_server.url, QUEUE))
    yield producer
    producer.close()


def worker_replicas():
    """(node id, state) of each worker replica actor that is alive."""
    return [(node, state) for node, state, _ in worker_replica_actors()]


def worker_replica_actors():
    """(node id, state, pid) of each worker replica actor that is alive or being created."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:workers:{WORKER_DEPLOYMENT}")], limit=100)
    return [(a.node_id, a.state, a.pid) for a in actors if a.state in ("ALIVE", "PENDING_CREATION")]


def running_worker_count(app_name: str = "workers") -> int:
    """Worker replicas Serve reports RUNNING (initialised: pipeline loaded, consumer started)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or WORKER_DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[WORKER_DEPLOYMENT].replica_states.get("RUNNING", 0)


def deploy_workers(redis_url: str, app_name: str = "workers", model: str = "tiny", **deployment_args):
    from ray import serve
    from ray.serve.api import RunTarget

    app = consumer.build_app({"celery": {"redis_url": redis_url, "queue": QUEUE},
                              "worker": {"num_gpus": 1, "model": model}, **deployment_args})
    serve.run_many([RunTarget(app, name=app_name, route_prefix=None)], wait_for_applications_running=False,
                   wait_for_ingress_deployment_creation=False)


def queue_scaling(redis_url: str, model: str, min_replicas: int, max_replicas: int,
                  downscale_delay_s: float = 4) -> dict:
    """sdgate's work-counting policy on `model`'s own queue."""
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": 1,
            "upscale_delay_s": 1, "downscale_delay_s": downscale_delay_s,
            "policy": {"policy_function": "celery_bridge.autoscaling:WorkerLoadPolicy",
                       "policy_kwargs": {"broker_url": redis_url, "queue_name": queue_for(QUEUE, model),
                                         "poll_interval_s": 0.5}}}


def many_requests(count: int, tag: str, **params) -> list:
    return [resolved(GenerationRequest(f"{tag} {i}", **params)).normalized() for i in range(count)]


def submit_many(producer: GenerationProducer, requests: list) -> list:
    """Watch, then queue, one task per request; their result futures in order."""
    futures = []
    for request in requests:
        task_id = new_task_id(request.cache_key())
        futures.append(producer.watch(task_id))
        producer.submit(request, task_id)
    return futures


def test_worker_replicas_land_one_per_gpu_node_never_on_the_head(cluster, redis_server, producer):
    deploy_workers(redis_server.url, num_replicas=2)
    wait_for(lambda: running_worker_count() == 2, 240, "two worker replicas running")
    nodes = [node for node, _ in worker_replicas()]
    gpu_node_ids = {node.node_id for node in cluster.gpu_nodes}
    assert set(nodes) == gpu_node_ids, "one replica per GPU node, none on the head"
    futures = submit_many(producer, many_requests(4, "placement", width=256, height=256, steps=4))
    results = [f.result(timeout=180) for f in futures]
    assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]


def deploy_autoscaled_slow_workers(redis_url: str, downscale_delay_s: float):
    deploy_workers(redis_url, model=SLOW_MODEL,
                   autoscaling_config=queue_scaling(redis_url, SLOW_MODEL, 0, 2, downscale_delay_s))


def test_workers_scale_on_queued_plus_running_tasks_and_a_stopped_replica_finishes_its_render(
        cluster, redis_server, producer):
    downscale_delay_s = 4
    # 1. Idle: the fleet goes to zero.
    deploy_autoscaled_slow_workers(redis_server.url, downscale_delay_s)
    idle = time.monotonic()
    wait_for(lambda: running_worker_count() == 0 and not worker_replicas(), 240, "an idle fleet scaled to zero")
    to_zero_s = time.monotonic() - idle

    # 2. Two long renders: the fleet comes back from zero, one replica per GPU node.
    requests = many_requests(2, f"busy fleet {time.time()}", model=SLOW_MODEL)
    runs = [harness.TaskRuns(redis_server.url, request.cache_key()) for request in requests]
    try:
        submitted = time.monotonic()
        futures = submit_many(producer, requests)
        wait_for(lambda: all(r.started() for r in runs), 300, "both renders started")
        both_started = time.monotonic()
        from_zero_s = both_started - submitted

        # 3. Busy fleet, empty queue: for longer than downscale_delay_s, both replicas stay.
        fewest = 2
        while not any(f.done() for f in futures) and time.monotonic() - both_started < downscale_delay_s + 4:
            fewest = min(fewest, running_worker_count())
            time.sleep(0.25)  # sampling Serve's view while the renders run
        assert not any(f.done() for f in futures), \
            "the renders ended before the window closed: the test could not tell (renders sized too short)"
        assert fewest == 2, "a busy replica was scaled down while its queue was empty"
        assert producer.queue_length(SLOW_MODEL) == 0

        # 4. An operator's scale-down while both render: the replica Serve stops finishes first.
        deploy_workers(redis_server.url, model=SLOW_MODEL, num_replicas=1)
        results = [f.result(timeout=600) for f in futures]
        assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]
        assert len({r.worker for r in results}) == 2, "each render finished on the replica that started it"
        wait_for(lambda: all(r.succeeded() for r in runs), 30, "both results published")
        assert [len(r.started()) for r in runs] == [1, 1], "a stopped replica's task was started again elsewhere"
        assert [r.succeeded() for r in runs] == [1, 1]
    finally:
        for r in runs:
            r.close()
    wait_for(lambda: running_worker_count() == 1 and len(worker_replicas()) == 1, 120, "the stopped replica gone")

    # 5. Autoscaled again with nothing to do: back to zero.
    deploy_autoscaled_slow_workers(redis_server.url, downscale_delay_s)
    wait_for(lambda: running_worker_count() == 0 and not worker_replicas(), 240, "idle again: scaled to zero")
    print(f"\nworkers: idle fleet to zero {to_zero_s:.1f} s; two renders started {from_zero_s:.1f} s after "
          f"submission from zero replicas")


def test_misses_for_one_model_add_only_that_models_workers(cluster, redis_server, producer):
    """Model B scales from zero on its own queue; model A (autoscaled on its queue) never grows."""
    from ray import serve

    deploy_workers(redis_server.url, autoscaling_config=queue_scaling(redis_server.url, "tiny", 1, 2))
    deploy_workers(redis_server.url, app_name="workers-b", model=MODEL_B,
                   autoscaling_config=queue_scaling(redis_server.url, MODEL_B, 0, 2))
    wait_for(lambda: running_worker_count() == 1, 240, "one worker of model A")
    a_counts = []
    futures = submit_many(producer, many_requests(12, "model b load", model=MODEL_B, width=128, height=128,
                                                    steps=8))
    wait_for(lambda: a_counts.append(running_worker_count()) or running_worker_count("workers-b") >= 1, 240,
             "a worker of model B, from zero, for B's queue")
    results = [f.result(timeout=600) for f in futures]
    a_counts.append(running_worker_count())
    assert all(r.ok and r.model == MODEL_B for r in results), [r.error_message for r in results if not r.ok]
    assert set(a_counts) == {1}, "misses for model B never add a worker of model A"
    serve.delete("workers-b")  # give its GPU back to the tests after this one


@pytest.fixture(scope="module")
def gateway_port(cluster, redis_server) -> int:
    """The gateway deployed with socket-load autoscaling (1..2 replicas, 2 requests each)."""
    from ray import serve
    from ray.serve.api import RunTarget

    socket_port = free_port()
    app = gateway.build_app({
        "gateway": {"socket_port": socket_port, "cache_path": os.path.join(os.environ["SDGATE_HOME"], "cache.db"),
                    "stats_flush_s": 0.2, "fast_http_port": free_port()},
        "celery": {"redis_url": redis_server.url, "queue": QUEUE},
        "on_ingress_node": True,  # only the head advertises the resource
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                               "upscale_delay_s": 2, "downscale_delay_s": 6, "look_back_period_s": 4,
                               "policy": {"policy_function": "serve_app.autoscaling:gateway_load_policy"}},
    })
    serve.run_many([RunTarget(app, name="gateway", route_prefix="/")], wait_for_applications_running=False,
                   wait_for_ingress_deployment_creation=False)
    wait_for(lambda: gateway_replicas() == 1, 240, "one gateway replica")
    return socket_port


def test_gateway_scales_on_socket_load_and_back_on_the_head(cluster, gateway_port):
    socket_port = gateway_port
    stop = threading.Event()
    answered = []

    def client(index: int):
        with socket.create_connection(("127.0.0.1", socket_port), timeout=30) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                request = GenerationRequest(f"gateway load {index} {n}", width=128, height=128, steps=4)
                answered.append(protocol.exchange(conn, request, timeout=300).meta["key"])

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        for index in range(8):
            pool.submit(client, index)
        try:
            wait_for(lambda: gateway_replicas() >= 2, 120, "a second gateway replica under socket load")
            scale_up_s = time.monotonic() - started
            nodes = gateway_replica_nodes()
        finally:
            stop.set()
    assert answered
    assert len(nodes) >= 2 and set(nodes) == {cluster.head_node.node_id}, \
        "every gateway replica on the head, the node with the ingress resource, where clients connect"
    idle = time.monotonic()
    wait_for(lambda: gateway_replicas() == 1, 120, "the gateway scaling back down when idle")
    print(f"\ngateway scale-up reaction {scale_up_s:.1f} s; scale-down {time.monotonic() - idle:.1f} s")


def test_metrics_endpoint_shows_counters_moving(cluster, gateway_port):
    import ray

    # Each node exports the metrics of the processes it runs, and the gateway replica may be on any node.
    urls = [f"http://127.0.0.1:{node['MetricsExportPort']}/metrics" for node in ray.nodes() if node["Alive"]]

    def scrape(name: str) -> dict:
        """{(node, label set): value} of every series of `name`; replicas that went away drop out."""
        series = {}
        for url in urls:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            for labels, value in re.findall(rf"^ray_{name}(?:_total)?({{[^}}]*}})? ([0-9.e+]+)$", text, re.M):
                series[(url, labels)] = float(value)
        return series

    def grew(before: dict, name: str) -> bool:
        return any(value > before.get(labels, 0.0) for labels, value in scrape(name).items())

    before = {name: scrape(name) for name in ("sdgate_cache_misses", "sdgate_cache_hits", "sdgate_generation_ms_count")}
    with socket.create_connection(("127.0.0.1", gateway_port), timeout=30) as conn:
        request = GenerationRequest(f"metrics move {time.time()}", seed=3)
        protocol.exchange(conn, request, timeout=120)
        protocol.exchange(conn, request, timeout=120)
    for name, old in before.items():
        wait_for(lambda: grew(old, name), 90, f"{name} moving")


def test_losing_a_gpu_node_loses_no_accepted_request(cluster, redis_server, producer):
    """The node goes while its worker is inside a render: that task runs again on the other node,
    and every request accepted gets its image."""
    deploy_workers(redis_server.url, model=SHORT_MODEL, num_replicas=2)
    wait_for(lambda: running_worker_count() == 2, 240, "two worker replicas")
    lost_node = cluster.gpu_nodes[1]
    lost_pids = {pid for node, _, pid in worker_replica_actors() if node == lost_node.node_id}
    assert lost_pids, "a worker replica on the node to be lost"
    requests = many_requests(4, f"node loss {time.time()}", model=SHORT_MODEL)
    runs = {request.cache_key(): harness.TaskRuns(redis_server.url, request.cache_key()) for request in requests}
    try:
        futures = submit_many(producer, requests)

        def rendering_on_lost_node():
            return [key for key, run in runs.items() if run.started()[-1:] and run.started()[-1] in lost_pids
                    and not run.succeeded()]

        held = wait_for(rendering_on_lost_node, 120, "a render started on the node to be lost")
        cluster.remove_node(lost_node)
        results = [f.result(timeout=600) for f in futures]
        assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]
        assert len({r.key for r in results}) == len(requests)
        for key in held:
            assert runs[key].wait_succeeded() == 1, runs[key].events
            started = runs[key].started()
            assert started[0] in lost_pids and started[-1] not in lost_pids, \
                f"the lost node's task should have run again on the other node: {runs[key].events}"
    finally:
        for run in runs.values():
            run.close()


# -- helpers over Serve's view of the gateway --------------------------------------------------------

def gateway_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("gateway")
    if app is None or "Gateway" not in app.deployments:
        return 0
    return app.deployments["Gateway"].replica_states.get("RUNNING", 0)


def gateway_replica_nodes():
    """Node id of each live gateway replica actor."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "ServeReplica:gateway:Gateway")], limit=100)
    return [a.node_id for a in actors if a.state == "ALIVE"]
