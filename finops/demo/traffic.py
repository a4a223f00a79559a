"""The demo request log: real trace shapes, a working week, and the usual messes.

Arrival times and prompt/output sizes are resampled from the public traces in
`../shared/data/traces/` (Azure LLM 2023, Mooncake FAST'25; a fresh clone reads the
same numbers from `data/traces/`): within each hour
the arrivals are a thinned, rotated copy of the Azure conversation trace (so
real burstiness survives), and the hourly volume follows a weekday/weekend
diurnal curve. Mooncake's `hash_ids` (512-token prompt blocks) give realistic
prefix-cache hits. On top come the things a FinOps tool must see through:
Zipf-shaped tenants, features with different token profiles (one attaching
far too much context), exact duplicates served from the shim's response
cache, retry bursts during upstream incidents, and one vLLM restart.

Everything is vectorized with numpy; loops run over hours, tenants, tiers or
retry attempts, never over requests.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson
import polars as pl

from finops.demo.fleet import TIER_ORDER, TIERS, Fleet

TRACES_ENV = "FINOPS_TRACES_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRACE_FILES = {
    "conv": "azure-llm-2023-conv.csv",
    "code": "azure-llm-2023-code.csv",
    "mooncake_conv": "mooncake-fast25-conversation.jsonl",
    "mooncake_synth": "mooncake-fast25-synthetic.jsonl",
}
BLOCK_TOKENS = 512  # Mooncake hash_ids name 512-token prompt blocks
VLLM_BLOCK = 16  # vLLM prefix caching works in 16-token KV blocks
REQUESTS_PER_WEEK = 420_000

TENANTS = (
    "acme-support", "globex-search", "initech-devtools", "umbrella-legal", "hooli-mail",
    "stark-analytics", "wayne-fin", "wonka-marketing", "tyrell-hr", "cyberdyne-ops",
    "soylent-data", "aperture-labs",
)  # fmt: skip
FEATURES = (
    "chat-assistant", "code-complete", "rag-qa", "summarize", "extract", "classify", "embeddings",
)  # fmt: skip
F = {name: i for i, name in enumerate(FEATURES)}
FEATURE_WEIGHTS = np.array([0.30, 0.20, 0.12, 0.07, 0.10, 0.10, 0.11])
STREAM_P = np.array([0.9, 0.95, 0.7, 0.3, 0.05, 0.0, 0.0])
DUP_P = np.array([0.02, 0.03, 0.04, 0.05, 0.06, 0.12, 0.10])
SYSTEM_PROMPT = np.array([350, 600, 0, 0, 900, 400, 0])  # cached system-prompt tokens
TOOLS_P = np.array([0.25, 0.0, 0.1, 0.0, 0.5, 0.0, 0.0])
CACHEABLE = np.array([False, False, False, True, True, True, True])  # shim response cache on
EXPLICIT_TIER = np.array([2, 1, 2, 1, 0, 0, 0])  # tier a client names when not using "auto"
DIFFICULTY = np.array([0.3, 0.1, 0.9, 0.5, -0.6, -1.4, -3.0])  # router score offset
ROUTER_VERSIONS = ("router-2026.11.0", "router-2026.11.1")
EPSILON = 0.06  # router exploration: logs propensities for off-policy evaluation


class TracesMissing(FileNotFoundError):
    pass


SHARED_TRACES = PROJECT_ROOT.parent / "shared" / "data" / "traces"
# The columns the demo reads from the four traces, committed so a fresh clone runs
# `make demo` with no download (scripts/embed_traces.py rebuilds it from the originals).
EMBEDDED_TRACES = PROJECT_ROOT / "data" / "traces" / "demo-traces.parquet"


def traces_dir() -> Path:
    """`$FINOPS_TRACES_DIR`, else `../shared/data/traces` next to the project."""
    env = os.environ.get(TRACES_ENV)
    return Path(env) if env else SHARED_TRACES


def _has_traces(base: Path) -> bool:
    return all((base / name).is_file() for name in TRACE_FILES.values())


@dataclass(frozen=True)
class Traces:
    conv: pl.DataFrame  # offset_s, input, output
    code: pl.DataFrame
    mooncake_conv: pl.DataFrame  # offset_s, input, output, prefix_hit_tokens
    mooncake_synth: pl.DataFrame


def _prefix_hits(hash_ids: list[list[int]]) -> np.ndarray:
    """Tokens of each prompt whose leading 512-token blocks were seen before in the trace."""
    seen: set[int] = set()
    out = np.zeros(len(hash_ids), dtype=np.int64)
    for i, ids in enumerate(hash_ids):
        k = 0
        for h in ids:
            if h not in seen:
                break
            k += 1
        out[i] = k * BLOCK_TOKENS
        seen.update(ids)
    return out


def load_traces(path: str | os.PathLike[str] | None = None) -> Traces:
    """Read the four public traces; a clear error names what is missing and how to fix it.

    `path` defaults to `traces_dir()`; when that is the default folder and it does not
    hold the traces, the extract committed in `data/traces/` is read instead (the
    same numbers). An explicit `path` or `$FINOPS_TRACES_DIR` must hold them.
    Results are cached per source.
    """
    default = path is None and TRACES_ENV not in os.environ
    if default and not _has_traces(SHARED_TRACES) and EMBEDDED_TRACES.is_file():
        return _load_embedded(str(EMBEDDED_TRACES))
    return _load_traces(str(Path(path) if path else traces_dir()))


TRACE_KEYS = ("conv", "code", "mooncake_conv", "mooncake_synth")


def traces_frame(tr: Traces) -> pl.DataFrame:
    """The four traces as one table (a `trace` column names each), as `data/traces/` keeps them."""
    parts = []
    for key in TRACE_KEYS:
        df = getattr(tr, key)
        if "prefix_hit_tokens" not in df.columns:
            df = df.with_columns(prefix_hit_tokens=pl.lit(None, dtype=pl.Int64))
        parts.append(df.select(pl.lit(key).alias("trace"), pl.all()))
    return pl.concat(parts)


@lru_cache(maxsize=2)
def _load_embedded(path: str) -> Traces:
    df = pl.read_parquet(path)
    got = {key: df.filter(pl.col("trace") == key).drop("trace") for key in TRACE_KEYS}
    if any(g.height == 0 for g in got.values()):
        raise TracesMissing(f"{path}: the embedded trace extract lacks a trace; rebuild it "
                            "with scripts/embed_traces.py")  # fmt: skip
    return Traces(
        got["conv"].drop("prefix_hit_tokens"),
        got["code"].drop("prefix_hit_tokens"),
        got["mooncake_conv"],
        got["mooncake_synth"],
    )


@lru_cache(maxsize=4)
def _load_traces(path: str) -> Traces:
    base = Path(path)
    missing = [name for name in TRACE_FILES.values() if not (base / name).is_file()]
    if missing:
        raise TracesMissing(
            f"{base}: demo traces not found ({', '.join(missing)}); the demo replays the public "
            f"Azure LLM 2023 and Mooncake FAST'25 traces. Put them there or set {TRACES_ENV} "
            f"(unset, the demo falls back to the extract in {EMBEDDED_TRACES.parent})."
        )
    azure = {}
    for key in ("conv", "code"):
        df = pl.read_csv(base / TRACE_FILES[key], schema_overrides={"TIMESTAMP": pl.String})
        ts = df["TIMESTAMP"].str.slice(0, 26).str.to_datetime("%Y-%m-%d %H:%M:%S%.f")
        secs = (ts - ts.min()).dt.total_microseconds().cast(pl.Float64) / 1e6
        azure[key] = pl.DataFrame(
            {
                "offset_s": secs,
                "input": df["ContextTokens"].cast(pl.Int64),
                "output": df["GeneratedTokens"].cast(pl.Int64),
            }
        )
    moon = {}
    for key in ("mooncake_conv", "mooncake_synth"):
        lines = (base / TRACE_FILES[key]).read_bytes().splitlines()
        rows = [orjson.loads(line) for line in lines if line.strip()]
        moon[key] = pl.DataFrame(
            {
                "offset_s": np.array([r["timestamp"] for r in rows], dtype=np.float64) / 1e3,
                "input": np.array([r["input_length"] for r in rows], dtype=np.int64),
                "output": np.array([r["output_length"] for r in rows], dtype=np.int64),
                "prefix_hit_tokens": _prefix_hits([r["hash_ids"] for r in rows]),
            }
        )
    return Traces(azure["conv"], azure["code"], moon["mooncake_conv"], moon["mooncake_synth"])


def hourly_shape(start: dt.datetime, hours: int) -> np.ndarray:
    """Relative request rate per hour: weekday double hump, nights and weekends low."""
    h = np.arange(hours)
    hour = (start.hour + h) % 24
    weekday = (start.weekday() + (start.hour + h) // 24) % 7
    day = np.exp(-(((hour - 10.5) / 2.6) ** 2)) + 0.85 * np.exp(-(((hour - 15.5) / 2.4) ** 2))
    evening = 0.25 * np.exp(-(((hour - 20.5) / 2.0) ** 2))
    shape = 0.05 + day + evening
    weekend = np.where(weekday == 5, 0.3, np.where(weekday == 6, 0.22, 1.0))
    friday = np.where(weekday == 4, 0.85, 1.0)
    return shape * weekend * friday


def hex_ids(rng: np.random.Generator, n: int) -> pl.Series:
    """n random 64-bit ids as 16 hex digits (deterministic for the generator)."""
    raw = rng.integers(0, 2**64, size=n, dtype=np.uint64) | np.uint64(1)
    return pl.Series(raw.astype(">u8").view("S8")).bin.encode("hex")


@dataclass(frozen=True)
class Incident:
    """An upstream tier failing for a while (overload 503, rate limit 429, timeout 504)."""

    tier: int
    start_s: float
    end_s: float
    status: int

    @property
    def error_type(self) -> str:
        return {503: "server_error", 429: "rate_limit_error", 504: "timeout"}[self.status]


@dataclass(frozen=True)
class Restart:
    """One vLLM replica crashing and coming back: counters reset to zero."""

    replica: int
    at_s: float
    down_s: float


@dataclass
class Traffic:
    """The request log plus per-request timing the telemetry is built from."""

    requests: pl.DataFrame  # lake columns of `requests`
    timing: pl.DataFrame  # replica, finish_s, queue_s, prefill_s, decode_s, itl_s, ttft_s, e2e_s
    incidents: list[Incident]
    restart: Restart


def _incidents(rng: np.random.Generator, days: int, shape: np.ndarray) -> list[Incident]:
    n = max(1, round(days * 0.6))
    busy_hours = np.flatnonzero(shape >= np.quantile(shape, 0.7))
    hours = rng.choice(busy_hours, size=min(n, busy_hours.size), replace=False)
    statuses = (503, 429, 504)
    out = []
    for k, hour in enumerate(sorted(hours)):
        start = float(hour) * 3600 + rng.uniform(0, 2400)
        out.append(
            Incident(
                tier=int(rng.integers(0, 3)),
                start_s=start,
                end_s=start + rng.uniform(360, 1200),
                status=statuses[k % 3],
            )
        )
    return out


def generate_traffic(
    fleet: Fleet,
    *,
    start: dt.datetime,
    days: int,
    seed: int,
    scale: float = 1.0,
    scrape_s: int = 120,
    traces: Traces | None = None,
) -> Traffic:
    """Simulate `days` of requests against `fleet`; deterministic for `seed`."""
    tr = traces or load_traces()
    rng = np.random.default_rng([seed, 1])
    hours = days * 24
    horizon = hours * 3600.0
    shape = hourly_shape(start, hours)
    daily_noise = np.repeat(rng.lognormal(0, 0.08, days), 24)
    rate = shape * daily_noise
    per_hour = rng.poisson(REQUESTS_PER_WEEK * scale * days / 7 * rate / rate.sum())

    # Arrivals: thin a rotated copy of the real Azure trace's one hour per simulated hour.
    trace_off = tr.conv["offset_s"].to_numpy() % 3600.0
    chunks = []
    for h, k in enumerate(per_hour):
        idx = rng.choice(trace_off.size, size=int(k), replace=bool(k > trace_off.size))
        off = (trace_off[idx] + rng.uniform(0, 3600)) % 3600.0
        chunks.append(h * 3600.0 + off + rng.uniform(0, 0.05, k))
    t = np.sort(np.concatenate(chunks))
    n = t.size

    # Tenants (Zipf shares) and their feature mixes.
    zipf = 1.0 / np.arange(1, len(TENANTS) + 1) ** 1.15
    tenant = rng.choice(len(TENANTS), size=n, p=zipf / zipf.sum())
    mix = rng.dirichlet(FEATURE_WEIGHTS * 12, size=len(TENANTS))
    cdf = np.cumsum(mix, axis=1)
    feature = (rng.random(n)[:, None] > cdf[tenant]).sum(axis=1).clip(0, len(FEATURES) - 1)

    # Prompt and output sizes from the traces, per feature.
    inp = np.zeros(n, dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    cached = np.zeros(n, dtype=np.int64)
    turns = np.ones(n, dtype=np.int64)

    def draw(frame: pl.DataFrame, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        i = rng.integers(0, frame.height, mask.sum())
        hits = (
            frame["prefix_hit_tokens"].to_numpy()[i]
            if "prefix_hit_tokens" in frame.columns
            else np.zeros(i.size, dtype=np.int64)
        )
        return frame["input"].to_numpy()[i], frame["output"].to_numpy()[i], hits

    m = feature == F["chat-assistant"]
    inp[m], out[m], _ = draw(tr.conv, m)
    turns[m] = 1 + rng.geometric(0.35, m.sum()).clip(max=30) - 1
    m = feature == F["code-complete"]
    inp[m], out[m], _ = draw(tr.code, m)
    m = feature == F["rag-qa"]  # the over-attached one: some callers paste whole corpora
    inp[m], out[m], cached[m] = draw(tr.mooncake_conv, m)
    over = m & (rng.random(n) < 0.2)
    inp[over] = (inp[over] * (1.5 + rng.pareto(1.1, over.sum()))).astype(np.int64).clip(max=400_000)
    turns[m] = rng.geometric(0.5, m.sum()).clip(max=12)
    m = feature == F["summarize"]
    inp[m], out[m], cached[m] = draw(tr.mooncake_synth, m)
    out[m] = out[m].clip(min=40, max=900)
    m = feature == F["extract"]
    inp[m], _, _ = draw(tr.conv, m)
    out[m] = rng.lognormal(4.0, 0.6, m.sum()).astype(np.int64).clip(5, 1024)
    m = feature == F["classify"]
    inp[m], _, _ = draw(tr.conv, m)
    inp[m] = (inp[m] * 0.4).astype(np.int64).clip(min=20)
    out[m] = rng.integers(1, 7, m.sum())
    m = feature == F["embeddings"]
    inp[m], _, _ = draw(tr.conv, m)
    inp[m] = inp[m].clip(max=8192)
    out[m] = 0
    sys_hit = (rng.random(n) < 0.85) * np.minimum(SYSTEM_PROMPT[feature], inp)
    cached = np.maximum(cached, sys_hit // VLLM_BLOCK * VLLM_BLOCK)
    cached = np.minimum(cached, (inp - 1).clip(min=0) // VLLM_BLOCK * VLLM_BLOCK)

    # Routing: "auto" goes through the router (score -> tier, epsilon exploration).
    is_embed = feature == F["embeddings"]
    explicit = is_embed | (rng.random(n) < 0.12)
    score = 1.0 / (
        1.0 + np.exp(-(DIFFICULTY[feature] + 0.45 * (np.log1p(inp) - 7.0) + rng.normal(0, 0.6, n)))
    )
    v2 = t >= horizon * 0.5
    lo = np.where(v2, 0.45, 0.35)
    hi = np.where(v2, 0.78, 0.70)
    greedy = np.where(score < lo, 0, np.where(score < hi, 1, 2))
    explore = rng.random(n) < EPSILON
    tier = np.where(explore, rng.integers(0, 3, n), greedy)
    propensity = np.where(tier == greedy, 1 - EPSILON + EPSILON / 3, EPSILON / 3)
    forced = ~explicit & (inp > TIERS["mid"].max_model_len)
    tier = np.where(forced, 2, tier)
    propensity = np.where(forced, 1.0, propensity)
    tier = np.where(explicit, EXPLICIT_TIER[feature], tier)
    explicit_other = explicit & ~is_embed & (rng.random(n) < 0.3)
    tier = np.where(explicit_other, rng.integers(0, 3, n), tier)

    # Context limits: the shim truncates for most callers, the rest get a 400 from vLLM.
    max_len = np.array([TIERS[name].max_model_len for name in TIER_ORDER])[tier]
    too_long = inp + out > max_len
    truncate = too_long & (rng.random(n) < 0.6)
    truncated = np.where(truncate, inp + out - max_len + 256, 0)
    inp = inp - truncated
    cached = np.minimum(cached, inp)
    ctx_error = too_long & ~truncate

    # Replicas within the tier; one replica restarts mid-week (down a few minutes).
    tier_reps = [fleet.replicas_of(name) for name in TIER_ORDER]
    replica = np.empty(n, dtype=np.int64)
    for k, reps in enumerate(tier_reps):
        mk = tier == k
        replica[mk] = np.asarray(reps)[rng.integers(0, len(reps), mk.sum())]
    mid_reps = tier_reps[1]
    crash_day = min(2, days - 1)
    restart = Restart(
        replica=mid_reps[-1],
        at_s=float(crash_day * 86400 + 14 * 3600 + 3 * scrape_s),
        down_s=float(4 * scrape_s),
    )
    down = (replica == restart.replica) & (t >= restart.at_s) & (t < restart.at_s + restart.down_s)
    if len(mid_reps) > 1:
        replica[down] = np.asarray(mid_reps[:-1])[rng.integers(0, len(mid_reps) - 1, down.sum())]
        down[:] = False

    stream = (rng.random(n) < STREAM_P[feature]) & ~is_embed
    fingerprint = hex_ids(rng, n)

    tools = rng.random(n) < TOOLS_P[feature]

    base = _Frame(
        t=t, tenant=tenant, feature=feature, inp=inp, out=out, cached=cached, turns=turns,
        tier=tier, replica=replica, explicit=explicit, score=score, propensity=propensity,
        v2=v2, stream=stream, truncated=truncated, ctx_error=ctx_error, fingerprint=fingerprint,
        tools=tools, dup_of=np.full(n, -1), attempt=np.ones(n, dtype=np.int64),
        retry_of=np.full(n, -1), down=down, cache_hit=np.zeros(n, dtype=bool),
        status=np.where(ctx_error, 400, np.where(down, 503, 200)),
    )  # fmt: skip
    base = _add_duplicates(base, rng)
    incidents = _incidents(rng, days, shape)
    base = _add_retries(base, rng, incidents, horizon)
    return _finish(base, fleet, rng, start, horizon, incidents, restart)


@dataclass
class _Frame:
    """Column arrays of the request log under construction (one entry per request)."""

    t: np.ndarray
    tenant: np.ndarray
    feature: np.ndarray
    inp: np.ndarray
    out: np.ndarray
    cached: np.ndarray
    turns: np.ndarray
    tier: np.ndarray
    replica: np.ndarray
    explicit: np.ndarray
    score: np.ndarray
    propensity: np.ndarray
    v2: np.ndarray
    stream: np.ndarray
    truncated: np.ndarray
    ctx_error: np.ndarray
    fingerprint: pl.Series
    tools: np.ndarray
    dup_of: np.ndarray
    attempt: np.ndarray
    retry_of: np.ndarray
    down: np.ndarray
    cache_hit: np.ndarray
    status: np.ndarray

    def take(self, idx: np.ndarray) -> _Frame:
        return _Frame(
            **{
                k: (v.gather(idx) if isinstance(v, pl.Series) else v[idx])
                for k, v in self.__dict__.items()
            }
        )

    def concat(self, other: _Frame) -> _Frame:
        out = {}
        for k, v in self.__dict__.items():
            w = other.__dict__[k]
            out[k] = v.append(w) if isinstance(v, pl.Series) else np.concatenate([v, w])
        return _Frame(**out)

    def __len__(self) -> int:
        return self.t.size


CACHE_TTL_S = 600.0


def _add_duplicates(f: _Frame, rng: np.random.Generator) -> _Frame:
    """Exact repeats of a prompt minutes later; cacheable ones hit the shim's cache."""
    pick = np.flatnonzero((rng.random(len(f)) < DUP_P[f.feature]) & (f.status == 200))
    dup = f.take(pick)
    gap = rng.exponential(150.0, pick.size) + 1.0
    dup.t = dup.t + gap
    dup.dup_of = pick
    dup.cache_hit = (
        CACHEABLE[dup.feature] & ~dup.stream & (gap < CACHE_TTL_S) & (rng.random(pick.size) < 0.9)
    )
    return f.concat(dup)


def _fail_in_incidents(f: _Frame, rng: np.random.Generator, incidents: list[Incident]) -> None:
    for inc in incidents:
        hit = (f.tier == inc.tier) & (f.t >= inc.start_s) & (f.t < inc.end_s)
        hit &= (f.status == 200) & ~f.cache_hit & (rng.random(len(f)) < 0.7)
        f.status = np.where(hit, inc.status, f.status)


RETRYABLE = (429, 503, 504)


def _add_retries(
    f: _Frame, rng: np.random.Generator, incidents: list[Incident], horizon: float
) -> _Frame:
    """Requests hitting a failing upstream fail; most clients retry with backoff."""
    _fail_in_incidents(f, rng, incidents)
    frames = [f]
    current = f
    failed = np.flatnonzero(np.isin(f.status, RETRYABLE) & (f.attempt == 1) & ~f.down)
    origin = failed.copy()
    for attempt in (2, 3, 4):
        chosen = rng.random(failed.size) < 0.85
        idx, org = failed[chosen], origin[chosen]
        if idx.size == 0:
            break
        r = current.take(idx)
        wait = np.where(r.status == 504, 60.0, 0.05)
        r.t = r.t + wait + 2.0 ** (attempt - 2) * rng.uniform(0.5, 1.5, idx.size)
        r.attempt = np.full(idx.size, attempt)
        r.retry_of = org
        r.dup_of = np.full(idx.size, -1)
        r.cache_hit = np.zeros(idx.size, dtype=bool)
        r.status = np.full(idx.size, 200)
        _fail_in_incidents(r, rng, incidents)
        keep = np.flatnonzero(r.t < horizon)
        r, org = r.take(keep), org[keep]
        frames.append(r)
        failed = np.flatnonzero(r.status != 200)
        origin = org[failed]
        current = r
    out = frames[0]
    for r in frames[1:]:
        out = out.concat(r)
    return out


ERRORS = {
    400: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_connection_error",
    503: "server_error",
    504: "timeout",
}
FAIL_LATENCY_S = {400: 0.012, 429: 0.004, 500: 0.2, 503: 0.015, 504: 60.0}


def _finish(
    f: _Frame,
    fleet: Fleet,
    rng: np.random.Generator,
    start: dt.datetime,
    horizon: float,
    incidents: list[Incident],
    restart: Restart,
) -> Traffic:
    """Sort by time, derive latencies from per-replica load, and build the frames."""
    inside = np.flatnonzero(f.t < horizon)  # a duplicate of a late request may fall past the end
    order = inside[np.argsort(f.t[inside], kind="stable")]
    rank = np.full(len(f), -1)
    rank[order] = np.arange(order.size)
    f = f.take(order)
    f.dup_of = np.where(f.dup_of >= 0, rank[np.maximum(f.dup_of, 0)], -1)
    f.retry_of = np.where(f.retry_of >= 0, rank[np.maximum(f.retry_of, 0)], -1)
    n = len(f)
    background = (f.status == 200) & ~f.cache_hit & (rng.random(n) < 0.0015)
    f.status = np.where(background, 500, f.status)

    specs = [TIERS[r.tier] for r in fleet.replicas]
    prefill_rate = np.array([s.prefill_tok_s for s in specs])[f.replica]
    decode_rate = np.array([s.decode_tok_s for s in specs])[f.replica]
    base_itl = np.array([s.itl_s for s in specs])[f.replica]
    served = (f.status == 200) & ~f.cache_hit
    fresh = (f.inp - f.cached).astype(np.float64)
    busy = np.where(served, fresh / prefill_rate + f.out / decode_rate, 0.0)
    n_bins = int(np.ceil(horizon / LOAD_BIN_S))
    b = np.minimum((f.t // LOAD_BIN_S).astype(np.int64), n_bins - 1)
    n_rep = len(fleet.replicas)
    load = np.bincount(f.replica * n_bins + b, weights=busy, minlength=n_rep * n_bins)
    rho = np.minimum(load / LOAD_BIN_S, 0.97)[f.replica * n_bins + b]

    queue = rng.exponential(0.004 + 0.25 * rho / (1.0 - rho))
    prefill = fresh / prefill_rate * (1.0 + 0.3 * rho) + 0.004
    itl = base_itl * (1.0 + 0.9 * rho) * rng.lognormal(0.0, 0.12, n)
    decode = np.maximum(f.out - 1, 0) * itl
    gen = f.out > 0
    ttft = queue + prefill + np.where(gen, itl, 0.0)
    e2e = queue + prefill + decode + 0.002

    crashed = (
        served & (f.replica == restart.replica) & (f.t < restart.at_s) & (f.t + e2e > restart.at_s)
    )
    f.status = np.where(crashed, 502, f.status)
    served &= ~crashed
    fail_lat = np.zeros(n)
    for code, secs in FAIL_LATENCY_S.items():
        fail_lat = np.where(f.status == code, secs * rng.uniform(0.7, 1.3, n), fail_lat)
    fail_lat = np.where(crashed, restart.at_s - f.t, fail_lat)
    hit_lat = rng.uniform(0.002, 0.009, n)
    latency = np.where(served, e2e, np.where(f.cache_hit, hit_lat, fail_lat))
    ttft_all = np.where(served, ttft, np.where(f.cache_hit, hit_lat, np.nan))
    ok = f.status == 200
    out_tokens = np.where(ok, f.out, 0)
    cached = np.where(served, f.cached, 0)
    is_embed = f.feature == F["embeddings"]
    max_out = np.array([1000, 1899, 2000, 900, 1024, 6, 0])[f.feature]
    finish = _pick(
        [None, "length", "stop"],
        np.where(~ok | is_embed, 0, np.where((out_tokens >= max_out) & gen, 1, 2)),
    )

    ids = hex_ids(rng, n)
    request_id = pl.select(pl.lit("req-") + ids).to_series()
    idem_raw = hex_ids(rng, n)
    root = np.where(f.retry_of >= 0, f.retry_of, np.arange(n))
    sends_key = (f.tenant % 3 == 0) | (f.retry_of >= 0) | (f.attempt > 1)
    idem = pl.select(pl.lit("idem-") + idem_raw.gather(root)).to_series()
    tier_names = list(TIER_ORDER)
    upstreams = [r.upstream for r in fleet.replicas] + [None]
    models = [TIERS[k].model for k in TIER_ORDER] + [None]
    routed = ~f.explicit
    operation = _pick(
        ["embeddings", "text_completion", "chat"],
        np.where(is_embed, 0, np.where(f.feature == F["code-complete"], 1, 2)),
    )
    cache_status = _pick(
        ["hit", "miss", "bypass"],
        np.where(f.cache_hit, 0, np.where(CACHEABLE[f.feature] & ~f.stream, 1, 2)),
    )
    error_codes = sorted(ERRORS)
    error_idx = np.where(
        np.isin(f.status, error_codes), np.searchsorted(error_codes, f.status), len(error_codes)
    )
    ts = pl.Series("ts", (start.timestamp() * 1e6 + np.round(f.t * 1e6)).astype(np.int64)).cast(
        pl.Datetime("us", "UTC")
    )
    requests = pl.DataFrame(
        {
            "request_id": request_id,
            "ts": ts,
            "source": "demo",
            "tenant": _pick(list(TENANTS), f.tenant),
            "feature": _pick(list(FEATURES), f.feature),
            "operation": operation,
            "request_model": _pick(["auto", *tier_names], np.where(routed, 0, f.tier + 1)),
            "response_model": _pick(models, np.where(ok, f.tier, 3)),
            "tier": _pick(tier_names, f.tier),
            "upstream": _pick(upstreams, np.where(f.cache_hit, len(upstreams) - 1, f.replica)),
            "input_tokens": f.inp,
            "output_tokens": out_tokens,
            "cached_input_tokens": cached,
            "status_code": f.status.astype(np.int32),
            "error_type": _pick([ERRORS[c] for c in error_codes] + [None], error_idx),
            "finish_reason": finish,
            "ttft_ms": np.where(is_embed & served, np.nan, ttft_all * 1e3),
            "latency_ms": latency * 1e3,
            "stream": f.stream,
            "cache_status": cache_status,
            "prompt_fingerprint": pl.select(pl.lit("sha256:") + f.fingerprint).to_series(),
            "idempotency_key": idem,
            "retry_of": request_id.gather(np.maximum(f.retry_of, 0)),
            "attempt": f.attempt.astype(np.int32),
            "truncated_tokens": f.truncated,
            "turn_count": f.turns.astype(np.int32),
            "has_tools": f.tools,
            "router_version": _pick([*ROUTER_VERSIONS, None], np.where(routed, f.v2, 2)),
            "router_score": np.where(routed, np.round(f.score, 4), np.nan),
            "route_propensity": np.where(routed, f.propensity, np.nan),
            "prompt_text": pl.Series([None] * n, dtype=pl.String),
        },
        strict=False,
    ).with_columns(
        pl.col("ttft_ms", "router_score", "route_propensity").fill_nan(None),
        pl.when(pl.Series(routed)).then(pl.col("tier")).alias("routed_tier"),
        pl.when(pl.Series(f.retry_of >= 0)).then(pl.col("retry_of")),
        pl.when(pl.Series(sends_key)).then(pl.col("idempotency_key")),
    )
    timing = pl.DataFrame(
        {
            "replica": np.where(served, f.replica, -1),
            "tier": f.tier,
            "t_s": f.t,
            "finish_s": f.t + np.where(served, e2e, latency),
            "input_tokens": np.where(served, f.inp, 0),
            "output_tokens": np.where(served, f.out, 0),
            "cached_tokens": cached,
            "queue_s": queue,
            "prefill_s": prefill,
            "decode_s": decode,
            "itl_s": itl,
            "ttft_s": ttft,
            "e2e_s": e2e,
            "busy_s": np.where(served, busy, 0.0),
            "finish_reason": finish,
            "generates": gen,
        }
    )
    return Traffic(requests, timing, incidents, restart)


LOAD_BIN_S = 30.0


def _pick(choices: list[str | None], idx: np.ndarray) -> pl.Series:
    """Strings by index into a short list of choices (None allowed), without Python loops."""
    return pl.Series(choices, dtype=pl.String).gather(np.asarray(idx, dtype=np.int64))
