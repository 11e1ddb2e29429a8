"""
Prometheus metrics for C{/metrics/prometheus}, in a registry of their own.

The exposition is rendered by C{prometheus_client.generate_latest} in the
request (its own Twisted resource renders in a thread pool, which hangs
in-memory tests and buys nothing for a page this small).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from twisted_gw.admission import Admission
from twisted_gw.admission.routing import SHARE_BUCKETS
from twisted_gw.books.record import RequestRecord

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class _QueueCollector(Collector):
    """Queue and upstream gauges, read from the admission queue when scraped."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
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
        router = self.admission.router
        for route in router.routes:
            healthy.add_metric([route.name, route.state], 1 if route.routable else 0)
            active.add_metric([route.name], route.active)
            places.add_metric([route.name], route.places)
            failovers.add_metric([route.name], route.failovers)
        yield from (healthy, active, places, failovers)
        decisions = CounterMetricFamily("llmgw_routing_decisions", "Generations routed, by upstream and why: "
                                        "cache (the best prefix match), balance (the match was out of balance, so "
                                        "least-busy chose) or least_busy (no useful match)",
                                        labels=["upstream", "reason"])
        for (name, reason), n in sorted(router.decisions.items()):
            decisions.add_metric([name, reason], n)
        yield decisions
        if router.index is not None:
            buckets = [(str(bound), count) for bound, count in zip(SHARE_BUCKETS, router.shares, strict=True)]
            total = router.shares[-1]
            yield HistogramMetricFamily("llmgw_routing_prefix_share", "The share of a prompt its chosen upstream "
                                        "was found to hold (cache-aware routing)",
                                        buckets=[*buckets, ("+Inf", total)], sum_value=router.shares_sum)


class _LedgerCollector(Collector):
    """The ledger's state: rows waiting to be written (while its database is away), and whether it is reachable."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("llmgw_ledger_up", "1 when the usage ledger's last write reached it",
                                value=1 if self.ledger.up else 0)
        yield GaugeMetricFamily("llmgw_ledger_pending_rows", "Finished requests not yet written to the ledger",
                                value=self.ledger.pending)
        yield CounterMetricFamily("llmgw_ledger_dropped_rows", "Rows dropped while the ledger was unreachable "
                                  "for longer than its memory bound", value=self.ledger.dropped)


class _StoreCollector(Collector):
    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("llmgw_state_store_up", "1 while the cluster's shared state store answers",
                                value=1 if self.store.up else 0)


class PrometheusMetrics:
    """Counters, histograms and gauges of the gateway."""

    def __init__(self, admission: Admission) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("llmgw_requests", "Finished requests", ["user"], registry=registry)
        self.prompt_tokens = Counter("llmgw_prompt_tokens", "Prompt tokens", ["user"], registry=registry)
        self.completion_tokens = Counter("llmgw_completion_tokens", "Completion tokens", ["user"], registry=registry)
        self.cancelled = Counter("llmgw_cancelled_requests", "Requests whose client left", ["user"], registry=registry)
        self.upstream_errors = Counter("llmgw_upstream_errors", "Upstream failures", ["kind"], registry=registry)
        self.queue_wait = Histogram("llmgw_queue_wait_seconds", "Time waited for a place",
                                    buckets=SECONDS_BUCKETS, registry=registry)
        self.ttft = Histogram("llmgw_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=SECONDS_BUCKETS, registry=registry)
        self.duration = Histogram("llmgw_request_duration_seconds", "Request duration",
                                  buckets=SECONDS_BUCKETS, registry=registry)
        self.tokens_per_second = Histogram("llmgw_generation_tokens_per_second", "Generation speed seen by clients",
                                           buckets=TPS_BUCKETS, registry=registry)
        registry.register(_QueueCollector(admission))

    def watch_store(self, store: Any) -> None:
        """Export whether a cluster's shared state store answers (C{up})."""
        self.registry.register(_StoreCollector(store))

    def watch_ledger(self, ledger: Any) -> None:
        """Export a shared ledger's state (C{up}, C{pending}, C{dropped})."""
        self.registry.register(_LedgerCollector(ledger))

    def observe(self, rec: RequestRecord) -> None:
        self.requests.labels(rec.user).inc()
        self.prompt_tokens.labels(rec.user).inc(rec.prompt_tokens)
        self.completion_tokens.labels(rec.user).inc(rec.completion_tokens)
        if rec.cancelled:  # (a user's first cancellation makes its series)
            self.cancelled.labels(rec.user).inc()
        if rec.error and (rec.error.startswith("upstream_") or rec.error == "idle_timeout"):  # (the upstream's doing)
            self.upstream_errors.labels(rec.error).inc()
        if rec.generation:
            self.queue_wait.observe(rec.queue_wait)
        if rec.ttft is not None:
            self.ttft.observe(rec.ttft)
        self.duration.observe(rec.duration)
        if rec.tokens_per_second is not None:
            self.tokens_per_second.observe(rec.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
