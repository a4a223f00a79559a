"""Router integrity: the stated guarantee is the one calibrate() controls (absolute loss);
decision fields are range-checked and bound to the version the shim reports."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.router import data as D
from finops.router import evaluate as E
from finops.router.artifact import (
    MANIFEST_FILE,
    MODEL_FILE,
    ArtifactError,
    artifact_version,
    load_router,
    manifest_digest,
)
from finops.router.calibrate import GRID, calibrate, losses, p_value, route_indices
from finops.router.train import train

# --- the guarantee: stated as what is controlled (absolute mean loss) ---------------


def _draw(n: int, rng: np.random.Generator, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and 0/1 quality (tier t is good enough iff t >= needed)."""
    logits = rng.normal(size=(n, k)) * 2.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)  # y ~ Categorical(p)
    q = (np.arange(k)[None, :] >= y[:, None]).astype(float)
    return E.cumulative(p), q


def test_guarantee_with_large_tier_below_one_is_stated_in_absolute_terms() -> None:
    """Judge scores x0.2 (large averages 0.2): the text must not promise 98% of all-large.

    The loss is tested against alpha in absolute score units, so with a large tier at 0.2
    the controlled bound is a ~10% relative loss; the old text said "quality >= 98.0% of
    the all-large baseline" regardless.
    """
    cum, q = _draw(2000, np.random.default_rng(5))
    dec = calibrate(cum, q * 0.2, quality_target=0.98, confidence=0.95)
    text = dec["guarantee"]
    assert "of the all-large baseline" not in text and "98" not in text
    assert "mean quality loss vs routing everything to the large tier <= 0.02" in text
    assert "absolute, in quality-score units on the 0-1 scale" in text
    assert "mean large-tier quality is 0.200" in text and "relative loss of about 10.0%" in text
    assert "95% confidence" in text
    terms = dec["guarantee_terms"]
    assert terms["kind"] == "absolute_mean_quality_loss"
    assert terms["max_loss"] == 0.02 and terms["confidence"] == 0.95
    assert terms["calibration_rows"] == 2000
    assert terms["calibration_mean_large_quality"] == pytest.approx(0.2)
    assert terms["calibration_mean_loss"] == dec["calibration_loss"] <= 0.02
    assert dec["quality_target"] == 0.98 and dec["alpha"] == pytest.approx(0.02)  # old readers
    crc = calibrate(cum, q * 0.5, quality_target=0.98, method="crc")
    assert crc["guarantee_terms"]["confidence"] is None
    assert (
        "in expectation" in crc["guarantee"] and "relative loss of about 4.0%" in crc["guarantee"]
    )


def test_plain_labels_still_state_the_relative_form() -> None:
    """0/1 labels: the large tier always succeeds, so absolute == relative and it says so."""
    cum, q = _draw(800, np.random.default_rng(1))
    dec = calibrate(cum, q, quality_target=0.98, confidence=0.95)
    assert dec["guarantee"].endswith("so quality >= 98.0% of the all-large baseline")
    assert dec["guarantee_terms"]["calibration_mean_large_quality"] == 1.0


def test_stated_absolute_bound_holds_on_fresh_scaled_scores() -> None:
    """What the text states (absolute loss <= max_loss) is what holds on fresh data."""
    alpha, delta, scale = 0.02, 0.1, 0.2
    big_cum, big_q = _draw(100_000, np.random.default_rng(0))
    fails = 0
    for s in range(20):
        cum, q = _draw(1500, np.random.default_rng(100 + s))
        dec = calibrate(cum, q * scale, quality_target=1 - alpha, confidence=1 - delta)
        assert dec["guarantee_terms"]["max_loss"] == alpha
        idx = route_indices(big_cum, dec["lambda"])
        fails += losses(big_q * scale, idx).mean() > alpha
    assert fails <= 6, fails  # ~ Binomial(20, <=0.1): P(X >= 7) < 0.003


def test_lambda_is_what_the_unchanged_procedure_picks() -> None:
    """The statistics are unchanged: same lambda as the absolute-loss procedure."""
    for seed in range(5):
        cum, q = _draw(800, np.random.default_rng(seed))
        for scale in (1.0, 0.5):
            dec = calibrate(cum, q * scale, quality_target=0.95, confidence=0.9)
            want = None
            for lam in GRID:  # the procedure, as it was
                loss = losses(q * scale, route_indices(cum, float(lam)))
                if p_value(loss, 0.05, scale == 1.0) > 0.1:
                    break
                want = float(lam)
            assert dec["lambda"] == want


# --- artifact: decision fields checked and bound to the version -----------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("integrity")
    ds = D.load_labeled(D.write_demo_labeled(tmp / "d.jsonl", 700, seed=4))
    train(ds, tmp / "a", cv_folds=0, seed=4, quality_target=0.9)
    return tmp / "a"


@pytest.fixture
def art(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def _forge(p: Path, edit, *, version: str = "keep") -> dict:
    """Edit the manifest and recompute manifest_sha256 (what anyone can do without a key).

    version="keep" leaves the version field, "match" recomputes it from the contents,
    "legacy" writes the pre-fix form (creation time + model hash).
    """
    m = json.loads((p / MANIFEST_FILE).read_text())
    edit(m)
    if version == "match":
        m["version"] = artifact_version(m)
    elif version == "legacy":
        m["version"] = f"{m['created']}-{m['files'][MODEL_FILE][:8]}"
    m["manifest_sha256"] = manifest_digest(m)
    (p / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    return m


def _set_threshold(v):
    return lambda m: m["decision"]["thresholds"].update(small=v)


def test_edited_threshold_with_recomputed_digest_is_refused_naming_version(art: Path) -> None:
    _forge(art, _set_threshold(0.1))
    with pytest.raises(ArtifactError, match=r"manifest\.json: field 'version': .*thresholds"):
        load_router(art)
    r = CliRunner().invoke(app, ["router", "verify", str(art)])
    assert r.exit_code == 1 and "field 'version'" in r.output


@pytest.mark.parametrize("version", ["match", "legacy"])
def test_edited_threshold_never_reports_the_original_version(
    built: Path, art: Path, version: str
) -> None:
    original = load_router(built).version
    _forge(art, _set_threshold(0.1), version=version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy form warns
        edited = load_router(art)
    assert edited.thresholds[0] == 0.1
    assert edited.version != original and edited.version == artifact_version(edited.manifest)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["tiers"].reverse(),
        lambda m: m["upstream_models"].update(large="someone-else/model"),
        lambda m: m["decision"]["thresholds"].update(mid=None),
    ],
)
def test_version_covers_every_decision_field(art: Path, edit) -> None:
    m = json.loads((art / MANIFEST_FILE).read_text())
    before = artifact_version(m)
    edit(m)
    assert artifact_version(m) != before


def test_legacy_version_still_loads_and_reports_what_its_contents_imply(art: Path) -> None:
    want = load_router(art).version
    m = _forge(art, lambda m: None, version="legacy")
    with pytest.warns(UserWarning, match=r"field 'version' .* predates"):
        r = load_router(art)
    assert m["version"] != want and r.version == want


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-1, "-1"), (5, "5"), (1.0000001, "1.0000001"), (True, "True"), ("0.5", "'0.5'")],
)
def test_threshold_outside_unit_interval_or_not_a_number_is_refused(
    art: Path, value, shown: str
) -> None:
    _forge(art, _set_threshold(value), version="match")  # digest and version both "valid"
    with pytest.raises(
        ArtifactError,
        match=rf"manifest\.json: field 'decision\.thresholds\.small': expected a number in "
        rf"\[0, 1\] or null, got {shown}",
    ):
        load_router(art)


def test_null_threshold_is_allowed(art: Path) -> None:
    _forge(art, _set_threshold(None), version="match")
    assert load_router(art).thresholds[0] is None


@pytest.mark.parametrize("name", ["", "   ", 3, None])
def test_empty_upstream_model_name_is_refused(art: Path, name) -> None:
    _forge(art, lambda m: m["upstream_models"].update(large=name), version="match")
    with pytest.raises(ArtifactError, match=r"field 'upstream_models\.large': expected a non-emp"):
        load_router(art)


@pytest.mark.parametrize("tiers", [["small", "", "large"], ["small", "small", "large"]])
def test_empty_or_repeated_tier_is_refused(art: Path, tiers: list[str]) -> None:
    def edit(m: dict) -> None:
        m["tiers"] = tiers

    _forge(art, edit, version="keep")
    with pytest.raises(ArtifactError, match=r"field 'tiers'"):
        load_router(art)


@pytest.mark.parametrize("value", [True, 1.5, 0])
def test_quality_target_must_be_a_fraction(art: Path, value) -> None:
    _forge(art, lambda m: m["decision"].update(quality_target=value), version="match")
    with pytest.raises(ArtifactError, match=r"field 'decision\.quality_target': expected a numb"):
        load_router(art)


def test_trained_artifact_records_the_guarantee_terms(built: Path) -> None:
    d = load_router(built).manifest["decision"]
    assert d["guarantee_terms"]["kind"] == "absolute_mean_quality_loss"
    assert d["guarantee_terms"]["max_loss"] == pytest.approx(1 - d["quality_target"])
