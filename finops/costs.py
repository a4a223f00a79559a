"""True unit economics: what GPUs cost, who used them, and where the money leaks.

Every figure comes from the SQL marts in `finops/sql/marts/30_*.sql`..`39_*.sql`
(views `marts.gpu_cost_hourly`, `marts.tier_cost_hourly`, `marts.tier_token_prices`,
`marts.request_costs`, ...), so a notebook, the CLI and plain SQL agree. The
formulas are documented in those files; in short:

- the bill: each GPU that reported in a clock hour costs one GPU-hour at its
  catalog price (`ref.prices`, pricing kind per deployment, default on_demand);
- GPUs belong to tiers by their Kubernetes labels or a user mapping
  (`load_deployments`), and each tier-hour's cost is shared by the requests of
  that tier-hour in proportion to token work (uncached input tokens for the
  prefill share, output tokens for the decode share, the shares split by the
  measured prefill/decode time when vLLM reports it);
- two bases, as OpenCost names them: **allocation** (the whole GPU cost of a
  tier-hour, idle included, goes to its requests; `allocated + unallocated = bill`
  to the cent, where unallocated is the cost no request could carry, GPU-hours
  without requests, not the idle capacity) and **usage** (only
  the busy share, SM activity x cost, goes to requests).

One line from a notebook::

    import finops, finops.costs as fc
    db = finops.connect()
    fc.by_tenant(db, week="2026-W47")
    fc.totals(db, week="2026-W47")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import polars as pl

Basis = Literal["allocation", "usage"]
BASES: tuple[str, ...] = ("allocation", "usage")
DIMENSIONS: dict[str, str] = {
    "tenant": "coalesce(tenant, '(none)')",
    "feature": "coalesce(feature, '(none)')",
    "tier": "coalesce(tier, '(none)')",
    "model": "coalesce(model, '(none)')",
    "operation": "coalesce(operation, '(none)')",
    "hour": "hour",
    "day": "CAST(hour AS DATE)",
}
_WEEK_RE = re.compile(r"^(\d{4})-W(\d{2})$")


class CostError(ValueError):
    """A cost question the lake cannot answer (bad period, no data); the message says why."""


# ----------------------------------------------------------------------------- periods


@dataclass(frozen=True)
class Period:
    """A half-open UTC time range [start, end); None on a side means unbounded."""

    start: dt.datetime | None
    end: dt.datetime | None
    label: str

    def where(self, column: str = "hour") -> str:
        """SQL predicate on a TIMESTAMPTZ column (values are ISO literals, not user text)."""
        parts = []
        if self.start is not None:
            parts.append(f"{column} >= TIMESTAMPTZ '{self.start.isoformat()}'")
        if self.end is not None:
            parts.append(f"{column} < TIMESTAMPTZ '{self.end.isoformat()}'")
        return " AND ".join(parts) or "true"

    @property
    def hours(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return (self.end - self.start).total_seconds() / 3600.0


def _utc(value: dt.datetime) -> dt.datetime:
    """A naive datetime is UTC; an aware one is moved to UTC (the marts' clock hours)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _as_date(value: str | dt.date | dt.datetime, name: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return _utc(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    try:
        d = dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise CostError(f"{name}: expected a date like 2026-11-16, got {value!r}") from None
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)


def period(
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
) -> Period:
    """Parse an ISO week ("2026-W47") or from/to dates (both inclusive) into a Period.

    `end` as a date is inclusive (the whole day counts), as people say "from the
    16th to the 22nd"; a datetime `end` is exclusive. Nothing given: all data. The
    cost functions take datetimes on whole UTC hours only (`_p`); a Period filtering
    a per-request `ts` column (`where("ts")`) may cut hours.
    """
    if week is not None and (start is not None or end is not None):
        raise CostError("give either a week or from/to dates, not both")
    if week is not None:
        m = _WEEK_RE.match(str(week).strip())
        if not m:
            raise CostError(f"week: expected an ISO week like 2026-W47, got {week!r}")
        year, num = int(m.group(1)), int(m.group(2))
        try:
            monday = dt.date.fromisocalendar(year, num, 1)
        except ValueError:
            raise CostError(
                f"week: {week!r} does not exist (year {year} has no week {num})"
            ) from None
        s = dt.datetime(monday.year, monday.month, monday.day, tzinfo=dt.UTC)
        return Period(s, s + dt.timedelta(days=7), f"{year}-W{num:02d}")
    s = _as_date(start, "from") if start is not None else None
    e = None
    if end is not None:
        e = _as_date(end, "to")
        if not isinstance(end, dt.datetime):
            e += dt.timedelta(days=1)
    if s is not None and e is not None and e <= s:
        raise CostError(
            f"from/to: the period is empty ({start} .. {end}); 'to' must not precede 'from'"
        )
    return Period(s, e, _label(s, e))


def _stamp(t: dt.datetime) -> str:
    """A UTC time as 2026-11-17T10:00Z (seconds only when there are any)."""
    if t.second or t.microsecond:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%f" if t.microsecond else "%Y-%m-%dT%H:%M:%S") + "Z"
    return t.strftime("%Y-%m-%dT%H:%MZ")


def _label(s: dt.datetime | None, e: dt.datetime | None) -> str:
    """The period as people read it: midnight bounds as dates (the end date inclusive,
    "2026-11-16..2026-11-22"), other bounds as times (the end exclusive)."""
    if s is None and e is None:
        return "all data"
    left = right = None
    if s is not None:
        left = str(s.date()) if s.time() == dt.time(0) else _stamp(s)
    if e is not None:
        right = str((e - dt.timedelta(days=1)).date()) if e.time() == dt.time(0) else _stamp(e)
    if right is None:  # "2026-11-16..…" read as a cut-off label
        return f"from {left} to the end of the data"
    if left is None:
        return f"up to {right} (from the start of the data)"
    return f"{left}..{right}"


def _p(week: str | None, start: Any, end: Any, per: Period | None = None) -> Period:
    """The Period a cost function asks about. Costs are hourly (the marts hold clock
    hours), so a bound inside an hour would silently widen to the whole hour: refused."""
    if per is None:
        per = period(week, start, end)
        names = ("start", "end")
    else:
        names = ("per.start", "per.end")
    for name, bound in zip(names, (per.start, per.end), strict=True):
        if bound is None:
            continue
        t = _utc(bound)
        if t.minute or t.second or t.microsecond:
            hour = t.replace(minute=0, second=0, microsecond=0)
            raise CostError(
                f"{name}: costs are counted per clock hour, so a time must fall on a whole "
                f"hour (UTC), e.g. {_stamp(hour)} or {_stamp(hour + dt.timedelta(hours=1))}, "
                f"or be a date; got {bound.isoformat()}"
            )
    return per


def latest_week(db: duckdb.DuckDBPyConnection) -> str:
    """The ISO week (e.g. "2026-W47") of the newest request or GPU sample in the lake."""
    last = _row(
        db,
        "SELECT greatest((SELECT max(hour) FROM marts.request_work),"
        " (SELECT max(hour) FROM marts.gpu_cost_hourly))",
    )[0]
    if last is None:
        raise CostError("the lake holds no requests and no GPU samples")
    year, week, _ = last.isocalendar()
    return f"{year}-W{week:02d}"


def _week_of_days(days: Iterable[dt.date]) -> str:
    """The latest ISO week holding all seven of `days`' weekdays; when none is whole,
    the week holding the most of them (the later one on a tie)."""
    covered: dict[tuple[int, int], int] = {}
    for day in set(days):
        year, week, _ = day.isocalendar()
        covered[(year, week)] = covered.get((year, week), 0) + 1
    whole = [w for w, n in covered.items() if n == 7]
    year, week = max(whole) if whole else max(covered, key=lambda w: (covered[w], w))
    return f"{year}-W{week:02d}"


def whole_week(start: dt.date, days: int) -> str:
    """`_week_of_days` of `days` consecutive days from `start` (the demo's report week)."""
    return _week_of_days(start + dt.timedelta(days=i) for i in range(days))


def latest_whole_week(db: duckdb.DuckDBPyConnection) -> str:
    """The latest ISO week with requests or GPU samples on each of its seven days.

    What a team reports as "last week": a lake that runs a few minutes into a new
    week would otherwise default to a week of minutes, and a few stray requests in
    an older week do not make it whole. No whole week: the week with most days.
    """
    days = db.execute(
        "SELECT DISTINCT CAST(hour AS DATE) FROM (SELECT hour FROM marts.request_work"
        " UNION ALL SELECT hour FROM marts.gpu_cost_hourly)"
    ).fetchall()
    if not days:
        raise CostError("the lake holds no requests and no GPU samples")
    return _week_of_days(d for (d,) in days)


# ----------------------------------------------------------------------------- settings


def configure(
    db: duckdb.DuckDBPyConnection,
    *,
    pricing_kind: str | None = None,
    output_token_weight: float | None = None,
    duplicate_window_s: float | None = None,
    storm_min_retries: float | None = None,
    storm_factor: float | None = None,
) -> None:
    """Set the knobs the marts read (session variables of this connection).

    pricing_kind: default price kind for GPUs no deployment rule prices
    (on_demand | reserved | spot). output_token_weight: R of the token-ratio
    fallback (an output token costs R input tokens). duplicate_window_s: how close
    two equal prompts must be to count as a duplicate. storm_*: retry-storm test.
    """
    from finops.prices import PRICING_KINDS

    if pricing_kind is not None:
        if pricing_kind not in PRICING_KINDS:
            raise CostError(f"pricing_kind: expected one of {PRICING_KINDS}, got {pricing_kind!r}")
        db.execute("SET VARIABLE finops_pricing_kind = ?", [pricing_kind])
    for name, value in (
        ("finops_output_token_weight", output_token_weight),
        ("finops_duplicate_window_s", duplicate_window_s),
        ("finops_storm_min_retries", storm_min_retries),
        ("finops_storm_factor", storm_factor),
    ):
        if value is None:
            continue
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise CostError(
                f"{name.removeprefix('finops_')}: expected a number >= 0, got {value!r}"
            )
        db.execute(f"SET VARIABLE {name} = ?", [float(value)])


def load_deployments(db: duckdb.DuckDBPyConnection, path: str | os.PathLike[str]) -> pl.DataFrame:
    """Load a pods/labels -> deployment/tier/pricing mapping (TOML) into `ref.deployments`.

    Format (see data/deployments.example.toml)::

        [[deployment]]
        name = "chat-small"          # deployment name in reports
        tier = "small"               # tier its requests carry (requests.tier)
        pricing_kind = "reserved"    # on_demand | reserved | spot (optional)
        match = { namespace = "llm-serving", pod = "vllm-small-*", label = "app=vllm-small" }

    Rules apply in file order; the first that matches a GPU wins. Replaces the
    rules loaded before, and returns them as a frame.
    """
    from finops.prices import PRICING_KINDS

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise CostError(f"{p}: deployments file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise CostError(f"{p}: not valid TOML: {exc}") from None
    entries = data.get("deployment", [])
    if not isinstance(entries, list) or not entries:
        raise CostError(f"{p}: expected one or more [[deployment]] tables")
    known_match = {"namespace", "pod", "label", "gpu_model"}
    rows = []
    for i, e in enumerate(entries, start=1):
        where = f"{p}: [[deployment]] #{i}"
        if not isinstance(e, dict):
            raise CostError(f"{where}: expected a table")
        unknown = set(e) - {"name", "tier", "pricing_kind", "match"}
        if unknown:
            raise CostError(
                f"{where}: unknown key(s) {sorted(unknown)}; expected name, tier, "
                "pricing_kind, match"
            )
        name = e.get("name")
        if not isinstance(name, str) or not name:
            raise CostError(f"{where}: field 'name': expected a non-empty string")
        tier = e.get("tier")
        if tier is not None and not isinstance(tier, str):
            raise CostError(f"{where}: field 'tier': expected a string, got {tier!r}")
        kind = e.get("pricing_kind")
        if kind is not None and kind not in PRICING_KINDS:
            raise CostError(
                f"{where}: field 'pricing_kind': expected one of {PRICING_KINDS}, got {kind!r}"
            )
        match = e.get("match", {})
        if not isinstance(match, dict) or not match:
            raise CostError(
                f"{where}: field 'match': expected a table such as {{ pod = \"vllm-small-*\" }}"
            )
        bad = set(match) - known_match
        if bad:
            raise CostError(
                f"{where}: match: unknown key(s) {sorted(bad)}; expected {sorted(known_match)}"
            )
        for k, v in match.items():
            if not isinstance(v, str) or not v:
                raise CostError(
                    f"{where}: match.{k}: expected a non-empty string (a glob for pod), got {v!r}"
                )
        label_key = label_value = None
        if "label" in match:
            lab = match["label"]
            if not isinstance(lab, str) or "=" not in lab:
                raise CostError(f"{where}: match.label: expected 'key=value', got {lab!r}")
            label_key, label_value = (x.strip() for x in lab.split("=", 1))
        rows.append(
            {
                "priority": i,
                "namespace": match.get("namespace"),
                "pod_glob": match.get("pod"),
                "label_key": label_key,
                "label_value": label_value,
                "gpu_model": match.get("gpu_model"),
                "deployment": name,
                "tier": tier,
                "pricing_kind": kind,
            }
        )
    frame = pl.DataFrame(
        rows,
        schema={
            "priority": pl.Int32,
            "namespace": pl.String,
            "pod_glob": pl.String,
            "label_key": pl.String,
            "label_value": pl.String,
            "gpu_model": pl.String,
            "deployment": pl.String,
            "tier": pl.String,
            "pricing_kind": pl.String,
        },
    )
    db.execute("DELETE FROM ref.deployments")
    db.register("__deployments", frame.to_arrow())
    try:
        db.execute("INSERT INTO ref.deployments BY NAME SELECT * FROM __deployments")
    finally:
        db.unregister("__deployments")
    return frame


def ensure_deployments(db: duckdb.DuckDBPyConnection) -> None:
    """Load $FINOPS_DEPLOYMENTS once per connection, when set (the API and `finops sql`)."""
    env = os.environ.get("FINOPS_DEPLOYMENTS")
    if not env:
        return
    loaded = db.execute("SELECT getvariable('finops_deployments_loaded')").fetchall()[0][0]
    if loaded != env:
        load_deployments(db, env)
        db.execute("SET VARIABLE finops_deployments_loaded = ?", [env])


# ----------------------------------------------------------------------------- materialization

COST_VIEWS: tuple[str, ...] = (
    "gpu_util_hourly",
    "gpu_pod_share_hourly",
    "gpu_cost_hourly",
    "tier_cost_hourly",
    "tier_phase_hourly",
    "request_work",
    "tier_token_prices",
    "request_flags",
    "request_costs",
)
"""The cost marts, in dependency order (views in `marts.`, defined in sql/marts/3*.sql)."""

_VIEW_RE = re.compile(r"CREATE OR REPLACE VIEW marts\.(\w+) AS\s*(.*?);\s*(?=CREATE|--|$)", re.S)
_MARTS_REF = re.compile(r"\bmarts\.(" + "|".join(COST_VIEWS) + r")\b")


def _view_bodies() -> dict[str, str]:
    from finops.db import SQL_DIR

    bodies: dict[str, str] = {}
    for f in sorted((SQL_DIR / "marts").glob("3*.sql")):
        text = "\n".join(
            line for line in f.read_text().splitlines() if not line.lstrip().startswith("--")
        )
        for m in _VIEW_RE.finditer(text + "\n"):
            bodies[m.group(1)] = m.group(2)
    missing = [v for v in COST_VIEWS if v not in bodies]
    if missing:
        raise RuntimeError(f"finops/sql/marts/3*.sql: view(s) {missing} not found")
    return bodies


def _cached(sql: str) -> str:
    """Point references to the cost marts at this connection's materialized copies."""
    return _MARTS_REF.sub(lambda m: f"temp.main._fc_{m.group(1)}", sql)


def _signature(db: duckdb.DuckDBPyConnection) -> str:
    from finops.db import lake_dir

    lake = lake_dir(db)
    h = hashlib.sha256()
    for table in ("gpu_samples", "serving_samples", "requests"):
        for f in sorted((lake / table).glob("date=*/*.parquet")):
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    knobs = db.execute(
        "SELECT getvariable('finops_pricing_kind'), getvariable('finops_output_token_weight'),"
        " getvariable('finops_duplicate_window_s'), getvariable('finops_storm_min_retries'),"
        " getvariable('finops_storm_factor'),"
        " (SELECT string_agg(d::VARCHAR, '|' ORDER BY priority) FROM ref.deployments d),"
        " (SELECT string_agg(p::VARCHAR, '|' ORDER BY p.gpu_model, p.pricing_kind) FROM ref.prices p)"
    ).fetchall()[0]
    h.update(repr(knobs).encode())
    return h.hexdigest()


def _set_progress_bar(db: duckdb.DuckDBPyConnection, on: bool) -> None:
    # Under Jupyter without ipywidgets DuckDB refuses to touch the setting; leave it then.
    with contextlib.suppress(duckdb.Error):
        db.execute(f"SET enable_progress_bar = {'true' if on else 'false'}")


def materialize(db: duckdb.DuckDBPyConnection, *, force: bool = False) -> None:
    """Compute the cost marts once into temp tables that the API functions read.

    The views in `marts.` stay the definition (and what SQL users query); this
    evaluates each of them once, in dependency order, so a notebook asking ten
    questions pays for the GPU and request pipelines once, not ten times. The
    copies are rebuilt when the lake's files, the prices, the deployment rules or
    the knobs of `configure` change.
    """
    ensure_deployments(db)
    sig = _signature(db)
    current = db.execute("SELECT getvariable('finops_costs_signature')").fetchall()[0][0]
    if current == sig and not force:
        return
    bodies = _view_bodies()
    # DuckDB's progress bar would print into notebooks and CLI output; it comes back after.
    bar = db.execute("SELECT current_setting('enable_progress_bar')").fetchall()[0][0]
    _set_progress_bar(db, False)
    try:
        for name in COST_VIEWS:
            db.execute(f"CREATE OR REPLACE TEMP TABLE _fc_{name} AS {_cached(bodies[name])}")
    finally:
        if bar:
            _set_progress_bar(db, True)
    db.execute("SET VARIABLE finops_costs_signature = ?", [sig])


def _hour_weighted(col: str) -> str:
    """SQL mean of `col` weighted by GPU-hours: a MIG instance counts for its share of the GPU."""
    return f"sum({col} * gpu_hours) / nullif(sum(gpu_hours) FILTER ({col} IS NOT NULL), 0)"


def _q(
    db: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None
) -> pl.DataFrame:
    materialize(db)
    return db.sql(_cached(sql), params=params).pl()


def _row(db: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> tuple:
    materialize(db)
    return db.execute(_cached(sql), params).fetchall()[0]


# ----------------------------------------------------------------------------- sources


def _hours(x: float) -> str:
    """GPU-hours for a sentence: thousands separated, at most 2 decimals (1,752,000; 0.43)."""
    return f"{x:,.2f}".rstrip("0").rstrip(".")


def sources(db: duckdb.DuckDBPyConnection, per: Period | None = None) -> dict[str, Any]:
    """What the lake holds for a period, and sentences for what is missing.

    Cost figures need GPU samples (the bill) and requests (who to bill); the
    prefill/decode split needs vLLM's phase histograms. Missing inputs are
    stated here rather than turning into crashes or silent zeros.
    """
    per = per or Period(None, None, "all data")
    row = _q(
        db,
        f"""
        SELECT
          (SELECT count(*) FROM marts.gpu_cost_hourly WHERE {per.where()}) AS gpu_hour_rows,
          (SELECT sum(gpu_hours) FROM marts.gpu_cost_hourly
            WHERE {per.where()} AND usd_per_gpu_hour IS NULL) AS unpriced_gpu_hours,
          (SELECT list(DISTINCT gpu_model) FROM marts.gpu_cost_hourly
            WHERE {per.where()} AND usd_per_gpu_hour IS NULL) AS unpriced_models,
          (SELECT list(DISTINCT pricing_kind) FROM marts.gpu_cost_hourly
            WHERE {per.where()} AND usd_per_gpu_hour IS NULL) AS unpriced_kinds,
          (SELECT list(DISTINCT gpu_model) FROM ref.prices) AS catalog_models,
          (SELECT list(DISTINCT tier) FROM marts.gpu_cost_hourly
            WHERE {per.where()} AND tier IS NOT NULL) AS gpu_tiers,
          (SELECT list(DISTINCT tier) FROM marts.request_work
            WHERE {per.where()} AND tier IS NOT NULL AND worked) AS request_tiers,
          (SELECT round(sum(gpu_hours), 2) FROM marts.gpu_cost_hourly
            WHERE {per.where()} AND tier IS NULL) AS untiered_gpu_hours,
          (SELECT round(sum(gpu_hours), 2) FROM marts.gpu_cost_hourly
            WHERE {per.where()} AND util_signal IS NULL) AS no_util_gpu_hours,
          (SELECT count(*) FROM marts.request_work WHERE {per.where()}) AS requests,
          (SELECT count(*) FROM marts.request_costs WHERE {per.where()} AND unpriced_tier_hour)
              AS unpriced_requests,
          (SELECT count(*) FROM marts.request_work
            WHERE {per.where()} AND tier IS NULL AND processed) AS tierless_requests,
          (SELECT count(*) FROM marts.tier_token_prices
            WHERE {per.where()} AND split_method = 'prefill_decode_time') AS measured_tier_hours,
          (SELECT count(*) FROM marts.tier_token_prices WHERE {per.where()}) AS tier_hours,
          (SELECT min(hour) FROM marts.request_work) AS first_request_hour,
          (SELECT max(hour) FROM marts.request_work) AS last_request_hour,
          (SELECT min(hour) FROM marts.gpu_cost_hourly) AS first_gpu_hour,
          (SELECT max(hour) FROM marts.gpu_cost_hourly) AS last_gpu_hour
    """,
    ).row(0, named=True)
    # GPU-hours that reported before and after but not in between (marts.gpu_gap_hourly),
    # over this connection's materialized gpu_cost_hourly, and the GPU scrapes that failed
    gaps = _cached(_view_bodies()["gpu_gap_hourly"])
    row |= _q(
        db,
        f"""
        WITH gaps AS MATERIALIZED (SELECT * FROM ({gaps}) WHERE {per.where()})
        SELECT
          (SELECT round(coalesce(sum(est_gpu_hours), 0), 2) FROM gaps) AS gap_gpu_hours,
          (SELECT round(coalesce(sum(est_cost), 0), 2) FROM gaps) AS gap_cost,
          (SELECT round(coalesce(sum(est_gpu_hours), 0), 2) FROM gaps
            WHERE usd_per_gpu_hour IS NULL) AS gap_unpriced_gpu_hours,
          (SELECT list(DISTINCT coalesce(tier, '(no tier)') ORDER BY coalesce(tier, '(no tier)'))
             FROM gaps WHERE est_gpu_hours > 0) AS gap_tiers,
          (SELECT min(hour) FROM gaps WHERE est_gpu_hours > 0) AS gap_first_hour,
          (SELECT max(hour) FROM gaps WHERE est_gpu_hours > 0) AS gap_last_hour,
          (SELECT CAST(coalesce(sum(down_attempts), 0) AS BIGINT)
             FROM (SELECT DISTINCT hour, down_attempts FROM gaps WHERE est_gpu_hours > 0))
              AS gap_down_attempts,
          (SELECT count(*) FROM clean.scrape_health
            WHERE {per.where("ts")} AND NOT up AND kind IN ('dcgm', 'nvml', 'prometheus'))
              AS gpu_down_attempts
    """,
    ).row(0, named=True)
    notes: list[str] = []
    if row["gpu_hour_rows"] == 0:
        notes.append(
            "no GPU samples (gpu_samples) in this period: GPU cost is unknown; "
            "collect DCGM/NVML metrics (finops collect) or run finops demo"
        )
    if row["unpriced_gpu_hours"]:
        # quoted: the exact name is what a catalog row must match (a stray space, a suffix)
        models = ", ".join(
            sorted(repr(m) if m else "(no model name)" for m in row["unpriced_models"])
        )
        kinds = sorted(k for k in row["unpriced_kinds"] or [] if k)
        # a model priced for another kind only (`--pricing-kind spot` on an on-demand
        # catalog): the kind is what is missing, not the model
        from finops.prices import model_matches

        listed = any(
            model_matches(c, m) for c in row["catalog_models"] or [] for m in row["unpriced_models"]
        )
        kind = f" for pricing kind {', '.join(map(repr, kinds))}" if listed and kinds else ""
        notes.append(
            f"{_hours(row['unpriced_gpu_hours'])} GPU-hours of {models} have no price{kind} "
            "in the catalog (data/prices.csv or $FINOPS_PRICES): the bill leaves them out, "
            "and the requests they served have an unknown cost"
        )
    if row["untiered_gpu_hours"]:
        notes.append(
            f"{_hours(row['untiered_gpu_hours'])} GPU-hours carry no tier label and match no "
            "deployment rule: their cost stays unallocated"
        )
    orphan = _tier_mismatch(row["gpu_tiers"] or [], row["request_tiers"] or [])
    if orphan:
        notes.append(orphan)
    if row["no_util_gpu_hours"]:
        notes.append(
            f"{_hours(row['no_util_gpu_hours'])} GPU-hours have no utilization signal: "
            "counted as idle on the usage basis"
        )
    if row["gap_gpu_hours"]:
        why = (
            f"; GPU exporters failed {row['gap_down_attempts']} scrape attempts in those hours"
            if row["gap_down_attempts"]
            else ""
        )
        unpriced = (
            f" (and {_hours(row['gap_unpriced_gpu_hours'])} of them have no price)"
            if row["gap_unpriced_gpu_hours"]
            else ""
        )
        first, last = row["gap_first_hour"], row["gap_last_hour"]
        when = (
            f"{first:%Y-%m-%d %H:00}"
            + ("" if last == first else f" to {last + dt.timedelta(hours=1):%Y-%m-%d %H:00}")
            + " UTC"
            if first is not None and last is not None
            else "?"
        )
        tiers = ", ".join(row["gap_tiers"] or [])
        notes.append(
            f"{_hours(row['gap_gpu_hours'])} GPU-hours inside the period "
            f"({'tier ' + tiers + ', ' if tiers else ''}{when}) have no GPU samples "
            "although the GPU reported before and after (exporter or collector down?): "
            f"spend leaves out about ${row['gap_cost']:,.2f}{unpriced}{why}; "
            "see marts.gpu_gap_hourly"
        )
    if row["requests"] == 0:
        notes.append(
            "no request logs in this period (none collected, or no traffic): requests, cost "
            "per request, leakage and cache savings are unknown, and cost cannot be allocated "
            "to tenants or features; load them with finops ingest requests or "
            "finops collect --log"
        )
    partial = _partial_period(db, per)
    if partial:
        notes.append(partial)
    on_tiers = row["unpriced_requests"] - row["tierless_requests"]
    if on_tiers:
        notes.append(
            f"{on_tiers:,} requests were on tier-hours with no GPU data or no "
            "GPU price: their cost is unknown (NULL)"
        )
    if row["tierless_requests"]:
        notes.append(
            f"{row['tierless_requests']:,} requests that ran on a model have no tier: which "
            "GPUs served them is unknown, so their cost is unknown (NULL) and per-request "
            "figures leave them out; give their log a tier in its mapping "
            '(tier = "its column", or tier = { value = "large" })'
        )
    if row["tier_hours"] and row["measured_tier_hours"] < row["tier_hours"]:
        notes.append(
            f"input/output split: {row['tier_hours'] - row['measured_tier_hours']} of "
            f"{row['tier_hours']} tier-hours lack vLLM prefill/decode histograms; "
            "the token-ratio fallback was used there"
        )
    row["notes"] = notes
    return row


def _partial_period(db: duckdb.DuckDBPyConnection, per: Period) -> str | None:
    """A bounded period the data covers only part of (a lake of two days read as its
    week): its totals are those hours' only, which a weekly figure must not hide."""
    if per.start is None or per.end is None:
        return None
    hours = (per.end - per.start).total_seconds() / 3600
    first, last, covered = _row(
        db,
        f"""
        WITH h AS (
            SELECT hour FROM marts.gpu_cost_hourly WHERE {per.where()}
            UNION SELECT hour FROM marts.request_work WHERE {per.where()}
        )
        SELECT min(hour), max(hour), count(*) FROM h
    """,
    )
    # data ending early or starting late: a gap inside the period is the GPU-gap note's
    if first is None or (
        first <= _utc(per.start) and last >= _utc(per.end) - dt.timedelta(hours=1)
    ):
        return None
    days = (last.date() - first.date()).days + 1
    return (
        f"partial period: data covers {covered:,} of {hours:,.0f} hours of {per.label} "
        f"({first:%a %Y-%m-%d %H:00} to {last + dt.timedelta(hours=1):%a %Y-%m-%d %H:00} UTC, "
        f"{days} day{'s' if days != 1 else ''}): its totals are those hours' only"
    )


def _tier_mismatch(gpu_tiers: list[str], request_tiers: list[str]) -> str | None:
    """A tier that served requests but has no GPUs next to a GPU tier without requests:
    most often one name spelled two ways (a `--deployments` rule's `tier = "Large"`, a pod
    label `lg`), which would read as idle capacity plus requests of unknown cost."""
    import difflib

    no_gpus = sorted(set(request_tiers) - set(gpu_tiers))
    no_requests = sorted(set(gpu_tiers) - set(request_tiers))
    if not no_gpus or not no_requests:
        return None
    pairs = []
    for t in no_gpus:
        near = [g for g in no_requests if g.lower() == t.lower()] or difflib.get_close_matches(
            t, no_requests, n=1, cutoff=0.5
        )
        if near:
            pairs.append(f"GPU tier {near[0]!r} vs requests' {t!r}")
    hint = f" (the same tier spelled two ways? {'; '.join(pairs)})" if pairs else ""
    return (
        f"requests ran on tier(s) {', '.join(map(repr, no_gpus))} that no GPU carries, while "
        f"GPU tier(s) {', '.join(map(repr, no_requests))} served no requests{hint}: their "
        "GPU cost shows as idle and those requests' cost as unknown; tiers come from the GPU "
        "pods' tier label or a --deployments rule and must match the requests' tier exactly"
    )


def _coverage(src: Mapping[str, Any]) -> str:
    spans = []
    for name, a, b in (
        ("requests", "first_request_hour", "last_request_hour"),
        ("GPU samples", "first_gpu_hour", "last_gpu_hour"),
    ):
        if src[a] is not None:
            spans.append(f"{name} {src[a]:%Y-%m-%d %H:00}..{src[b]:%Y-%m-%d %H:00} UTC")
    return "; ".join(spans) if spans else "the lake is empty"


def require_data(db: duckdb.DuckDBPyConnection, per: Period) -> dict[str, Any]:
    """Sources for `per`, or CostError when the period holds neither requests nor GPU data."""
    src = sources(db, per)
    if src["gpu_hour_rows"] == 0 and src["requests"] == 0:
        raise CostError(
            f"no requests and no GPU samples in {per.label}; the lake has: {_coverage(src)}"
        )
    return src


def _crumb(x: float) -> float:
    return 0.0 if abs(x) < 1e-6 else x


def _basis(basis: str) -> str:
    if basis not in BASES:
        raise CostError(f"basis: expected one of {BASES}, got {basis!r}")
    return basis


# ----------------------------------------------------------------------------- the bill


def gpu_bill(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> pl.DataFrame:
    """The GPU bill by tier, deployment, GPU model and pricing kind.

    gpu_cost = GPU-hours x usd_per_gpu_hour; busy_cost = SM-activity share of it;
    idle_cost = the rest. Sum of gpu_cost is the bill the other tables reconcile to.
    """
    per = _p(week, start, end, per)
    return _q(
        db,
        f"""
        SELECT tier, deployment, gpu_model, pricing_kind, usd_per_gpu_hour,
               count(DISTINCT gpu_uuid) AS gpus,
               sum(gpu_hours) AS gpu_hours,
               sum(busy_gpu_hours) AS busy_gpu_hours,
               sum(busy_gpu_hours) / sum(gpu_hours) AS util,
               {_hour_weighted("gpu_util")} AS gpu_util,
               any_value(util_signal) AS util_signal,
               sum(gpu_cost) AS gpu_cost, sum(busy_cost) AS busy_cost,
               sum(idle_cost) AS idle_cost
        FROM marts.gpu_cost_hourly
        WHERE {per.where()}
        GROUP BY ALL
        ORDER BY gpu_cost DESC NULLS LAST, tier
    """,
    )


# ----------------------------------------------------------------------------- by dimension


def _known(col: str, *, raw: bool = False) -> str:
    """sum(col) over a group, NULL (unknown) when some of its requests are on tier-hours
    without a GPU cost (no GPU data or no price) and none of those that did GPU work has
    a price: requests that did no work (cache hits, refusals) cost 0, so summing them
    alone would show 0 for a group whose cost is in fact unknown. A group only partly
    priced sums what is known (`sources` notes the unpriced requests)."""
    return (
        "CASE WHEN count(*) FILTER (unpriced_tier_hour) > 0"
        " AND count(*) FILTER (worked AND NOT unpriced) = 0"
        f" THEN NULL ELSE {col if raw else f'sum({col})'} END"
    )


def sum_known(values: pl.Series) -> float | None:
    """Sum of cost lines that may be NULL (unknown: no GPU data), for totals of `leakage`
    or `cache_savings` lines: None when some line is unknown and the known ones are all 0,
    so that a week without GPU data never reads as $0; else the sum of the known lines
    (partly priced, like `_known`)."""
    known = values.drop_nulls()
    if values.null_count() and not (known != 0).any():
        return None
    return float(known.sum())


def by(
    db: duckdb.DuckDBPyConnection,
    dim: str,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    basis: Basis = "allocation",
    per: Period | None = None,
) -> pl.DataFrame:
    """Requests, tokens and cost per value of `dim` (tenant|feature|tier|model|operation|hour|day).

    cost = sum of per-request costs on `basis`; cost_per_request = cost / requests
    (all requests, failed and cache hits included: what a request really costs; only
    those on priced tier-hours when some are not, as cost counts only what is priced);
    usd_per_1k_requests = 1000 x that; usd_per_1m_input_tokens = input_cost /
    input_tokens x 1e6 (priced tokens likewise). Token columns count the requests a model processed
    (the `marts.processed` macro of sql/marts/20_requests.sql: not served by the shim's cache,
    hit or coalesced, and not refused by a context cap); prefix-cached input tokens are
    included in input_tokens. A group whose working requests have no GPU data has cost
    NULL (unknown), not 0;
    usd_per_1m_output_tokens likewise; leakage_cost = cost of retried/failed
    requests, aborted streams and duplicates (see `leakage`). priced_requests: the
    requests on priced tier-hours, which cost, share and the per-request figures cover.
    """
    if dim not in DIMENSIONS:
        raise CostError(f"by: expected one of {list(DIMENSIONS)}, got {dim!r}")
    b = _basis(basis)
    per = _p(week, start, end, per)
    expr = DIMENSIONS[dim]
    input_cost, output_cost, cost = (
        _known(f"{c}_{b}") for c in ("input_cost", "output_cost", "cost")
    )
    leakage_cost = _known(f"coalesce(sum(cost_{b}) FILTER (leak IS NOT NULL), 0)", raw=True)
    df = _q(
        db,
        f"""
        SELECT {expr} AS {dim},
               count(*) AS requests,
               count(*) FILTER (failed) AS failed,
               count(*) FILTER (is_retry) AS retries,
               count(*) FILTER (cache_status = 'hit') AS cache_hits,
               CAST(coalesce(sum(input_tokens) FILTER (processed), 0) AS BIGINT) AS input_tokens,
               CAST(coalesce(sum(output_tokens) FILTER (processed), 0) AS BIGINT) AS output_tokens,
               CAST(coalesce(sum(cached_input_tokens) FILTER (processed), 0) AS BIGINT)
                   AS cached_input_tokens,
               {input_cost} AS input_cost,
               {output_cost} AS output_cost,
               {cost} AS cost,
               {leakage_cost} AS leakage_cost,
               count(*) FILTER (NOT unpriced_tier_hour) AS priced_requests,
               coalesce(sum(input_tokens) FILTER (processed AND NOT unpriced_tier_hour), 0)
                   AS _priced_input_tokens,
               coalesce(sum(output_tokens) FILTER (processed AND NOT unpriced_tier_hour), 0)
                   AS _priced_output_tokens
        FROM marts.request_costs
        WHERE {per.where()}
        GROUP BY ALL
    """,
    )
    total = df["cost"].sum() if df.height else 0.0
    # the known cost over the requests and tokens it is the cost of: a group partly on
    # unpriced tier-hours would otherwise read as cheaper per request than it is
    return (
        df.with_columns(
            (pl.col("cost") / pl.col("priced_requests")).alias("cost_per_request"),
            (pl.col("cost") / pl.col("priced_requests") * 1000).alias("usd_per_1k_requests"),
            (pl.col("input_cost") / pl.col("_priced_input_tokens") * 1e6).alias(
                "usd_per_1m_input_tokens"
            ),
            (pl.col("output_cost") / pl.col("_priced_output_tokens") * 1e6).alias(
                "usd_per_1m_output_tokens"
            ),
            (pl.col("cost") / total if total else pl.lit(None, dtype=pl.Float64)).alias("share"),
        )
        .with_columns(
            pl.when(pl.col(c).is_infinite() | pl.col(c).is_nan())
            .then(None)
            .otherwise(pl.col(c))
            .alias(c)
            for c in (
                "cost_per_request",
                "usd_per_1k_requests",
                "usd_per_1m_input_tokens",
                "usd_per_1m_output_tokens",
            )
        )
        .drop("_priced_input_tokens", "_priced_output_tokens")
        .sort(
            dim if dim in ("hour", "day") else "cost",
            descending=dim not in ("hour", "day"),
            nulls_last=True,
        )
    )


def by_tenant(db: duckdb.DuckDBPyConnection, **kw: Any) -> pl.DataFrame:
    """`by(db, "tenant", ...)`."""
    return by(db, "tenant", **kw)


def by_feature(db: duckdb.DuckDBPyConnection, **kw: Any) -> pl.DataFrame:
    """`by(db, "feature", ...)`."""
    return by(db, "feature", **kw)


def by_tier(db: duckdb.DuckDBPyConnection, **kw: Any) -> pl.DataFrame:
    """`by(db, "tier", ...)`."""
    return by(db, "tier", **kw)


def by_model(db: duckdb.DuckDBPyConnection, **kw: Any) -> pl.DataFrame:
    """`by(db, "model", ...)`."""
    return by(db, "model", **kw)


def by_hour(db: duckdb.DuckDBPyConnection, **kw: Any) -> pl.DataFrame:
    """`by(db, "hour", ...)`."""
    return by(db, "hour", **kw)


# ----------------------------------------------------------------------------- totals


def totals(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    basis: Basis = "allocation",
    per: Period | None = None,
) -> dict[str, Any]:
    """The period's bill and how it splits; allocated_cost + unallocated_cost == gpu_cost.

    gpu_cost: GPU-hours x price. allocated_cost: the sum of per-request costs on
    `basis`. unallocated_cost: gpu_cost - allocated_cost, i.e. on the allocation basis
    the cost of GPU-hours without requests (tier-hours no request ran on, GPUs of no
    tier), on the usage basis also the idle share of busy tier-hours. idle_cost is its
    older name, kept for existing callers: it is *not* the idle capacity.
    idle_capacity_cost: the physical idle capacity, sum((1 - util) x cost), the same on
    both bases (what `idle`, `tier_utilization` and `gpu_bill` call idle_cost); on the
    allocation basis most of it sits inside the requests' cost. busy_cost: the rest.
    gpus: physical GPUs that reported (a GPU split by MIG counts once). Per request
    and per token figures are on `basis`: per request, the bill (allocation) or the
    allocated busy cost (usage) over the priced requests.
    """
    b = _basis(basis)
    per = _p(week, start, end, per)
    src = require_data(db, per)
    g = _q(
        db,
        f"""
        SELECT coalesce(sum(gpu_hours), 0) AS gpu_hours,
               coalesce(sum(busy_gpu_hours), 0) AS busy_gpu_hours,
               coalesce(sum(gpu_hours) FILTER (usd_per_gpu_hour IS NOT NULL), 0)
                   AS priced_gpu_hours,
               coalesce(sum(gpu_cost), 0) AS gpu_cost,
               coalesce(sum(busy_cost), 0) AS busy_cost,
               coalesce(sum(idle_cost), 0) AS idle_capacity_cost,
               count(DISTINCT gpu_uuid) AS gpus
        FROM marts.gpu_cost_hourly WHERE {per.where()}
    """,
    ).row(0, named=True)
    r = _q(
        db,
        f"""
        SELECT count(*) AS requests,
               CAST(coalesce(sum(input_tokens) FILTER (processed), 0) AS BIGINT) AS input_tokens,
               CAST(coalesce(sum(output_tokens) FILTER (processed), 0) AS BIGINT) AS output_tokens,
               CAST(coalesce(sum(cached_input_tokens) FILTER (processed), 0) AS BIGINT)
                   AS cached_input_tokens,
               coalesce(sum(cost_{b}), 0) AS allocated_cost,
               {_known(f"coalesce(sum(input_cost_{b}), 0)", raw=True)} AS input_cost,
               {_known(f"coalesce(sum(output_cost_{b}), 0)", raw=True)} AS output_cost,
               {_known(f"coalesce(sum(cost_{b}) FILTER (leak IS NOT NULL), 0)", raw=True)}
                   AS leakage_cost,
               count(*) FILTER (failed) AS failed_requests,
               count(*) FILTER (unpriced_tier_hour) AS unpriced_requests,
               CAST(coalesce(sum(input_tokens) FILTER (processed AND NOT unpriced_tier_hour), 0)
                    AS BIGINT) AS priced_input_tokens,
               CAST(coalesce(sum(output_tokens) FILTER (processed AND NOT unpriced_tier_hour), 0)
                    AS BIGINT) AS priced_output_tokens
        FROM marts.request_costs WHERE {per.where()}
    """,
    ).row(0, named=True)
    out: dict[str, Any] = {
        "period": per.label,
        "start": per.start.isoformat() if per.start else None,
        "end": per.end.isoformat() if per.end else None,
        "basis": b,
        "gpus": g["gpus"],
        "gpu_hours": g["gpu_hours"],
        "busy_gpu_hours": g["busy_gpu_hours"],
        # GPU-hours the catalog has a price for: none (GPUs measured, none priced) makes
        # every dollar figure unknown, not $0 (headline, report)
        "priced_gpu_hours": g["priced_gpu_hours"],
        "utilization": g["busy_gpu_hours"] / g["gpu_hours"] if g["gpu_hours"] else None,
        "gpu_cost": g["gpu_cost"],
        "busy_cost": g["busy_cost"],
        "idle_capacity_cost": g["idle_capacity_cost"],
        "allocated_cost": r["allocated_cost"],
        # float sums leave ~1e-10 crumbs where everything was allocated: show 0, not -0.00
        "unallocated_cost": _crumb(g["gpu_cost"] - r["allocated_cost"]),
        # the old name of unallocated_cost (the CLI and reports read it); not idle capacity
        "idle_cost": _crumb(g["gpu_cost"] - r["allocated_cost"]),
        "input_cost": r["input_cost"],
        "output_cost": r["output_cost"],
        "leakage_cost": r["leakage_cost"],
        "requests": r["requests"],
        "failed_requests": r["failed_requests"],
        "input_tokens": r["input_tokens"],
        "output_tokens": r["output_tokens"],
        "cached_input_tokens": r["cached_input_tokens"],
    }
    # per-request and per-token figures count only priced requests (a request on a
    # tier-hour without GPU data has cost NULL): the bill over all requests would
    # understate them; no GPU data at all: unknown (None), not $0
    n = out["requests"] - r["unpriced_requests"]
    out["unpriced_requests"] = r["unpriced_requests"]
    priced = bool(n and g["priced_gpu_hours"])
    # per request on the totals' own basis: the whole bill on the allocation basis (idle
    # capacity is part of what serving costs), only the busy share on the usage basis,
    # as the per-token figures and `by()` rows are
    unit_cost = out["gpu_cost"] if b == "allocation" else out["allocated_cost"]
    out["cost_per_request"] = unit_cost / n if priced else None
    out["usd_per_1k_requests"] = 1000 * unit_cost / n if priced else None
    i, o = r["priced_input_tokens"], r["priced_output_tokens"]
    # the tokens those per-token figures divide by (all of them when every request is priced)
    out["priced_tokens"] = int(i) + int(o)
    out["usd_per_1m_input_tokens"] = (
        out["input_cost"] / i * 1e6 if i and out["input_cost"] is not None else None
    )
    out["usd_per_1m_output_tokens"] = (
        out["output_cost"] / o * 1e6 if o and out["output_cost"] is not None else None
    )
    out["notes"] = list(src["notes"])
    if priced and r["unpriced_requests"]:
        out["notes"].append(
            f"cost per request and per token count only the {n:,} priced requests "
            f"({r['unpriced_requests']:,} have no GPU data or price)"
        )
    return out


# ----------------------------------------------------------------------------- idle & utilization


def idle(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
    per_tier: bool = True,
) -> pl.DataFrame:
    """Idle capacity by hour of day x day of week (the troughs), per tier.

    idle_gpu_hours = sum(1 - util) over GPU-hours; idle_cost = sum((1 - util) x
    price); idle_share = idle_gpu_hours / gpu_hours. dow: 1 = Monday .. 7 = Sunday
    (ISO); hours are UTC.
    """
    per = _p(week, start, end, per)
    tier = "coalesce(tier, '(none)') AS tier," if per_tier else ""
    return _q(
        db,
        f"""
        SELECT {tier}
               isodow(hour) AS dow, strftime(hour, '%a') AS day_name,
               hour(hour) AS hour_of_day,
               sum(gpu_hours) AS gpu_hours,
               sum(idle_gpu_hours) AS idle_gpu_hours,
               sum(idle_cost) AS idle_cost,
               sum(idle_gpu_hours) / sum(gpu_hours) AS idle_share,
               count(DISTINCT CAST(hour AS DATE)) AS days
        FROM marts.gpu_cost_hourly
        WHERE {per.where()}
        GROUP BY ALL
        ORDER BY ALL
    """,
    )


def utilization(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> pl.DataFrame:
    """Per tier per hour: SM activity vs DCGM_FI_DEV_GPU_UTIL (0-1), GPUs and cost.

    GPU_UTIL counts the fraction of time *any* kernel ran, so a GPU running one
    small kernel all the time shows 100%; SM activity is the fraction of SMs busy.
    The gap between the two is how much GPU_UTIL flatters. gpus counts physical GPUs
    (MIG instances of one GPU count once); means are weighted by GPU-hours.
    """
    per = _p(week, start, end, per)
    return _q(
        db,
        f"""
        SELECT hour, coalesce(tier, '(none)') AS tier,
               count(DISTINCT gpu_uuid) AS gpus,
               {_hour_weighted("sm_active")} AS sm_active,
               {_hour_weighted("gpu_util")} AS gpu_util,
               sum(busy_gpu_hours) / nullif(sum(gpu_hours), 0) AS util,
               sum(gpu_cost) AS gpu_cost,
               sum(idle_cost) AS idle_cost
        FROM marts.gpu_cost_hourly
        WHERE {per.where()}
        GROUP BY ALL
        ORDER BY hour, tier
    """,
    )


def tier_utilization(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> pl.DataFrame:
    """Per tier: SM-active share, GPU_UTIL, how much GPU_UTIL flatters, and idle dollars.

    util = busy GPU-hours / GPU-hours (SM activity where reported); gpu_util = mean
    DCGM_FI_DEV_GPU_UTIL (0-1, weighted by GPU-hours); gpus = physical GPUs;
    flatter = gpu_util / util (how many times higher GPU_UTIL reads);
    idle_share = idle_cost / gpu_cost.
    """
    per = _p(week, start, end, per)
    return _q(
        db,
        f"""
        SELECT coalesce(tier, '(none)') AS tier,
               count(DISTINCT gpu_uuid) AS gpus,
               sum(gpu_hours) AS gpu_hours,
               sum(busy_gpu_hours) / sum(gpu_hours) AS util,
               {_hour_weighted("gpu_util")} AS gpu_util,
               {_hour_weighted("gpu_util")}
                   / nullif(sum(busy_gpu_hours) / sum(gpu_hours), 0) AS flatter,
               sum(gpu_cost) AS gpu_cost, sum(busy_cost) AS busy_cost,
               sum(idle_cost) AS idle_cost,
               sum(idle_cost) / nullif(sum(gpu_cost), 0) AS idle_share
        FROM marts.gpu_cost_hourly WHERE {per.where()}
        GROUP BY ALL ORDER BY gpu_cost DESC
    """,
    )


def util_signal_gap(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> pl.DataFrame:
    """How much DCGM_FI_DEV_GPU_UTIL overstates SM activity, per tier and for the fleet.

    A dashboard on GPU_UTIL reads a GPU as busy whenever any kernel runs; SM activity
    says how much of it worked. Only GPU-hours that report both signals are compared,
    so GPUs with one signal never skew the ratio (tier_utilization's `flatter` mixes
    them). Columns: tier ('(all)' last: the whole fleet), gpu_hours (reporting both),
    share (of all the tier's GPU-hours), gpu_util and sm (0-1, weighted by GPU-hours),
    flatter = gpu_util / sm: inf where GPU_UTIL reads above 0 without SM work, null where
    both read 0. Empty when no GPU-hour reports both (no profiling metrics collected).
    """
    per = _p(week, start, end, per)
    return _q(
        db,
        f"""
        WITH h AS (
            SELECT coalesce(tier, '(none)') AS tier, gpu_hours,
                   gpu_util IS NOT NULL AND util_signal = 'DCGM_FI_PROF_SM_ACTIVE' AS both_,
                   gpu_util, busy_gpu_hours
            FROM marts.gpu_cost_hourly WHERE {per.where()}
        ), g AS (
            SELECT coalesce(tier, '(all)') AS tier, grouping(tier) AS is_all,
                   sum(gpu_hours) FILTER (both_) AS gpu_hours,
                   sum(gpu_hours) FILTER (both_) / sum(gpu_hours) AS share,
                   sum(gpu_util * gpu_hours) FILTER (both_)
                       / sum(gpu_hours) FILTER (both_) AS gpu_util,
                   sum(busy_gpu_hours) FILTER (both_) / sum(gpu_hours) FILTER (both_) AS sm
            FROM h GROUP BY ROLLUP (tier)
        )
        SELECT tier, gpu_hours, share, gpu_util, sm,
               CASE WHEN sm > 0 THEN gpu_util / sm
                    WHEN gpu_util > 0 THEN 'inf'::DOUBLE END AS flatter
        FROM g WHERE gpu_hours > 0
        ORDER BY is_all, flatter DESC NULLS LAST, tier
    """,
    )


# ----------------------------------------------------------------------------- leakage


_LEAK_NOTES = {
    "retried_failure": "failed attempts that the client retried: paid twice",
    "failed": "failed requests never retried: GPU work with no answer",
    "stream_aborted": "streams that ended without a normal finish: tokens thrown away",
    "duplicate": "same tenant + prompt fingerprint within the duplicate window: a response "
    "cache would have answered",
}


def leakage(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    basis: Basis = "allocation",
    per: Period | None = None,
) -> pl.DataFrame:
    """What requests really cost beyond useful answers, one line per cause.

    kind 'leak' lines are disjoint (a request is counted under the first of
    retried_failure, failed, stream_aborted, duplicate) and add up with 'useful'
    to the allocated cost; 'unallocated' (kind 'idle') is the GPU cost no request
    carried, totals' unallocated_cost: GPU-hours without requests (on the usage basis
    also the idle time of busy hours). It is not totals' idle_capacity_cost: on the
    allocation basis the idle capacity of hours with requests is inside their lines;
    kind 'info' lines overlap the others: retry_storm (failed/retry requests in a
    storm window), retries (all attempt >= 2), embeddings, streaming.
    """
    b = _basis(basis)
    per = _p(week, start, end, per)
    t = totals(db, per=per, basis=b)
    cost = _known(f"coalesce(sum(cost_{b}), 0)", raw=True)  # NULL: no GPU data for its work
    df = _q(
        db,
        f"""
        SELECT coalesce(leak, 'useful') AS category, count(*) AS requests,
               {cost} AS cost
        FROM marts.request_costs WHERE {per.where()} GROUP BY ALL
        UNION ALL
        SELECT 'retry_storm', count(*), {cost}
        FROM marts.request_costs WHERE {per.where()} AND in_storm
        UNION ALL
        SELECT 'retries', count(*), {cost}
        FROM marts.request_costs WHERE {per.where()} AND is_retry
        UNION ALL
        SELECT 'embeddings', count(*), {cost}
        FROM marts.request_costs WHERE {per.where()} AND operation = 'embeddings'
        UNION ALL
        SELECT 'streaming', count(*), {cost}
        FROM marts.request_costs WHERE {per.where()} AND stream
    """,
    )
    kinds = {"useful": "useful", **{k: "leak" for k in _LEAK_NOTES}}
    notes = {
        **_LEAK_NOTES,
        "useful": "requests that did useful, non-duplicate work"
        + (", with the idle capacity of the hours they ran in" if b == "allocation" else ""),
        "retry_storm": "failures and retries inside retry-storm windows (subset of the above)",
        "retries": "all retry attempts (attempt >= 2), whatever their outcome",
        "embeddings": "embeddings calls (input tokens only)",
        "streaming": "streamed requests (all outcomes)",
        "unallocated": "GPU cost no request carried: GPU-hours without requests (tier-hours "
        "without traffic, untiered GPUs"
        + (
            "), and the idle time of busy tier-hours"
            if b == "usage"
            else "); the idle capacity of hours with requests is in those requests' lines"
        ),
    }
    idle_row = pl.DataFrame(
        {
            "category": ["unallocated"],
            "requests": [0],
            "cost": [t["idle_cost"] if t["gpu_hours"] else None],
        },
        schema=df.schema,
    )
    df = pl.concat([df, idle_row])
    order = [
        "retried_failure",
        "failed",
        "stream_aborted",
        "duplicate",
        "unallocated",
        "useful",
        "retry_storm",
        "retries",
        "embeddings",
        "streaming",
    ]
    gpu = t["gpu_cost"]
    return (
        df.with_columns(
            pl.col("category")
            .replace_strict({**kinds, "unallocated": "idle"}, default="info")
            .alias("kind"),
            pl.col("category").replace_strict(notes, default="").alias("note"),
            (pl.col("cost") / gpu if gpu else pl.lit(None, dtype=pl.Float64)).alias(
                "share_of_bill"
            ),
            pl.col("category")
            .replace_strict({c: i for i, c in enumerate(order)}, default=99)
            .alias("_o"),
        )
        .sort("_o")
        .drop("_o")
        .select("category", "kind", "requests", "cost", "share_of_bill", "note")
    )


# ----------------------------------------------------------------------------- caches


def cache_savings(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    basis: Basis = "usage",
    per: Period | None = None,
) -> pl.DataFrame:
    """Dollars the caches saved, and what a response cache would save on duplicates.

    - vllm_prefix: sum over requests of cached_input_tokens x the tier-hour's
      marginal input-token price (prefill cost / uncached input tokens);
    - shim_response: each request the shim answered without an upstream call of its
      own (cache_status `hit`, Idempotency-Key replays included, or `coalesced` onto an
      identical in-flight request) and that was served (status < 400, no error: a
      follower whose client left saved nothing), valued at what it avoided: the
      tokens of the response it replayed x its tier-hour's input/output prices (tier
      from the request, else the tier its model ran on). The shim logs such a request
      with 0 tokens (nothing ran), so the avoided tokens are, in order: the record's
      own tokens when it carries them (demo data, other producers); else those of the
      original it replayed (`retry_of`, else the latest earlier processed, successful
      request of the same tenant and prompt fingerprint); else the `shim_response`
      event's tokens in `cache_events` (priced at the tier-hour's average token price).
      One value per request: nothing is counted twice;
    - response_cache_potential: the cost of observed exact duplicates that did
      reach the GPUs (leak = 'duplicate').
    Default basis is usage: a cache frees busy GPU time; idle capacity is paid
    for either way until the fleet shrinks. usd_saved is NULL (unknown), not 0, for a
    line whose tokens have no price at all (no GPU data for their tier-hours).
    """
    b = _basis(basis)
    per = _p(week, start, end, per)

    def unknown(value: str, needs_price: str) -> str:
        # NULL when rows needed a price and none had one (no GPU data), as `_known`
        return (
            f"CASE WHEN count(*) FILTER ({needs_price} AND ({value}) IS NULL) > 0"
            f" AND count(*) FILTER ({needs_price} AND ({value}) IS NOT NULL) = 0"
            f" THEN NULL ELSE coalesce(sum({value}) FILTER ({needs_price}), 0) END"
        )

    return _q(
        db,
        f"""
        WITH model_tier AS (
            SELECT model, mode(tier) AS tier FROM marts.request_work
            WHERE tier IS NOT NULL GROUP BY ALL
        ),
        tier_avg AS (
            SELECT tier,
                   sum(pool_{b} * input_share) / nullif(sum(w_in), 0) AS in_price,
                   sum(pool_{b} * (1 - input_share)) / nullif(sum(w_out), 0) AS out_price,
                   sum(pool_{b}) / nullif(sum(w_in) + sum(w_out), 0) AS token_price
            FROM marts.tier_token_prices WHERE {per.where()} GROUP BY ALL
        ),
        r AS (
            SELECT w.*, coalesce(w.tier, mt.tier) AS price_tier
            FROM marts.request_work w LEFT JOIN model_tier mt USING (model)
            WHERE {per.where("w.hour")}
        ),
        priced AS (
            SELECT r.*,
                   coalesce(p.usd_per_input_token_{b}, a.in_price) AS in_price,
                   coalesce(p.usd_per_output_token_{b}, a.out_price) AS out_price,
                   coalesce(p.pool_{b} / nullif(p.w_in + p.w_out, 0), a.token_price)
                       AS token_price
            FROM r
            LEFT JOIN marts.tier_token_prices p ON p.hour = r.hour AND p.tier = r.price_tier
            LEFT JOIN tier_avg a ON a.tier = r.price_tier
        ),
        -- served by the shim without an upstream call, and actually served
        hits AS (
            SELECT * FROM priced
            WHERE served_by_cache AND coalesce(status_code, 200) < 400 AND error_type IS NULL
        ),
        -- what a hit can have replayed: a processed, successful request with usage
        originals AS (
            SELECT request_id, ts, coalesce(tenant, '') AS tenant, prompt_fingerprint,
                   input_tokens, output_tokens
            FROM marts.request_work
            WHERE processed AND coalesce(status_code, 200) < 400 AND error_type IS NULL
              AND input_tokens + output_tokens > 0
        ),
        by_fp AS (
            SELECT h.request_id, o.input_tokens, o.output_tokens
            FROM (SELECT request_id, ts, coalesce(tenant, '') AS tenant, prompt_fingerprint
                  FROM hits WHERE prompt_fingerprint IS NOT NULL) h
            ASOF JOIN (SELECT * FROM originals WHERE prompt_fingerprint IS NOT NULL) o
              ON o.tenant = h.tenant AND o.prompt_fingerprint = h.prompt_fingerprint
             AND h.ts >= o.ts
        ),
        events AS (
            SELECT request_id, max(tokens) AS tokens FROM clean.cache_events
            WHERE layer = 'shim_response' AND event = 'hit' AND request_id IS NOT NULL
            GROUP BY ALL
        ),
        avoided AS (
            SELECT h.request_id, h.in_price, h.out_price, h.token_price,
                CASE WHEN h.input_tokens + h.output_tokens > 0 THEN h.input_tokens
                     WHEN o.request_id IS NOT NULL THEN o.input_tokens
                     ELSE f.input_tokens END AS in_tok,
                CASE WHEN h.input_tokens + h.output_tokens > 0 THEN h.output_tokens
                     WHEN o.request_id IS NOT NULL THEN o.output_tokens
                     ELSE f.output_tokens END AS out_tok,
                e.tokens AS event_tokens
            FROM hits h
            LEFT JOIN originals o ON o.request_id = h.retry_of
            LEFT JOIN by_fp f ON f.request_id = h.request_id
            LEFT JOIN events e ON e.request_id = h.request_id
        )
        SELECT 'vllm_prefix' AS layer,
               count(*) FILTER (cached_input_tokens > 0 AND worked) AS requests,
               CAST(coalesce(sum(cached_input_tokens) FILTER (worked), 0) AS BIGINT) AS tokens,
               {unknown("cached_input_tokens * in_price", "worked AND cached_input_tokens > 0")}
                   AS usd_saved,
               'cached prompt tokens x marginal input-token price' AS how
        FROM priced
        UNION ALL
        SELECT 'shim_response', count(*),
               CAST(coalesce(sum(coalesce(in_tok + out_tok, event_tokens)), 0) AS BIGINT),
               {
            unknown(
                "CASE WHEN in_tok IS NOT NULL THEN in_tok * in_price + out_tok * out_price"
                " ELSE event_tokens * token_price END",
                "coalesce(in_tok + out_tok, event_tokens) > 0",
            )
        },
               'response-cache hits and coalesced requests served x the tokens they avoided'
               || ' at upstream prices'
        FROM avoided
        UNION ALL
        SELECT 'response_cache_potential', count(*),
               CAST(coalesce(sum(input_tokens + output_tokens), 0) AS BIGINT),
               {_known(f"coalesce(sum(cost_{b}), 0)", raw=True)},
               'exact duplicates that reached the GPUs (a response cache would answer them)'
        FROM marts.request_costs WHERE {per.where()} AND leak = 'duplicate'
    """,
    )


def prefix_reuse_potential(
    trace: str | os.PathLike[str] | pl.DataFrame | Iterable[Mapping[str, Any]],
    *,
    block_size: int = 512,
    capacity_blocks: int | None = None,
) -> dict[str, Any]:
    """Potential prefix-cache hit rate of a trace with per-request block hashes.

    Each request lists `hash_ids`, the hashes of its consecutive `block_size`-token
    prompt blocks (Mooncake's format; a hash names the whole prefix up to it). In
    arrival order, a request hits the cache for its leading blocks that are
    already cached (a prefix cache cannot reuse a block after a miss); then all its
    blocks are cached. `capacity_blocks` bounds the cache (LRU); None = unbounded,
    the upper bound. hit_rate = hit tokens / input tokens, where a hit block
    counts block_size tokens (the last block only what remains of input_length).
    """
    if block_size <= 0:
        raise CostError(f"block_size: expected a positive integer, got {block_size!r}")
    if capacity_blocks is not None and capacity_blocks <= 0:
        raise CostError(f"capacity_blocks: expected a positive integer, got {capacity_blocks!r}")
    if isinstance(trace, pl.DataFrame):
        frame = trace
    elif isinstance(trace, str | os.PathLike):
        p = Path(trace)
        if not p.exists():
            raise CostError(f"{p}: trace file not found")
        try:
            frame = pl.read_ndjson(p)
        except Exception as exc:  # polars raises several error types for bad JSON
            raise CostError(f"{p}: not a JSON-lines trace: {exc}") from None
    else:
        frame = pl.DataFrame(list(trace))
    missing = [c for c in ("hash_ids", "input_length") if c not in frame.columns]
    if missing:
        raise CostError(
            f"trace: missing column(s) {missing}; expected Mooncake's timestamp, "
            "input_length, output_length, hash_ids"
        )
    if "timestamp" in frame.columns:
        frame = frame.with_row_index("__i").sort(["timestamp", "__i"])
    cache: OrderedDict[Any, None] = OrderedDict()
    total_tokens = hit_tokens = hit_blocks = total_blocks = requests_hit = 0
    for n, (hashes, length) in enumerate(
        zip(frame["hash_ids"].to_list(), frame["input_length"].to_list(), strict=True), start=1
    ):
        if hashes is None or length is None or length < 0:
            raise CostError(f"trace row {n}: expected hash_ids (a list) and input_length >= 0")
        length = int(length)
        total_tokens += length
        total_blocks += len(hashes)
        k = 0
        while k < len(hashes) and hashes[k] in cache:
            k += 1
        if k:
            requests_hit += 1
            hit_blocks += k
            hit_tokens += min(k * block_size, length)
        for h in hashes:
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                if capacity_blocks is not None and len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return {
        "requests": frame.height,
        "input_tokens": total_tokens,
        "blocks": total_blocks,
        "hit_blocks": hit_blocks,
        "hit_tokens": hit_tokens,
        "hit_rate": hit_tokens / total_tokens if total_tokens else 0.0,
        "requests_with_hit": requests_hit,
        "block_size": block_size,
        "capacity_blocks": capacity_blocks,
    }


# ----------------------------------------------------------------------------- context discipline


def token_distribution(
    db: duckdb.DuckDBPyConnection,
    *,
    feature: str | None = None,
    caps: Mapping[str, int] | None = None,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> pl.DataFrame:
    """Input-token percentiles per feature, and the share above its cap (if given).

    Requests served by the response cache are left out (they sent no tokens upstream).
    """
    per = _p(week, start, end, per)
    cond = per.where()
    if feature is not None:
        cond += " AND feature = $feature"
    df = _q(
        db,
        f"""
        SELECT coalesce(feature, '(none)') AS feature, count(*) AS requests,
               quantile_cont(input_tokens, 0.5) AS p50,
               quantile_cont(input_tokens, 0.9) AS p90,
               quantile_cont(input_tokens, 0.99) AS p99,
               max(input_tokens) AS max,
               avg(input_tokens) AS mean
        FROM marts.request_work WHERE {cond} AND worked
        GROUP BY ALL ORDER BY ALL
    """,
        params={"feature": feature} if feature is not None else None,
    )
    caps = dict(caps or {})
    cap_col = pl.Series("cap", [caps.get(f) for f in df["feature"]], dtype=pl.Int64)
    df = df.with_columns(cap_col)
    if caps:
        over = _q(
            db,
            f"""
            SELECT coalesce(feature, '(none)') AS feature, input_tokens
            FROM marts.request_work WHERE {cond} AND worked
        """,
            params={"feature": feature} if feature is not None else None,
        )
        over = (
            over.join(df.select("feature", "cap"), on="feature")
            .group_by("feature")
            .agg((pl.col("input_tokens") > pl.col("cap")).mean().alias("share_over_cap"))
        )
        df = df.join(over, on="feature", how="left")
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("share_over_cap"))
    return df


def token_samples(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
    limit_per_feature: int = 5000,
) -> pl.DataFrame:
    """Per-request input/output tokens per feature (a sample per feature, for charts)."""
    per = _p(week, start, end, per)
    return _q(
        db,
        f"""
        SELECT coalesce(feature, '(none)') AS feature, input_tokens, output_tokens
        FROM marts.request_work WHERE {per.where()} AND worked
        QUALIFY row_number() OVER (PARTITION BY feature ORDER BY hash(request_id))
                <= {int(limit_per_feature)}
    """,
    )


@dataclass(frozen=True)
class CapSavings:
    """What a cap on input tokens would have done to one feature's traffic."""

    feature: str
    cap: int
    requests: int
    touched: int
    touched_share: float
    tokens_saved: int
    usd_saved: float | None  # None: no GPU data to price the cut tokens
    feature_cost: float | None
    basis: str
    period: str

    def sentence(self) -> str:
        return (
            f"a cap of {self.cap:,} tokens on {self.feature} would have saved "
            f"{'an unknown amount (no GPU data)' if self.usd_saved is None else f'${self.usd_saved:,.2f}'}"
            f" ({self.basis} basis, {self.period}) and touched "
            f"{100 * self.touched_share:.1f}% of requests ({self.touched:,} of {self.requests:,})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sentence": self.sentence()}


def cap_savings(
    db: duckdb.DuckDBPyConnection,
    feature: str,
    cap: int,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    basis: Basis = "allocation",
    per: Period | None = None,
) -> CapSavings:
    """Dollars a hard cap of `cap` input tokens on `feature` would have saved.

    For each request of the feature that did GPU work with input_tokens > cap:
    tokens_saved = input_tokens - cap, priced at its tier-hour's input-token price
    (prefill pool / uncached input tokens) on `basis`. Assumes the cut tokens would
    have been uncached and that answers keep their length (a lower bound: shorter
    context also shortens some answers). touched_share = touched / requests.
    """
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        raise CostError(f"cap: expected a whole number of tokens >= 0, got {cap!r}")
    b = _basis(basis)
    per = _p(week, start, end, per)
    row = _row(
        db,
        f"""
        SELECT count(*) AS requests,
               count(*) FILTER (w.input_tokens > $cap) AS touched,
               CAST(coalesce(sum(w.input_tokens - $cap) FILTER (w.input_tokens > $cap), 0) AS BIGINT) AS tokens,
               CASE WHEN count(p.usd_per_input_token_{b}) FILTER (w.input_tokens > $cap) = 0
                         AND count(*) FILTER (w.input_tokens > $cap) > 0 THEN NULL  -- no GPU data
                    ELSE coalesce(sum((w.input_tokens - $cap) * p.usd_per_input_token_{b})
                                  FILTER (w.input_tokens > $cap), 0) END AS usd,
               (SELECT {_known(f"coalesce(sum(cost_{b}), 0)", raw=True)} FROM marts.request_costs
                 WHERE feature = $feature AND {per.where()}) AS feature_cost
        FROM marts.request_work w
        LEFT JOIN marts.tier_token_prices p ON p.hour = w.hour AND p.tier = w.tier
        WHERE w.feature = $feature AND w.worked AND {per.where("w.hour")}
    """,
        {"cap": cap, "feature": feature},
    )
    requests, touched, tokens, usd, fcost = row
    if requests == 0:
        known = [
            r[0]
            for r in _q(
                db,
                "SELECT DISTINCT feature FROM marts.request_work WHERE feature IS NOT NULL "
                "ORDER BY 1",
            ).rows()
        ]
        raise CostError(
            f"cap_savings: no requests of feature {feature!r} in {per.label}; "
            f"features in the lake: {known}"
        )
    return CapSavings(
        feature,
        cap,
        requests,
        touched,
        touched / requests,
        int(tokens),
        None if usd is None else float(usd),
        None if fcost is None else float(fcost),
        b,
        per.label,
    )


# ----------------------------------------------------------------------------- headline


def headline(
    db: duckdb.DuckDBPyConnection,
    *,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> dict[str, Any]:
    """The numbers `make demo` prints: bill, idle, cost per request, leakage, cache savings.

    idle_time_share is idle GPU time (1 - utilization, the report's idle share);
    idle_capacity_share is the idle dollars' share of the bill.
    """
    per = _p(week, start, end, per)
    t = totals(db, per=per, basis="allocation")
    u = totals(db, per=per, basis="usage")
    leak = leakage(db, per=per)
    cache = cache_savings(db, per=per)
    leak_cost = sum_known(leak.filter(pl.col("kind") == "leak")["cost"])
    # no GPU samples, or none of them priced by the catalog: the bill is unknown (None,
    # printed as unknown), not $0
    measured = bool(t["gpu_hours"])
    known = bool(t["priced_gpu_hours"])
    # no request logs: how many requests, what leaked and what caches saved are
    # unknown (None, printed n/a), not 0 and $0.00
    logged = bool(t["requests"])
    if not known or not logged:
        leak_cost = None
    priced = u["requests"] - u["unpriced_requests"]
    return {
        "period": t["period"],
        "gpus": t["gpus"],
        "gpu_hours": t["gpu_hours"],
        "gpu_cost": t["gpu_cost"] if known else None,
        "utilization": t["utilization"],
        "idle_capacity_cost": t["idle_capacity_cost"] if known else None,
        "idle_capacity_share": t["idle_capacity_cost"] / t["gpu_cost"] if t["gpu_cost"] else None,
        # the report's "N% of GPU time was idle": idle GPU-hours over GPU-hours
        "idle_time_share": (
            (t["gpu_hours"] - t["busy_gpu_hours"]) / t["gpu_hours"] if measured else None
        ),
        "requests": t["requests"] if logged else None,
        "cost_per_1k_requests": t["usd_per_1k_requests"],
        "usage_cost_per_1k_requests": (
            1000 * u["allocated_cost"] / priced if known and priced else None
        ),
        "usd_per_1m_input_tokens": t["usd_per_1m_input_tokens"],
        "usd_per_1m_output_tokens": t["usd_per_1m_output_tokens"],
        "leakage_cost": leak_cost,
        "leakage_share": leak_cost / t["gpu_cost"]
        if leak_cost is not None and t["gpu_cost"]
        else None,
        "cache_saved": sum_known(
            cache.filter(pl.col("layer") != "response_cache_potential")["usd_saved"]
        )
        if known and logged
        else None,
        "response_cache_potential": sum_known(
            cache.filter(pl.col("layer") == "response_cache_potential")["usd_saved"]
        )
        if known and logged
        else None,
        "notes": t["notes"],
    }


def format_headline(h: Mapping[str, Any]) -> str:
    """One line: the week's bill, idle share, cost per 1k requests, leakage, cache savings
    (dollars without GPU data read "unknown", never $0.00)."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    def usd(x: float | None) -> str:
        return "unknown" if x is None else f"${x:,.2f}"

    return (
        f"{h['period']}: GPU bill {usd(h['gpu_cost'])} for {h['gpu_hours']:,.0f} GPU-hours "
        f"({h['gpus']} GPUs, SM-active {pct(h['utilization'])}, idle {pct(h['idle_time_share'])}"
        f" of GPU time = {usd(h['idle_capacity_cost'])}); "
        + (
            "no request logs: cost per request, leakage and cache savings unknown"
            if h["requests"] is None
            else f"{h['requests']:,} requests at {usd(h['cost_per_1k_requests'])}/1k (busy-time "
            f"only {usd(h['usage_cost_per_1k_requests'])}/1k); leakage {usd(h['leakage_cost'])} "
            f"({pct(h['leakage_share'])}); caches saved {usd(h['cache_saved'])}, a response "
            f"cache would save {usd(h['response_cache_potential'])} more"
        )
    )


def to_json(obj: Any) -> str:
    """JSON for totals/headline dicts (datetimes as ISO strings)."""
    return json.dumps(obj, default=str, indent=2)
