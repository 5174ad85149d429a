"""The worker autoscaling policy counts queued plus in-progress tasks of its own queue, holds on an
unknown count, and a stopping worker replica drains instead of being killed mid-render."""

import json
from types import SimpleNamespace


from celery_bridge.autoscaling import QueueWork, WorkerLoadPolicy, queue_keys, unacked_for_queue


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def context(current: int, target_replicas=None, per_replica: float = 1.0):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: per_replica)
    return SimpleNamespace(current_num_replicas=current, config=config,
                           target_num_replicas=current if target_replicas is None else target_replicas)


def policy(counts, clock=None, **kwargs):
    """A policy whose Redis count is the next item of `counts` (an Exception item: Redis failing)."""
    feed = iter(counts)

    def counter():
        item = next(feed)
        if isinstance(item, Exception):
            raise item
        return item

    return WorkerLoadPolicy(queue_name="model-a", broker_url="redis://unused", poll_interval_s=2,
                            counter=counter, clock=clock or Clock(), **kwargs)


def test_a_busy_fleet_with_an_empty_queue_keeps_every_replica():
    desired, state = policy([QueueWork(queued=0, in_progress=4)])(context(4))
    assert desired == 4 and state["in_progress"] == 4 and state["queued"] == 0


def test_queued_and_running_tasks_add_up():
    desired, _ = policy([QueueWork(queued=3, in_progress=2)])(context(2))
    assert desired == 5


def test_target_per_replica_divides_the_work():
    desired, _ = policy([QueueWork(queued=3, in_progress=1)])(context(2, per_replica=2.0))
    assert desired == 2


def test_an_idle_fleet_asks_for_zero():
    desired, _ = policy([QueueWork(queued=0, in_progress=0)])(context(3))
    assert desired == 0  # Serve's wrapper applies min_replicas and downscale_delay_s


def test_from_zero_replicas_asks_for_all_the_work_at_once():
    desired, _ = policy([QueueWork(queued=3, in_progress=0)])(context(0))
    assert desired == 3


def test_no_count_yet_or_redis_unreachable_holds_the_current_target():
    clock = Clock()
    p = policy([RuntimeError("redis down"), QueueWork(0, 2)] + [RuntimeError("redis down")] * 20, clock=clock)
    assert p(context(3))[0] == 3  # never counted: hold
    clock.now += 2
    assert p(context(3))[0] == 2  # counted
    for _ in range(3):  # Redis fails; the last count is still fresh enough
        clock.now += 2
        assert p(context(3))[0] == 2
    clock.now += 10  # no count for more than five poll intervals: hold, never scale down blind
    desired, state = p(context(3, target_replicas=3))
    assert desired == 3 and state["work"] == "unknown"


def test_counts_at_most_once_per_poll_interval():
    clock = Clock()
    calls = []
    p = WorkerLoadPolicy(queue_name="q", broker_url="redis://unused", poll_interval_s=2,
                         counter=lambda: calls.append(1) or QueueWork(1, 0), clock=clock)
    for _ in range(5):
        p(context(1))
    assert len(calls) == 1
    clock.now += 2
    p(context(1))
    assert len(calls) == 2


def unacked_entry(routing_key: str) -> bytes:
    return json.dumps([{"body": "...", "headers": {"task": "sdgate.generate"}}, "", routing_key]).encode()


def test_in_progress_is_counted_per_queue():
    entries = [unacked_entry("model-a"), unacked_entry("model-b"), unacked_entry("model-a"), b"not json"]
    assert unacked_for_queue(entries, "model-a") == 2
    assert unacked_for_queue(entries, "model-b") == 1
    assert unacked_for_queue(entries, "model-c") == 0


def test_queue_keys_cover_kombus_priority_lists():
    keys = queue_keys("model-a")
    assert keys[0] == "model-a" and len(keys) > 1 and all(k.startswith("model-a") for k in keys)


def test_policy_defaults_come_from_the_celery_config(monkeypatch):
    monkeypatch.setenv("SDGATE_QUEUE", "from-env")
    p = WorkerLoadPolicy()
    assert p.queue_name == "from-env"


# -- a stopping replica drains ---------------------------------------------------------------------

class FakeAdapter:
    """Serve's Celery adapter as drain() sees it: a worker thread that renders until told to stop,
    and a pidbox that misses the first `deaf` broadcasts (the worker is still starting)."""

    def __init__(self, deaf: int = 0):
        import threading

        self.broadcasts = 0
        self.deaf = deaf
        self.stop_heard = threading.Event()
        self.render_done = threading.Event()
        self._worker_hostname = "q_replica"
        self._app = SimpleNamespace(control=SimpleNamespace(broadcast=self._broadcast))
        self._worker_thread = threading.Thread(target=self._work, daemon=True)
        self._worker_thread.start()

    def _broadcast(self, command, destination):
        assert command == "shutdown" and destination == ["celery@q_replica"]
        self.broadcasts += 1
        if self.broadcasts > self.deaf:
            self.stop_heard.set()

    def _work(self):
        self.stop_heard.wait()
        self.render_done.set()  # warm shutdown: the render in progress finishes before the thread ends


def test_drain_resends_the_stop_until_the_worker_hears_it_and_waits_for_the_render():
    from celery_bridge.consumer import ServeConsumer, drain

    adapter = FakeAdapter(deaf=2)
    assert drain(ServeConsumer(adapter), timeout_s=30, resend_every_s=0.01)
    assert adapter.broadcasts == 3 and adapter.render_done.is_set()
    assert adapter._worker_thread is None


def test_drain_gives_up_at_its_deadline():
    from celery_bridge.consumer import ServeConsumer, drain

    adapter = FakeAdapter(deaf=10**9)
    assert not drain(ServeConsumer(adapter), timeout_s=0.05, resend_every_s=0.01)
    adapter.stop_heard.set()


def test_a_stopping_worker_replica_drains_for_the_task_time_limit_then_stops_its_leases(monkeypatch):
    from celery_bridge import consumer
    from celery_bridge.config import CeleryConfig

    config = CeleryConfig(time_limit_s=330)
    cls = consumer.consumer_class(config, "tiny")
    events = []
    monkeypatch.setattr(consumer, "drain", lambda adapter, timeout_s: events.append(("drain", timeout_s)))
    replica = cls.__new__(cls)  # no pipeline, no Celery thread: only the shutdown path
    replica._adapter = object()
    replica.runtime = SimpleNamespace(stop=lambda: events.append(("leases", None)))
    replica.__del__()
    assert events[0][0] == "drain" and events[0][1] >= config.time_limit_s, \
        "waits out the longest render, not the adapter's 10 s"
    assert events[1] == ("leases", None), "the running task keeps its lease until the drain ends"
    assert consumer.graceful_shutdown_timeout_s(config) > events[0][1], "Serve kills only after the drain"


def test_the_deployment_gives_a_stopping_replica_time_to_drain():
    from celery_bridge import consumer

    app = consumer.build_app({"celery": {"time_limit_s": 100}, "num_replicas": 1})
    options = app._bound_deployment._deployment_config
    assert options.graceful_shutdown_timeout_s >= 100 + consumer.DRAIN_MARGIN_S


# -- configs/serve.yaml uses them --------------------------------------------------------------------

def test_serve_yaml_scales_workers_on_the_work_and_places_the_gateway_on_the_ingress_node():
    from ray._common.utils import import_attr

    from celery_bridge import consumer
    from celery_bridge.config import REPO_CONFIG_DIR, load_celery_config
    from celery_bridge.models import load_catalogue, queue_for
    from cluster.deploy import render_serve_config
    from serve_app.placement import INGRESS_RESOURCE, ingress_node_resources

    config = render_serve_config(REPO_CONFIG_DIR / "serve.yaml",
                                 {"SDGATE_REDIS_URL": "redis://head:6379/0", "SDGATE_TOKEN": "a-test-token"})
    apps = {app["name"]: app for app in config["applications"]}
    workers = apps["workers-demo"]["deployments"][0]
    policy = workers["autoscaling_config"]["policy"]
    built = import_attr(policy["policy_function"])(**policy["policy_kwargs"])
    model = apps["workers-demo"]["args"]["worker"]["model"]
    assert isinstance(built, WorkerLoadPolicy) and built.queue_name == queue_for(load_celery_config().queue, model)
    if workers["autoscaling_config"]["min_replicas"] == 0:  # idle GPUs go away: requests must queue, not fail
        assert load_catalogue(REPO_CONFIG_DIR / "models.yaml").get(model).scale_from_zero, \
            f"{model} scales from zero: set scale_from_zero"
    assert workers["graceful_shutdown_timeout_s"] >= consumer.graceful_shutdown_timeout_s(load_celery_config())
    gateway = apps["gateway"]["deployments"][0]
    needs = gateway["ray_actor_options"]["resources"][INGRESS_RESOURCE]
    assert 0 < needs <= ingress_node_resources()[INGRESS_RESOURCE] / gateway["autoscaling_config"]["max_replicas"]


def test_cluster_yaml_makes_the_head_the_ingress_node():
    import yaml

    from celery_bridge.config import REPO_CONFIG_DIR
    from serve_app.placement import INGRESS_RESOURCE, ingress_node_resources

    raw = yaml.safe_load((REPO_CONFIG_DIR / "cluster.yaml").read_text())
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"][INGRESS_RESOURCE] == ingress_node_resources()[INGRESS_RESOURCE]
    assert INGRESS_RESOURCE not in raw["available_node_types"]["sdgate.gpu"]["resources"]
    assert f'--resources=\'{{"{INGRESS_RESOURCE}": 1}}\'' in " ".join(raw["head_start_ray_commands"])
