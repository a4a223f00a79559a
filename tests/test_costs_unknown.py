"""Cost without GPU data is unknown (None / "unknown"), never $0.00, and cost per 1k
requests counts only the requests that have a price."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from test_costs import T0, _gpu_rows, _request_rows, _serving_rows
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from finops.lake import Lake

WEEK = "2026-W47"
NOW = T0 + dt.timedelta(days=30)


def _lake(path: Path, *, gpu_rows: list[dict] | None) -> Path:
    lake = Lake(path, fsync=False)
    if gpu_rows is not None:
        assert lake.append("gpu_samples", gpu_rows, source="test", now=NOW).rejected == 0
        assert lake.append("serving_samples", _serving_rows(), source="test", now=NOW).rejected == 0
    assert lake.append("requests", _request_rows(), source="test", now=NOW).rejected == 0
    return path


def test_no_gpu_data_totals_leakage_and_caches_are_unknown(tmp_path: Path) -> None:
    con = finops.connect(_lake(tmp_path / "lake", gpu_rows=None))
    t = fc.totals(con, week=WEEK)
    assert t["requests"] == 51
    for key in ("usd_per_1k_requests", "cost_per_request", "leakage_cost", "input_cost",
                "usd_per_1m_input_tokens", "usd_per_1m_output_tokens"):  # fmt: skip
        assert t[key] is None, key
    leak = fc.leakage(con, week=WEEK)
    some = leak.filter(pl.col("requests") > 0)
    assert some.height > 3 and some["cost"].null_count() == some.height, leak
    cache = fc.cache_savings(con, week=WEEK)
    worked = cache.filter(pl.col("requests") > 0)
    assert worked.height and worked["usd_saved"].null_count() == worked.height, cache
    assert fc.cap_savings(con, "chat", 10, week=WEEK).usd_saved is None
    h = fc.headline(con, week=WEEK)
    for key in ("gpu_cost", "cost_per_1k_requests", "usage_cost_per_1k_requests",
                "leakage_cost", "cache_saved", "response_cache_potential"):  # fmt: skip
        assert h[key] is None, key


def test_cli_headline_says_unknown_not_zero(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", gpu_rows=None)
    res = CliRunner().invoke(app, ["costs", "--lake", str(lake), "--week", WEEK, "--headline"])
    assert res.exit_code == 0, res.output
    line = res.stdout.splitlines()[0]
    assert "$0.00" not in line, line
    assert "51 requests at unknown/1k" in line and "leakage unknown" in line
    assert "caches saved unknown" in line


def test_cli_bill_line_says_unknown_not_zero(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", gpu_rows=None)
    res = CliRunner().invoke(app, ["costs", "--lake", str(lake), "--week", WEEK])
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert last == f"GPU bill unknown (no GPU samples in {WEEK}); 51 requests", last


def test_per_1k_counts_only_priced_requests(tmp_path: Path) -> None:
    """The large tier's GPUs were not scraped: its requests have cost NULL; the bill of
    the small tier (and the untiered GPU) is divided by the priced requests only."""
    rows = [r for r in _gpu_rows() if r["gpu_uuid"] != "gpu-l0"]
    con = finops.connect(_lake(tmp_path / "lake", gpu_rows=rows))
    n, unpriced = con.execute(
        "SELECT count(*), count(*) FILTER (unpriced_tier_hour) FROM marts.request_costs"
    ).fetchall()[0]
    assert 0 < unpriced < n
    t = fc.totals(con, week=WEEK)
    assert t["unpriced_requests"] == unpriced
    assert t["usd_per_1k_requests"] == pytest.approx(1000 * t["gpu_cost"] / (n - unpriced))
    assert t["cost_per_request"] == pytest.approx(t["gpu_cost"] / (n - unpriced))
    assert any(f"only the {n - unpriced:,} priced requests" in s for s in t["notes"])
    res = CliRunner().invoke(app, ["costs", "--lake", str(tmp_path / "lake"), "--week", WEEK,
                                   "--headline"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"at ${t['usd_per_1k_requests']:,.2f}/1k" in res.stdout
    assert f"only the {n - unpriced:,} priced requests" in res.stderr


def test_report_html_without_gpu_data_never_says_zero_dollars(
    demo_lake: Path, tmp_path: Path
) -> None:
    from finops.report.build import build_report

    lake = tmp_path / "lake"
    shutil.copytree(demo_lake, lake, ignore=shutil.ignore_patterns("gpu_samples"))
    paths = build_report(lake, "2026-W47", tmp_path / "out", growth=False)
    r = json.loads(paths.json.read_text())
    assert r["cache"]["saved_usd"] is None and r["leakage"]["leak_usd"] is None
    page = paths.html.read_text()
    text = html.unescape(re.sub("<[^>]+>", " ", re.sub(r"<svg.*?</svg>", "", page, flags=re.S)))
    assert "$0.00" not in text
    assert "Cache savings are unknown" in text


def _partly_priced_lake(path: Path) -> Path:
    """The large tier's GPU unscraped; a cache hit and a vLLM 400 on that tier as well."""
    rows = _request_rows()
    extra = [
        {"request_id": "hit-large", "cache_status": "hit", "input_tokens": 0,
         "output_tokens": 0, "status_code": 200},
        {"request_id": "400-large", "cache_status": "miss", "input_tokens": 9000,
         "output_tokens": 0, "status_code": 400, "error_type": "BadRequestError"},
    ]  # fmt: skip
    for e in extra:
        rows.append({"ts": T0 + dt.timedelta(minutes=7), "tenant": "acme", "feature": "chat",
                     "tier": "large", "response_model": "model-large", **e})  # fmt: skip
    lake = Lake(path, fsync=False)
    gpu = [r for r in _gpu_rows() if r["gpu_uuid"] != "gpu-l0"]
    assert lake.append("gpu_samples", gpu, source="test", now=NOW).rejected == 0
    assert lake.append("serving_samples", _serving_rows(), source="test", now=NOW).rejected == 0
    assert lake.append("requests", rows, source="test", now=NOW).rejected == 0
    return path


def test_by_group_per_request_divides_by_its_priced_requests_only(tmp_path: Path) -> None:
    """A tenant with requests on a priced and an unpriced tier: its known cost over all of
    its requests read ~2x too cheap. Cache hits and refusals on the unpriced tier are no
    priced requests either, so the headline matches the one priced tier's cost per 1k."""
    lake = _partly_priced_lake(tmp_path / "lake")
    con = finops.connect(lake)
    tiers = dict(
        con.execute("SELECT request_id, tier FROM clean.requests").fetchall()
    )  # independent of the marts' flags: the raw tier of each request
    by_tier = fc.by(con, "tier", week=WEEK)
    small = by_tier.filter(pl.col("tier") == "small").row(0, named=True)
    large = by_tier.filter(pl.col("tier") == "large").row(0, named=True)
    assert large["cost"] is None and large["usd_per_1k_requests"] is None
    n_small = sum(1 for t in tiers.values() if t == "small")
    assert small["usd_per_1k_requests"] == pytest.approx(1000 * small["cost"] / n_small)
    for row in fc.by(con, "tenant", week=WEEK).iter_rows(named=True):
        ids = con.execute(
            "SELECT request_id FROM clean.requests WHERE tenant = ?", [row["tenant"]]
        ).fetchall()
        priced = sum(1 for (i,) in ids if tiers[i] == "small")
        assert 0 < priced < len(ids)
        assert row["cost_per_request"] == pytest.approx(row["cost"] / priced), row
    t = fc.totals(con, week=WEEK)
    # the bill includes the untiered GPU's idle hours, which no tier carries
    assert t["usd_per_1k_requests"] == pytest.approx(1000 * t["gpu_cost"] / n_small)
    assert t["unpriced_requests"] == len(tiers) - n_small


def test_a_4xx_refusal_is_no_model_work(tmp_path: Path) -> None:
    """vLLM answers a prompt over max_model_len with a plain 400 before scheduling it: its
    logged input size is not processed tokens, and it carries no cost; a 499 (the client
    left mid-way) and a 5xx did run."""
    lake = Lake(tmp_path / "lake", fsync=False)
    assert lake.append("gpu_samples", _gpu_rows(), source="test", now=NOW).rejected == 0
    assert lake.append("serving_samples", _serving_rows(), source="test", now=NOW).rejected == 0
    base = _request_rows()
    extra = [
        ("v400", 400, "BadRequestError"), ("v429", 429, "rate_limit_exceeded"),
        ("v499", 499, "client_closed"), ("v503", 503, "upstream_error"),
    ]  # fmt: skip
    for rid, status, err in extra:
        base.append({"request_id": rid, "ts": T0 + dt.timedelta(minutes=9), "tenant": "acme",
                     "feature": "chat", "tier": "small", "input_tokens": 50_000,
                     "output_tokens": 7, "status_code": status, "error_type": err,
                     "cache_status": "miss"})  # fmt: skip
    assert lake.append("requests", base, source="test", now=NOW).rejected == 0
    con = finops.connect(tmp_path / "lake")
    got = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT request_id, processed, cost_allocation FROM marts.request_costs "
            "WHERE request_id LIKE 'v%'"
        ).fetchall()
    }
    assert got["v400"] == (False, 0.0) and got["v429"] == (False, 0.0)
    assert got["v499"][0] and got["v499"][1] > 0
    assert got["v503"][0] and got["v503"][1] > 0
    hourly = con.execute(
        "SELECT sum(input_tokens) FROM marts.requests_hourly WHERE tier = 'small'"
    ).fetchone()[0]
    processed = sum(
        r.get("input_tokens") or 0
        for r in base
        if r.get("tier") == "small"
        and r.get("cache_status") not in ("hit", "coalesced")
        and r["request_id"] not in ("v400", "v429")
    )
    assert hourly == processed


def test_a_missing_pricing_kind_is_named_not_the_model(tmp_path: Path) -> None:
    """Spot pricing on an on-demand-only catalog said "'NVIDIA L4' has no price in the
    catalog" although the file lists the L4: the kind is what is missing."""
    lake = _lake(tmp_path / "lake", gpu_rows=_gpu_rows())
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu_model,pricing_kind,usd_per_gpu_hour\nNVIDIA L4,on_demand,0.75\n")
    con = finops.connect(lake, prices=prices)
    fc.configure(con, pricing_kind="spot")
    notes = " ".join(fc.totals(con, week=WEEK)["notes"])
    assert "have no price for pricing kind 'spot' in the catalog" in notes, notes
    fc.configure(con, pricing_kind="on_demand")  # the H100 is not listed at all
    notes = " ".join(fc.totals(con, week=WEEK)["notes"])
    assert "of 'NVIDIA H100 80GB HBM3' have no price in the catalog" in notes, notes


def test_a_tier_spelled_two_ways_is_named(tmp_path: Path) -> None:
    """A deployments rule with tier = "Large" for requests logged as "large": the GPU
    cost read as idle and the requests as unknown, with the warning blaming missing GPU
    data; the note names both spellings."""
    con = finops.connect(_lake(tmp_path / "lake", gpu_rows=_gpu_rows()))
    rules = tmp_path / "deploy.toml"
    rules.write_text(
        '[[deployment]]\nname = "big"\ntier = "Large"\nmatch = { pod = "vllm-large-*" }\n'
    )
    fc.load_deployments(con, rules)
    notes = " ".join(fc.totals(con, week=WEEK)["notes"])
    assert "requests ran on tier(s) 'large' that no GPU carries" in notes, notes
    assert "GPU tier 'Large' vs requests' 'large'" in notes
    fine = finops.connect(tmp_path / "lake")
    assert "no GPU carries" not in " ".join(fc.totals(fine, week=WEEK)["notes"])
