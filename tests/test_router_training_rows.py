"""`router evaluate` on rows the artifact was trained on, and the figures around it.

An artifact records hashes of the rows it was fitted and calibrated on
(training_rows.npy), so `evaluate` can tell them apart row by row: a file mixing them
with new rows is scored on the new ones (and says how many it left out), and a file of
training rows only is not called held-out. Also here: train refuses a tier order its
prices contradict, dollar figures say when output tokens are missing, `evaluate` takes
`--data LAKE --labels FILE` as `train` does, and sub-cent savings keep their digits.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_router_offpolicy import write_jsonl
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake
from finops.router import data as D
from finops.router import evaluate as E
from finops.router import train as T
from finops.router.artifact import (
    TRAINING_ROWS_FILE,
    ArtifactError,
    copy_verified,
    load_router,
)

runner = CliRunner()


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("training_rows")
    data = D.write_demo_labeled(d / "lab.jsonl", 600, seed=3)
    other = D.write_demo_labeled(d / "other.jsonl", 300, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on a small sample
        T.train(D.load_labeled(data), d / "art", cv_folds=0, quality_target=0.9)
    return {"dir": d, "data": data, "other": other, "art": d / "art"}


def _evaluate(art: Path, *args: str) -> tuple[object, dict]:
    base = ["router", "evaluate", "--artifact", str(art), *args]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    j = runner.invoke(app, [*base, "--format", "json"])
    assert j.exit_code == 0, j.output
    return r, json.loads(j.stdout)["evaluation"]


# -- the artifact's training-rows file --


def test_the_artifact_lists_and_verifies_its_training_rows(trained, tmp_path) -> None:
    router = load_router(trained["art"])
    fp = router.manifest["training_data"]["row_fingerprint"]
    assert fp["file"] == TRAINING_ROWS_FILE and fp["rows"] == 480  # train + calibration
    assert TRAINING_ROWS_FILE in router.manifest["files"]
    hashes = router.training_row_hashes()
    assert hashes is not None and hashes.dtype == np.uint64 and len(hashes) == 480
    assert (np.diff(hashes.astype(np.float64)) >= 0).all()  # sorted
    # exported with the artifact, and an edit is caught as for any listed file
    assert (copy_verified(trained["art"], tmp_path / "copy").path / TRAINING_ROWS_FILE).exists()
    bad = tmp_path / "bad"
    shutil.copytree(trained["art"], bad)
    np.save(bad / TRAINING_ROWS_FILE, hashes[:-1], allow_pickle=False)
    with pytest.raises(ArtifactError, match=TRAINING_ROWS_FILE):
        load_router(bad)


def test_row_hash_keys_request_id_else_prompt_text_else_metadata() -> None:
    row = {"log_prompt_tokens": 3.0, "turn_count": 1.0, "has_tools": 0.0, "feature": "f"}
    assert D.row_hash("r1", "a", row) == D.row_hash("r1", "other text", {})
    assert D.row_hash("r1", "a", row) != D.row_hash("r2", "a", row)
    assert D.row_hash(None, " Hello\n  world ", row) == D.row_hash(None, "Hello world", {})
    assert D.row_hash(None, None, row) == D.row_hash(None, None, dict(row))
    assert D.row_hash(None, None, row) != D.row_hash(None, None, {**row, "feature": "g"})


# -- finding: training rows mixed with new ones were called held-out --


def test_evaluate_leaves_out_training_rows_mixed_with_new_ones(trained) -> None:
    rows = _rows(trained["data"]) + _rows(trained["other"])
    rng = np.random.default_rng(0)
    mixed = write_jsonl(
        trained["dir"] / "mixed.jsonl", [rows[i] for i in rng.permutation(len(rows))]
    )
    r, ev = _evaluate(trained["art"], "--data", str(mixed))
    assert (
        f"note: 480 of 900 rows of {mixed} were in the artifact's training set (fitted on or "
        "calibrated with); evaluating on the other 420" in r.stderr
    )
    assert "warning" not in r.stderr
    assert "rows 420 (bad rows skipped: 0; training rows left out: 480)" in r.stdout
    assert r.stdout.strip().splitlines()[-1].endswith("on 420 held-out requests")
    assert ev["rows"] == 420 and ev["rows_loaded"] == 900
    assert ev["training_rows_excluded"] == 480 and ev["includes_training_rows"] is False


def test_evaluate_on_training_rows_only_is_not_called_held_out(trained) -> None:
    trained_rows = set(load_router(trained["art"]).training_row_hashes().tolist())
    ds = D.load_labeled(trained["data"])
    seen = [h in trained_rows for h in ds.frame["row_hash"].to_list()]
    only = write_jsonl(
        trained["dir"] / "only.jsonl",
        [r for r, s in zip(_rows(trained["data"]), seen, strict=True) if s],
    )
    r, ev = _evaluate(trained["art"], "--data", str(only))
    assert f"warning: all 480 rows of {only} were in this artifact's training set" in r.stderr
    assert (
        r.stdout.strip()
        .splitlines()[-1]
        .endswith(
            "on 480 requests that include the artifact's training rows (optimistic, not held-out)"
        )
    )
    assert ev["includes_training_rows"] is True and ev["rows"] == 480


def test_evaluate_on_new_rows_is_held_out(trained) -> None:
    r, ev = _evaluate(trained["art"], "--data", str(trained["other"]))
    assert "training set" not in r.stderr and "warning" not in r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("on 300 held-out requests")
    assert ev["training_rows_excluded"] == 0


# -- finding: missing output_tokens silently left out of the dollar figures --


def test_dollar_figures_say_when_output_tokens_are_missing(trained) -> None:
    rows = _rows(trained["other"])
    for r in rows[:200]:
        del r["output_tokens"]
    part = write_jsonl(trained["dir"] / "no_out.jsonl", rows)
    r, ev = _evaluate(trained["art"], "--data", str(part))
    want = "dollar figures count prompt tokens only for 200 of 300 rows"
    assert f"note: {want}" in r.stdout
    assert any(want in n for n in ev["notes"]) and ev["output_tokens_missing"] == 200
    r, _ = _evaluate(trained["art"], "--data", str(trained["other"]))
    assert "dollar figures count prompt tokens only" not in r.stdout


# -- finding: evaluate had no --labels for labels joined to a lake --


def test_evaluate_takes_a_lake_and_its_labels_as_train_does(trained, tmp_path) -> None:
    def prompts(path: Path, n: int) -> list[dict]:
        return [r for r in _rows(path) if "prompt" in r][:n]

    rows = prompts(trained["other"], 100) + prompts(trained["data"], 50)
    assert len(rows) == 150
    t0 = dt.datetime(2026, 11, 16, 9, tzinfo=dt.UTC)
    records = [
        {
            "request_id": r["request_id"],
            "ts": t0 + dt.timedelta(seconds=i),
            "source": "shim",
            "tenant": r["tenant"],
            "feature": r["feature"],
            "operation": "chat",
            "request_model": "auto",
            "tier": "large",
            "prompt_text": r["prompt"],
            "input_tokens": int(len(r["prompt"]) / 4) + 10,
            "output_tokens": r["output_tokens"],
            "turn_count": r["turn_count"],
            "has_tools": r["has_tools"],
            "status_code": 200,
        }
        for i, r in enumerate(rows)
    ]
    lake = tmp_path / "lake"
    Lake(lake).append("requests", records, source="test")
    labels = write_jsonl(
        tmp_path / "labels.jsonl",
        [{"request_id": r["request_id"], "label": r["label"]} for r in rows],
    )
    help_ = runner.invoke(app, ["router", "evaluate", "--help"]).stdout
    assert "--labels" in help_
    r, ev = _evaluate(trained["art"], "--data", str(lake), "--labels", str(labels))
    seen = set(load_router(trained["art"]).training_row_hashes().tolist())
    in_training = sum(D.row_hash(r["request_id"], None, {}) in seen for r in rows)
    assert 0 < in_training < 50  # some of lab.jsonl's rows were its test split
    assert ev["bad_rows"] == 0, r.stderr
    assert ev["rows_loaded"] == 150 and ev["training_rows_excluded"] == in_training
    assert ev["rows"] == 150 - in_training
    assert r.stdout.strip().splitlines()[-1].endswith(f"on {150 - in_training} held-out requests")
    r = runner.invoke(
        app,
        [
            "router",
            "evaluate",
            "--artifact",
            str(trained["art"]),
            "--lake",
            str(lake),
            "--labels",
            str(labels),
        ],
    )
    assert r.exit_code != 0 and "--labels needs --data LAKE" in r.output


# -- finding: a tier order the prices contradict trained without a word --


def test_train_refuses_tiers_that_are_not_cheapest_first(trained, tmp_path) -> None:
    ds = D.load_labeled(trained["data"], tiers=["large", "mid", "small"])
    with pytest.raises(D.DataError) as exc:
        T.train(ds, tmp_path / "rev", cv_folds=0)
    msg = str(exc.value)
    assert msg.startswith("--tiers large,mid,small: expected tiers cheapest first, but 'large'")
    assert "/input token" in msg and "price catalog" in msg
    assert msg.endswith("list them cheapest first, e.g. --tiers small,mid,large")
    assert not (tmp_path / "rev").exists()
    r = runner.invoke(
        app,
        [
            "router",
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(tmp_path / "rev"),
            "--tiers",
            "large,mid,small",
            "--cv-folds",
            "0",
        ],
    )
    assert r.exit_code != 0 and "expected tiers cheapest first" in r.output


def test_measured_prices_out_of_order_are_a_note(monkeypatch) -> None:
    """Lake prices include idle GPU time: an under-used cheap pool may cost more per token."""
    price = {
        "source": "lake cost marts (x): ...",
        "usd_per_input_token": {"small": 3e-7, "mid": 1e-7, "large": 4e-7},
        "usd_per_output_token": {"small": 5e-5, "mid": 2e-5, "large": 2e-4},
    }
    notes = T.check_price_order(price, ["small", "mid", "large"])
    assert len(notes) == 1 and "'small' ($3e-07/input token" in notes[0]
    assert "the next tier 'mid'" in notes[0] and "idle GPU time" in notes[0]
    price["source"] = "price catalog"
    with pytest.raises(D.DataError, match=r"e\.g\. --tiers mid,small,large"):
        T.check_price_order(price, ["small", "mid", "large"])
    price["usd_per_input_token"]["small"] = 1e-8
    price["usd_per_output_token"]["small"] = 1e-6
    assert T.check_price_order(price, ["small", "mid", "large"]) == []


def test_tier_names_of_ones_own_are_priced_by_position() -> None:
    """tiny,mini,small (cheapest first): the assumed deployments were taken by name for
    'small' and by position for the others, so 'mini' read dearer than 'small' and a
    correct order was refused, with a wrong order suggested."""
    from finops.router import evaluate as E

    price = E.tier_token_prices(["tiny", "mini", "small"])
    assert "by position" in price["source"]
    assert T.check_price_order(price, ["tiny", "mini", "small"]) == []
    pin = price["usd_per_input_token"]
    assert pin["tiny"] < pin["mini"] < pin["small"]
    named = E.tier_token_prices(["small", "mid", "large"])
    assert "by position" not in named["source"]
    with pytest.raises(D.DataError):  # the assumed deployments' own names still count
        T.check_price_order(
            E.tier_token_prices(["large", "mid", "small"]), ["large", "mid", "small"]
        )


# -- polish: sub-cent dollars --


def test_sub_cent_savings_keep_their_digits() -> None:
    assert E.usd(0.0042) == "$0.0042" and E.usd(-0.00042) == "$-0.00042"
    assert E.usd(0.16) == "$0.16" and E.usd(1234.5) == "$1,234.50" and E.usd(0) == "$0.00"
    line = E.dollars_line(0.0042, 0.599, 0.99)
    assert line == (
        "this router would have saved $0.0042 (59.9%) vs all on the largest tier at 99.0% quality"
    )
