"""Router artifact: tamper detection, fresh-process loading, CLI verify/inspect/export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.router import data as D
from finops.router.artifact import (
    MANIFEST_FILE,
    MODEL_FILE,
    ArtifactError,
    load_router,
    manifest_digest,
)
from finops.router.train import train


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two artifacts trained on different seeds (for the swapped-model test)."""
    tmp = tmp_path_factory.mktemp("art")
    out = []
    for seed in (1, 2):
        data = D.write_demo_labeled(tmp / f"d{seed}.jsonl", 700, seed=seed)
        ds = D.load_labeled(data)
        train(ds, tmp / f"a{seed}", cv_folds=0, seed=seed, quality_target=0.9)
        out.append(tmp / f"a{seed}")
    return out[0], out[1]


@pytest.fixture
def art(artifacts: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifacts[0], dst)
    return dst


def _manifest(p: Path) -> dict:
    return json.loads((p / MANIFEST_FILE).read_text())


def _write_manifest(p: Path, m: dict, *, rehash: bool = True) -> None:
    if rehash:
        m["manifest_sha256"] = manifest_digest(m)
    (p / MANIFEST_FILE).write_text(json.dumps(m))


def test_roundtrip_interface(art: Path) -> None:
    r = load_router(art)
    assert r.tiers == ["small", "mid", "large"]
    assert set(r.upstream_models) == set(r.tiers)
    m = r.manifest
    assert r.version.endswith(m["files"][MODEL_FILE][:8]) and r.version.startswith(m["created"])
    assert m["decision"]["quality_target"] == 0.9
    assert m["training_data"]["sha256"] and m["libraries"]["sklearn"]
    assert sum(m["drift"]["score_histogram"]) == m["drift"]["rows"]


def test_changed_model_bytes_refused(art: Path) -> None:
    b = bytearray((art / MODEL_FILE).read_bytes())
    b[len(b) // 2] ^= 0xFF
    (art / MODEL_FILE).write_bytes(bytes(b))
    with pytest.raises(ArtifactError, match=r"sha256 .* does not match"):
        load_router(art)


def test_swapped_model_file_refused_even_with_rehashed_manifest(
    art: Path, artifacts: tuple[Path, Path]
) -> None:
    shutil.copy(artifacts[1] / MODEL_FILE, art / MODEL_FILE)
    with pytest.raises(ArtifactError, match="changed or swapped"):
        load_router(art)
    m = _manifest(art)
    from finops.router.artifact import sha256_file

    m["files"][MODEL_FILE] = sha256_file(art / MODEL_FILE)
    _write_manifest(art, m)  # an attacker re-hashed everything
    with pytest.raises(ArtifactError, match="probe predictions"):
        load_router(art)


def test_edited_manifest_refused(art: Path) -> None:
    m = _manifest(art)
    m["decision"]["thresholds"]["small"] = 0.0
    _write_manifest(art, m, rehash=False)
    with pytest.raises(ArtifactError, match="modified after export"):
        load_router(art)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(format="onnx-thing"), "field 'format'"),
        (lambda m: m.pop("tiers"), "missing field 'tiers'"),
        (lambda m: m.update(tiers="small,large"), "field 'tiers': expected list"),
        (lambda m: m["decision"]["thresholds"].pop("mid"), "decision.thresholds"),
        (lambda m: m["libraries"].update(sklearn="0.24.2"), "different major version"),
        (lambda m: m["feature_schema"].append({"name": "ssn"}), "feature_schema"),
        (lambda m: m["upstream_models"].pop("large"), "no model name for tier"),
        (lambda m: m["files"].update({"../etc": "0"}), "not a plain file name|missing"),
    ],
)
def test_wrong_schema_or_version_refused(art: Path, edit, match: str) -> None:
    m = _manifest(art)
    edit(m)
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match=match):
        load_router(art)


def test_untrusted_type_in_model_refused(art: Path) -> None:
    import skops.io as sio
    from sklearn.tree import DecisionTreeClassifier

    sio.dump(DecisionTreeClassifier(), art / MODEL_FILE)
    from finops.router.artifact import sha256_file

    m = _manifest(art)
    m["files"][MODEL_FILE] = sha256_file(art / MODEL_FILE)
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match=r"trusted list|not a finops router model"):
        load_router(art)


def test_missing_and_garbage(tmp_path: Path, art: Path) -> None:
    with pytest.raises(ArtifactError, match="not a directory"):
        load_router(tmp_path / "nope")
    (art / MANIFEST_FILE).write_text("{oops")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_router(art)


def test_loads_in_fresh_process_without_training_state(art: Path) -> None:
    code = (
        "import sys, json; from finops.router.artifact import load_router;"
        f"r = load_router({str(art)!r});"
        "d = r.route({'messages': [{'role': 'user', 'content': 'Translate to French: hi'}]},"
        " feature='translate');"
        "assert 'finops.router.train' not in sys.modules and 'finops.router.data' not in sys.modules;"
        "print(json.dumps({'tier': d.tier, 'score': d.score, 'version': r.version}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    r = load_router(art)
    want = r.route(
        {"messages": [{"role": "user", "content": "Translate to French: hi"}]}, feature="translate"
    )
    assert got == {"tier": want.tier, "score": want.score, "version": r.version}


def test_cli_verify_inspect_export(art: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["router", "verify", str(art)])
    assert ok.exit_code == 0 and ok.output.startswith("ok ")
    ins = runner.invoke(app, ["router", "inspect", str(art)])
    assert ins.exit_code == 0 and "guarantee" in ins.output
    exp = runner.invoke(app, ["router", "export", str(art), str(tmp_path / "exported")])
    assert exp.exit_code == 0, exp.output
    assert load_router(tmp_path / "exported").version == load_router(art).version
    (art / MODEL_FILE).write_bytes(b"junk")
    bad = runner.invoke(app, ["router", "verify", str(art)])
    assert bad.exit_code == 1 and "does not match" in bad.output
    bad_exp = runner.invoke(app, ["router", "export", str(art), str(tmp_path / "e2")])
    assert bad_exp.exit_code != 0 and not (tmp_path / "e2").exists()


def test_cli_train_and_evaluate_json(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "d.jsonl"
    r = runner.invoke(app, ["router", "demo-data", "--out", str(data), "--n", "800", "--seed", "3"])
    assert r.exit_code == 0, r.output
    with open(data, "a") as fh:
        fh.write('{"prompt": "x", "label": "xl"}\n')
    out = tmp_path / "art"
    r = runner.invoke(
        app,
        [
            "router",
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--cv-folds",
            "2",
            "--quality-target",
            "0.9",
            "--upstream",
            "large=my-70b",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "1 bad row(s) skipped" in r.output and ":801: field 'label'" in r.output
    assert load_router(out).upstream_models["large"] == "my-70b"
    r = runner.invoke(
        app, ["router", "evaluate", "--artifact", str(out), "--data", str(data), "--format", "json"]
    )
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)["evaluation"]
    for key in ("accuracy", "auc_per_tier", "routellm", "at_threshold", "baselines"):
        assert key in ev
    assert ev["at_threshold"]["saved_usd"] >= 0 and "cpt80" in ev["routellm"]
    r = runner.invoke(app, ["router", "train", "--data", str(tmp_path / "no.jsonl"), "--out", "x"])
    assert r.exit_code == 2 and "no such file" in r.output
