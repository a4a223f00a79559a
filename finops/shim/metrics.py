"""The shim's own Prometheus metrics (a private registry per app, so tests can run several).

`finops_shim_added_latency_seconds` is the shim's overhead alone: time spent
in the shim before the client got its first byte, minus the time waited on
the upstream. Buckets start at 100 µs because the goal is p50 <= 1 ms.

With several workers (`finops shim serve --workers N`) prometheus_client's
multiprocess mode is on (`PROMETHEUS_MULTIPROC_DIR`, set by the supervisor):
counters and histograms are summed over the workers, and each gauge says how
its workers' values combine (`multiprocess_mode`).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder workers share metric files in, when the shim runs several workers."""
    return os.environ.get(MULTIPROC_ENV) or None


OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class CachedLabels:
    """A labelled metric whose children are found in a plain dict.

    prometheus_client's `labels()` validates the values and takes a lock on every call
    (0.8 us; the proxy path makes about eight a request). A child is dropped only by
    `remove()`, which drops it from the metric too, so a cached child is always the
    metric's own. Everything else goes to the metric.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: MetricWrapperBase) -> None:
        self.metric = metric
        self._children: dict[tuple, Any] = {}

    def labels(self, *values: Any) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def remove(self, *values: Any) -> None:
        """Drop one label set (no-op when it was never made), here and in the metric."""
        self._children.pop(values, None)
        self.metric.remove(*values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class ShimMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._router_version: str | None = None
        self.requests = Counter(
            "finops_shim_requests",
            "Requests by tier, HTTP status and tenant.",
            ["tier", "status", "tenant"],
            registry=r,
        )
        self.added_latency = Histogram(
            "finops_shim_added_latency_seconds",
            "Shim overhead alone (time to first byte minus upstream wait).",
            ["stream"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "finops_shim_upstream_latency_seconds",
            "Upstream time from request sent to last byte.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "finops_shim_time_to_first_token_seconds",
            "Time from request arrival to first streamed token.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "finops_shim_tokens",
            "Tokens by tier and kind (input, output, cached_input).",
            ["tier", "kind"],
            registry=r,
        )
        self.cache = Counter(
            "finops_shim_cache",
            "Requests by cache result, as the request log's cache_status counts them (hit:"
            " the cache or an Idempotency-Key replay; coalesced; miss; bypass; skipped: not"
            " looked up because the shared cache is out, logged as a miss).",
            ["result"],
            registry=r,
        )
        self.cache_backend_errors = Counter(
            "finops_shim_cache_backend_errors",
            "Failed calls to the shared cache (Redis) by operation (get, set, claim, "
            "holder, refresh, release) and kind (unavailable: connection or timeout, "
            "Redis then skipped for a few seconds; key: an error about one key).",
            ["op", "kind"],
            registry=r,
        )
        self.cache_invalid = Counter(
            "finops_shim_cache_invalid_values",
            "Values read under the shim's keys that are not what it writes (corrupt or "
            "foreign), by store (cache, idempotency): treated as a miss / no record.",
            ["store"],
            registry=r,
        )
        self.coalesced = Counter(
            "finops_shim_coalesced",
            "Requests served by an identical in-flight request.",
            registry=r,
        )
        self.refused_connections = Counter(
            "finops_shim_refused_connections",
            "Connections closed before a request was read (request_header_fields_too_large, "
            "request_timeout, idle_connection, invalid_http_request), or still sending a "
            "body body_timeout_s after its answer (unread_body).",
            ["reason"],
            registry=r,
        )
        self.idempotent_replays = Counter(
            "finops_shim_idempotent_replays",
            "Requests answered from an Idempotency-Key record.",
            registry=r,
        )
        self.idempotency_evictions = Counter(
            "finops_shim_idempotency_evictions",
            "Idempotency-Key records dropped before idempotency_ttl_s for room (no Redis: "
            "raise [cache] idempotency_max_entries, or share them through redis_url).",
            registry=r,
        )
        self.fallbacks = Counter(
            "finops_shim_fallbacks",
            "Attempts moved to another replica or tier before the first byte.",
            ["from_tier", "to_tier", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "finops_shim_retry_budget_exhausted",
            "Fallbacks refused by a replica's retry budget.",
            ["upstream"],
            registry=r,
        )
        self.hung_abandons = Counter(
            "finops_shim_upstream_hung_abandons",
            "Clients that gave up on a replica which had answered none of the requests it "
            "held for [upstream] hung_after_s; each counts against its circuit.",
            ["tier", "upstream"],
            registry=r,
        )
        self.pool_full = Counter(
            "finops_shim_upstream_pool_full",
            "Attempts that found every connection to a replica busy ([upstream] "
            "max_connections) for the first-byte timeout; not counted against its circuit.",
            ["tier", "upstream"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "finops_shim_circuit_state",
            "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open.",
            ["tier", "upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.outstanding = Gauge(
            "finops_shim_upstream_outstanding",
            "Requests in flight per upstream.",
            ["tier", "upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.router_decisions = Counter(
            "finops_shim_router_decisions",
            "Routing decisions for the alias by chosen tier.",
            ["tier", "router_version", "explored"],
            registry=r,
        )
        self.router_score = Histogram(
            "finops_shim_router_score",
            "Router score distribution (watch it for drift).",
            ["router_version"],
            buckets=tuple(i / 20 for i in range(1, 21)),
            registry=r,
        )
        self.router_info = Gauge(
            "finops_shim_router_info",
            "1 for the router version now serving.",
            ["router_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.truncated_tokens = Counter(
            "finops_shim_truncated_tokens",
            "Input tokens cut by context caps.",
            ["tier"],
            registry=r,
        )
        self.cap_rejections = Counter(
            "finops_shim_cap_rejections",
            "Requests rejected by a context cap.",
            ["tier"],
            registry=r,
        )
        self.coalesce_timeouts = Counter(
            "finops_shim_coalesce_timeouts",
            "Requests that stopped waiting for an identical one in flight (held back by its "
            "slow client) and called the upstream themselves.",
            registry=r,
        )
        self.cap_reroutes = Counter(
            "finops_shim_cap_reroutes",
            "Routed requests over their routed tier's context cap, sent to a tier up whose "
            "cap they fit (from_tier -> to_tier).",
            ["from_tier", "to_tier"],
            registry=r,
        )
        self.reloads = Counter(
            "finops_shim_reloads",
            "Config/router reloads by result (ok, refused).",
            ["result"],
            registry=r,
        )
        # per worker since it started; summed over workers, ended ones included
        self.log_records = Gauge(
            "finops_shim_log_records_written",
            "Request-log records written to disk.",
            registry=r,
            multiprocess_mode="sum",
        )
        self.log_errors = Gauge(
            "finops_shim_log_write_errors",
            "Request-log records lost to write errors.",
            registry=r,
            multiprocess_mode="sum",
        )
        self.stored_response_calls = Counter(
            "finops_shim_stored_response_calls",
            "Calls on stored Responses API answers (retrieve, cancel, delete, input_items) "
            "by status; a 404 is an id unknown here or another tenant's. Follow-ups "
            "(previous_response_id) count with op follow_up.",
            ["op", "status"],
            registry=r,
        )
        self.log_backlog = Gauge(
            "finops_shim_log_backlog",
            "Request-log records queued in memory, not yet on disk (grows while the disk "
            "is stuck or full: records are kept, up to 200,000, then newer ones are dropped "
            "and counted in finops_shim_log_write_errors).",
            registry=r,
            multiprocess_mode="livesum",
        )

        for name, metric in list(vars(self).items()):
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                setattr(self, name, CachedLabels(metric))

    def set_router(self, version: str) -> None:
        # not clear(): under multiprocess mode the old value stays in the worker's file
        if self._router_version is not None and self._router_version != version:
            self.router_info.labels(self._router_version).set(0)
        self.router_info.labels(version).set(1)
        self._router_version = version

    def drop_upstream(self, tier: str, url: str) -> None:
        """Stop reporting an upstream a reload removed (its circuit and in-flight gauges).

        In multiprocess mode removing a child does not reach the worker files the
        scrape reads (prometheus_client does not implement it there and only warns),
        so the last value would stay forever: the gauges are set to 0 instead, which
        is neutral for both modes. `outstanding` is `livesum`: 0 adds nothing to the
        other workers' sum. `circuit_state` is `livemax`: 0 (closed) never hides
        another worker's value, so a worker that has not reloaded yet still shows its
        own; once all have, the series reads 0 (nothing open) and stays until the
        workers restart, as `router_info` does for an old router version.
        """
        gauges = (self.circuit_state, self.outstanding)
        if multiprocess_dir() is None:
            for g in gauges:
                g.remove(tier, url)
        else:
            for g in gauges:
                g.labels(tier, url).set(0)

    def exposition(self) -> bytes:
        """Prometheus text: this app's registry, or all workers' files in multiprocess mode."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=path)
        return generate_latest(merged)
