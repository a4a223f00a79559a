"""Off-policy token outcomes count the work the cost outcome counts.

A context-cap 400 logs the shim's estimate of a prompt no GPU ever read, and a cache hit
logs 0 input tokens; the cost marts (`marts.request_work`) count both as no work. The
`input_tokens` / `output_tokens` outcomes read the same work columns, so a candidate is
not charged 50,000 tokens for a request that was refused.
"""

from __future__ import annotations

import datetime as dt
import warnings

import polars as pl
import pytest

from finops.lake import Lake
from finops.router import off_policy_estimate
from finops.shim.testing import train_demo_router

TIERS = ["small", "mid", "large"]


def test_refusals_and_cache_hits_are_no_token_work(tmp_path) -> None:
    art = train_demo_router(tmp_path / "r", n=400)
    t0 = dt.datetime(2026, 11, 16, 9, tzinfo=dt.UTC)
    records = []
    for i in range(300):
        kind = i % 3  # 0: refused by a context cap, 1: cache hit, 2: processed
        tier = TIERS[(i // 3) % 3]
        records.append(
            {
                "request_id": f"q{i}",
                "ts": t0 + dt.timedelta(seconds=i),
                "source": "shim",
                "tenant": "t",
                "feature": "chat",
                "operation": "chat",
                "request_model": "auto",
                "tier": tier,
                "input_tokens": [50_000, 0, 100][kind],
                "cached_input_tokens": [None, None, 40][kind],
                "output_tokens": [None, 20, 20][kind],
                "status_code": [400, 200, 200][kind],
                "error_type": ["context_length_exceeded", None, None][kind],
                "cache_status": ["miss", "hit", "miss"][kind],
                "latency_ms": 10.0,
                "prompt_text": "Translate to French: hello",
                "prompt_tokens_est": 6.0,
                "router_version": "logger-v1",
                "router_score": 0.5,
                "route_propensity": 1 / 3,  # uniform exploration: every tier supported
                "routed_tier": tier,
            }
        )
    lake = tmp_path / "lake"
    Lake(lake).append("requests", records, source="test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = off_policy_estimate(art, lake)
    est = res["estimates"]
    # processed requests: 100 input tokens, 40 of them prefix-cached (no prefill work)
    assert est["input_tokens"]["logged_mean"] == pytest.approx(60 / 3)
    assert est["output_tokens"]["logged_mean"] == pytest.approx(20 / 3)
    assert est["input_tokens"]["snips"] == pytest.approx(60 / 3)
    assert "processed" in est["input_tokens"]["what"]


def test_a_frame_without_the_work_columns_keeps_the_logged_counts(tmp_path) -> None:
    from finops.router.offpolicy import _work

    df = pl.DataFrame({"input_tokens": [50_000, None, 100]})
    y, ok = _work(df, "input_tokens", "work_in")
    assert y.tolist() == [50_000, 0, 100] and ok.tolist() == [True, False, True]
    # a processed request whose count was not logged stays unobserved, not 0 tokens
    df = df.with_columns(work_in=pl.Series([0, 0, 60]), worked=pl.Series([False, True, True]))
    y, ok = _work(df, "input_tokens", "work_in")
    assert y.tolist() == [0, 0, 60] and ok.tolist() == [True, False, True]
