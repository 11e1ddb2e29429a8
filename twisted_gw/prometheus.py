"""
Prometheus collectors for C{/metrics/prometheus}, in a registry of their own.

The exposition is rendered by C{prometheus_client.generate_latest} in the
request (its own Twisted resource renders in a thread pool, which hangs
in-memory tests and buys nothing for a page this small).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterator, Sequence

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from twisted_gw.accounting import RequestRecord
from twisted_gw.admission import Admission

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class _QueueCollector(Collector):
    """Queue gauges read from the admission queue when scraped."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("llmgw_queue_waiting", "Requests waiting for a place", value=self.admission.waiting)
        yield GaugeMetricFamily("llmgw_queue_active", "Requests holding a place", value=self.admission.active)
        yield GaugeMetricFamily("llmgw_queue_limit", "Places of the healthy upstreams, in all",
                                value=self.admission.limit)
        healthy = GaugeMetricFamily("llmgw_upstream_healthy", "1 when the upstream gets new requests",
                                    labels=["upstream", "state"])
        active = GaugeMetricFamily("llmgw_upstream_active", "Requests holding a place on the upstream",
                                   labels=["upstream"])
        places = GaugeMetricFamily("llmgw_upstream_places", "The upstream's places (slots)", labels=["upstream"])
        failovers = CounterMetricFamily("llmgw_upstream_failovers", "Requests the upstream could not take "
                                        "that went to another one", labels=["upstream"])
        for route in self.admission.router.routes:
            healthy.add_metric([route.name, route.state], 1 if route.routable else 0)
            active.add_metric([route.name], route.active)
            places.add_metric([route.name], route.places)
            failovers.add_metric([route.name], route.failovers)
        yield from (healthy, active, places, failovers)


class _Counter:
    """
    A counter family with one label, kept as plain floats: what a
    C{prometheus_client.Counter} would expose (C{_total}, and C{_created} as
    of each label value's first count), without its lock and child lookup on
    every count.
    """

    __slots__ = ("children", "doc", "label", "name")

    def __init__(self, name: str, doc: str, label: str) -> None:
        self.name = name
        self.doc = doc
        self.label = label
        self.children: dict[str, list[float]] = {}  # label value -> [total, created]

    def inc(self, value: str, amount: float = 1.0) -> None:
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = [0.0, time.time()]
        child[0] += amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, (total, created) in self.children.items():
            family.add_metric([value], total, created=created if _created_series() else None)
        return family


class _Histogram:
    """A histogram without labels, kept as plain floats: what a C{prometheus_client.Histogram} would expose."""

    __slots__ = ("bounds", "counts", "created", "doc", "name", "sum")

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = [float(b) for b in buckets] + [math.inf]
        self.counts = [0.0] * len(self.bounds)  # per bucket, not yet cumulative
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        if amount == amount:  # (NaN falls in no bucket, as in prometheus_client)
            self.counts[bisect.bisect_left(self.bounds, amount)] += 1.0

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc)
        cumulative = list(itertools.accumulate(self.counts))
        family.add_metric([], [(floatToGoString(b), n) for b, n in zip(self.bounds, cumulative, strict=True)],
                          self.sum)
        if _created_series():  # (HistogramMetricFamily has no created= of its own: the sample a Histogram adds)
            family.add_sample(self.name + "_created", {}, self.created)
        return family


def _created_series() -> bool:
    """Whether C{_created} series are exposed (C{prometheus_client.disable_created_metrics} turns them off)."""
    return bool(prometheus_client.metrics._use_created)


class _RequestCollector(Collector):
    """The per-request counters and histograms, exposed when scraped, in the order they are registered."""

    def __init__(self, families: Sequence[_Counter | _Histogram]) -> None:
        self.families = families

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for family in self.families:
            yield family.family()


class PrometheusMetrics:
    """Counters, histograms and gauges of the gateway."""

    def __init__(self, admission: Admission) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Counted in plain floats, not prometheus_client's metric objects: each count took a lock and each
        # histogram a loop over its buckets, some 68,000 instructions per request; the exposition is the same.
        self.requests = _Counter("llmgw_requests", "Finished requests", "user")
        self.prompt_tokens = _Counter("llmgw_prompt_tokens", "Prompt tokens", "user")
        self.completion_tokens = _Counter("llmgw_completion_tokens", "Completion tokens", "user")
        self.cancelled = _Counter("llmgw_cancelled_requests", "Requests whose client left", "user")
        self.upstream_errors = _Counter("llmgw_upstream_errors", "Upstream failures", "kind")
        self.queue_wait = _Histogram("llmgw_queue_wait_seconds", "Time waited for a place", SECONDS_BUCKETS)
        self.ttft = _Histogram("llmgw_time_to_first_token_seconds", "Time to the first generated token",
                               SECONDS_BUCKETS)
        self.duration = _Histogram("llmgw_request_duration_seconds", "Request duration", SECONDS_BUCKETS)
        self.tokens_per_second = _Histogram("llmgw_generation_tokens_per_second", "Generation speed seen by clients",
                                            TPS_BUCKETS)
        self.registry.register(_RequestCollector([
            self.requests, self.prompt_tokens, self.completion_tokens, self.cancelled, self.upstream_errors,
            self.queue_wait, self.ttft, self.duration, self.tokens_per_second,
        ]))
        self.registry.register(_QueueCollector(admission))

    def observe(self, rec: RequestRecord) -> None:
        user = rec.user
        self.requests.inc(user)
        self.prompt_tokens.inc(user, rec.prompt_tokens)
        self.completion_tokens.inc(user, rec.completion_tokens)
        if rec.cancelled:  # (a user's first cancellation makes its series)
            self.cancelled.inc(user)
        if rec.error and rec.error.startswith("upstream_"):
            self.upstream_errors.inc(rec.error)
        if rec.method == "POST":
            self.queue_wait.observe(rec.queue_wait)
        if rec.ttft is not None:
            self.ttft.observe(rec.ttft)
        self.duration.observe(rec.duration)
        if rec.tokens_per_second is not None:
            self.tokens_per_second.observe(rec.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
