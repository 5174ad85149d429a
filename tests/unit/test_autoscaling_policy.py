"""The gateway's autoscaling policy counts the socket traffic Serve cannot see."""

from types import SimpleNamespace

from serve_app.autoscaling import SOCKET_LOAD_METRIC, gateway_load_policy


def context(replicas: int, http: float, socket_load: dict, target: float = 2.0):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target)
    return SimpleNamespace(current_num_replicas=replicas, total_num_requests=http, config=config,
                           aggregated_metrics={SOCKET_LOAD_METRIC: socket_load})


def test_socket_load_alone_asks_for_more_replicas():
    desired, state = gateway_load_policy(context(1, 0, {"r1": 6.0}))
    assert desired == 3.0 and state["socket_load"] == 6.0


def test_http_and_socket_load_add_up():
    desired, _ = gateway_load_policy(context(2, 2, {"r1": 1.0, "r2": 1.0}))
    assert desired == 2.0


def test_idle_gateway_asks_for_none_beyond_the_minimum():
    desired, _ = gateway_load_policy(context(2, 0, {"r1": 0.0, "r2": 0.0}))
    assert desired == 0.0  # Serve's wrapper clamps this to min_replicas


def test_no_metrics_yet_and_no_replicas():
    ctx = context(0, 0, {})
    ctx.aggregated_metrics = None
    assert gateway_load_policy(ctx)[0] == 0
