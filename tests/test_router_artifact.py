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
    artifact_version,
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
    # the version names the model file AND the decision fields (see test_router_integrity.py)
    assert r.version == m["version"] == artifact_version(m) and r.version.startswith(m["created"])
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
        (
            lambda m: (
                m["tiers"].remove("mid"),
                m["upstream_models"].pop("mid"),
                m["decision"]["thresholds"].pop("mid"),
            ),
            r"field 'tiers': expected 3\+ distinct tier names",
        ),
        # wrong types in probes: an ArtifactError naming the field, not NumPy's ValueError
        (lambda m: m["probes"][0].__setitem__(0, "x"), "field 'probes'"),
        (lambda m: m["probes"][1].pop(), "field 'probes'"),
        (lambda m: m["probes"].__setitem__(2, {"small": 1}), "field 'probes'"),
        (lambda m: m["probes"][3].__setitem__(1, True), "field 'probes'"),
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
    with pytest.raises(ArtifactError, match="no such folder"):
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
    ev = json.loads(r.stdout)["evaluation"]
    for key in ("accuracy", "auc_per_tier", "routellm", "at_threshold", "baselines"):
        assert key in ev
    assert ev["at_threshold"]["saved_usd"] >= 0 and "cpt80" in ev["routellm"]
    r = runner.invoke(app, ["router", "train", "--data", str(tmp_path / "no.jsonl"), "--out", "x"])
    assert r.exit_code == 2 and "no such file" in r.output


def _two_class_pipeline():
    """A fitted router pipeline that learned only two classes (the scorer cannot load it)."""
    from finops.router import features as F
    from finops.router.artifact import _probe_frame
    from finops.router.model import build_pipeline

    rows = [F.extract(text=None, prompt_tokens=10 + i, feature="f") for i in range(40)]
    pipe = build_pipeline(False, cv=2)
    pipe.fit(_probe_frame(rows), [i % 2 for i in range(40)])
    return pipe


def test_export_that_cannot_load_is_never_left_at_out(tmp_path: Path) -> None:
    """write_artifact loads its temp dir before the rename: a model the scorer refuses
    raises there, and neither --out nor a temp dir is left behind."""
    from finops.router.artifact import write_artifact

    tiers = ["small", "mid", "large"]
    with pytest.raises(ArtifactError, match="does not load, so nothing was written"):
        write_artifact(
            tmp_path / "out",
            _two_class_pipeline(),
            tiers=tiers,
            upstream_models={t: t for t in tiers},
            decision={
                "thresholds": {"small": 0.5, "mid": 0.5},
                "quality_target": 0.9,
                "confidence": 0.9,
            },
            uses_prompt_text=False,
            training_data={},
            evaluation={},
            drift={},
        )
    assert list(tmp_path.iterdir()) == []


def test_nan_in_manifest_is_named(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    """An undefined figure says which field, not json's "Out of range float values"."""
    from finops.router.artifact import write_artifact

    r = load_router(artifacts[0])
    m = r.manifest
    with pytest.raises(ArtifactError, match=r"field 'evaluation.routellm.apgr' is nan"):
        write_artifact(
            tmp_path / "out",
            r.pipeline,
            tiers=r.tiers,
            upstream_models=r.upstream_models,
            decision=m["decision"],
            uses_prompt_text=r.uses_prompt_text,
            training_data={},
            evaluation={"routellm": {"apgr": float("nan")}},
            drift={},
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_evaluate_names_skipped_rows(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    """evaluate used to skip bad rows with only a count; it names them as train does."""
    data = D.write_demo_labeled(tmp_path / "h.jsonl", 300, seed=5)
    with open(data, "a") as fh:
        fh.write('{"prompt": "x", "label": "xl"}\n{oops\n')
    want = [
        f"{data}:301: field 'label': expected one of ['small', 'mid', 'large'], got 'xl'",
        f"{data}:302: field '<line>': expected a JSON object, got <invalid JSON: "
        "Expecting property name enclosed in double quotes>",
    ]
    args = ["router", "evaluate", "--artifact", str(artifacts[0]), "--data", str(data)]
    r = CliRunner().invoke(app, [*args, "--format", "json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["evaluation"]
    assert ev["bad_rows"] == 2 and ev["skipped_rows"] == want
    assert [f"skipped {w}" for w in want] == r.stderr.splitlines()[:2]
    assert "2 bad row(s) skipped of 302 read; 300 loaded" in r.stderr
    t = CliRunner().invoke(app, args)
    assert t.exit_code == 0 and f"skipped {want[0]}" in t.stderr


def test_cli_train_refuses_unknown_upstream_tier(tmp_path: Path) -> None:
    """--upstream lrage=... was ignored; it is refused before the data is even read."""
    upstream = ["--upstream", "large=my-70b", "--upstream", "lrage=foo"]
    r = CliRunner().invoke(
        app,
        ["router", "train", "--data", str(tmp_path / "later.jsonl"), "--out", "a", *upstream],
    )
    assert r.exit_code == 2, r.output
    assert "unknown tier 'lrage'; the tiers are ['small', 'mid', 'large']" in r.output
    r = CliRunner().invoke(
        app, ["router", "train", "--data", "x.jsonl", "--out", "a", "--tiers", "small,large"]
    )
    assert r.exit_code == 2 and "expected 3+ tiers" in r.output


def test_cli_refuses_bad_out_and_format(art: Path, tmp_path: Path) -> None:
    """Unknown suffixes, unwritable --out and unknown --format: rc 2, one line, no traceback."""
    runner = CliRunner()
    r = runner.invoke(app, ["router", "demo-data", "--out", str(tmp_path / "x.txt"), "--n", "5"])
    assert r.exit_code == 2 and "unknown format '.txt'" in r.output and ".parquet" in r.output
    assert not (tmp_path / "x.txt").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = runner.invoke(app, ["router", "demo-data", "--out", str(blocker / "d.jsonl"), "--n", "5"])
    assert r.exit_code == 2 and f"--out {blocker / 'd.jsonl'}: cannot write" in r.output
    data = D.write_demo_labeled(tmp_path / "d.jsonl", 300, seed=1)
    for out, why in [
        (blocker / "art", "cannot create the artifact directory"),
        (blocker, "not a directory"),
    ]:
        r = runner.invoke(app, ["router", "train", "--data", str(data), "--out", str(out)])
        assert r.exit_code == 2 and f"{out}: " in r.output and why in r.output, r.output
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    r = runner.invoke(app, ["router", "inspect", str(art), "--format", "xml"])
    assert r.exit_code == 2 and "--format must be table or json, got 'xml'" in r.output


def test_route_names_a_wrong_argument_type(art: Path) -> None:
    r = load_router(art)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(TypeError, match=r"route\(\): tenant must be a str or None, got list"):
        r.route(body, tenant=["a"])
    with pytest.raises(TypeError, match=r"route\(\): feature must be a str or None, got int"):
        r.route(body, feature=3)
    with pytest.raises(
        TypeError, match=r"route\(\): body must be a request body \(a dict\), got str"
    ):
        r.route("hi")  # type: ignore[arg-type]
    assert r.route(body, feature="chat", tenant="acme").tier in r.tiers


def _one_error_line(r) -> str:
    """The CLI failed with `error: ...` and no traceback; returns the output."""
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and r.output.startswith("error: "), r.output
    return r.output


def test_malformed_manifests_are_named_not_tracebacks(art: Path, tmp_path: Path) -> None:
    """NaN (which Python's json writes and reads), an over-long integer, a non-string
    feature name and a missing decision.rule used to crash verify/inspect."""
    runner = CliRunner()
    base = _manifest(art)

    def case(name: str, edit, rehash: bool = True) -> Path:
        d = tmp_path / name
        shutil.copytree(art, d)
        m = json.loads(json.dumps(base))
        text = edit(m)
        if text is None:
            if rehash:
                m["version"] = artifact_version(m)
                m["manifest_sha256"] = manifest_digest(m)
            text = json.dumps(m)
        (d / MANIFEST_FILE).write_text(text)
        return d

    def nan(m):
        m["evaluation"]["rows"] = float("nan")
        return json.dumps(m)

    def bigint(m):
        return json.dumps(m).replace('"format_version": 1', '"format_version": 1' + "0" * 5000)

    cases = [
        (case("nan", nan), "field 'evaluation.rows' is nan"),
        (case("bigint", bigint), "not valid JSON: Exceeds the limit (4300 digits)"),
        (
            case("fname", lambda m: m["feature_schema"][0].update(name=["text"])),
            "field 'feature_schema'",
        ),
        (case("norule", lambda m: m["decision"].pop("rule") and None), "field 'decision.rule'"),
        (case("nolam", lambda m: m["decision"].update({"lambda": "high"})), "'decision.lambda'"),
        (case("noguar", lambda m: m["decision"].pop("guarantee") and None), "'decision.guarantee'"),
    ]
    for d, why in cases:
        for cmd in ("verify", "inspect"):
            out = _one_error_line(runner.invoke(app, ["router", cmd, str(d)]))
            assert why in out, (cmd, out)
            assert "set_int_max_str_digits" not in out
        with pytest.raises(ArtifactError, match=why.replace("(", r"\(").replace(")", r"\)")):
            load_router(d)


def test_cli_export_and_demo_refuse_bad_out(art: Path, tmp_path: Path) -> None:
    """export/demo to a file, under a file, or over a non-artifact folder: one error line,
    and demo checks --out before it writes its labeled set next to it."""
    runner = CliRunner()
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for dst, why in [
        (blocker, "exists and is not a directory"),
        (blocker / "sub", "cannot create the artifact directory"),
        (Path("/proc/finops-x"), "cannot create the artifact directory"),
    ]:
        out = _one_error_line(runner.invoke(app, ["router", "export", str(art), str(dst)]))
        assert f"{dst}: " in out and why in out, out
    nolake = str(tmp_path / "nolake")
    notart = tmp_path / "notart"
    notart.mkdir()
    (notart / "x.txt").write_text("keep")
    for out_dir, n, why in [
        (tmp_path / "d1" / "art", "20", "fewer than 10 labeled rows"),
        (blocker / "art", "300", "cannot create the artifact directory"),
        (notart, "300", "not a router artifact; refusing to replace it"),
    ]:
        args = ["router", "demo", "--out", str(out_dir), "--n", n, "--lake", nolake]
        out = _one_error_line(runner.invoke(app, args))
        assert why in out, out
    assert not (tmp_path / "demo-labeled.jsonl").exists()  # notart's parent: nothing written
    assert [p.name for p in notart.iterdir()] == ["x.txt"]


def test_cli_train_corrupt_parquet_and_lake_typo(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1garbage")
    out = _one_error_line(
        runner.invoke(app, ["router", "train", "--data", str(bad), "--out", str(tmp_path / "o")])
    )
    assert f"{bad}: not a readable Parquet file" in out
    data = D.write_demo_labeled(tmp_path / "d.jsonl", 700, seed=1)
    args = ["router", "train", "--data", str(data), "--cv-folds", "0", "--quality-target", "0.9"]
    typo = tmp_path / "lkae"
    out = _one_error_line(
        runner.invoke(app, [*args, "--out", str(tmp_path / "a1"), "--lake", str(typo)])
    )
    assert out.strip() == f"error: {typo}: no lake here"
    assert not (tmp_path / "a1").exists()
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a2")])
    assert r.exit_code == 0, r.output
    assert "prices: price catalog (ref.prices, on_demand)" in r.output
