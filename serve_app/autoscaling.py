"""Gateway autoscaling on the load it actually carries, socket connections included.

Serve counts only the requests that pass through its proxy; the boot client's socket traffic
never does. Each replica reports its time-averaged number of socket requests in flight through
`record_autoscaling_stats`, and this policy adds it to Serve's own count. Serve wraps custom
policies with min/max bounds and the upscale/downscale delays of the deployment's config.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

SOCKET_LOAD_METRIC = "socket_requests_in_flight"


def gateway_load_policy(ctx) -> Tuple[float, Dict[str, Any]]:
    """Replicas wanted = (HTTP requests + socket requests in flight) / target per replica."""
    per_replica = (ctx.aggregated_metrics or {}).get(SOCKET_LOAD_METRIC) or {}
    socket_load = float(sum(per_replica.values()))
    load = ctx.total_num_requests + socket_load
    if ctx.current_num_replicas == 0:
        return (1 if load > 0 else 0), {"socket_load": socket_load}
    return load / ctx.config.get_target_ongoing_requests(), {"socket_load": socket_load}
