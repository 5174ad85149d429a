"""Prometheus metrics through Ray's metrics pipeline (scraped from each node's metrics agent).

Ray prefixes application metrics with `ray_`: `ray_sdgate_cache_hits_total`, ... See README
"Monitoring" for where to scrape them.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from ray.util import metrics

from serve_app import stats

GENERATION_MS_BOUNDARIES = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


TENANT_SERIES = {
    "images_served": "images a tenant was given, cache hits included (cluster-wide)",
    "images_rendered": "images rendered by workers for a tenant (cluster-wide; a shared render counts once)",
    "gpu_seconds": "worker pipeline seconds spent on a tenant's images (cluster-wide)",
}


def tenant_series(usage: Dict[str, Dict[str, int]]) -> List[Tuple[str, str, float]]:
    """(series, tenant name, value) for each tenant's usage; the series carry names, never keys."""
    rows = []
    for tenant, counters in sorted(usage.items()):
        rows.append(("images_served", tenant, float(counters.get("images_served", 0))))
        rows.append(("images_rendered", tenant, float(counters.get("images_rendered", 0))))
        rows.append(("gpu_seconds", tenant, counters.get("gpu_ms", 0) / 1000.0))
    return rows


class RayMetrics:
    """sdgate's counters, generation-time histogram and queue-depth gauge as Ray metrics."""

    def __init__(self) -> None:
        descriptions = {
            stats.CACHE_HITS: "requests answered from the image cache",
            stats.CACHE_MISSES: "requests not in the cache",
            stats.GENERATIONS: "generations submitted to the workers",
            stats.SINGLEFLIGHT_JOINS: "misses that joined a generation already in flight",
        }
        self._counters: Dict[str, metrics.Counter] = {
            name: metrics.Counter(f"sdgate_{name}", description=text) for name, text in descriptions.items()
        }
        self._errors = metrics.Counter("sdgate_errors", description="errors answered, by code", tag_keys=("code",))
        self.generation_ms = metrics.Histogram(
            "sdgate_generation_ms", description="pipeline time reported by workers (ms)",
            boundaries=GENERATION_MS_BOUNDARIES)
        self.miss_ms = metrics.Histogram(
            "sdgate_miss_latency_ms", description="time to answer a miss, end to end in the gateway (ms)",
            boundaries=GENERATION_MS_BOUNDARIES)
        self.queue_depth = metrics.Gauge("sdgate_queue_depth", description="tasks waiting in a model's Celery queue",
                                         tag_keys=("model",))
        self.live_workers = metrics.Gauge("sdgate_live_workers", description="workers serving a model now",
                                          tag_keys=("model",))
        self._model_counters = {
            counter: metrics.Counter(f"sdgate_model_{counter}", description=text, tag_keys=("model",))
            for counter, text in ((stats.MODEL_REQUESTS, "requests accepted for a model"),
                                  (stats.MODEL_UNAVAILABLE, "requests refused: no worker serves the model"))
        }

        self._tenant_gauges = {
            name: metrics.Gauge(f"sdgate_tenant_{name}", description=text, tag_keys=("tenant",))
            for name, text in TENANT_SERIES.items()}

    def set_tenant_usage(self, usage: Dict[str, Dict[str, int]]) -> None:
        """Cluster-wide usage per tenant (serve_app.tenants.TenantRegistry.usage), by tenant name."""
        for name, tenant, value in tenant_series(usage):
            self._tenant_gauges[name].set(value, tags={"tenant": tenant})

    def set_model_gauges(self, model: str, queue_depth: int, live_workers: int) -> None:
        self.queue_depth.set(queue_depth, tags={"model": model})
        self.live_workers.set(live_workers, tags={"model": model})

    def on_count(self, name: str, amount: int) -> None:
        """A stats.Counters listener."""
        split = stats.split_model_counter(name)
        if split and split[1] in self._model_counters:
            self._model_counters[split[1]].inc(amount, tags={"model": split[0]})
        elif name.startswith(f"{stats.ERRORS}."):
            self._errors.inc(amount, tags={"code": name.split(".", 1)[1]})
        elif name in self._counters:
            self._counters[name].inc(amount)
