"""The router is judged on what the shim serves it.

Two skews between evaluation and serving: a labeled set without `feature`/`tenant`
trains on them as missing while the shim always sends a name (its default, or the
X-Feature header); and an off-policy estimate of a text router on logs without captured
prompts replays it on empty text.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake
from finops.router import OffPolicyWarning, off_policy_estimate
from finops.router import data as D
from finops.router import features as F
from finops.router.features import estimate_prompt_tokens
from finops.router.train import TrainResult, train

TIERS = ["small", "mid", "large"]
T0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)


def body_of(row: dict) -> dict:
    return {"messages": row.get("messages") or [{"role": "user", "content": row["prompt"]}]}


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    return D.demo_labeled_rows(1500, seed=5)


@pytest.fixture(scope="module")
def unnamed(demo_rows, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A text router trained on "bring your own labels": prompt/messages + label only."""
    tmp = tmp_path_factory.mktemp("unnamed")
    path = tmp / "labels.jsonl"
    keep = ("prompt", "messages", "label")
    path.write_text(
        "".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in demo_rows)
    )
    res = train(D.load_labeled(path), tmp / "art", cv_folds=0)
    assert res.router is not None and res.router.uses_prompt_text
    return res


def test_evaluated_probabilities_are_the_served_ones_without_feature_columns(unnamed) -> None:
    """The test split was scored (sklearn) on missing names; the shim sends 'default'."""
    router = unnamed.router
    rows = unnamed.test.features(True).to_dicts()
    assert {r["feature"] for r in rows} == {F.MISSING} == {r["tenant"] for r in rows}
    as_served = np.vstack(
        [
            router.probabilities_for_row({**r, "feature": "default", "tenant": "default"})
            for r in rows
        ]
    )
    diff = np.abs(as_served - unnamed.test_proba).max()
    assert diff < 1e-9, f"served probabilities differ from the evaluated ones by {diff:.3g}"
    for r in rows[:200]:  # the decisions too, and a name sent in an X-Feature header
        want = router.decide_row(r).tier
        assert router.decide_row({**r, "feature": "default", "tenant": "default"}).tier == want
        assert router.decide_row({**r, "feature": "checkout", "tenant": "acme"}).tier == want


def test_route_with_the_shims_defaults_equals_route_without_names(unnamed, demo_rows) -> None:
    router = unnamed.router
    for r in demo_rows[:300]:
        a = router.route(body_of(r))
        b = router.route(body_of(r), feature="default", tenant="default")
        assert a.tier == b.tier
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-12)


def test_unknown_name_scores_as_missing_when_some_rows_lack_it(demo_rows, tmp_path) -> None:
    """A set where some rows name their feature: a new name is scored like a missing one,
    a known name keeps its own weight."""
    path = tmp_path / "mixed.jsonl"
    lines = []
    for i, r in enumerate(demo_rows):
        row = {k: r[k] for k in ("prompt", "messages", "label", "feature", "tenant") if k in r}
        if i % 3 == 0:
            row.pop("feature", None)
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    router = train(D.load_labeled(path), tmp_path / "art", cv_folds=0, text="off").router
    known = sorted({r["feature"] for r in demo_rows})
    moved = 0
    for r in demo_rows[:200]:
        missing = router.route(body_of(r), tenant=r["tenant"]).probabilities
        new = router.route(body_of(r), feature="never-seen", tenant=r["tenant"]).probabilities
        assert new == pytest.approx(missing, abs=1e-12)
        named = router.route(body_of(r), feature=known[0], tenant=r["tenant"]).probabilities
        moved += named != pytest.approx(missing, abs=1e-6)
    assert moved > 0, "a known feature name should keep its own learned weight"


def test_unknown_name_is_all_zeros_when_every_row_was_named(demo_rows, tmp_path) -> None:
    """No missing value trained: an unknown name scores as scikit-learn scores it."""
    from finops.router.artifact import _probe_frame

    path = tmp_path / "named.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows))
    router = train(D.load_labeled(path), tmp_path / "art", cv_folds=0, text="off").router
    rows = [F.from_body(body_of(r), feature="never-seen", tenant="nobody") for r in demo_rows[:100]]
    via_sklearn = router.pipeline.predict_proba(_probe_frame(rows))
    served = np.vstack([router.probabilities_for_row(r) for r in rows])
    assert np.abs(served - via_sklearn).max() < 1e-9


# ------------------------------------------------- off-policy: a text router on capture-off logs


def logged(rows: list[dict], *, text_every: int = 0) -> list[dict]:
    """Routed shim records; prompt text only on every `text_every`-th (0: none, capture off)."""
    rng = np.random.default_rng(0)
    out = []
    for i, r in enumerate(rows):
        body = body_of(r)
        est = estimate_prompt_tokens(body)
        tier = TIERS[int(rng.integers(0, 3))] if rng.random() < 0.3 else "large"
        text = F.body_text(body)[0] if text_every and i % text_every == 0 else None
        out.append(
            {
                "request_id": f"r{i}",
                "ts": T0 + dt.timedelta(seconds=i),
                "tenant": "default",
                "feature": "default",
                "operation": "chat",
                "tier": tier,
                "input_tokens": int(est) + 20,
                "output_tokens": r["output_tokens"],
                "status_code": 200,
                "latency_ms": 100.0,
                "turn_count": r["turn_count"],
                "has_tools": r["has_tools"],
                "prompt_tokens_est": est,
                "prompt_text": text,
                "router_version": "rules-v1",
                "route_propensity": 0.8 if tier == "large" else 0.1,
                "routed_tier": tier,
            }
        )
    return out


def frame_of(records: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(records, schema_overrides={"prompt_text": pl.String})


def estimate(router, frame: pl.DataFrame) -> dict:
    """The result; its warnings are read from the result's list."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffPolicyWarning)
        return off_policy_estimate(router, frame)


def test_offpolicy_warns_when_a_text_router_meets_logs_without_text(unnamed, demo_rows) -> None:
    with pytest.warns(OffPolicyWarning, match="no captured prompt text"):
        res = off_policy_estimate(unnamed.router, frame_of(logged(demo_rows[:600])))
    hits = [w for w in res["warnings"] if "no captured prompt text" in w]
    assert len(hits) == 1, res["warnings"]
    assert hits[0].startswith("600 of 600 requests") and "without its text features" in hits[0]
    assert "--text off" in hits[0] and "[log] prompts" in hits[0]


def test_offpolicy_counts_the_requests_without_text(unnamed, demo_rows) -> None:
    res = estimate(unnamed.router, frame_of(logged(demo_rows[:600], text_every=3)))
    hits = [w for w in res["warnings"] if "no captured prompt text" in w]
    assert len(hits) == 1 and hits[0].startswith("400 of 600 requests"), res["warnings"]


def test_offpolicy_no_text_warning_with_capture_or_a_metadata_router(
    unnamed, demo_rows, tmp_path
) -> None:
    res = estimate(unnamed.router, frame_of(logged(demo_rows[:600], text_every=1)))
    assert not [w for w in res["warnings"] if "prompt text" in w], res["warnings"]
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows))
    meta = train(D.load_labeled(path), tmp_path / "meta", cv_folds=0, text="off").router
    res = estimate(meta, frame_of(logged(demo_rows[:600])))
    assert not [w for w in res["warnings"] if "prompt text" in w], res["warnings"]


def test_offpolicy_cli_prints_the_text_warning(unnamed, demo_rows, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    records = [{k: v for k, v in r.items() if k != "prompt_text"} for r in logged(demo_rows)]
    Lake(lake).append("requests", records, source="shim")
    args = ["router", "offpolicy", str(unnamed.router.path), "--lake", str(lake)]
    t = CliRunner().invoke(app, args)
    assert t.exit_code == 0, t.output
    assert "warning: 1500 of 1500 requests have no captured prompt text" in t.output
    j = CliRunner().invoke(app, [*args, "--format", "json"])
    assert j.exit_code == 0, j.output
    assert any("no captured prompt text" in w for w in json.loads(j.stdout)["warnings"])
