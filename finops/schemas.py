"""Table contracts of the lake: columns, types, keys and row rules.

Every writer (collectors, the shim's log ingest, the demo) goes through
`finops.lake.Lake.append`, which validates against these definitions. Keeping
them in one place is what lets the views, the marts and the tests agree on
what a column means. Units live in column names (`_ms`, `_tokens`) or in the
`unit` notes below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class TableSchema:
    """One lake table: its columns, the deterministic key, and row rules.

    `key` names the columns that identify a row: loading the same row twice
    yields the same key, so clean views keep one. `required` columns must be
    non-null, and a required string column non-blank (an empty or whitespace-only id is
    missing, not a key every such row would share); `non_negative` numeric columns must
    be >= 0; `allowed` columns must hold one of their listed values (or be null where
    not required). Float columns must hold finite numbers (NaN and infinities are
    rejected: one would turn a mart's mean or percentile into NaN or inf) unless listed
    in `non_finite_ok`. `lowercase` columns (enumerations such as a cache status) are
    stored stripped and lower-cased, as are `allowed` columns, so "HIT" and "hit" are
    one value to every view. `ts_column` is the event time that picks the `date=`
    partition.

    Within one append, a row whose key appears again later in the batch is superseded
    by the later one: an exact copy is loaded once, a differing one is rejected.
    """

    name: str
    columns: dict[str, pl.DataType]
    key: tuple[str, ...]
    required: tuple[str, ...]
    ts_column: str = "ts"
    non_negative: tuple[str, ...] = ()
    # columns whose value must be one of a fixed set (the marts match on them: a typo
    # such as event "hitt" would load and never be counted)
    allowed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # open enumerations, matched by the views in lower case (see the class docstring)
    lowercase: tuple[str, ...] = ()
    # float columns that may hold NaN or +-Inf as data (exported metric samples: an
    # empty Prometheus summary's quantile is NaN; the clean views drop NaN samples)
    non_finite_ok: tuple[str, ...] = ()
    doc: dict[str, str] = field(default_factory=dict)

    @property
    def polars_schema(self) -> pl.Schema:
        return pl.Schema(self.columns)


GPU_SAMPLES = TableSchema(
    name="gpu_samples",
    columns={
        "ts": TS,
        "source": pl.String,  # dcgm | nvml | prometheus | demo
        "host": pl.String,
        "gpu_uuid": pl.String,
        "gpu_index": pl.Int32,
        "gpu_model": pl.String,
        "mig_profile": pl.String,
        "mig_instance": pl.String,
        "namespace": pl.String,
        "pod": pl.String,
        "container": pl.String,
        "labels": pl.String,  # extra labels (k8s pod labels, pci_bus_id...) as canonical JSON
        "field": pl.String,  # the exporter's own name, e.g. DCGM_FI_PROF_SM_ACTIVE
        "value": pl.Float64,
    },
    # a series is all of its labels: a GPU shared by pods (time-slicing, MPS) is
    # exported once per pod, and per-XID / per-clock-event counters once per code
    key=(
        "source",
        "host",
        "gpu_uuid",
        "mig_instance",
        "namespace",
        "pod",
        "container",
        "labels",
        "field",
        "ts",
    ),
    required=("ts", "source", "gpu_uuid", "field"),
    non_finite_ok=("value",),
    doc={
        "value": "unit per field: *_UTIL percent 0-100, DCGM_FI_PROF_* ratio 0-1, "
        "FB_* MiB, POWER_USAGE W, TOTAL_ENERGY_CONSUMPTION mJ, TEMP C, CLOCK MHz",
    },
)

SERVING_SAMPLES = TableSchema(
    name="serving_samples",
    columns={
        "ts": TS,
        "source": pl.String,  # vllm | prometheus | demo
        "target": pl.String,  # scrape URL or replica name
        "metric": pl.String,  # normalized name, e.g. vllm:kv_cache_usage_perc
        "type": pl.String,  # counter | gauge | histogram | summary | untyped
        "labels": pl.String,  # canonical JSON (sorted keys), includes le for buckets
        "model_name": pl.String,  # lifted from labels for cheap filtering
        "value": pl.Float64,
    },
    key=("source", "target", "metric", "labels", "ts"),
    required=("ts", "source", "target", "metric"),
    non_finite_ok=("value",),
)

REQUESTS = TableSchema(
    name="requests",
    columns={
        "request_id": pl.String,
        "ts": TS,  # request start
        "source": pl.String,  # shim | demo | ingest:<file>
        "tenant": pl.String,
        "feature": pl.String,
        "operation": pl.String,  # gen_ai.operation.name: chat | text_completion | embeddings
        "request_model": pl.String,  # gen_ai.request.model as the client asked
        "response_model": pl.String,  # gen_ai.response.model as served
        "tier": pl.String,
        "upstream": pl.String,
        "input_tokens": pl.Int64,
        "output_tokens": pl.Int64,
        "cached_input_tokens": pl.Int64,
        "status_code": pl.Int32,
        "error_type": pl.String,
        "finish_reason": pl.String,
        "ttft_ms": pl.Float64,
        "latency_ms": pl.Float64,
        "stream": pl.Boolean,
        "cache_status": pl.String,  # hit | miss | bypass | coalesced
        "prompt_fingerprint": pl.String,
        "idempotency_key": pl.String,
        "retry_of": pl.String,  # request_id of the original when this is a retry
        "attempt": pl.Int32,
        # upstream calls made for this request: 0 when answered without one (a cache hit,
        # a refusal), 2+ after fallbacks (each may have cost a replica work)
        "upstream_attempts": pl.Int32,
        # why the last failed upstream attempt failed, or context_cap: a routed request
        # over its routed tier's cap, served by a tier up
        "fallback_reason": pl.String,
        "truncated_tokens": pl.Int64,
        "turn_count": pl.Int32,  # user turns as the client sent them (before any cap)
        "has_tools": pl.Boolean,
        # the router's prompt-token feature (prompt chars/4, or a token-id prompt's length)
        # as the request arrived: what a router trained from the log must be given
        "prompt_tokens_est": pl.Float64,
        "router_version": pl.String,
        "router_score": pl.Float64,
        "route_propensity": pl.Float64,  # P(logging policy picks routed_tier), exploration included
        "routed_tier": pl.String,  # the router's pick; `tier` differs when a fallback served it
        "prompt_text": pl.String,  # only when capture is on, redacted
    },
    key=("request_id",),
    required=("request_id", "ts"),
    non_negative=(
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "truncated_tokens",
        "upstream_attempts",
        "prompt_tokens_est",
        "ttft_ms",
        "latency_ms",
    ),
    lowercase=("cache_status",),
)

CACHE_EVENTS = TableSchema(
    name="cache_events",
    columns={
        "event_id": pl.String,
        "ts": TS,
        "source": pl.String,
        "layer": pl.String,  # vllm_prefix | shim_response | generic | a generic log's own name
        "event": pl.String,  # hit | miss | store | evict
        "tenant": pl.String,
        "tier": pl.String,
        "model": pl.String,
        "request_id": pl.String,
        "tokens": pl.Int64,  # tokens served from cache (or queried, for misses)
        "requests": pl.Int64,  # requests this event stands for (1 for per-request events)
    },
    key=("event_id",),
    required=("event_id", "ts", "layer", "event"),
    # layer is open (a generic log names its own cache: redis, cdn, ...); the event kinds
    # are what the views count
    allowed={"event": ("hit", "miss", "store", "evict")},
    lowercase=("layer",),
    non_negative=("tokens", "requests"),
)

SCRAPE_HEALTH = TableSchema(
    name="scrape_health",
    columns={
        "ts": TS,
        "target": pl.String,
        "kind": pl.String,  # dcgm | vllm | nvml | prometheus | log
        "up": pl.Boolean,
        "duration_ms": pl.Float64,
        "samples": pl.Int64,
        "rejected": pl.Int64,
        "error": pl.String,
    },
    key=("target", "ts"),
    required=("ts", "target", "kind", "up"),
    non_negative=("duration_ms", "samples", "rejected"),
)

REJECTS = TableSchema(
    name="rejects",
    columns={
        "ts": TS,  # when the row was rejected
        "table_name": pl.String,  # the table it was meant for
        "source": pl.String,
        "location": pl.String,  # file:line, url, or batch row
        "raw": pl.String,  # excerpt of the input, at most 500 characters
        "reason": pl.String,
    },
    key=("table_name", "source", "location", "reason"),
    required=("ts", "table_name", "reason"),
)

TABLES: dict[str, TableSchema] = {
    t.name: t
    for t in (GPU_SAMPLES, SERVING_SAMPLES, REQUESTS, CACHE_EVENTS, SCRAPE_HEALTH, REJECTS)
}


def schema_for(table: str) -> TableSchema:
    """Look a table up by name, with an error that lists the valid ones."""
    try:
        return TABLES[table]
    except KeyError:
        raise KeyError(f"unknown lake table {table!r}; expected one of {sorted(TABLES)}") from None
