"""/metrics in Prometheus' text format, with vLLM's metric names under an `lmserve:` prefix.

Gauges and counters are read from the engine's stats snapshot when scraped; latency histograms are observed in the
step thread (prometheus_client metrics are thread-safe). Each app has its own registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmserve.engine.stats import EngineStats
from lmserve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str) -> None:
        self.stats = stats
        self.labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        gauges = [("num_requests_running", "Requests in model execution batches.", stats.num_requests_running),
                  ("num_requests_waiting", "Requests waiting to be processed.", stats.num_requests_waiting),
                  ("kv_cache_usage_perc", "KV-cache usage: the fraction of blocks held by requests (1 = full).",
                   stats.kv_cache_usage)]
        counters = [("prefix_cache_queries", "Prefix-cache queries, in tokens.", stats.prefix_cache_queries),
                    ("prefix_cache_hits", "Prefix-cache hits, in tokens.", stats.prefix_cache_hits),
                    ("num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions),
                    ("prompt_tokens", "Prefill tokens processed.", stats.prompt_tokens),
                    ("generation_tokens", "Generation tokens processed.", stats.generation_tokens)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"lmserve:{name}", doc, labels=["model_name"])
            family.add_metric(self.labels, value)
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(f"lmserve:{name}", doc, labels=["model_name"])
            family.add_metric(self.labels, value)
            yield family


class ServerMetrics:
    """The app's registry; also the engine's OutputObserver, for the latency histograms."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(stats, model_name))

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(f"lmserve:{name}", doc, ["model_name"], registry=self.registry,
                             buckets=buckets).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Inter-token latency in seconds.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency in seconds.", _E2E_BUCKETS)

        self._progress: dict[str, tuple[int, float]] = {}  # request id -> (tokens so far, time of the last one)

    def observe(self, outputs: list[RequestOutput], now: float) -> None:
        """Latencies from one step's outputs (called by the engine's step thread only)."""
        for output in outputs:
            tokens = sum(len(c.token_ids) for c in output.outputs)
            seen, last = self._progress.get(output.request_id, (0, 0.0))
            new = tokens - seen
            if new > 0:
                if seen == 0:
                    self.ttft.observe((output.metrics.first_token_time or now) - output.metrics.arrival_time)
                else:
                    for _ in range(new):
                        self.itl.observe((now - last) / new)
                self._progress[output.request_id] = (tokens, now)
            if output.finished:
                self.e2e.observe(now - output.metrics.arrival_time)
                self._progress.pop(output.request_id, None)

    def forget(self, request_id: str) -> None:
        self._progress.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
