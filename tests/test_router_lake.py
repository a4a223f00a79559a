"""Router on the lake: labels joined to logged requests, replay of last week's traffic in $."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import finops
from finops.router import data as D
from finops.router.evaluate import replay_lake, tier_token_prices
from finops.router.train import train


def test_lake_labels_metadata_only_and_replay(demo_lake: Path, tmp_path: Path) -> None:
    db = finops.connect(demo_lake)
    reqs = db.sql(
        "SELECT request_id, feature, input_tokens FROM clean.requests "
        "WHERE coalesce(operation, 'chat') <> 'embeddings' ORDER BY request_id LIMIT 1500"
    ).pl()
    assert reqs.height > 500
    rng = np.random.default_rng(0)
    lines = []
    for r in reqs.iter_rows(named=True):
        hard = (r["input_tokens"] or 0) > 4000 or r["feature"] == "code-complete"
        tier = 2 if hard and rng.random() < 0.8 else int(rng.choice(2))
        lines.append(json.dumps({"request_id": r["request_id"], "label": D.DEFAULT_TIERS[tier]}))
    lines.append(json.dumps({"request_id": "nope", "label": "small"}))
    lines.append(json.dumps({"label": "small"}))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    ds = D.load_lake(demo_lake, labels)
    assert ds.frame.height == reqs.height
    assert [b.field for b in ds.bad_rows] == ["request_id", "request_id"]
    assert not ds.has_text  # the demo lake has prompt capture off
    res = train(ds, tmp_path / "art", cv_folds=0, lake=demo_lake, quality_target=0.9)
    assert res.router is not None and not res.router.uses_prompt_text
    assert "lake cost marts" in res.evaluation["prices"]["source"]
    rep = replay_lake(res.router, demo_lake)
    assert rep["requests"] > 0
    assert rep["routed_cost_usd"] <= rep["all_large_cost_usd"] + 1e-9
    # compared with the routing the log shows first; "saved" only when cheaper than it
    left_out = rep["no_logged_tier"] + sum(rep["other_tier"].values())
    assert rep["logged_requests"] + left_out == rep["requests"]
    if rep["costs_more_than_logged"]:
        assert rep["line"].startswith("warning: this router would cost $")
        assert "saved" not in rep["line"]
    else:
        assert rep["line"].startswith("this router would")
        assert "the routing the log shows" in rep["line"]
    assert rep["line"].index("the routing the log shows") < rep["line"].index("all on large")
    # metadata-only: it sees the inputs it was tested on, so the held-out figure applies
    assert rep["quality_basis"] == "held-out test split"
    assert "retained on its held-out test split" in rep["line"]
    costs = [p["cost_usd"] for p in rep["curve"]]
    assert costs[-1] == max(costs)  # all-large (lambda None) is the most expensive point
    # the logged routing is priced at the lake's own $/token (per prefill-computed token),
    # so it cannot cost more than the GPU-hours its tiers were billed. Was: full prompts
    # (prefix-cache hits included) at that price, above the whole bill on the demo week
    bill = db.execute(
        "SELECT sum(gpu_cost) FROM marts.gpu_cost_hourly WHERE tier IN ('small', 'mid', 'large')"
    ).fetchone()[0]
    assert 0 < rep["logged_cost_usd"] <= bill


def test_price_fallback_is_stated(tmp_path: Path) -> None:
    p = tier_token_prices(["small", "mid", "large"], lake=tmp_path)
    assert "price catalog" in p["source"] and "tok/s" in p["source"]
    # and why the lake did not price the tiers
    assert p["source"].endswith(
        f"; the lake {tmp_path} has no cost marts for tier(s) ['small', 'mid', 'large']"
    )
    pin = p["usd_per_input_token"]
    assert pin["small"] < pin["mid"] < pin["large"]


def test_lake_repeated_request_id_is_a_bad_row(demo_lake: Path, tmp_path: Path) -> None:
    """A second label for a request used to replace the first silently (a dict keyed by
    request_id): the first is kept, the repeat is reported, and every line is counted."""
    ids = (
        finops.connect(demo_lake)
        .sql("SELECT request_id FROM clean.requests ORDER BY request_id LIMIT 3")
        .pl()["request_id"]
        .to_list()
    )
    labels = tmp_path / "labels.jsonl"
    lines = [{"request_id": i, "label": "small"} for i in ids]
    lines.append({"request_id": ids[0], "label": "large"})
    labels.write_text("".join(json.dumps(r) + "\n" for r in lines))
    ds = D.load_lake(demo_lake, labels)
    assert ds.read == 4 and ds.frame.height == 3
    assert ds.frame["label"].to_list() == [0, 0, 0]  # the first label of ids[0] kept
    (b,) = ds.bad_rows
    assert (b.location, b.field) == (f"{labels}:4", "request_id")
    assert f"first labeled at {labels}:1" in b.expected and ids[0] in b.got


def test_a_router_trained_from_the_shim_log_gets_the_features_it_serves_on(
    tmp_path: Path,
) -> None:
    """Prompt capture off, a truncating cap: the log must still let training rebuild the
    exact feature row the router computed live. vLLM's prompt_tokens (template included,
    after the cut) and the post-cut turn count are not that row."""
    import dataclasses
    import math

    import httpx

    from collectors.logs import ingest_file
    from finops.lake import Lake
    from finops.router import features as F
    from finops.shim import from_flags, serve_in_thread
    from finops.shim.config import CapRule
    from finops.shim.fakeupstream import FakeUpstream
    from finops.shim.server import run_app_in_thread

    long_chat = [{"role": "system", "content": "be brief"}]
    for i in range(8):
        long_chat += [
            {"role": "user", "content": f"question {i} " + "word " * 40},
            {"role": "assistant", "content": "answer " * 20},
        ]
    long_chat.append({"role": "user", "content": "and finally?"})
    bodies = [
        {"model": "small", "messages": long_chat},  # cut by the cap
        {"model": "small", "messages": [{"role": "user", "content": "hi there"}]},
        {"model": "small", "prompt": "Translate: the meeting moved"},
        {"model": "small", "prompt": [[1, 2, 3], [4, 5]]},
    ]
    up = run_app_in_thread(FakeUpstream("ok"))
    try:
        cfg = from_flags([f"small={up.url}"], log_dir=tmp_path / "log")
        cfg = dataclasses.replace(cfg, caps=(CapRule(120, "truncate"),))
        with serve_in_thread(cfg) as h:
            ids = []
            for b in bodies:
                path = "/chat/completions" if "messages" in b else "/completions"
                r = httpx.post(
                    h.base_url + path, json={**b, "max_tokens": 2}, headers={"x-feature": "qa"}
                )
                assert r.status_code == 200, r.text
                ids.append(r.headers["x-request-id"])
            h.shim.log.flush()
    finally:
        up.stop(2)
    lake = Lake(tmp_path / "lake")
    for f in sorted((tmp_path / "log").glob("requests-*.jsonl")):
        ingest_file(f, lake)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"request_id": i, "label": "small"}) + "\n" for i in ids))
    db = finops.connect(tmp_path / "lake")
    logged = db.sql("SELECT request_id, input_tokens, truncated_tokens FROM clean.requests").pl()
    assert logged.filter(logged["truncated_tokens"] > 0).height == 1  # the cap did cut one
    ds = D.load_lake(tmp_path / "lake", labels)
    assert ds.frame.height == len(bodies) and not ds.has_text
    for row, body in zip(ds.frame.iter_rows(named=True), bodies, strict=True):
        live = F.from_body(body, feature="qa", tenant="default")
        assert math.isclose(row["log_prompt_tokens"], live["log_prompt_tokens"], rel_tol=1e-12)
        assert row["turn_count"] == live["turn_count"]


def test_train_cli_states_lake_prices_and_the_fallback(demo_lake: Path, tmp_path: Path) -> None:
    """`train --lake` prints which prices it used (it used to say nothing); a lake that
    cannot price one of the tiers falls back to the catalog and says which tier."""
    from typer.testing import CliRunner

    from finops.cli import app

    data = D.write_demo_labeled(tmp_path / "d.jsonl", 700, seed=1)
    args = ["router", "train", "--data", str(data), "--cv-folds", "0", "--lake", str(demo_lake)]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert f"prices: lake cost marts ({demo_lake})" in r.output
    p = tier_token_prices(["small", "mid", "xl"], lake=demo_lake)
    assert p["source"].startswith("price catalog")
    assert f"the lake {demo_lake} has no cost marts for tier(s) ['xl']" in p["source"]
    assert "xl=3500 tok/s" in p["source"]  # the throughput it priced with, not 0
