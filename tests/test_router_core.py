"""Router: learnable rule, conformal guarantee, data contract errors, fast scorer parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finops.router import data as D
from finops.router import evaluate as E
from finops.router.artifact import load_router
from finops.router.calibrate import calibrate, losses, route_indices
from finops.router.train import train

TIERS = ["small", "mid", "large"]


def rule_rows(n: int, seed: int) -> list[dict]:
    """A learnable rule: the verb decides the tier; fillers overlap across tiers."""
    rng = np.random.default_rng(seed)
    verbs = {0: ["reformat", "translate"], 1: ["summarize", "draft"], 2: ["prove", "audit"]}
    fill = [
        "the",
        "invoice",
        "order",
        "customer",
        "ticket",
        "code",
        "data",
        "report",
        "table",
        "please",
        "quickly",
    ]
    rows = []
    for _ in range(n):
        t = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        words = [str(rng.choice(verbs[t])), *rng.choice(fill, int(rng.integers(3, 30)))]
        rows.append({"prompt": " ".join(words), "label": TIERS[t], "feature": "f"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rule_artifact(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rule")
    ds = D.load_labeled(write_jsonl(tmp / "rule.jsonl", rule_rows(900, 1)))
    res = train(ds, tmp / "art", cv_folds=0, quality_target=0.9, confidence=0.9)
    return res, tmp


def test_learnable_rule_reaches_clear_auc(rule_artifact) -> None:
    res, _ = rule_artifact
    ev = res.evaluation
    assert min(ev["auc_per_tier"].values()) > 0.9, ev["auc_per_tier"]
    assert ev["routellm"]["apgr"] > ev["baselines"]["random"]["apgr"] + 0.1
    assert ev["accuracy"] > 0.85


def test_fast_scorer_matches_sklearn_on_many_rows(rule_artifact) -> None:
    _, tmp = rule_artifact
    router = load_router(tmp / "art")
    ds = D.load_labeled(write_jsonl(tmp / "fresh.jsonl", rule_rows(200, 7)))
    X = ds.features(True)
    via_sklearn = router.pipeline.predict_proba(X)
    fast = np.vstack([router.probabilities_for_row(r) for r in X.to_dicts()])
    np.testing.assert_allclose(fast, via_sklearn, atol=1e-9)


TRICKY_TEXTS = [
    "",
    "   \t\n ",
    "a",
    "I",
    "Translate  the\tinvoice\n\nplease",
    "TRANSLATE The Invoice",
    "nbsp\u00a0joined em\u2003space ideographic\u3000space",
    "\u0130stanbul STRASSE \u1e9e \u03a3\u039f\u03a3 caf\u00e9 cafe\u0301",
    "emoji \U0001f600\U0001f600 tabs\x0bvertical\x1cfile-sep\x1funit",
    "audit " + "x" * 300,
    "prove the code " * 40,
    "summarize, draft; reformat: translate! (audit) [prove]",
    # hundreds of distinct words: the word block sums its columns with one NumPy gather
    " ".join(f"w{i} x{i * 7 % 13}" for i in range(300)),
]


@pytest.mark.parametrize("piece_limit", [50_000, 0])
def test_fast_scorer_matches_sklearn_on_tricky_text(rule_artifact, piece_limit: int) -> None:
    """Word-by-word char n-grams equal sklearn's analyzer on odd whitespace, case and
    Unicode, cached or not (limit 0: nothing is kept), three times over (later passes
    partly cached; long texts of new words are scored whole while a few are learned)."""
    from finops.router import features as F
    from finops.router.artifact import _probe_frame

    _, tmp = rule_artifact
    router = load_router(tmp / "art")
    router._scorer._words = [{} for _ in router._scorer.hashed]
    router._scorer._columns = [{} for _ in router._scorer.hashed]
    router._scorer._word_limit = piece_limit
    router._scorer._column_limit = piece_limit
    rows = [
        F.extract(text=t, feature=f, tenant="acme")
        for t in TRICKY_TEXTS
        for f in ("f", "never-seen-feature")
    ]
    via_sklearn = router.pipeline.predict_proba(_probe_frame([router.as_served(r) for r in rows]))
    for _ in range(3):
        fast = np.vstack([router.probabilities_for_row(r) for r in rows])
        np.testing.assert_allclose(fast, via_sklearn, atol=1e-9)
    kept = sum(len(c) for c in router._scorer._words + router._scorer._columns)
    assert (kept > 0) == (piece_limit > 0)


def test_route_on_openai_bodies(rule_artifact) -> None:
    _, tmp = rule_artifact
    router = load_router(tmp / "art")
    chat = {"model": "auto", "messages": [{"role": "user", "content": "translate the table"}]}
    d = router.route(chat, feature="f")
    assert d.tier in router.tiers
    assert abs(sum(d.probabilities.values()) - 1) < 1e-9
    assert d.score == pytest.approx(d.cumulative[d.tier])
    hard = router.route({"prompt": "prove and audit the data report"}, feature="f")
    easy = router.route({"prompt": "reformat the invoice"}, feature="f")
    assert hard.probabilities["large"] > easy.probabilities["large"]
    assert router.tiers.index(hard.tier) >= router.tiers.index(easy.tier)
    assert any(c["name"] == "text" for c in router.feature_schema)


def test_conformal_threshold_meets_target_on_fresh_samples() -> None:
    """LTT guarantee: P(risk > alpha) <= delta; check the failure rate over many draws."""
    k, alpha, delta = 3, 0.05, 0.1

    def draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(size=(n, k)) * 2.0
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = np.array([rng.choice(k, p=pi) for pi in p])  # calibrated by construction
        q = (np.arange(k)[None, :] >= y[:, None]).astype(float)
        return E.cumulative(p), q

    rng = np.random.default_rng(0)
    big_cum, big_q = draw(60_000, rng)
    fails = 0
    trials = 30
    saved = []
    for s in range(trials):
        cum, q = draw(600, np.random.default_rng(100 + s))
        dec = calibrate(cum, q, quality_target=1 - alpha, confidence=1 - delta)
        risk = losses(big_q, route_indices(big_cum, dec["lambda"])).mean()
        fails += risk > alpha
        saved.append(1 - (route_indices(big_cum, dec["lambda"]) == k - 1).mean())
    # failures ~ Binomial(30, <=0.1): P(X >= 8) < 0.03
    assert fails <= 7, fails
    assert np.mean(saved) > 0.2  # and it is not trivially "always large"


def test_conformal_with_scores_uses_bounded_losses() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    p = rng.dirichlet(np.ones(3), size=n)
    q = np.clip(rng.normal(0.6, 0.2, size=(n, 3)) + np.array([0, 0.1, 0.3]), 0, 1)
    dec = calibrate(E.cumulative(p), q, quality_target=0.95, confidence=0.9)
    assert "Hoeffding-Bentkus" in dec["method"]
    if dec["lambda"] is not None:
        assert dec["calibration_loss"] <= 0.05


def test_trained_threshold_holds_on_fresh_data(rule_artifact) -> None:
    _, tmp = rule_artifact
    router = load_router(tmp / "art")
    ds = D.load_labeled(write_jsonl(tmp / "fresh2.jsonl", rule_rows(3000, 99)))
    proba = router.pipeline.predict_proba(ds.features(True))
    idx = route_indices(E.cumulative(proba), router.thresholds[0])
    loss = losses(ds.quality, idx).mean()
    assert loss <= 1 - router.quality_target + 0.01


def test_bad_rows_are_reported_with_location(tmp_path: Path) -> None:
    good = rule_rows(40, 3)
    lines = [json.dumps(r) for r in good]
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"prompt": "x", "label": "huge"}))
    lines.insert(7, json.dumps({"prompt": "x", "scores": {"small": 2, "mid": 0.1, "large": 1}}))
    lines.insert(9, json.dumps({"prompt": "x", "label": "small", "turn_count": -1}))
    lines.insert(11, json.dumps({"label": "small"}))
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ds = D.load_labeled(p)
    assert ds.frame.height == 40 and ds.read == 45 and len(ds.bad_rows) == 5
    msgs = [str(b) for b in ds.bad_rows]
    assert msgs[0].startswith(f"{p}:3: field '<line>'")
    assert f"{p}:6: field 'label': expected one of ['small', 'mid', 'large'], got 'huge'" in msgs
    assert any(f"{p}:8: field 'scores.small'" in m for m in msgs)
    assert any(f"{p}:10: field 'turn_count'" in m for m in msgs)
    assert any(f"{p}:12: field 'prompt'" in m for m in msgs)


def test_csv_and_parquet_loaders_and_scores(tmp_path: Path) -> None:
    csv_path = D.write_demo_labeled(tmp_path / "d.csv", 300, seed=2, scores=True)
    pq_path = D.write_demo_labeled(tmp_path / "d.parquet", 300, seed=2, scores=True)
    a = D.load_labeled(csv_path)
    b = D.load_labeled(pq_path)
    assert a.frame.height == b.frame.height == 300
    assert a.label_kind == "scores"
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.quality, b.quality)
    with open(csv_path, "a") as fh:
        fh.write("x,y\n")
    c = D.load_labeled(csv_path)
    last_line = len(csv_path.read_text().splitlines())  # quoted fields span lines
    assert len(c.bad_rows) == 1 and c.bad_rows[0].location == f"{csv_path}:{last_line}"
    assert c.bad_rows[0].got == "<2 cells>"
    assert "cells" in c.bad_rows[0].expected


def test_demo_set_is_deterministic_imbalanced_and_not_trivial(tmp_path: Path) -> None:
    a = D.demo_labeled_rows(3000, seed=5)
    assert a == D.demo_labeled_rows(3000, seed=5)
    assert a != D.demo_labeled_rows(3000, seed=6)
    labels = np.array([TIERS.index(r["label"]) for r in a])
    shares = np.bincount(labels, minlength=3) / len(labels)
    assert shares[0] > shares[1] > shares[2] > 0.08
    # length alone is a weak signal
    from sklearn.metrics import roc_auc_score

    lengths = [len(r.get("prompt") or json.dumps(r.get("messages"))) for r in a]
    assert roc_auc_score(labels == 2, lengths) < 0.8


def test_metadata_only_training_when_capture_off(tmp_path: Path) -> None:
    rows = D.demo_labeled_rows(1200, seed=4)
    for r in rows:
        text = r.pop("prompt", None) or json.dumps(r.pop("messages"))
        r["prompt_tokens"] = len(text) // 4
    ds = D.load_labeled(write_jsonl(tmp_path / "meta.jsonl", rows))
    assert not ds.has_text
    res = train(ds, tmp_path / "art", cv_folds=0, quality_target=0.9, confidence=0.9)
    router = load_router(tmp_path / "art")
    assert router.uses_prompt_text is False
    assert all(c["kind"] != "text" for c in router.feature_schema)
    assert res.evaluation["routellm"]["apgr"] > res.evaluation["baselines"]["random"]["apgr"]
    d = router.route({"messages": [{"role": "user", "content": "hi"}]}, feature="translate")
    assert d.tier in TIERS


def test_too_few_rows_for_a_tier_is_a_clear_error(tmp_path: Path) -> None:
    rows = [{"prompt": f"p {i}", "label": "small" if i % 2 else "mid"} for i in range(60)]
    rows[0]["label"] = "large"
    ds = D.load_labeled(write_jsonl(tmp_path / "thin.jsonl", rows))
    with pytest.raises(D.DataError, match=r"tier\(s\) \['large'\] have fewer than 10"):
        train(ds, None, cv_folds=0)


def test_training_on_judge_scores_uses_bounded_loss(tmp_path: Path) -> None:
    path = D.write_demo_labeled(tmp_path / "scores.jsonl", 900, seed=8, scores=True)
    ds = D.load_labeled(path)
    assert ds.label_kind == "scores" and not np.isin(ds.quality, (0.0, 1.0)).all()
    res = train(ds, None, cv_folds=0, quality_target=0.9, confidence=0.9)
    assert "Hoeffding-Bentkus" in res.decision["method"]
    at = res.evaluation["at_threshold"]
    assert 0 < at["quality_retained"] <= 1.0 + 1e-9


def test_overwrite_only_replaces_artifacts(rule_artifact, tmp_path: Path) -> None:
    res, _ = rule_artifact
    from finops.router.artifact import ArtifactError, write_artifact

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    kw = dict(
        tiers=TIERS,
        upstream_models={t: t for t in TIERS},
        decision=res.decision,
        uses_prompt_text=True,
        training_data={},
        evaluation={},
        drift={},
    )
    with pytest.raises(ArtifactError, match=r"not empty; choose a new directory$"):
        write_artifact(other, res.pipeline, **kw)  # not an artifact: no --force hint
    with pytest.raises(ArtifactError, match="not a router artifact"):
        write_artifact(other, res.pipeline, overwrite=True, **kw)
    assert (other / "keep.txt").read_text() == "mine"
    a = write_artifact(tmp_path / "a", res.pipeline, **kw)
    v1 = load_router(a).version
    with pytest.raises(ArtifactError, match=r"replace the router artifact there: --force"):
        write_artifact(a, res.pipeline, **kw)  # an artifact: the error says how to replace it
    write_artifact(a, res.pipeline, overwrite=True, created="2030-01-01T00:00:00Z", **kw)
    assert load_router(a).version != v1 and sorted(p.name for p in a.iterdir()) == [
        "manifest.json",
        "model.skops",
    ]


def test_token_id_prompts_count_their_tokens() -> None:
    """A pre-tokenized prompt is sized exactly, not read as empty."""
    from finops.router import features as F

    small = F.from_body({"prompt": [1, 2, 3]})
    big = F.from_body({"prompt": list(range(4000))})
    batch = F.from_body({"prompt": [[1, 2], [3, 4, 5]]})
    assert big["log_prompt_tokens"] == pytest.approx(np.log1p(4000))
    assert small["log_prompt_tokens"] == pytest.approx(np.log1p(3))
    assert batch["log_prompt_tokens"] == pytest.approx(np.log1p(5))
    assert F.from_body({"prompt": "x" * 40})["log_prompt_tokens"] == pytest.approx(np.log1p(10))
    assert F.token_id_count([1, "a"]) is None and F.token_id_count([]) is None


def test_fewer_than_three_tiers_refused_before_fitting(tmp_path: Path) -> None:
    """Two tiers used to train into an artifact that can never load (the scorer is
    multinomial); the tier list is refused before any file is read or model fitted."""
    with pytest.raises(D.DataError, match=r"expected 3\+ tiers.*'small,large'"):
        D.parse_tiers("small,large")
    with pytest.raises(D.DataError, match=r"3\+ tiers"):
        D.load_labeled(write_jsonl(tmp_path / "two.jsonl", rule_rows(30, 1)), tiers="a,b")
    with pytest.raises(D.DataError, match=r"3\+ tiers"):
        D.from_records(
            [("x:1", {"prompt": "p", "label": "a"})], tiers=["a", "b"], source="x", sha256=""
        )
    assert D.parse_tiers(" xs, s ,m,l ") == ["xs", "s", "m", "l"]


def test_unknown_upstream_tier_refused(tmp_path: Path) -> None:
    """`upstream={"lrage": ...}` (a typo) used to be ignored, leaving large on its default."""
    ds = D.load_labeled(write_jsonl(tmp_path / "u.jsonl", rule_rows(120, 2)))
    with pytest.raises(
        D.DataError, match=r"unknown tier\(s\) \['lrage'\].*\['small', 'mid', 'large'\]"
    ):
        train(ds, None, cv_folds=0, upstream={"lrage": "my-70b"})


def test_huge_numbers_are_row_errors(tmp_path: Path) -> None:
    """An int past 1e308 overflows float(): a bad row naming the field, not a traceback."""
    big = 10**400
    rows = rule_rows(20, 4)
    rows += [
        {"prompt": "x", "label": "small", "prompt_tokens": big},
        {"prompt": "x", "label": "small", "turn_count": big},
        {"prompt": "x", "scores": {"small": big, "mid": 0, "large": 1}},
        {"prompt": "x", "scores": {"small": 0, "mid": 0, "large": -big}},
    ]
    ds = D.load_labeled(write_jsonl(tmp_path / "big.jsonl", rows))
    assert ds.frame.height == 20 and ds.read == 24
    assert [(b.location.rsplit(":", 1)[1], b.field) for b in ds.bad_rows] == [
        ("21", "prompt_tokens"),
        ("22", "turn_count"),
        ("23", "scores.small"),
        ("24", "scores.large"),
    ]
    assert ds.bad_rows[0].expected == "a number >= 0" and ds.bad_rows[0].got.startswith("1000")


def test_overlong_integer_line_is_a_bad_row(tmp_path: Path) -> None:
    """json.loads raises plain ValueError (not JSONDecodeError) past 4300 digits."""
    p = write_jsonl(tmp_path / "digits.jsonl", rule_rows(20, 5))
    with open(p, "a") as fh:
        fh.write('{"prompt": "x", "label": "small", "prompt_tokens": ' + "9" * 5000 + "}\n")
        fh.write(json.dumps(rule_rows(1, 6)[0]) + "\n")
    ds = D.load_labeled(p)
    assert ds.frame.height == 21 and ds.read == 22 and len(ds.bad_rows) == 1
    b = ds.bad_rows[0]
    assert (b.location, b.field, b.expected) == (f"{p}:21", "<line>", "a JSON object")
    assert "4300 digits" in b.got and "set_int_max_str_digits" not in b.got


def test_lone_surrogates_are_row_errors(tmp_path: Path) -> None:
    """ "\\ud800" is valid JSON to Python but not UTF-8: the frame (and any writer) would
    fail on it, so each field that can carry it is a row error; the other rows load."""
    lines = [json.dumps(r) for r in rule_rows(20, 8)]
    lines += [
        '{"prompt": "hi \\ud800 there", "label": "small"}',
        '{"messages": [{"role": "user", "content": "a\\udfff"}], "label": "small"}',
        '{"prompt": "ok", "feature": "f\\ud800", "label": "small"}',
        '{"prompt": "ok", "tenant": "\\udc00", "label": "small"}',
        '{"prompt": "paired \\ud83d\\ude00 is fine", "label": "small"}',
    ]
    p = tmp_path / "sur.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ds = D.load_labeled(p)
    assert ds.frame.height == 21 and ds.read == 25
    assert [(b.location, b.field) for b in ds.bad_rows] == [
        (f"{p}:21", "prompt"),
        (f"{p}:22", "messages"),
        (f"{p}:23", "feature"),
        (f"{p}:24", "tenant"),
    ]
    assert ds.bad_rows[0].got == "<lone surrogate at character 3>"
    assert "\U0001f600" in ds.frame["text"][-1]


def test_route_never_raises_on_lone_surrogates(rule_artifact) -> None:
    """The shim parses bodies with Python's json; a lone surrogate must still be routed
    (as '?'), not fail the request inside the n-gram hashing."""
    from finops.router import features as F

    _, tmp = rule_artifact
    router = load_router(tmp / "art")
    body = json.loads('{"messages": [{"role": "user", "content": "audit \\ud800 the report"}]}')
    d = router.route(body, feature="f")
    want = router.route(
        {"messages": [{"role": "user", "content": "audit ? the report"}]}, feature="f"
    )
    assert d == want
    assert router.route(json.loads('{"prompt": "\\udfff"}')).tier in router.tiers
    long = "prove " * 500 + "\udfff"  # in the clipped tail, past the head
    assert F.extract(text=long)["text"].endswith("?") and len(F.extract(text=long)["text"]) == 1601


def test_undefined_figures_are_null_not_nan(tmp_path: Path) -> None:
    """No quality gap (every tier scores 1) leaves APGR undefined; it is None in the JSON
    (NaN is not JSON) and "n/a" in text, and training says why instead of failing."""
    weak = np.ones((50, 3))
    m = E.routellm_metrics(E.sweep(E.random_cumulative(50, 3, 0), weak), weak)
    assert m["apgr"] is None
    zero = np.zeros((50, 3))
    pts = E.sweep(E.random_cumulative(50, 3, 0), zero, np.zeros((50, 3)))
    assert all(p["quality_retained"] is None and p["cost_ratio"] is None for p in pts)
    assert E.baselines(weak, np.zeros(50, dtype=int), np.ones(50))["random"]["apgr"] is None
    rows = rule_rows(400, 9)
    for r in rows:
        r["scores"] = {t: 1 for t in TIERS}  # labels kept; scores say every tier is fine
    ds = D.load_labeled(write_jsonl(tmp_path / "flat.jsonl", rows))
    res = train(ds, tmp_path / "art", cv_folds=0)
    json.dumps(res.evaluation, allow_nan=False)
    assert res.evaluation["routellm"]["apgr"] is None
    assert any("APGR n/a" in n and "no quality gap" in n for n in res.evaluation["notes"])
    from finops.router.train import one_line

    assert "APGR n/a (length heuristic n/a, random n/a)" in one_line(res.evaluation, TIERS)
    assert load_router(tmp_path / "art").manifest["evaluation"]["routellm"]["apgr"] is None


def test_same_data_and_seed_give_the_same_model_file(tmp_path: Path) -> None:
    """saga shuffles with its own RNG, and skops names arrays by id() and stamps times: the
    seed now reaches the estimator and the file is written without addresses or times, so
    a retrain (even in another process) reproduces the model file's sha256 and probes."""
    import subprocess
    import sys

    from finops.router.artifact import MODEL_FILE

    data = write_jsonl(tmp_path / "d.jsonl", rule_rows(500, 11))
    ds = D.load_labeled(data)
    a = train(ds, tmp_path / "a", cv_folds=0, seed=3)
    b = train(ds, tmp_path / "b", cv_folds=0, seed=3)
    np.testing.assert_array_equal(a.test_proba, b.test_proba)
    code = (
        "import sys; from finops.router import data as D; from finops.router.train import train; "
        "train(D.load_labeled(sys.argv[1]), sys.argv[2], cv_folds=0, seed=3)"
    )
    subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "c")], check=True)
    ms = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in "abc"]
    assert len({m["files"][MODEL_FILE] for m in ms}) == 1
    assert ms[0]["probes"] == ms[1]["probes"] == ms[2]["probes"]
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "c" / MODEL_FILE).read_bytes()


def test_bom_and_invalid_utf8(tmp_path: Path) -> None:
    """A byte-order mark (Excel's "CSV UTF-8") used to become part of the first column's
    name (every CSV row refused) or break the first JSONL row; an invalid byte used to be
    replaced silently. Now the BOM is ignored and a bad byte is a row error at file:line."""
    rows = rule_rows(20, 4)
    js = tmp_path / "bom.jsonl"
    js.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    ds = D.load_labeled(js)
    assert ds.frame.height == 20 and ds.bad_rows == []
    csv_path = tmp_path / "excel.csv"
    body = "label,prompt,feature\n" + "".join(
        f"{r['label']},{r['prompt']},{r['feature']}\n" for r in rows
    )
    csv_path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    ds = D.load_labeled(csv_path)
    assert ds.frame.height == 20 and ds.bad_rows == []
    bad_js = tmp_path / "bad.jsonl"
    lines = [json.dumps(r).encode() for r in rows[:3]]
    lines.insert(1, b'{"prompt": "caf\xe9", "label": "small"}')  # Latin-1, not UTF-8
    bad_js.write_bytes(b"\n".join(lines) + b"\n")
    ds = D.load_labeled(bad_js)
    assert ds.frame.height == 3 and ds.read == 4
    (b,) = ds.bad_rows
    assert (b.location, b.field) == (f"{bad_js}:2", "<line>")
    assert b.got == "<invalid UTF-8 byte 0xe9 at character 15>"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(body.encode().replace(b"\n", b"\nsmall,caf\xe9,f\n", 1))
    ds = D.load_labeled(bad_csv)
    assert ds.frame.height == 20
    (b,) = ds.bad_rows
    assert (b.location, b.field) == (f"{bad_csv}:2", "prompt")
    assert "invalid UTF-8 byte 0xe9" in b.got


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "corrupt.parquet"
    p.write_bytes(b"PAR1garbage")
    with pytest.raises(D.DataError, match=rf"{p}: not a readable Parquet file"):
        D.load_labeled(p)


def test_min_calibration_rows_is_the_bound_calibrate_tests() -> None:
    """The needed count comes from calibrate's own p-value: with that many perfect rows a
    lambda is certified, with one fewer none is."""
    from finops.router.calibrate import min_calibration_rows

    need = min_calibration_rows(0.98, 0.95)
    assert need == 149
    cum = np.tile([1.0, 1.0, 1.0], (need, 1))
    q = np.ones((need, 3))
    assert calibrate(cum, q)["lambda"] is not None
    assert calibrate(cum[:-1], q[:-1])["lambda"] is None
    assert min_calibration_rows(0.9, 0.9, binary=False) == 22


def test_too_small_calibration_split_is_explained(tmp_path: Path) -> None:
    """600 rows train, but a 120-row calibration split cannot certify any threshold: the
    result, the manifest and the CLI say so and how many rows are needed."""
    from typer.testing import CliRunner

    from finops.cli import app

    data = write_jsonl(tmp_path / "d.jsonl", rule_rows(300, 12))
    res = train(D.load_labeled(data), tmp_path / "a", cv_folds=0)
    assert res.decision["lambda"] is None
    (note,) = [n for n in res.evaluation["notes"] if "no threshold could be certified" in n]
    assert "the calibration split had 60 rows" in note and "at least 149" in note
    assert "label at least 745 rows" in note
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert note in m["evaluation"]["notes"]
    r = CliRunner().invoke(
        app,
        ["router", "train", "--data", str(data), "--out", str(tmp_path / "b"), "--cv-folds", "0"],
    )
    assert r.exit_code == 0, r.output
    assert "note: no threshold could be certified" in r.output and "at least 149" in r.output
