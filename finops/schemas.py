"""Table contracts of the lake: columns, types, keys and row rules.

Every writer (collectors, the shim's log ingest, the demo) goes through
`finops.lake.Lake.append`, which validates against these definitions. Keeping
them in one place is what lets the views, the marts and the tests agree on
what a column means. Units live in column names (`_ms`, `_tokens`) or in the
`unit` notes below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import polars as pl

TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class ValueRule:
    """Bounds a metric's value has by definition (a percent, a ratio, a count).

    A value outside them is no measurement (a utilization of -5 %, a counter
    of -100): loaded, it would drag a mart's mean or a counter increase. The
    rule applies to a row whose metric name fully matches `pattern` (when
    given) and whose `type` is one of `types` (when given). NaN and null
    values are left alone: they say "no reading", which the clean views drop.
    """

    what: str  # what the metric is, for the reject's reason
    pattern: str = ""
    types: tuple[str, ...] = ()
    low: float | None = 0.0
    high: float | None = None

    def applies(self, name: str | None, type_: str | None) -> bool:
        if self.pattern and (name is None or not re.fullmatch(self.pattern, name)):
            return False
        return not self.types or type_ in self.types

    def bounds(self) -> str:
        if self.high is None:
            return f">= {self.low:g}"
        return f"between {self.low:g} and {self.high:g}"


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
    # metric tables: the column naming each row's metric, and the bounds some metrics'
    # `value` has by definition (see `impossible_values`; the first matching rule wins)
    metric_column: str | None = None
    value_rules: tuple[ValueRule, ...] = ()
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
    metric_column="field",
    value_rules=(
        ValueRule("a utilization percent", r"DCGM_FI_DEV_\w*_UTIL", high=100.0),
        ValueRule(
            "a ratio of time or cycles",
            r"DCGM_FI_PROF_\w+_ACTIVE|DCGM_FI_PROF_SM_OCCUPANCY",
            high=1.0,
        ),
        ValueRule(
            "an amount (memory, power, energy, clock) or a count",
            r"DCGM_FI_DEV_(FB_\w+|POWER_USAGE\w*|TOTAL_ENERGY_CONSUMPTION|\w+_CLOCK"
            r"|\w+_COUNTER|\w+_REMAPPED_ROWS|NVLINK_BANDWIDTH_\w+)|DCGM_FI_PROF_\w+_BYTES",
        ),
    ),
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
    metric_column="metric",
    value_rules=(
        ValueRule("a fraction of the cache (0-1)", r"vllm:(kv|gpu|cpu)_cache_usage_perc", high=1.0),
        ValueRule("a number of requests", r"vllm:num_requests_\w+"),
        ValueRule("a counter", types=("counter",)),
        ValueRule("a counter", r".+_total"),
        ValueRule(
            "a histogram or summary count",
            r".+_(bucket|count)",
            types=("histogram", "gaugehistogram", "summary"),
        ),
        ValueRule("a histogram count", r"vllm:.+_(bucket|count)"),
    ),
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


PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
"""vLLM's prefix-cache token counters: hits are a subset of the queried tokens."""


def impossible_values(df: pl.DataFrame, schema: TableSchema) -> pl.Series | None:
    """Why each row's `value` is impossible by definition (null: fine); None if no row is.

    Per row, `schema.value_rules` (a negative counter or utilization, a ratio
    above 1). Across rows of `serving_samples` (same target, series and time):
    a histogram bucket whose `le` is not a number, a bucket below a smaller
    bucket (buckets are cumulative), and prefix-cache hits above the queries
    they are part of. Collectors send such rows to `rejects` and load the rest.
    """
    if df.height == 0 or schema.metric_column is None or "value" not in df.columns:
        return None
    value = df["value"]
    if not value.dtype.is_float():
        value = value.cast(pl.Float64, strict=False)
    names = df[schema.metric_column]
    types = (
        df["type"]
        if "type" in df.columns
        else pl.repeat(None, df.height, dtype=pl.String, eager=True)
    )
    reasons: list[pl.Series] = []
    pairs = pl.DataFrame({"n": names, "t": types}).unique()
    rule_of: dict[tuple[str | None, str | None], int] = {}
    for n, t in pairs.iter_rows():
        i = next((i for i, r in enumerate(schema.value_rules) if r.applies(n, t)), None)
        if i is not None:
            rule_of[(n, t)] = i
    if rule_of:
        keyed = pl.DataFrame(
            {
                "n": [k[0] for k in rule_of],
                "t": [k[1] for k in rule_of],
                "rule": list(rule_of.values()),
            },
            schema={"n": names.dtype, "t": pl.String, "rule": pl.Int32},
        )
        rule = (
            pl.DataFrame({"n": names, "t": types.cast(pl.String)})
            .join(keyed, on=["n", "t"], how="left", maintain_order="left", nulls_equal=True)
            .get_column("rule")
        )
        lows = [r.low for r in schema.value_rules]
        highs = [r.high for r in schema.value_rules]
        low = rule.replace_strict(
            list(range(len(lows))), lows, default=None, return_dtype=pl.Float64
        )
        high = rule.replace_strict(
            list(range(len(highs))), highs, default=None, return_dtype=pl.Float64
        )
        real = value.is_not_null() & value.is_not_nan()
        out = ((value < low).fill_null(False) | (value > high).fill_null(False)) & real
        if out.any():
            whats = [f"{r.what}, {r.bounds()}" for r in schema.value_rules]
            what = rule.replace_strict(
                list(range(len(whats))), whats, default=None, return_dtype=pl.String
            )
            frame = pl.DataFrame({"bad": out, "n": names, "what": what, "v": value})
            reasons.append(
                frame.select(
                    pl.when("bad").then(
                        pl.format(
                            "field 'value': {} is {}; got {}",
                            "n",
                            "what",
                            pl.col("v").cast(pl.String),
                        )
                    )
                ).to_series()
            )
    if schema.name == SERVING_SAMPLES.name and {"labels", "ts", "target"} <= set(df.columns):
        reasons += _histogram_problems(df, value)
        reasons += _prefix_problems(df, value)
    if not reasons:
        return None
    merged = pl.DataFrame(reasons, schema=[f"r{i}" for i in range(len(reasons))]).select(
        pl.coalesce(pl.all())
    )
    out_s = merged.to_series().alias("reason")
    return out_s if out_s.is_not_null().any() else None


_LE = r'"le":"(?:[^"\\]|\\.)*"'


def _series_frame(df: pl.DataFrame, value: pl.Series) -> pl.DataFrame:
    """The columns the across-row checks compare (series, time, value), with row numbers."""
    return pl.DataFrame(
        {
            "metric": df["metric"],
            "labels": df["labels"],
            "target": df["target"],
            "ts": df["ts"],
            "v": value,
        }
    ).with_row_index("i")


def _histogram_problems(df: pl.DataFrame, value: pl.Series) -> list[pl.Series]:
    """Buckets whose `le` is not a number, and buckets below a smaller bucket of their series."""
    frame = _series_frame(df, value)
    buckets = frame.filter(
        pl.col("metric").str.ends_with("_bucket")
        & pl.col("labels").str.contains('"le":', literal=True)
    )
    if buckets.height == 0:
        return []
    # each distinct label set once (a histogram repeats a few hundred over many points):
    # its `le`, and the label set without `le` (the histogram it belongs to), as ids
    per_labels = (
        buckets.select(pl.col("labels").unique())
        .with_columns(le_text=pl.col("labels").str.json_path_match("$.le"))
        .with_columns(
            le=pl.col("le_text").cast(pl.Float64, strict=False),
            series=pl.col("labels")
            .str.replace(_LE, "")
            .str.replace(",}", "}", literal=True)
            .str.replace("{,", "{", literal=True)
            .cast(pl.Categorical)
            .to_physical(),
        )
    )
    buckets = buckets.join(per_labels, on="labels", how="left").with_columns(
        _ids("target"), _ids("metric")
    )
    out: list[pl.Series] = []
    bad_le = buckets.filter(pl.col("le").is_null() | pl.col("le").is_nan())
    if bad_le.height:
        out.append(
            _at_rows(
                df.height,
                bad_le["i"],
                bad_le.select(
                    pl.format(
                        "label 'le': a histogram bucket's upper bound must be a number, got '{}'",
                        pl.col("le_text").fill_null("?").str.slice(0, 60),
                    )
                ).to_series(),
            )
        )
    ok = buckets.filter(
        pl.col("le").is_not_null()
        & pl.col("le").is_not_nan()
        & pl.col("v").is_not_null()
        & pl.col("v").is_not_nan()
    )
    if ok.height:
        # one histogram: its buckets at one time, in `le` order; each must hold at least
        # the largest count below it
        group = ("target_id", "metric_id", "series", "ts")
        ok = ok.sort(*group, "le")
        ok = ok.with_columns(below=pl.col("v").cum_max().shift(1).over(group))
        fall = ok.filter(pl.col("v") < pl.col("below"))
        if fall.height:
            out.append(
                _at_rows(
                    df.height,
                    fall["i"],
                    fall.select(
                        pl.format(
                            "field 'value': bucket le={} counts {}, fewer than a smaller bucket "
                            "of the same histogram ({}); buckets are cumulative",
                            "le_text",
                            pl.col("v").cast(pl.String),
                            pl.col("below").cast(pl.String),
                        )
                    ).to_series(),
                )
            )
    return out


def _ids(column: str) -> pl.Expr:
    """A string column as dense integer ids (sorting and grouping on them is cheap)."""
    return pl.col(column).cast(pl.Categorical).to_physical().alias(f"{column}_id")


def _prefix_problems(df: pl.DataFrame, value: pl.Series) -> list[pl.Series]:
    """Prefix-cache hits above the queried tokens of the same series and time (both rows)."""
    frame = _series_frame(df, value)
    key = ["target", "labels", "ts"]
    hits = frame.filter(pl.col("metric") == PREFIX_HITS)
    if hits.height == 0:
        return []
    queries = frame.filter(pl.col("metric") == PREFIX_QUERIES)
    pair = hits.join(queries, on=key, how="inner", suffix="_q", nulls_equal=True).filter(
        pl.col("v") > pl.col("v_q")
    )
    if pair.height == 0:
        return []
    reason = pair.select(
        pl.format(
            "field 'value': {} {} exceeds {} {} of the same series and time; hits are a "
            "subset of the queried tokens",
            pl.lit(PREFIX_HITS),
            pl.col("v").cast(pl.String),
            pl.lit(PREFIX_QUERIES),
            pl.col("v_q").cast(pl.String),
        )
    ).to_series()
    return [_at_rows(df.height, pl.concat([pair["i"], pair["i_q"]]), pl.concat([reason, reason]))]


def _at_rows(n: int, idx: pl.Series, reasons: pl.Series) -> pl.Series:
    """A length-`n` reason column: `reasons` at rows `idx`, null elsewhere."""
    return (
        pl.DataFrame({"i": pl.int_range(n, dtype=pl.UInt32, eager=True)})
        .join(
            pl.DataFrame({"i": idx.cast(pl.UInt32), "r": reasons.cast(pl.String)}).unique(
                "i", keep="first"
            ),
            on="i",
            how="left",
            maintain_order="left",
        )
        .get_column("r")
    )
