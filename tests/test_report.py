"""The weekly report: JSON vs independent SQL, FOCUS 1.3 column rules, self-contained HTML,
missing sources, CLI errors, and a headless-Chromium screenshot."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from finops.report.build import build_report, summary_markdown
from finops.report.figures import ReportError, compute
from finops.report.focus import COLUMNS

WEEK = "2026-W47"
START = "TIMESTAMPTZ '2026-11-16 00:00:00+00'"
END = "TIMESTAMPTZ '2026-11-23 00:00:00+00'"
IN_WEEK = f"ts >= {START} AND ts < {END}"


@pytest.fixture(scope="module")
def built(demo_lake: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report")
    paths = build_report(demo_lake, WEEK, out, growth=False)
    return paths, json.loads(paths.json.read_text())


@pytest.fixture(scope="module")
def raw(demo_lake: Path):
    db = finops.connect(demo_lake)
    yield db
    db.close()


def one(db, sql: str):
    return db.sql(sql).fetchall()[0][0]


# ----------------------------------------------------------------------------- independent SQL

GPU_HOURS_SQL = f"""
    WITH s AS (
        SELECT date_trunc('hour', ts) AS hour, gpu_uuid, coalesce(mig_instance, '') AS mig,
               any_value(gpu_model) AS gpu_model,
               avg(value) FILTER (field = 'DCGM_FI_PROF_SM_ACTIVE') AS sm
        FROM raw.gpu_samples
        WHERE {IN_WEEK} AND value IS NOT NULL AND NOT isnan(value)
        GROUP BY ALL
    ),
    p AS (SELECT replace(gpu_model, 'NVIDIA ', '') AS m, usd_per_gpu_hour
          FROM read_csv_auto('{Path(finops.__file__).parents[1] / "data" / "prices.csv"}')
          WHERE pricing_kind = 'on_demand')
    SELECT s.*, p.usd_per_gpu_hour AS price
    FROM s JOIN p ON replace(s.gpu_model, 'NVIDIA ', '') = p.m
"""
# tokens count what a model processed: not the shim's cache hits (the demo logs them with the
# original's tokens), not refusals: a cap's, or any 4xx but 408/499 such as vLLM's 400 for
# a prompt over max_model_len (sql/marts/20_requests.sql, `processed`)
REFUSED = (
    "(coalesce(error_type, '') = 'context_length_exceeded' "
    "OR (coalesce(status_code, 0) BETWEEN 400 AND 498 AND status_code <> 408))"
)
REQ_SQL = f"""
    SELECT request_id, any_value(tenant) AS tenant,
           any_value(CASE WHEN cache_status IN ('hit', 'coalesced') OR {REFUSED} THEN 0
                          ELSE input_tokens END) AS i,
           any_value(CASE WHEN cache_status IN ('hit', 'coalesced') OR {REFUSED} THEN 0
                          ELSE output_tokens END) AS o,
           any_value(cache_status) AS cache_status
    FROM raw.requests WHERE {IN_WEEK} GROUP BY request_id
"""


def test_json_headline_equals_independent_sql(built, raw) -> None:
    _, r = built
    h = r["headline"]
    n_gpu_rows = one(raw, f"SELECT count(*) FROM ({GPU_HOURS_SQL})")
    assert n_gpu_rows == one(
        raw,
        f"SELECT count(DISTINCT (date_trunc('hour', ts), gpu_uuid)) FROM raw.gpu_samples "
        f"WHERE {IN_WEEK}",
    ), "every GPU model of the demo has a catalog price"
    spend = one(raw, f"SELECT sum(price) FROM ({GPU_HOURS_SQL})")
    util = one(raw, f"SELECT avg(least(greatest(sm, 0), 1)) FROM ({GPU_HOURS_SQL})")
    idle = one(raw, f"SELECT sum((1 - least(greatest(sm, 0), 1)) * price) FROM ({GPU_HOURS_SQL})")
    n, i, o = raw.sql(f"SELECT count(*), sum(i), sum(o) FROM ({REQ_SQL})").fetchall()[0]
    assert h["requests"]["value"] == n > 0
    assert h["input_tokens"]["value"] == i and h["output_tokens"]["value"] == o
    assert h["tokens"]["value"] == i + o
    assert h["gpu_hours"]["value"] == n_gpu_rows
    assert h["gpus"]["value"] == one(
        raw, f"SELECT count(DISTINCT gpu_uuid) FROM raw.gpu_samples WHERE {IN_WEEK}"
    )
    assert h["spend_usd"]["value"] == pytest.approx(spend, abs=0.005)
    assert h["utilization"]["value"] == pytest.approx(util, rel=1e-9)
    assert h["idle_capacity_usd"]["value"] == pytest.approx(idle, abs=0.005)
    assert h["usd_per_1k_requests"]["value"] == pytest.approx(1000 * spend / n, rel=1e-9)
    assert h["usd_per_1m_tokens"]["value"] == pytest.approx(1e6 * spend / (i + o), rel=1e-9)
    assert h["util_signal"] == "DCGM_FI_PROF_SM_ACTIVE"
    # the demo lake has no week before: no change figures, and the report says so
    assert h["spend_usd"]["previous"] is None and h["spend_usd"]["change"] is None
    assert any("2026-W46" in m for m in r["sources"]["missing"])


def test_json_sections_equal_independent_sql(built, raw) -> None:
    _, r = built
    tenants = dict(
        raw.sql(
            f"SELECT coalesce(tenant, '(none)'), count(*) FROM ({REQ_SQL}) GROUP BY 1"
        ).fetchall()
    )
    assert {x["tenant"]: x["requests"] for x in r["breakdown"]["tenant"]} == tenants
    spend = one(raw, f"SELECT sum(price) FROM ({GPU_HOURS_SQL})")
    allocated = sum(x["cost"] for x in r["breakdown"]["tenant"])
    idle_unallocated = next(x["cost"] for x in r["leakage"]["categories"] if x["kind"] == "idle")
    assert allocated + idle_unallocated == pytest.approx(spend, abs=0.005)
    by_hour = dict(
        raw.sql(
            f"""SELECT hour(hour), sum(1 - least(greatest(sm, 0), 1)) / count(*)
                FROM ({GPU_HOURS_SQL}) GROUP BY 1"""
        ).fetchall()
    )
    got = {x["hour_of_day"]: x["idle_share"] for x in r["idle"]["by_hour"]}
    assert got.keys() == by_hour.keys()
    for k, v in by_hour.items():
        assert got[k] == pytest.approx(v, rel=1e-9)
    assert r["idle"]["troughs"][0]["idle_share"] == pytest.approx(max(by_hour.values()))
    hourly = dict(
        raw.sql(
            f"""SELECT date_trunc('hour', ts), count(DISTINCT request_id) FROM raw.requests
                WHERE {IN_WEEK} GROUP BY 1"""
        ).fetchall()
    )
    assert {dt.datetime.fromisoformat(x["hour"]): x["requests"] for x in r["hourly"]} == hourly
    hits = one(raw, f"SELECT count(*) FROM ({REQ_SQL}) WHERE cache_status = 'hit'")
    shim = next(x for x in r["cache"]["layers"] if x["layer"] == "shim_response")
    assert shim["requests"] == hits
    routed = one(
        raw,
        f"""SELECT count(DISTINCT request_id) FROM raw.requests WHERE {IN_WEEK}
            AND router_version IS NOT NULL AND tier IS NOT NULL
            AND coalesce(cache_status, '') NOT IN ('hit', 'coalesced') AND NOT {REFUSED}""",
    )
    assert r["router"]["routed_requests"] == routed
    assert r["router"]["artifact"] is None and "no router" in r["router"]["note"]
    # every sentence of the report carries its number
    for key in ("headline", "tenant", "idle", "leakage", "cache"):
        assert re.search(r"\d", r["takeaways"][key]), key


def test_routing_saving_is_gpu_busy_time_and_never_more_than_the_bill(built, raw) -> None:
    """The saving priced all routed work at the top tier's allocation $/token, idle
    included: the demo's top tier is ~99% idle, so routing "saved" more than the whole
    GPU bill. Both sides are now the usage basis (busy GPU time), checked here against
    the marts computed independently."""
    _, r = built
    ro = r["router"]
    top = ro["reference_tier"]
    in_p, out_p = raw.sql(
        f"""SELECT sum(pool_usage * input_share) / sum(w_in),
                   sum(pool_usage * (1 - input_share)) / sum(w_out)
            FROM marts.tier_token_prices
            WHERE hour >= {START} AND hour < {END} AND tier = '{top}'"""
    ).fetchall()[0]
    all_large, actual = raw.sql(
        f"""SELECT sum(work_in * {in_p} + work_out * {out_p}), sum(cost_usage)
            FROM marts.request_costs WHERE hour >= {START} AND hour < {END} AND worked
              AND request_id IN (SELECT request_id FROM clean.requests
                                 WHERE router_version IS NOT NULL)"""
    ).fetchall()[0]
    assert ro["all_large_usd"] == pytest.approx(all_large)
    assert ro["saved_usd"] == pytest.approx(all_large - actual)
    assert 0 < ro["saved_usd"] < r["headline"]["spend_usd"]["value"]
    assert "of GPU busy time" in r["takeaways"]["router"]


def test_forecast_and_anomalies_are_documented_and_consistent(built) -> None:
    _, r = built
    fo = r["forecast"]
    assert len(fo["hourly"]) == 168
    assert fo["requests"] == pytest.approx(sum(x["requests"] for x in fo["hourly"]))
    assert fo["trend"]["requests"] == 1.0  # no week before: no trend
    assert fo["hourly"][0]["hour"].startswith("2026-11-23T00:00")
    assert "hour of" in r["anomalies"]["method"]
    for a in r["anomalies"]["hours"]:
        assert abs(a["z"]) > 3.5


# ----------------------------------------------------------------------------- FOCUS

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
REQUIRED_NON_NULL = (
    "BilledCost",
    "BillingAccountId",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargeCategory",
    "ChargeDescription",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
    "ConsumedQuantity",
    "ConsumedUnit",
    "PricingQuantity",
    "PricingUnit",
)


def test_focus_export_follows_the_column_rules(built, raw) -> None:
    paths, _ = built
    df = pl.read_parquet(paths.focus_parquet)
    csv = pl.read_csv(paths.focus_csv, infer_schema_length=0)
    assert df.height == csv.height > 0
    assert list(df.columns) == list(COLUMNS) == list(csv.columns)
    for c in REQUIRED_NON_NULL:
        assert df[c].null_count() == 0, c
    for c in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"):
        assert df[c].dtype == pl.Datetime("us", "UTC"), c
        assert csv[c].str.contains(ISO_UTC.pattern).all(), c
    for c in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "PricingQuantity"):
        assert df[c].dtype == pl.Float64 and df[c].is_finite().all(), c
        csv[c].cast(pl.Float64)  # decimal text, parseable
    assert set(df["BillingCurrency"]) == {"USD"}
    assert set(df["ChargeCategory"]) <= {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
    assert df["ChargeClass"].is_null().all() or set(df["ChargeClass"].drop_nulls()) == {
        "Correction"
    }
    assert set(df["ServiceCategory"]) == {"AI and Machine Learning"}
    assert (df["ChargePeriodEnd"] > df["ChargePeriodStart"]).all()
    assert (df["ChargePeriodStart"] >= df["BillingPeriodStart"]).all()
    assert (df["ChargePeriodEnd"] <= df["BillingPeriodEnd"]).all()
    # FOCUS 1.3 split cost allocation: every row of a tier-day's SKU in its unit, GPU-hours
    assert set(df["ConsumedUnit"]) == {"GPU-Hours"}
    assert (df["ConsumedQuantity"] >= 0).all()
    assert (df["ConsumedQuantity"] == df["PricingQuantity"]).all()
    for t in df["Tags"].drop_nulls():  # the origin charge's tier, no placeholder values
        tags = json.loads(t)
        assert set(tags) == {"tier"} and None not in tags.values()
    assert paths.focus_metadata == paths.focus_csv.parent / f"focus-{WEEK}.metadata.json"
    assert paths.focus_metadata.exists() and "focus_metadata" in paths.as_dict()
    for c in df.columns:
        assert c in COLUMNS and (c[0].isupper() or c.startswith("x_")), c
    # costs reconcile: the rows add up to the week's GPU bill, to the cent
    bill = one(raw, f"SELECT sum(price) FROM ({GPU_HOURS_SQL})")
    assert round(df["BilledCost"].sum(), 2) == round(bill, 2)
    assert (df["BilledCost"] == df["EffectiveCost"]).all()
    # tenants on the usage basis + idle capacity rows = the bill; the idle rows hold the
    # report's idle capacity (busy GPU time no request carried adds to it)
    idle = df.filter(pl.col("x_IdleCapacity"))["BilledCost"].sum()
    idle_cost = (
        f"SELECT sum(idle_cost) FROM marts.gpu_cost_hourly WHERE hour >= {START} AND hour < {END}"
    )
    assert idle >= one(raw, idle_cost) - 0.005
    assert df["ListCost"].to_list() == pytest.approx(
        (df["ListUnitPrice"] * df["PricingQuantity"]).to_list(), abs=1e-6
    )
    assert df["PricingQuantity"].sum() == pytest.approx(
        one(raw, f"SELECT count(*) FROM ({GPU_HOURS_SQL})"), rel=1e-9
    )


# ----------------------------------------------------------------------------- HTML, summary


def test_html_is_self_contained(built) -> None:
    paths, r = built
    page = paths.html.read_text()
    assert "<script" not in page.lower()
    assert "http" not in page.lower(), re.findall(r".{40}http.{40}", page)[:3]
    assert "<svg" in page and page.count("<svg") >= 6
    assert 'name="viewport"' in page and "@media print" in page and "@media (max-width" in page
    assert "def " not in page and "import " not in page  # code cells hidden
    assert f"GPU cost report {WEEK}" in page
    assert r["takeaways"]["headline"].split(" for ")[0].replace("$", "") in page.replace("$", "")


def test_summary_is_ten_lines_with_the_numbers(built) -> None:
    paths, r = built
    lines = paths.summary.read_text().splitlines()
    assert 4 <= len(lines) <= 10
    assert f"${r['headline']['spend_usd']['value']:,.2f}" in lines[1]
    assert summary_markdown(r) == paths.summary.read_text()


# ----------------------------------------------------------------------------- missing sources


def _copy_without(src: Path, dst: Path, *tables: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*tables))
    return dst


def test_report_without_gpu_metrics_says_so(demo_lake: Path, tmp_path: Path) -> None:
    lake = _copy_without(demo_lake, tmp_path / "lake", "gpu_samples")
    paths = build_report(lake, WEEK, tmp_path / "out", growth=False)
    r = json.loads(paths.json.read_text())
    assert r["sources"]["gpu_samples"] is False
    assert any("No GPU metrics" in m for m in r["sources"]["missing"])
    assert r["headline"]["requests"]["value"] > 0
    # unknown, not $0.00: every dollar figure of the headline, the summary and the forecast
    for key in ("spend_usd", "usd_per_1k_requests", "usd_per_1m_tokens", "gpu_hours",
                "idle_capacity_usd", "leakage_usd", "cache_saved_usd"):  # fmt: skip
        assert r["headline"][key]["value"] is None, key
    assert r["forecast"]["spend_usd"] is None
    summary = paths.summary.read_text()
    assert "Spend n/a" in summary and "$0.00" not in summary
    assert all(r["breakdown"][dim] == [] for dim in ("tenant", "feature", "tier", "model"))
    assert "No GPU metrics" in paths.html.read_text()
    assert pl.read_parquet(paths.focus_parquet).height == 0


def test_empty_week_gives_a_report_that_says_what_is_missing(
    demo_lake: Path, tmp_path: Path
) -> None:
    paths = build_report(demo_lake, "2026-W40", tmp_path, growth=False)
    r = json.loads(paths.json.read_text())
    # and says which days it does hold (the demo lake: 2 days from 2026-11-16)
    said = "The lake holds no data for 2026-W40 (it holds 2026-11-16 to 2026-11-17 UTC)."
    assert r["sources"]["missing"][0] == said
    assert r["headline"]["spend_usd"]["value"] is None
    # nothing to judge, and nothing said to be $0: caches and leakage are unknown
    assert r["takeaways"]["anomalies"] == "Anomalies not judged: no requests this week."
    assert r["cache"]["saved_usd"] is None and r["leakage"]["leak_usd"] is None
    page = paths.html.read_text()
    assert said in page and "<script" not in page
    assert "Traceback" not in page
    assert pl.read_csv(paths.focus_csv).columns == list(COLUMNS)


def test_the_report_kernel_prints_no_warning(
    demo_lake: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The notebook's kernel ran over loopback TCP without encryption, and every `finops
    report` and `finops demo` printed ipykernel's eavesdropping warning to the user."""
    build_report(demo_lake, "2026-W40", tmp_path, growth=False)
    err = capfd.readouterr().err
    assert "without encryption" not in err and "WARNING" not in err


def test_a_relative_out_folder_works(
    demo_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notebook runs in the out folder: a relative one ("report") was resolved twice
    (report/report/...) and the HTML step died with a traceback."""
    monkeypatch.chdir(tmp_path)
    paths = build_report(demo_lake, "2026-W40", "report", growth=False)
    assert paths.html == tmp_path / "report" / "report-2026-W40.html"
    assert paths.html.exists() and paths.json.exists()


def test_partial_week_and_compare_to(demo_lake: Path) -> None:
    r = compute(demo_lake, WEEK, compare_to="2026-W45", growth=False)
    assert any(m.startswith("Partial week: data covers 48 of 168") for m in r["sources"]["missing"])
    assert r["headline"]["spend_usd"]["change"] is None  # W45 has no data: no change
    assert r["compare_to"] == "2026-W45"


def test_no_sm_activity_names_the_fallback_signal(demo_lake: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(demo_lake, lake)
    db = finops.connect(lake)
    files = db.sql(
        "SELECT DISTINCT filename FROM read_parquet(?, filename=true)",
        params=[str(lake / "gpu_samples" / "**" / "*.parquet")],
    ).fetchall()
    for (f,) in files:
        t = pl.read_parquet(f).filter(pl.col("field") != "DCGM_FI_PROF_SM_ACTIVE")
        t.write_parquet(f)
    db.close()
    r = compute(lake, WEEK, growth=False)
    assert r["sources"]["util_signal"] == "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
    assert any("No SM-activity metric" in m for m in r["sources"]["missing"])


def test_bad_input_fails_clearly(demo_lake: Path, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="ISO week"):
        compute(demo_lake, "2026-47", growth=False)
    with pytest.raises(ReportError, match="compare_to"):
        compute(demo_lake, WEEK, compare_to="last week", growth=False)
    with pytest.raises(ReportError, match="lake folder not found"):
        build_report(tmp_path / "nope", WEEK, tmp_path / "out")
    from finops.cli import app

    res = CliRunner().invoke(app, ["report", "--week", "2026-W99", "--lake", str(demo_lake)])
    assert res.exit_code == 2
    assert "2026-W99" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- chromium


def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into an array."""
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", None
    while pos < len(b):
        (n,) = struct.unpack(">I", b[pos : pos + 4])
        kind, data = b[pos + 4 : pos + 8], b[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
    assert hdr is not None
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, hdr
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].copy()
        if f == 1:
            line = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif f == 2:
            line = line + prev
        elif f in (3, 4):
            p = prev.astype(np.int32)
            cur = line.astype(np.int32)
            for x in range(w * bpp):
                a = cur[x - bpp] if x >= bpp else 0
                c = p[x - bpp] if x >= bpp else 0
                if f == 3:
                    pred = (a + p[x]) // 2
                else:
                    pa, pb, pc = abs(p[x] - c), abs(a - c), abs(a + p[x] - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (p[x] if pb <= pc else c)
                cur[x] = (cur[x] + pred) & 0xFF
            line = cur.astype(np.uint8)
        out[y] = line
        prev = line
    return out.reshape(h, w, bpp)[:, :, :3]


@pytest.mark.chromium
def test_html_screenshot_in_headless_chromium(built, artifacts_dir: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI=true: chromium must be installed (apt-get install chromium)")
        pytest.skip("chromium not installed")
    paths, _ = built
    png = artifacts_dir / "report-2026-W47.png"
    png.unlink(missing_ok=True)
    log = tmp_path / "chrome.log"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        "--enable-logging=stderr",
        "--v=1",
        f"--screenshot={png}",
        "--window-size=1280,4000",
        paths.html.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log.write_text(res.stderr)
    assert png.exists(), res.stderr[-2000:]
    # no request left the page: every URL chromium loaded is the page itself or one of the
    # browser's own background services (update/time/account checks, blocked by the proxy)
    loaded = re.findall(r"NotifyBeforeURLRequest: (\S+)", res.stderr)
    browser_own = re.compile(r"^https?://[^/]*\b(google\.com|googleapis\.com|gvt1\.com)/")
    from_page = [u for u in loaded if not u.startswith("file://") and not browser_own.match(u)]
    assert not from_page, from_page[:5]
    px = _png_pixels(png)
    assert px.shape == (4000, 1280, 3)
    non_white = (px.min(axis=2) < 235).mean()
    assert non_white > 0.03, f"screenshot nearly blank: {non_white:.1%} non-white"
    assert px.std() > 20
    # coloured chart marks (the blue bars) are on screen, not just text
    blue = (px[:, :, 2].astype(int) - px[:, :, 0].astype(int) > 60).mean()
    assert blue > 0.002


def test_router_artifact_adds_quality_and_drift(demo_lake: Path, tmp_path: Path) -> None:
    from finops.router import data as D
    from finops.router.train import train

    db = finops.connect(demo_lake)
    reqs = db.sql(
        """SELECT request_id, input_tokens, feature FROM clean.requests
           WHERE coalesce(operation, 'chat') <> 'embeddings' ORDER BY request_id LIMIT 600"""
    ).pl()
    db.close()
    rng = np.random.default_rng(0)
    lines = []
    for r in reqs.iter_rows(named=True):
        hard = (r["input_tokens"] or 0) > 4000 or r["feature"] == "code-complete"
        tier = 2 if hard and rng.random() < 0.8 else int(rng.choice(2))
        lines.append(json.dumps({"request_id": r["request_id"], "label": D.DEFAULT_TIERS[tier]}))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    art = tmp_path / "art"
    train(D.load_lake(demo_lake, labels), art, cv_folds=0, lake=demo_lake, quality_target=0.9)
    full = compute(demo_lake, WEEK, router=art, growth=False)
    r = full["router"]
    assert r["artifact"]["path"] == str(art) and "note" not in r
    assert 0 < r["quality_estimate"] <= 1
    # the quality is the artifact's, replayed; the logged saving is the serving routers':
    # one sentence gave the one next to the other as if they were the same router's
    t = full["takeaways"]
    assert "quality" not in t["router"] and r["logged_versions"]
    assert r["artifact"]["version"] not in r["logged_versions"]
    quality = f"would keep an estimated {100 * r['quality_estimate']:.1f}% of quality"
    assert quality in t["router_replay"]
    assert "it did not serve this week (logged: " in t["router_replay"]
    # its dollars against the routing the log shows, not against all on large
    vs = r["replay"]["vs_logged_usd"]
    assert vs is not None and r["replay"]["logged_requests"] > 0
    said = "against the routing the log shows" if vs >= 0 else "more than the routing the log shows"
    assert said in t["router_replay"], t["router_replay"]
    # the report week's own requests (was: the lake's last 7 days, whatever the week)
    db = finops.connect(demo_lake)
    in_week = one(
        db,
        f"""SELECT count(*) FROM clean.requests
            WHERE strftime(ts AT TIME ZONE 'UTC', '%G-W%V') = '{WEEK}'
              AND coalesce(operation, 'chat') <> 'embeddings'
              AND coalesce(cache_status, 'miss') <> 'hit' AND coalesce(status_code, 200) < 400""",
    )
    db.close()
    assert r["replay"]["requests"] == in_week > 0
    y, w = WEEK.split("-W")
    empty = compute(demo_lake, f"{int(y) - 1}-W{w}", router=art, growth=False)["router"]
    assert empty["replay"]["requests"] == 0 and not (empty["drift"] or {}).get("share_shift")
    d = r["drift"]
    assert set(d["share_shift"]) == set(D.DEFAULT_TIERS)
    assert d["max_share_shift"] == max(abs(v) for v in d["share_shift"].values())
    if "score_psi" in d:
        assert d["score_psi"] >= 0


def test_growth_and_autoscaling_cover_the_report_week(demo_lake: Path) -> None:
    r = compute(demo_lake, WEEK)
    g = r["growth"]
    assert g["growth"] == 5.0 and g["before_usd_per_1k"] > g["after_usd_per_1k"] > 0
    a = g["autoscaling"]
    assert a["autoscaled_usd"] <= a["fixed_fleet_usd"]
    assert a["saved_usd"] == pytest.approx(a["fixed_fleet_usd"] - a["autoscaled_usd"])
    # the simulated fixed fleet is the observed fleet of this week: its cost is the bill
    assert a["fixed_fleet_usd"] == pytest.approx(r["headline"]["spend_usd"]["value"], rel=0.01)
    assert f"${g['before_usd_per_1k']:,.2f}/1k" in r["takeaways"]["growth"]
    assert f"${a['saved_usd']:,.2f}" in r["takeaways"]["autoscaling"]
    # which levers earn the 5x saving (the waterfall's biggest steps) and the SLO kept
    top = g["top_levers"]
    assert 1 <= len(top) <= 2 and top[0]["saved_usd"] >= top[-1]["saved_usd"] > 0
    for x in top:
        assert f"{x['setting']}: ${x['saved_usd']:,.0f}" in r["takeaways"]["growth"]
    assert "finops simulate --default-levers" in r["takeaways"]["growth"]
    assert g["scenario"].startswith("response cache hit rate")
    slo = f"p95 time to first token within {g['slo_ttft_p95_ms']:,.0f} ms"
    assert slo in r["takeaways"]["autoscaling"]
    for tier, ms in g["tier_slo_ms"].items():
        if ms > g["slo_ttft_p95_ms"]:
            assert f"{tier} {ms:,.0f} ms" in r["takeaways"]["autoscaling"]
    # the SLO claim carries notebook 02's caveat (finops.models.autoscaling.recommend's
    # notes): where target_waiting is floored, a queue-depth autoscaler may miss the SLO
    caveats = g["queue_target_caveats"]
    assert caveats, "the demo week's tiers leave milliseconds of queueing: floored targets"
    line = r["takeaways"]["autoscaling"]
    for x in caveats:
        assert "target_waiting is floored at 0.5" in x["note"]
        assert f"{x['queue_wait_ms']:,.0f} ms on {x['tier']}" in line, line
    assert "can exceed the SLO before it adds a replica" in line, line
    # a traffic or serving lever's share is replicas at whole-replica steps, not tokens
    if {x["lever"] for x in top} - {"reserved_baseline", "spot_share"}:
        assert "in whole-replica steps, not GPU work avoided" in r["takeaways"]["growth"]


def test_notebook_runs_standalone_for_analysts(demo_lake: Path, tmp_path: Path) -> None:
    """Opened in Jupyter without `finops report`, the notebook computes its own figures."""
    import papermill as pm

    from finops.report.build import NOTEBOOK
    from finops.report.render import notebook_to_html

    executed = tmp_path / "run.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK),
        str(executed),
        parameters={"week": WEEK, "lake": str(demo_lake)},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
    )
    page = notebook_to_html(executed, title="t")
    assert "GPU cost report 2026-W47" in page and "<svg" in page and "<script" not in page


# ----------------------------------------------------------------------------- review fixes

EVIL = "<img src=x onerror=\"document.title='PWNED'\">"


def _tiny_lake(path: Path, feature: str, tenant: str = "acme") -> Path:
    """Two hours, two GPUs, a few requests; the large-tier feature name is `feature`."""
    from finops.lake import Lake

    t0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
    lake = Lake(path, fsync=False)
    gpus = [
        ("gpu-s0", "NVIDIA L4", "vllm-small-0", "small", 0.25),
        ("gpu-l0", "NVIDIA H100 80GB HBM3", "vllm-large-0", "large", 0.5),
    ]
    rows = [
        dict(
            ts=t0 + dt.timedelta(hours=h, minutes=m),
            source="t",
            host="n1",
            gpu_uuid=uuid,
            gpu_model=model,
            namespace="ns",
            pod=pod,
            labels=json.dumps({"tier": tier}),
            field=f,
            value=v,
        )
        for h in range(2)
        for uuid, model, pod, tier, sm in gpus
        for m in range(0, 60, 15)
        for f, v in (("DCGM_FI_PROF_SM_ACTIVE", sm), ("DCGM_FI_DEV_GPU_UTIL", 100 * sm + 20))
    ]
    lake.append("gpu_samples", rows, source="t")
    base = dict(
        source="t", tenant=tenant, status_code=200, cache_status="miss", attempt=1, stream=False
    )
    lake.append(
        "requests",
        [
            dict(
                base,
                request_id="r1",
                ts=t0 + dt.timedelta(minutes=1),
                tier="small",
                feature="chat",
                response_model="m-small",
                input_tokens=1000,
                output_tokens=100,
                prompt_fingerprint="a",
            ),
            dict(
                base,
                request_id="r2",
                ts=t0 + dt.timedelta(minutes=2),
                tier="large",
                feature=feature,
                response_model="m-large",
                input_tokens=2000,
                output_tokens=200,
                prompt_fingerprint="c",
            ),
        ],
        source="t",
    )
    return path


def _tags(page: str) -> list[tuple[str, list[str]]]:
    """Every start tag of a page with its attribute names, as a browser's tokenizer sees them."""
    from html.parser import HTMLParser

    tags: list[tuple[str, list[str]]] = []

    class P(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list) -> None:
            tags.append((tag, [k for k, _ in attrs]))

    P().feed(page)
    return tags


def test_names_from_the_data_never_become_markup(tmp_path: Path) -> None:
    """A client-chosen feature name (the shim's x-feature header) ran as script in the
    report: takeaways went through mistune.html, which passes raw HTML."""
    lake = _tiny_lake(tmp_path / "lake", EVIL, tenant="*bold* [x](http://e.example)")
    paths = build_report(lake, WEEK, tmp_path / "out", growth=False)
    page = paths.html.read_text()
    # no live tag or event attribute: the name only appears as (escaped) text
    tags = _tags(page)
    assert "img" not in {t for t, _ in tags}
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    assert "&lt;img src=x onerror=" in page  # shown as text
    assert "<strong>bold</strong>" not in page and 'href="http://e.example' not in page
    summary = paths.summary.read_text()
    assert EVIL not in summary.replace(f"` {EVIL} `", "")  # only as an inert code span
    r = json.loads(paths.json.read_text())
    assert f"` {EVIL} ` costs the most" in r["takeaways"]["feature"]
    assert r["takeaways"]["tenant"].startswith("` *bold* [x](http://e.example) `")


def test_markdown_renderer_escapes_raw_html_and_md_name_is_inert() -> None:
    from finops.report.figures import md_name
    from finops.report.render import _markdown

    html_ = _markdown(f"{EVIL} and **strong**")
    assert "<img" not in html_ and "&lt;img" in html_ and "<strong>strong</strong>" in html_
    assert md_name("chat-bot_v2") == "chat-bot_v2"  # plain names stay plain
    assert md_name("a`b") == "`` a`b ``"
    assert md_name("x\ny") == "x y"  # a newline cannot start a new Markdown line
    assert "<code>" in _markdown(md_name("*x*")) and "<em>" not in _markdown(md_name("*x*"))


def test_out_and_router_errors_are_one_clear_line(demo_lake: Path, tmp_path: Path) -> None:
    """--out an existing file or an unwritable place, --router a missing folder: tracebacks
    before (the router only after every figure had been computed)."""
    from finops.cli import app

    afile = tmp_path / "afile"
    afile.write_text("x")
    runner = CliRunner()
    base = ["report", "--week", WEEK, "--lake", str(demo_lake), "--no-growth"]
    for out in (afile, afile / "sub"):
        res = runner.invoke(app, [*base, "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert f"error: --out {out}" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app, [*base, "--out", str(tmp_path / "o"), "--router", str(tmp_path / "nope")]
    )
    assert res.exit_code == 2, res.output
    assert "error: --router" in res.output and str(tmp_path / "nope") in res.output


def test_a_wrong_router_fails_before_any_figure(
    demo_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finops.report.figures as F

    def boom(*a, **k):
        raise AssertionError("figures computed before the router was checked")

    monkeypatch.setattr(F.fc, "materialize", boom)
    with pytest.raises(ReportError, match="no such folder"):
        compute(demo_lake, WEEK, router=tmp_path / "nope", growth=False)


def test_percent_changes_and_the_period_read_right(built) -> None:
    from finops.report.figures import change, signed_pct

    assert signed_pct(-1.6e-16) == "0.0%" and signed_pct(0.0) == "0.0%"
    assert signed_pct(-0.0004) == "0.0%" and signed_pct(0.032) == "+3.2%"
    assert signed_pct(-0.01) == "-1.0%"
    assert change(-1.6e-16) == " (0.0% vs previous week)"
    r = {**built[1]}
    r["headline"] = {k: dict(v) for k, v in r["headline"].items() if isinstance(v, dict)}
    r["headline"]["spend_usd"]["change"] = -1.6e-16
    assert "(0.0%)" in summary_markdown(r) and "-0.0%" not in summary_markdown(r)
    paths, r = built
    # the end is exclusive: the header names the last day included
    assert r["period"] == "2026-11-16 to 2026-11-22 UTC"
    page = paths.html.read_text()
    assert "2026-11-16 to 2026-11-22 UTC" in page and "to 2026-11-23" not in page


def _series(start: dt.datetime, hours: int, requests: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "hour": [start + dt.timedelta(hours=h) for h in range(hours)],
            "requests": [requests] * hours,
            "spend": [2.0] * hours,
            "has_gpu": [True] * hours,
        }
    )


def test_forecast_of_a_week_in_progress_compares_rates(tmp_path: Path) -> None:
    """3 days into the week at the same hourly rate as the full week before: the trend
    was 3/7 clipped to 0.8 (a 20% drop that did not happen)."""
    import finops.costs as fc
    from finops.report.figures import _forecast

    per = fc.period(WEEK)
    assert per.start is not None
    prev = _series(per.start - dt.timedelta(days=7), 168, 10)
    cur = _series(per.start, 72, 10)
    fo = _forecast(pl.concat([prev, cur]), per)
    assert fo["trend"] == {"requests": 1.0, "spend": 1.0}
    assert fo["requests"] == pytest.approx(168 * 10)
    assert "first 72 hours" in fo["method"]
    # a real rise within the same span is still seen
    fo = _forecast(pl.concat([prev, _series(per.start, 72, 11)]), per)
    assert fo["trend"]["requests"] == pytest.approx(1.1)


def test_no_traffic_in_the_report_week_gives_no_forecast() -> None:
    """Trend fell back to 1.0 and forecast next week from old weeks only."""
    import finops.costs as fc
    from finops.report.figures import _forecast

    per = fc.period(WEEK)
    assert per.start is not None
    fo = _forecast(_series(per.start - dt.timedelta(days=7), 168, 10), per)
    assert fo["requests"] is None and fo["spend_usd"] is None and fo["hourly"] == []
    assert "no basis for a forecast" in fo["note"]
    fo = _forecast(
        pl.concat([_series(per.start - dt.timedelta(days=7), 168, 10), _series(per.start, 5, 0)]),
        per,
    )
    assert fo["requests"] is None and "no requests in 2026-W47" in fo["note"]
