"""Router CLI and loader checks: evaluating on the training data, inconsistent model files,
and train options (--quality-bar, --cv-folds) refused with errors that name them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.router import data as D
from finops.router.artifact import (
    ArtifactError,
    artifact_version,
    load_router,
    manifest_digest,
    sha256_file,
    stable_skops_bytes,
)
from finops.router.train import train

runner = CliRunner()
TIERS = ["small", "mid", "large"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo labeled file, an artifact trained on it, and one trained on it as a lake's labels."""
    d = tmp_path_factory.mktemp("cli_checks")
    data = D.write_demo_labeled(d / "lab.jsonl", 600, seed=3)
    other = D.write_demo_labeled(d / "other.jsonl", 300, seed=4)
    # a stand-in lake: its fingerprint is the requests table's file names and sizes
    part = d / "lake" / "requests" / "date=2026-11-16"
    part.mkdir(parents=True)
    (part / "part-0.parquet").write_bytes(b"x" * 123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on a small sample
        train(D.load_labeled(data), d / "art", cv_folds=0, quality_target=0.9)
        lake_ds = D.load_labeled(data)
        # what load_lake records for labels joined to a lake: source and combined sha256
        lake_ds.source = f"lake {d / 'lake'} + {data}"
        lake_ds.sha256 = hashlib.sha256(
            (D.sha256_path(data) + D._lake_fingerprint(d / "lake")).encode()
        ).hexdigest()
        train(lake_ds, d / "lake_art", cv_folds=0, quality_target=0.9)
    # section 1 checks the file-hash fallback: artifacts from before training_rows.npy
    legacy_artifact(d / "art")
    legacy_artifact(d / "lake_art")
    return {"data": data, "other": other, "art": d / "art", "lake_art": d / "lake_art"}


def legacy_artifact(art: Path) -> Path:
    """`art` as written before artifacts recorded their training rows (in place)."""
    m = json.loads((art / "manifest.json").read_text())
    name = m["training_data"].pop("row_fingerprint")["file"]
    del m["files"][name]
    (art / name).unlink()
    m["manifest_sha256"] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    load_router(art)
    return art


# -- 1. evaluate on the artifact's own training data (an artifact without training_rows.npy:
# the file's hash tells; see test_router_training_rows.py for the row-level check) --


def test_evaluate_on_the_training_file_warns_and_does_not_say_held_out(trained) -> None:
    art, data = trained["art"], trained["data"]
    r = runner.invoke(app, ["router", "evaluate", "--artifact", str(art), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert f"warning: {data} is this artifact's training data" in r.stderr
    assert "training_data.sha256" in r.stderr
    assert "(360 rows were fitted on and 120 calibrated the thresholds; only 120" in r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert "held-out requests" not in line, line
    assert line.endswith(
        "on 600 requests that include the artifact's training rows (optimistic, not held-out)"
    ), line
    r = runner.invoke(
        app,
        ["router", "evaluate", "--artifact", str(art), "--data", str(data), "--format", "json"],
    )
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["evaluation"]
    assert ev["includes_training_rows"] is True
    assert "training_data.sha256" in ev["training_overlap"]


def test_evaluate_on_other_data_still_says_held_out(trained) -> None:
    art, other = trained["art"], trained["other"]
    r = runner.invoke(app, ["router", "evaluate", "--artifact", str(art), "--data", str(other)])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("on 300 held-out requests")


def test_evaluate_on_a_lake_artifacts_own_labels_warns(trained) -> None:
    """Trained on lake + labels: the manifest holds their combined hash, not the file's."""
    art, data = trained["lake_art"], trained["data"]
    r = runner.invoke(app, ["router", "evaluate", "--artifact", str(art), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert f"warning: {data} with lake {data.parent / 'lake'} is this artifact's training" in (
        r.stderr
    )
    assert "held-out requests" not in r.stdout.strip().splitlines()[-1]


# -- 2. a hash-consistent but internally inconsistent model file --


def _craft(src: Path, dst: Path, mutate: Callable[[object], None]) -> Path:
    """Copy `src`, change its model, and rewrite every hash so only the model is wrong."""
    shutil.copytree(src, dst)
    pipe = load_router(src).pipeline
    mutate(pipe)
    (dst / "model.skops").write_bytes(stable_skops_bytes(pipe))
    m = json.loads((dst / "manifest.json").read_text())
    m["files"]["model.skops"] = sha256_file(dst / "model.skops")
    m["version"] = artifact_version(m)
    m["manifest_sha256"] = manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _scaler(p):
    return next(t for n, t, _ in p.named_steps["features"].transformers_ if n == "num")


def _cal(p):
    return p.named_steps["clf"].calibrated_classifiers_[0]


def _short_mean(p):
    _scaler(p).mean_ = _scaler(p).mean_[:2]


def _nan_coef(p):
    _cal(p).estimator.coef_[0, 0] = np.nan  # a column the probe rows never hit


def _inf_intercept(p):
    _cal(p).estimator.intercept_[1] = np.inf


def _inf_scale(p):
    _scaler(p).scale_[0] = np.inf


def _nan_beta(p):
    _cal(p).calibrators[0].beta_ = np.float64(np.nan)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            _short_mean,
            "internally inconsistent model: features.num.mean_ has shape (2,), expected (3,)",
        ),
        (
            _nan_coef,
            "model array clf.calibrated_classifiers_[0].estimator.coef_ has 1 "
            "non-finite value(s) (first at index (0, 0): nan)",
        ),
        (
            _inf_intercept,
            "model array clf.calibrated_classifiers_[0].estimator.intercept_ has 1 "
            "non-finite value(s)",
        ),
        (_inf_scale, "model array features.num.scale_ has 1 non-finite value(s)"),
        (
            _nan_beta,
            "model array clf.calibrated_classifiers_[0].calibrators[0].beta_ has 1 "
            "non-finite value(s)",
        ),
    ],
    ids=["scaler-width", "nan-coef", "inf-intercept", "inf-scale", "nan-temperature"],
)
def test_verify_refuses_an_inconsistent_model_file(trained, tmp_path, mutate, needle) -> None:
    bad = _craft(trained["art"], tmp_path / "bad", mutate)
    r = runner.invoke(app, ["router", "verify", str(bad)])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert f"{bad / 'model.skops'}: {needle}" in r.output, r.output


def test_a_model_whose_scoring_crashes_is_an_artifact_error(trained, tmp_path) -> None:
    """Errors past the array checks (scorer maths, sklearn on the probes) name the file too."""

    def two_temperatures(p):
        _cal(p).calibrators[0].beta_ = np.array([1.0, 2.0])

    def scaler_expects_more(p):
        _scaler(p).n_features_in_ = 5

    bad = _craft(trained["art"], tmp_path / "beta", two_temperatures)
    with pytest.raises(ArtifactError) as err:
        load_router(bad)
    assert str(err.value).startswith(
        f"{bad / 'model.skops'}: internally inconsistent model: building the scorer failed"
    ), err.value
    bad = _craft(trained["art"], tmp_path / "nin", scaler_expects_more)
    with pytest.raises(ArtifactError) as err:
        load_router(bad)
    assert str(err.value).startswith(
        f"{bad / 'model.skops'}: internally inconsistent model: scoring the probe rows failed"
    ), err.value


def test_hot_reload_refuses_an_inconsistent_model_and_keeps_serving(
    trained, tmp_path, upstream
) -> None:
    from finops.shim import from_flags, serve_in_thread

    _, url = upstream
    live = tmp_path / "router"
    shutil.copytree(trained["art"], live)
    v1 = load_router(live).version
    bad = _craft(trained["art"], tmp_path / "bad", _nan_coef)
    cfg = from_flags([f"{t}={url}" for t in TIERS], router=live, log_dir=tmp_path / "log")
    cfg = dataclasses.replace(cfg, watch=False)
    chat = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with serve_in_thread(cfg) as h:
        for f in ("model.skops", "manifest.json"):
            shutil.copy(bad / f, live / f)
        ok, msg = h.shim.reload()
        assert not ok and "refused" in msg, msg
        assert "estimator.coef_ has 1 non-finite value(s)" in msg, msg
        assert h.shim.router.version == v1
        assert httpx.post(h.base_url + "/chat/completions", json=chat).status_code == 200


# -- 3. train options checked up front, named --


def _thin(tmp_path: Path) -> Path:
    """10 rows per tier: the fitting split (60%) has 6 of each."""
    p = tmp_path / "ten.jsonl"
    rows = [{"prompt": f"q {i}", "label": TIERS[i % 3]} for i in range(30)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("bar", ["5", "-0.1", "nan"])
def test_train_refuses_a_quality_bar_outside_0_1(tmp_path, bar) -> None:
    out = tmp_path / "art"
    r = runner.invoke(
        app,
        [
            "router",
            "train",
            "--data",
            str(_thin(tmp_path)),
            "--out",
            str(out),
            "--quality-bar",
            bar,
        ],
    )
    assert r.exit_code != 0
    assert f"--quality-bar must be in [0, 1], got {float(bar)}" in r.output, r.output
    assert not out.exists()


def test_train_names_cv_folds_and_the_largest_usable_value(tmp_path) -> None:
    data, out = _thin(tmp_path), tmp_path / "art"
    args = ["router", "train", "--data", str(data), "--out", str(out)]
    r = runner.invoke(app, [*args, "--cv-folds", "10"])
    assert r.exit_code != 0
    assert "n_splits" not in r.output, r.output
    assert (
        "--cv-folds 10: the fitting split (60% of the rows, 18) has only 6 row(s) of tier "
        "'small' (counts {'small': 6, 'mid': 6, 'large': 6})" in r.output
    ), r.output
    assert "use --cv-folds 6 or fewer (0 turns it off)" in r.output
    assert not out.exists()
    r = runner.invoke(app, [*args, "--cv-folds", "1"])
    assert r.exit_code != 0
    assert "--cv-folds must be 0 (no cross-validation) or >= 2, got 1" in r.output, r.output
    r = runner.invoke(app, [*args, "--cv-folds", "6"])  # the value it names does work
    assert r.exit_code == 0, r.output
    assert load_router(out).manifest["evaluation"]["cross_validation"]["folds"] == 6
