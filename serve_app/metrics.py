"""Prometheus metrics through Ray's metrics pipeline (scraped from each node's metrics agent).

Ray prefixes application metrics with `ray_`: `ray_sdgate_cache_hits_total`, ... See README
"Monitoring" for where to scrape them.
"""

from __future__ import annotations

from typing import Dict

from ray.util import metrics

from serve_app import stats

GENERATION_MS_BOUNDARIES = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


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
