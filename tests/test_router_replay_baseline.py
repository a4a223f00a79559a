"""The lake replay compares a router with the routing the log shows, not only with all-large.

Against an all-large fleet nobody runs every router "saves": the replay used to say a
router that sent 98.6% of the demo week to the large tier "would have saved $9.07" when
the logged routing (25% large) cost half as much. The replay now prices each request's
logged tier at the same $/token as the router's pick, says that difference first, and
never says "saved" for a router that would cost more than the log shows.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake
from finops.router import artifact as A
from finops.router import data as D
from finops.router import evaluate as E
from finops.router.artifact import MANIFEST_FILE, load_router, manifest_digest
from finops.router.train import train

TIERS = ["small", "mid", "large"]
FEATURES = ["chat", "code", "summarize", "legal"]
T0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
N = 400
NO_TIER = 7  # requests the log has no tier for (neither served nor routed)
OTHER = 3  # requests logged on a tier the router does not have


def _labeled(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        f = str(rng.choice(FEATURES))
        tok = float(np.exp(rng.normal(6.5, 1.2)))
        z = 0.9 * (np.log(tok) - 6.5) + (1.0 if f == "legal" else 0) + rng.normal(0, 0.7)
        rows.append(
            {
                "prompt_tokens": round(tok),
                "feature": f,
                "tenant": "a",
                "turn_count": 1,
                "has_tools": False,
                "label": TIERS[0 if z < 0.2 else 1 if z < 1.2 else 2],
            }
        )
    return rows


def _with_thresholds(src: Path, dst: Path, thresholds: dict[str, float | None]) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST_FILE).read_text())
    m["decision"]["thresholds"] = thresholds
    m["version"] = A.artifact_version(m)  # the version names the thresholds
    m["manifest_sha256"] = manifest_digest(m)
    (dst / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    return dst


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("replay-baseline")
    labeled = tmp / "meta.jsonl"
    labeled.write_text("".join(json.dumps(r) + "\n" for r in _labeled(800, 1)))
    res = train(D.load_labeled(labeled), tmp / "base", cv_folds=0, quality_target=0.9)
    assert res.router is not None and not res.router.uses_prompt_text
    return {
        # None = never that tier: everything goes to large
        "all_large": _with_thresholds(
            tmp / "base", tmp / "all-large", {"small": None, "mid": None}
        ),
        # P(needed <= small) >= 0 always holds: everything goes to small
        "all_small": _with_thresholds(tmp / "base", tmp / "all-small", {"small": 0.0, "mid": 0.0}),
    }


@pytest.fixture(scope="module")
def mostly_small_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A routed week where the log shows 80% small, 10% mid, 10% large."""
    rng = np.random.default_rng(5)
    tiers = rng.choice(TIERS, N, p=[0.8, 0.1, 0.1]).tolist()
    tiers[:NO_TIER] = [None] * NO_TIER
    tiers[NO_TIER : NO_TIER + OTHER] = ["xl"] * OTHER
    records = []
    for j, tier in enumerate(tiers):
        tok = int(np.exp(rng.normal(6.5, 1.0)))
        records.append(
            {
                "request_id": f"q{j}",
                "ts": T0 + dt.timedelta(seconds=30 * j),
                "source": "shim",
                "tenant": "a",
                "feature": str(rng.choice(FEATURES)),
                "operation": "chat",
                "request_model": "auto",
                "tier": tier,
                "routed_tier": tier,
                "input_tokens": tok + 40,
                "prompt_tokens_est": float(tok),
                "output_tokens": int(rng.integers(50, 400)),
                "status_code": 200,
                "latency_ms": 100.0,
                "cache_status": "miss",
                "turn_count": 1,
                "has_tools": False,
                "router_version": "logger-v1" if tier else None,
                "route_propensity": 1.0 if tier else None,
            }
        )
    path = tmp_path_factory.mktemp("lake") / "lake"
    Lake(path).append("requests", records, source="test")
    return path


def _expected_logged_cost(rep: dict, lake: Path) -> float:
    """Each compared request at its logged tier, priced as the replay prices tiers."""
    import finops

    df = (
        finops.connect(lake)
        .sql("SELECT tier, input_tokens, output_tokens FROM clean.requests")
        .pl()
    )
    pin, pout = rep["prices"]["usd_per_input_token"], rep["prices"]["usd_per_output_token"]
    return sum(
        r["input_tokens"] * pin[r["tier"]] + r["output_tokens"] * pout[r["tier"]]
        for r in df.iter_rows(named=True)
        if r["tier"] in TIERS
    )


def test_a_router_dearer_than_the_logged_routing_is_never_said_to_save(
    arts, mostly_small_lake: Path
) -> None:
    rep = E.replay_lake(load_router(arts["all_large"]), mostly_small_lake, days=30)
    assert rep["requests"] == N
    assert rep["shares"]["large"] == 1.0
    assert "saved" not in rep["line"], rep["line"]  # was: "would have saved $0.00 (0.0%)"
    # vs all-large it is no cheaper (it is all-large), vs the log it costs far more
    assert rep["saved_usd"] == pytest.approx(0.0, abs=1e-12)
    assert rep["logged_requests"] == N - NO_TIER - OTHER
    assert rep["no_logged_tier"] == NO_TIER and rep["other_tier"] == {"xl": OTHER}
    assert rep["logged_cost_usd"] == pytest.approx(_expected_logged_cost(rep, mostly_small_lake))
    assert rep["vs_logged_usd"] == pytest.approx(
        rep["logged_cost_usd"] - rep["routed_cost_on_logged_usd"]
    )
    assert rep["vs_logged_usd"] < 0 and rep["costs_more_than_logged"] is True
    assert rep["vs_logged_pct"] == pytest.approx(rep["vs_logged_usd"] / rep["logged_cost_usd"])
    assert rep["logged_shares"]["small"] > 0.7 and rep["shares_on_logged"]["large"] == 1.0
    line = rep["line"]
    assert "saved" not in line
    extra = E.usd(-rep["vs_logged_usd"])
    assert line.startswith(
        f"warning: this router would cost {extra} (+{-rep['vs_logged_pct']:.1%}) more than "
        "the routing the log shows"
    ), line
    # the logged routing first, all-large second
    assert line.index("the routing the log shows") < line.index("all on large")
    assert f"leaving out {NO_TIER} with no logged tier and {OTHER} logged on tier(s) ['xl']" in line
    assert rep["quality_note"] in line


def test_a_router_cheaper_than_the_logged_routing_says_what_it_saves(
    arts, mostly_small_lake: Path
) -> None:
    rep = E.replay_lake(load_router(arts["all_small"]), mostly_small_lake, days=30)
    assert rep["shares"]["small"] == 1.0
    assert rep["costs_more_than_logged"] is False and rep["vs_logged_usd"] > 0
    assert rep["logged_cost_usd"] == pytest.approx(_expected_logged_cost(rep, mostly_small_lake))
    assert rep["saved_usd"] > rep["vs_logged_usd"] > 0  # all-large is the dearer baseline
    line = rep["line"]
    assert line.startswith(
        f"this router would have saved {E.usd(rep['vs_logged_usd'])} "
        f"({rep['vs_logged_pct']:.1%}) vs the routing the log shows"
    ), line
    assert f"less than all on large on all {N} requests" in line


def test_cli_evaluate_reports_the_logged_baseline(arts, mostly_small_lake: Path) -> None:
    args = ["router", "evaluate", "--artifact", str(arts["all_large"])]
    args += ["--lake", str(mostly_small_lake)]
    r = CliRunner().invoke(app, [*args, "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)["replay"]
    assert rep["costs_more_than_logged"] is True
    assert rep["vs_logged_usd"] < 0 and rep["logged_cost_usd"] > 0
    assert rep["no_logged_tier"] == NO_TIER
    t = CliRunner().invoke(app, args)
    assert t.exit_code == 0, t.output
    assert "warning: this router would cost $" in t.output
    assert "would have saved" not in t.output
    logged = E.usd(rep["logged_cost_usd"])
    assert f"with a logged tier: the routing the log shows {logged} (small " in t.output
    assert f"replayed: all on large {E.usd(rep['all_large_cost_usd'])} (small 0%" in t.output
    assert f"{NO_TIER + OTHER} requests left out of the logged comparison" in t.output


def _vs(logged: float, mine: float, n: int = 10, **kw) -> dict:
    return {
        "logged_requests": n,
        "no_logged_tier": kw.get("no_tier", 0),
        "other_tier": kw.get("other", {}),
        "logged_cost_usd": logged,
        "routed_cost_on_logged_usd": mine,
        "vs_logged_usd": logged - mine,
        "vs_logged_pct": (logged - mine) / logged if logged else None,
        "costs_more_than_logged": mine > logged,
    }


def test_sentence_for_the_demo_week_figures() -> None:
    """The reviewer's demo-week figures: dearer than the log, a hair under all-large."""
    note = "the router's own estimate: these requests have no quality labels"
    s = E.replay_sentence(
        _vs(6249.60, 12357.11, n=395688), 9.07, 9.07 / 12366.18, 0.999, note, requests=395688
    )
    assert s == (
        "warning: this router would cost $6,107.51 (+97.7%) more than the routing the log "
        "shows ($12,357.11 vs $6,249.60 logged, on 395,688 requests); it would cost $9.07 "
        "(0.1%) less than all on large, at 99.9% quality (the router's own estimate: these "
        "requests have no quality labels)"
    )


def test_sentence_when_the_log_has_no_tiers_or_ties() -> None:
    cost = np.ones((12, 3))
    none = E.logged_comparison(cost, np.zeros(12, dtype=np.int64), [None] * 12, TIERS)
    assert none["no_logged_tier"] == 12 and none["logged_cost_usd"] is None
    assert none["costs_more_than_logged"] is False
    s = E.replay_sentence(none, 5.0, 0.5, 0.97, "q", requests=12)
    assert s.startswith(
        "this router's cost vs the routing the log shows is unknown: none of its 12"
    )
    assert "saved" not in s
    tie = E.replay_sentence(_vs(3.0, 3.0), 1.0, 0.25, 0.97, "q")
    assert tie.startswith("this router would cost the same as the routing the log shows")
    # dearer than all-large too (a strongest tier that is not the priciest)
    s = E.replay_sentence(_vs(3.0, 5.0), -1.0, -0.25, None, "q")
    assert "$1.00 (25.0%) more than all on large" in s and "saved" not in s
