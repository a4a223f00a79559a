"""Evaluation judges the served policy; off-policy estimates of a candidate router from logs.

Logs are simulated from a known logging policy with exploration (every request has a
true outcome for every tier; only the logged tier's is written, through the Lake API),
so the candidate's true mean is known and the IPS/SNIPS estimates can be checked.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake
from finops.router import OffPolicyError, OffPolicyWarning, ips_estimate, off_policy_estimate
from finops.router import artifact as A
from finops.router import data as D
from finops.router import evaluate as E
from finops.router.artifact import MANIFEST_FILE, load_router, manifest_digest
from finops.router.train import train

TIERS = ["small", "mid", "large"]
FEATURES = ["chat", "code", "summarize", "legal"]
T0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)


def with_thresholds(src: Path, dst: Path, thresholds: dict[str, float | None]) -> Path:
    """A copy of an artifact whose manifest has other per-tier thresholds (re-digested)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST_FILE).read_text())
    m["decision"]["thresholds"] = thresholds
    if hasattr(A, "artifact_version"):  # the version names the thresholds where it does
        m["version"] = A.artifact_version(m)
    m["manifest_sha256"] = manifest_digest(m)
    (dst / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    return dst


def meta_rows(n: int, seed: int) -> list[dict]:
    """Capture-off rows: the needed tier grows with prompt size, tools and feature."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        f = str(rng.choice(FEATURES))
        tok = float(np.exp(rng.normal(6.5, 1.2)))
        tools = bool(rng.random() < 0.2)
        z = 0.9 * (np.log(tok) - 6.5) + (1.2 if tools else 0) + (1.0 if f == "legal" else 0)
        z += 0.6 * (f == "code") + rng.normal(0, 0.7)
        t = 0 if z < 0.2 else 1 if z < 1.2 else 2
        rows.append(
            {
                "prompt_tokens": round(tok),
                "feature": f,
                "tenant": str(rng.choice(["a", "b"])),
                "turn_count": int(rng.integers(1, 4)),
                "has_tools": tools,
                "label": TIERS[t],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("offpolicy")
    ds = D.load_labeled(write_jsonl(tmp / "meta.jsonl", meta_rows(1500, 3)))
    res = train(ds, tmp / "logger", cv_folds=0, quality_target=0.9, confidence=0.9)
    assert res.router is not None and not res.router.uses_prompt_text
    cand = with_thresholds(tmp / "logger", tmp / "cand", {"small": 0.35, "mid": 0.6})
    return {"logger": tmp / "logger", "cand": cand}


def simulate(logger, n: int, eps: float, seed: int, *, propensity: bool = True):
    """Logged requests of `logger` with exploration `eps`, and every tier's true outcomes."""
    rng = np.random.default_rng(seed)
    k = len(TIERS)
    tok = np.round(np.exp(rng.normal(6.5, 1.2, n))).astype(int)
    frame = pl.DataFrame(
        {
            "prompt_text": [None] * n,
            "feature": rng.choice(FEATURES, n).tolist(),
            "tenant": rng.choice(["a", "b"], n).tolist(),
            # vLLM's count includes the chat template; the router's feature is the shim's own
            # serving-time estimate, logged as prompt_tokens_est
            "input_tokens": (tok + 40).tolist(),
            "prompt_tokens_est": tok.astype(float).tolist(),
            "output_tokens": [0] * n,
            "turn_count": rng.integers(1, 4, n).tolist(),
            "has_tools": (rng.random(n) < 0.2).tolist(),
        },
        schema_overrides={"prompt_text": pl.String},
    )
    greedy = E.served_indices(logger, E.replay_feature_rows(logger, frame))
    explore = rng.random(n) < eps
    a = np.where(explore, rng.integers(0, k, n), greedy)
    p = np.where(a == greedy, 1 - eps + eps / k, eps / k)
    # true outcomes of each tier: bigger tiers talk more, fail less on long prompts, are slower
    out = rng.poisson(np.array([120, 180, 260])[None, :] * (1 + tok[:, None] / 2000))
    err = rng.random((n, k)) < np.array([0.12, 0.06, 0.02])[None, :] * (1 + (tok[:, None] > 1500))
    lat = rng.gamma(4.0, np.array([60.0, 150.0, 400.0])[None, :] / 4.0 * (1 + tok[:, None] / 4000))
    i = np.arange(n)
    records = []
    for j, r in enumerate(frame.iter_rows(named=True)):
        records.append(
            {
                "request_id": f"r{seed}-{j}",
                "ts": T0 + dt.timedelta(seconds=10 * j),
                "source": "shim",
                "tenant": r["tenant"],
                "feature": r["feature"],
                "operation": "chat",
                "request_model": "auto",
                "tier": TIERS[a[j]],
                "input_tokens": int(tok[j]) + 40,
                "prompt_tokens_est": float(tok[j]),
                "output_tokens": int(out[j, a[j]]),
                "status_code": 502 if err[j, a[j]] else 200,
                "latency_ms": float(lat[j, a[j]]),
                "cache_status": "miss",
                "turn_count": r["turn_count"],
                "has_tools": r["has_tools"],
                "router_version": logger.version,
                "router_score": 0.5,
                "route_propensity": float(p[j]) if propensity else None,
                "routed_tier": TIERS[a[j]],
            }
        )
    truth = {"tok": tok, "out": out, "err": err, "lat": lat, "frame": frame, "i": i}
    return records, truth


def true_means(cand, truth, lake) -> dict[str, float]:
    c = E.served_indices(cand, E.replay_feature_rows(cand, truth["frame"]))
    price = E.tier_token_prices(TIERS, lake=lake)
    pin = np.array([price["usd_per_input_token"][t] for t in TIERS])
    pout = np.array([price["usd_per_output_token"][t] for t in TIERS])
    i = truth["i"]
    out = truth["out"][i, c]
    return {
        "cost_usd": float(((truth["tok"] + 40) * pin[c] + out * pout[c]).mean()),
        "output_tokens": float(out.mean()),
        "error_rate": float(truth["err"][i, c].mean()),
        "latency_ms": float(truth["lat"][i, c].mean()),
        "input_tokens": float(truth["tok"].mean() + 40),
    }


@pytest.fixture(scope="module")
def explored_lake(routers, tmp_path_factory: pytest.TempPathFactory):
    logger = load_router(routers["logger"])
    records, truth = simulate(logger, 6000, 0.3, seed=11)
    explicit = [  # explicit-tier traffic: no routing decision, never counted
        {**records[0], "request_id": f"x{j}", "router_version": None, "router_score": None}
        | {"route_propensity": None, "routed_tier": None, "tier": "large"}
        for j in range(50)
    ]
    path = tmp_path_factory.mktemp("lake") / "lake"
    Lake(path).append("requests", records + explicit, source="test")
    return path, truth


def test_ips_by_hand_on_a_tiny_log() -> None:
    logged = ["small", "mid", "small", "large"]
    p = [0.8, 0.1, 0.1, 0.8]
    cand = ["small", "mid", "mid", "large"]
    y = [1.0, 2.0, 3.0, 4.0]
    r = ips_estimate(logged, p, cand, y)
    # weights 1/0.8, 1/0.1, 0 (no match), 1/0.8 = 1.25, 10, 0, 1.25
    assert r["matches"] == 3
    assert r["ips"] == pytest.approx((1.25 * 1 + 10 * 2 + 1.25 * 4) / 4)  # 6.5625
    assert r["snips"] == pytest.approx(26.25 / 12.5)  # 2.1
    assert r["ess"] == pytest.approx(12.5**2 / (1.25**2 + 100 + 1.25**2))
    assert r["logged_mean"] == pytest.approx(2.5)
    lo, hi = r["snips_ci"]
    assert lo < 2.1 < hi
    # a candidate that explores too: pi = 0.7 * match + 0.3 / 3 -> weights 1, 8, 1, 1
    s = ips_estimate(logged, p, cand, y, n_tiers=3, exploration_rate=0.3)
    assert s["ips"] == pytest.approx((1 + 16 + 3 + 4) / 4)
    assert s["snips"] == pytest.approx(24 / 11)


def test_intervals_stay_within_what_the_estimate_can_be() -> None:
    """A rare error (one 1 among zeros) had a SNIPS interval below 0 ([-0.004, 0.018] in
    the README walk-through): a weighted mean of 0/1 outcomes lies in [0, 1]."""
    n = 40
    logged = ["small"] * n
    p = [0.5] * n
    y = [0.0] * (n - 1) + [1.0]
    r = ips_estimate(logged, p, logged, y)
    lo, hi = r["snips_ci"]
    assert lo == 0.0 and 0 < r["snips"] < hi <= 1.0
    assert r["ips_ci"][0] == 0.0  # outcomes >= 0: IPS is >= 0 too
    signed = ips_estimate(logged, p, logged, [-1.0] + [0.0] * (n - 1))
    assert signed["ips_ci"][0] < 0  # outcomes that can be negative are not clipped at 0


def test_estimates_recover_the_candidates_true_mean(routers, explored_lake) -> None:
    lake, truth = explored_lake
    cand = load_router(routers["cand"])
    res = off_policy_estimate(cand, lake)
    assert res["requests"] == 6050 and res["used_requests"] == 6000
    assert 0.3 < res["match_share"] < 0.9  # the candidate really is another policy
    assert res["warnings"] == []
    assert res["ess"] > 500
    assert "tokens x per-tier $/token" in res["cost_basis"]  # no GPU data in this lake
    want = true_means(cand, truth, lake)
    for name, true in want.items():
        est = res["estimates"][name]
        for kind in ("ips", "snips"):
            lo, hi = est[f"{kind}_ci"]
            assert lo <= true <= hi, (name, kind, est[kind], true, (lo, hi))
            assert abs(est[kind] - true) / true < 0.1, (name, kind, est[kind], true)
    # and the logged mean is *not* the candidate's value: the estimate moved to the truth
    cost = res["estimates"]["cost_usd"]
    assert abs(cost["snips"] - want["cost_usd"]) < abs(cost["logged_mean"] - want["cost_usd"])


def test_logging_policy_on_its_own_logs(routers, explored_lake) -> None:
    lake, truth = explored_lake
    logger = load_router(routers["logger"])
    # with its own exploration rate every weight is 1: exactly the observed mean
    same = off_policy_estimate(logger, lake, exploration_rate=0.3)
    for est in same["estimates"].values():
        assert est["ips"] == pytest.approx(est["logged_mean"])
        assert est["snips"] == pytest.approx(est["logged_mean"])
    assert same["ess"] == pytest.approx(6000)
    # its greedy part alone: the truth of the deterministic logging router
    greedy = off_policy_estimate(logger, lake)
    want = true_means(logger, truth, lake)
    for name in ("cost_usd", "error_rate", "latency_ms"):
        lo, hi = greedy["estimates"][name]["snips_ci"]
        assert lo <= want[name] <= hi, name


def test_refuses_logs_without_routing_or_propensities(routers, tmp_path: Path) -> None:
    logger = load_router(routers["logger"])
    records, _ = simulate(logger, 200, 0.3, seed=5)
    explicit = [
        {**r, "router_version": None, "route_propensity": None, "routed_tier": None}
        for r in records
    ]
    Lake(tmp_path / "explicit").append("requests", explicit, source="test")
    with pytest.raises(OffPolicyError, match="router_version is null"):
        off_policy_estimate(logger, tmp_path / "explicit")
    old, _ = simulate(logger, 200, 0.3, seed=6, propensity=False)
    Lake(tmp_path / "old").append("requests", old, source="test")
    with pytest.raises(
        OffPolicyError, match=r"'route_propensity' expected a probability in \(0, 1\]"
    ):
        off_policy_estimate(logger, tmp_path / "old")
    with pytest.raises(OffPolicyError, match="no logged requests in this period"):
        off_policy_estimate(logger, tmp_path / "old", since="2030-01-01")
    r = CliRunner().invoke(
        app, ["router", "offpolicy", str(routers["logger"]), "--lake", str(tmp_path / "old")]
    )
    assert r.exit_code == 2 and "route_propensity" in r.output


def test_warns_on_few_matches_and_unexplored_logs(routers, tmp_path: Path) -> None:
    logger = load_router(routers["logger"])
    cand = load_router(routers["cand"])
    few, _ = simulate(logger, 40, 0.3, seed=7)
    Lake(tmp_path / "few").append("requests", few, source="test")
    with pytest.warns(OffPolicyWarning) as caught:
        res = off_policy_estimate(cand, tmp_path / "few")
    assert any("too few for a meaningful estimate" in str(w.message) for w in caught)
    assert any("effective sample size" in w for w in res["warnings"])
    greedy_only, _ = simulate(logger, 400, 0.0, seed=8)
    Lake(tmp_path / "greedy").append("requests", greedy_only, source="test")
    with pytest.warns(OffPolicyWarning, match="without exploration"):
        res = off_policy_estimate(cand, tmp_path / "greedy")
    assert res["unsupported"] == 400 - res["matches"] > 0
    # the logging router itself on exploration-free logs: all match, weights 1, no warning
    same = off_policy_estimate(logger, tmp_path / "greedy")
    assert same["matches"] == 400 and same["warnings"] == []
    c = same["estimates"]["cost_usd"]
    assert c["snips"] == pytest.approx(c["logged_mean"]) == pytest.approx(c["ips"])


def test_offpolicy_cli_json_and_table(routers, explored_lake) -> None:
    lake, _ = explored_lake
    args = ["router", "offpolicy", str(routers["cand"]), "--lake", str(lake)]
    r = CliRunner().invoke(app, [*args, "--format", "json", "--from", "2026-11-16"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["used_requests"] == 6000 and set(res["estimates"]) == {
        "cost_usd",
        "input_tokens",
        "output_tokens",
        "error_rate",
        "latency_ms",
    }
    assert res["decision"] == "thresholds small=0.35, mid=0.6"
    t = CliRunner().invoke(app, args)
    assert t.exit_code == 0, t.output
    assert "SNIPS" in t.output and "ESS" in t.output and "cost_usd" in t.output


def test_frame_input_uses_its_cost_column(routers, explored_lake) -> None:
    import finops

    lake, _ = explored_lake
    cand = load_router(routers["cand"])
    df = finops.connect(lake).sql("SELECT * FROM clean.requests").pl()
    df = df.with_columns(cost_usd=pl.lit(0.01))
    res = off_policy_estimate(cand, df)
    assert res["cost_basis"] == "the frame's cost_usd column"
    assert res["estimates"]["cost_usd"]["snips"] == pytest.approx(0.01)
    with pytest.raises(OffPolicyError, match="missing column"):
        off_policy_estimate(cand, df.drop("route_propensity"))


# ------------------------------------------------------------ evaluate judges the served policy


def text_rows(n: int, seed: int, *, half_scores: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    verbs = {0: ["reformat", "translate"], 1: ["summarize", "draft"], 2: ["prove", "audit"]}
    fill = ["the", "invoice", "order", "customer", "ticket", "code", "data", "report", "please"]
    rows = []
    for _ in range(n):
        t = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        words = [str(rng.choice(verbs[t])), *rng.choice(fill, int(rng.integers(3, 30)))]
        row: dict = {"prompt": " ".join(words), "feature": "f"}
        if half_scores:  # judge scores on a 0..0.5 scale: good enough means >= 0.35
            row["scores"] = {name: 0.5 if j >= t else 0.1 for j, name in enumerate(TIERS)}
        else:
            row["label"] = TIERS[t]
        rows.append(row)
    return rows


def test_evaluate_uses_the_artifacts_quality_bar(tmp_path: Path) -> None:
    ds = D.load_labeled(
        write_jsonl(tmp_path / "tr.jsonl", text_rows(900, 1, half_scores=True)), quality_bar=0.35
    )
    res = train(ds, tmp_path / "art", cv_folds=0, quality_target=0.9, confidence=0.9)
    assert res.router is not None
    assert res.router.manifest["training_data"]["quality_bar"] == 0.35
    hold = write_jsonl(tmp_path / "hold.jsonl", text_rows(400, 2, half_scores=True))
    base = ["router", "evaluate", "--artifact", str(tmp_path / "art"), "--data", str(hold)]
    r = CliRunner().invoke(app, [*base, "--format", "json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)["evaluation"]
    assert ev["quality_bar"] == {"value": 0.35, "source": "the artifact's training data"}
    assert ev["accuracy"] > 0.8  # at the default bar 0.7 every label would be 'large'
    r7 = CliRunner().invoke(app, [*base, "--format", "json", "--quality-bar", "0.7"])
    ev7 = json.loads(r7.output)["evaluation"]
    assert ev7["quality_bar"] == {"value": 0.7, "source": "--quality-bar"}
    assert ev7["accuracy"] < 0.5
    t = CliRunner().invoke(app, base)
    assert "quality bar 0.35 (from the artifact's training data)" in t.output


def test_evaluate_shares_match_route_with_per_tier_thresholds(tmp_path: Path) -> None:
    fit = text_rows(900, 1)
    ds = D.load_labeled(write_jsonl(tmp_path / "tr.jsonl", fit))
    res = train(ds, tmp_path / "art", cv_folds=0, quality_target=0.9, confidence=0.9)
    assert res.router is not None
    art = with_thresholds(tmp_path / "art", tmp_path / "uneq", {"small": 0.3, "mid": 0.99})
    router = load_router(art)
    # new prompts only: evaluate leaves out a row whose prompt it trained on
    seen = {r["prompt"] for r in fit}
    rows = [r for r in text_rows(600, 4) if r["prompt"] not in seen]
    hold = write_jsonl(tmp_path / "hold.jsonl", rows)
    served = [
        router.route({"messages": [{"role": "user", "content": r["prompt"]}]}, feature="f").tier
        for r in rows
    ]
    want = {t: served.count(t) / len(rows) for t in TIERS}
    r = CliRunner().invoke(
        app, ["router", "evaluate", "--artifact", str(art), "--data", str(hold), "--format", "json"]
    )
    assert r.exit_code == 0, r.output
    at = json.loads(r.output)["evaluation"]["at_threshold"]
    assert at["shares"] == pytest.approx(want)
    assert at["thresholds"] == {"small": 0.3, "mid": 0.99} and at["lambda"] is None
    # one lambda (small's) for every tier, as evaluate used to judge, is another policy here
    from finops.router.artifact import _probe_frame

    X = D.load_labeled(hold).features(True).to_dicts()
    cum = E.cumulative(router.pipeline.predict_proba(_probe_frame(X)))
    old = np.bincount(E.route_indices(cum, 0.3), minlength=3) / len(rows)
    assert np.abs(old - np.array([want[t] for t in TIERS])).max() > 0.05
    t = CliRunner().invoke(app, ["router", "evaluate", "--artifact", str(art), "--data", str(hold)])
    assert "served decision (thresholds small=0.3, mid=0.99)" in t.output


def test_lake_replay_uses_per_tier_thresholds(routers, explored_lake, tmp_path: Path) -> None:
    lake, _ = explored_lake
    art = with_thresholds(routers["logger"], tmp_path / "uneq", {"small": 0.2, "mid": 0.9})
    router = load_router(art)
    rep = E.replay_lake(router, lake, days=30)
    import finops

    df = (
        finops.connect(lake)
        .sql(f"SELECT {', '.join(E.REPLAY_COLUMNS)} FROM clean.requests WHERE status_code < 400")
        .pl()
    )
    served = [router.decide_row(row).tier for row in E.replay_feature_rows(router, df)]
    want = {t: served.count(t) / len(served) for t in TIERS}
    assert rep["requests"] == len(served)
    assert rep["shares"] == pytest.approx(want)
    assert rep["decision"] == "thresholds small=0.2, mid=0.9"


def test_warns_when_few_explored_requests_cover_the_candidates_departures(
    routers, explored_lake, tmp_path: Path
) -> None:
    """At 5% exploration a candidate that departs from the logged choices is seen
    through a handful of explored requests: the interval alone would not say that the
    estimate mostly reflects where the two routers agree."""
    logger = load_router(routers["logger"])
    cand = load_router(routers["cand"])
    rare, _ = simulate(logger, 600, 0.05, seed=9)
    Lake(tmp_path / "rare").append("requests", rare, source="test")
    with pytest.warns(OffPolicyWarning, match="departs from the logging router's choice"):
        res = off_policy_estimate(cand, tmp_path / "rare")
    assert res["departs_share"] > 0.1 and res["explored_matches"] < 50
    # 30% exploration over 6000 requests covers them: no warning (see above), and counted
    full = off_policy_estimate(cand, explored_lake[0])
    assert full["explored_matches"] >= 50 and full["warnings"] == []


def test_exploring_candidate_gives_foreign_logged_tiers_no_weight() -> None:
    """eps/K exploration applies to the candidate's own tiers only: a logged tier it does
    not have ('xl') can never be its choice, so those requests weigh 0 (SNIPS was 28)."""
    logged = ["small", "xl", "xl", "xl"]
    cand = ["small"] * 4
    r = ips_estimate(
        logged,
        [0.5] * 4,
        cand,
        [1.0, 100.0, 100.0, 100.0],
        exploration_rate=0.3,
        tiers=["small", "mid", "large"],
    )
    assert r["snips"] == pytest.approx(1.0)
    # pi(small) = 0.7 + 0.1 -> weight 1.6; the xl rows 0
    assert r["ips"] == pytest.approx(1.6 * 1.0 / 4)
    # n_tiers defaults to len(tiers); an explicit one still wins
    s = ips_estimate(logged, [0.5] * 4, cand, [1.0] * 4, exploration_rate=0.3, n_tiers=3)
    assert s["ips"] == pytest.approx((1.6 + 3 * 0.2) / 4)
