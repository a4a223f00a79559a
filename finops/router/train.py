"""Train, calibrate, evaluate and export a router in one call (the CLI and notebook use it).

Splits the labeled set (stratified) into train / calibration / test. The model is fitted
on train only; the calibration split picks the threshold (see `calibrate`) and stores the
drift reference; the test split gives the evaluation figures in the manifest, so every
number in an artifact was measured on requests the model and the threshold never saw.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from finops.router import evaluate as E
from finops.router.artifact import (
    TRAINING_ROWS_FILE,
    Router,
    check_out_dir,
    load_router,
    training_rows_bytes,
    write_artifact,
)
from finops.router.calibrate import calibrate, min_calibration_rows, route_indices
from finops.router.data import DataError, LabeledData, parse_tiers
from finops.router.model import build_pipeline

DEFAULT_UPSTREAM = {
    "small": "llama-3.2-1b-instruct",
    "mid": "llama-3.1-8b-instruct",
    "large": "llama-3.1-70b-instruct",
}


@dataclass
class TrainResult:
    router: Router | None
    pipeline: Any
    decision: dict[str, Any]
    evaluation: dict[str, Any]
    drift: dict[str, Any]
    uses_text: bool
    test_proba: np.ndarray
    test: LabeledData
    path: Path | None
    cal_proba: np.ndarray | None = None
    cal: LabeledData | None = None


def _split(labels: np.ndarray, seed: int, fractions: tuple[float, float]) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=labels, random_state=seed)
    cal_share = fractions[1] / (1.0 - fractions[0])
    cal, test = train_test_split(
        rest, train_size=cal_share, stratify=labels[rest], random_state=seed + 1
    )
    return train, cal, test


def _fit(pipeline: Any, X: pl.DataFrame, y: np.ndarray) -> list[str]:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipeline.fit(X, y)
    return sorted({str(w.message)[:120] for w in caught if w.category is ConvergenceWarning})


def cross_validate(data: LabeledData, uses_text: bool, folds: int = 3, seed: int = 0) -> dict:
    """k-fold scores of the calibrated pipeline on (a subset of) the training rows."""
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    X = data.features(uses_text)
    y = data.labels
    acc, ll, auc = [], [], []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        np.zeros(len(y)), y
    ):
        p = build_pipeline(uses_text, seed=seed)
        _fit(p, X[tr], y[tr])
        pr = p.predict_proba(X[te])
        acc.append(float((pr.argmax(1) == y[te]).mean()))
        ll.append(float(log_loss(y[te], pr, labels=list(range(len(data.tiers))))))
        cum = E.cumulative(pr)
        auc.append(float(roc_auc_score(y[te] == 0, cum[:, 0])))
    return {
        "folds": folds,
        "accuracy": acc,
        "log_loss": ll,
        f"auc_needed_<=_{data.tiers[0]}": auc,
        "accuracy_mean": float(np.mean(acc)),
        "log_loss_mean": float(np.mean(ll)),
    }


def train(
    data: LabeledData,
    out: str | os.PathLike[str] | None = None,
    *,
    upstream: Mapping[str, str] | None = None,
    quality_target: float = 0.98,
    confidence: float = 0.95,
    text: str = "auto",
    seed: int = 0,
    cv_folds: int = 3,
    lake: str | os.PathLike[str] | None = None,
    prices: str | os.PathLike[str] | None = None,
    fractions: tuple[float, float] = (0.6, 0.2),
    overwrite: bool = False,
) -> TrainResult:
    """Fit, calibrate to `quality_target` at `confidence`, evaluate, and export to `out`."""
    tiers = parse_tiers(data.tiers)  # 3+ tiers, refused before any fitting
    unknown = sorted(set(upstream or {}) - set(tiers))
    if unknown:  # a typo (lrage=...) would otherwise leave that tier on its default model
        raise DataError(f"--upstream: unknown tier(s) {unknown}; the tiers are {tiers}")
    if lake is not None and not Path(lake).exists():  # a typo must not price from the catalog
        raise DataError(f"{lake}: no lake here")
    if out is not None:
        check_out_dir(out, overwrite=overwrite)
    if text not in ("auto", "on", "off"):
        raise DataError(f"text must be auto, on or off, got {text!r}")
    if cv_folds < 0 or cv_folds == 1:  # 1 used to switch cross-validation off silently
        raise DataError(f"--cv-folds must be 0 (no cross-validation) or >= 2, got {cv_folds}")
    if text == "on" and not data.has_text:
        raise DataError(f"{data.source}: --text on, but not every row has prompt text")
    uses_text = data.has_text if text == "auto" else text == "on"
    counts = np.bincount(data.labels, minlength=len(tiers))
    thin = [t for t, c in zip(tiers, counts, strict=True) if c < 10]
    if thin:
        raise DataError(
            f"{data.source}: tier(s) {thin} have fewer than 10 labeled rows "
            f"(counts {dict(zip(tiers, counts.tolist(), strict=True))}); need examples of every tier"
        )
    up = {t: (upstream or {}).get(t) or DEFAULT_UPSTREAM.get(t, t) for t in tiers}
    # before fitting: a tier order the prices contradict is refused in a second
    price = E.tier_token_prices(tiers, lake=lake, prices=prices)
    order_notes = check_price_order(price, tiers)
    tr, cal, te = _split(data.labels, seed, fractions)
    X = data.features(uses_text)
    y = data.labels
    if cv_folds >= 2:
        _check_cv_folds(cv_folds, y[tr], tiers, fractions[0])
    cv = cross_validate(data.take(tr), uses_text, cv_folds, seed) if cv_folds >= 2 else None
    pipeline = build_pipeline(uses_text, seed=seed)
    conv = _fit(pipeline, X[tr], y[tr])
    p_cal = pipeline.predict_proba(X[cal])
    p_test = pipeline.predict_proba(X[te])
    Q = data.quality
    decision = calibrate(
        E.cumulative(p_cal), Q[cal], quality_target=quality_target, confidence=confidence
    )
    lam = decision["lambda"]
    decision["thresholds"] = {t: lam for t in tiers[:-1]}
    test = data.take(te)
    evaluation = evaluate_split(p_test, test, lam, price=price)
    evaluation["notes"][:0] = order_notes
    if lam is None:
        evaluation["notes"].append(
            _uncertified_note(decision, len(cal), fractions[1], quality_target, confidence)
        )
    if cv is not None:
        evaluation["cross_validation"] = cv
    if conv:
        evaluation["convergence_warnings"] = conv
    drift = drift_reference(p_cal, lam, tiers)
    summary = data.summary()
    summary["splits"] = {"train": len(tr), "calibration": len(cal), "test": len(te), "seed": seed}
    summary["bad_row_examples"] = [str(b) for b in data.bad_rows[:5]]
    summary["notes"] = data.notes
    fitted = np.concatenate([tr, cal])
    rows_file = training_rows_bytes(data.frame["row_hash"].to_numpy()[fitted])
    summary["row_fingerprint"] = {
        "file": TRAINING_ROWS_FILE,
        "rows": len(fitted),
        "splits": ["train", "calibration"],
        "key": "data.row_hash: sha256 (first 8 bytes, uint64) of the request_id, else the "
        "whitespace-collapsed prompt text, else the metadata features",
    }
    path = None
    router = None
    if out is not None:
        path = write_artifact(
            out,
            pipeline,
            tiers=tiers,
            upstream_models=up,
            decision=decision,
            uses_prompt_text=uses_text,
            training_data=summary,
            evaluation=evaluation,
            drift=drift,
            extra_files={TRAINING_ROWS_FILE: rows_file},
            overwrite=overwrite,
        )
        router = load_router(path)
    return TrainResult(
        router,
        pipeline,
        decision,
        evaluation,
        drift,
        uses_text,
        p_test,
        test,
        path,
        p_cal,
        data.take(cal),
    )


def check_price_order(price: Mapping[str, Any], tiers: list[str]) -> list[str]:
    """Refuse tiers the catalog prices say are not cheapest first; notes for lake prices.

    Routing sends a request to the first tier good enough for it, so a reversed --tiers
    (large,mid,small) trains a router that "saves" by picking the dearest tier. Catalog
    prices are assumptions that fix the order, so a contradiction is an error. Lake
    prices are measured with idle GPU time included, so an under-used pool can cost more
    per token than the next tier up in a correct order: that is a note, not an error.
    """
    pin, pout = price["usd_per_input_token"], price["usd_per_output_token"]
    bad = [(a, b) for a, b in itertools.pairwise(tiers) if pin[a] > pin[b] or pout[a] > pout[b]]
    if not bad:
        return []

    def usd(t: str) -> str:
        return f"${pin[t]:.3g}/input token, ${pout[t]:.3g}/output token"

    pairs = "; ".join(
        f"{a!r} ({usd(a)}) costs more than the next tier {b!r} ({usd(b)})" for a, b in bad
    )
    source = str(price["source"])
    if not source.startswith("lake ") and "by position" not in source:
        by_price = sorted(tiers, key=lambda t: (pin[t] + pout[t], tiers.index(t)))
        raise DataError(
            f"--tiers {','.join(tiers)}: expected tiers cheapest first, but {pairs} "
            f"(prices from {price['source']}); list them cheapest first, e.g. "
            f"--tiers {','.join(by_price)}"
        )
    if not source.startswith("lake "):  # tiers named unlike the assumed deployments
        return [
            f"tier order: --tiers {','.join(tiers)} must be cheapest first, but the price "
            f"catalog, with the assumed deployments taken by position, says {pairs}; check "
            "the order, or price the tiers from a lake (--lake)"
        ]
    return [
        f"tier order: --tiers {','.join(tiers)} must be cheapest first, but in the lake's "
        f"measured prices {pairs}; check the order (idle GPU time is included, so an "
        "under-used pool can cost more per token than the next tier up)"
    ]


def _check_cv_folds(folds: int, y_fit: np.ndarray, tiers: list[str], fit_share: float) -> None:
    """Refuse more folds than the fitting split's rarest tier has rows, naming --cv-folds.

    Stratified k-fold needs a row of every tier in each fold; scikit-learn's own error
    ("n_splits=10 cannot be greater than the number of members in each class") names
    neither the option nor the counts, and fewer rows than folds only warns.
    """
    counts = np.bincount(y_fit, minlength=len(tiers))
    smallest = int(counts.min())
    if folds > smallest:
        rarest = tiers[int(counts.argmin())]
        raise DataError(
            f"--cv-folds {folds}: the fitting split ({fit_share:.0%} of the rows, "
            f"{len(y_fit)}) has only {smallest} row(s) of tier {rarest!r} (counts "
            f"{dict(zip(tiers, counts.tolist(), strict=True))}), and every fold needs one "
            f"of each tier; use --cv-folds {smallest} or fewer (0 turns it off)"
        )


def _uncertified_note(
    decision: Mapping[str, Any], n_cal: int, cal_share: float, target: float, confidence: float
) -> str:
    """Why lambda is None (every request to the last tier, nothing saved), and what would help."""
    binary = decision["loss"].startswith("0/1")
    need = min_calibration_rows(target, confidence, binary)
    head = (
        f"no threshold could be certified (lambda=None: every request goes to the last tier, "
        f"so nothing is saved): the calibration split had {n_cal} rows"
    )
    if n_cal < need:
        return (
            f"{head}, and quality target {target:g} at {confidence:.0%} confidence needs at "
            f"least {need} (even with no request routed below its needed tier); with "
            f"{cal_share:.0%} of the rows for calibration, label at least "
            f"{math.ceil(need / cal_share)} rows"
        )
    return (
        f"{head} (>= the {need} the target needs), but even the strictest threshold lost too "
        "much quality on them; more labeled rows or a lower --quality-target would help"
    )


def drift_reference(proba: np.ndarray, lam: float | None, tiers: list[str]) -> dict[str, Any]:
    """Histograms of the calibration split's scores and its tier shares, for production to compare."""
    cum = E.cumulative(proba)
    idx = route_indices(cum, lam)
    score = cum[np.arange(len(idx)), idx]
    edges = np.linspace(0, 1, 21)
    return {
        "bins": [float(e) for e in edges],
        "score_histogram": np.histogram(score, edges)[0].tolist(),
        "p_cheapest_histogram": np.histogram(cum[:, 0], edges)[0].tolist(),
        "tier_shares": {
            t: float(s)
            for t, s in zip(tiers, np.bincount(idx, minlength=len(tiers)) / len(idx), strict=True)
        },
        "rows": len(idx),
        "note": "score = calibrated P(chosen tier is good enough) on the calibration split",
    }


def evaluate_split(
    proba: np.ndarray,
    data: LabeledData,
    lam: float | None,
    *,
    lake: str | os.PathLike[str] | None = None,
    prices: str | os.PathLike[str] | None = None,
    price: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """All evaluation figures of a router's probabilities on a labeled split.

    `price`: per-tier token prices already looked up (`tier_token_prices`), else they
    are looked up from `lake` / `prices`.
    """
    tiers = data.tiers
    Q = data.quality
    y = data.labels
    cum = E.cumulative(proba)
    if price is None:
        price = E.tier_token_prices(tiers, lake=lake, prices=prices)
    price = dict(price)
    out_tok = data.frame["output_tokens"].fill_null(0.0).to_numpy()
    cost = E.cost_matrix(data.frame["input_tokens"].to_numpy(), out_tok, price, tiers)
    curve = E.sweep(cum, Q, cost)
    metrics = E.routellm_metrics(curve, Q)
    notes = []
    no_out = int(data.frame["output_tokens"].null_count())
    if no_out:
        # a missing count is priced as 0 output tokens, which changes every dollar figure
        notes.append(
            f"dollar figures count prompt tokens only for {no_out} of {len(y)} rows: they "
            "have no output_tokens, so their output tokens (priced higher than input "
            "tokens) are left out of the costs and savings; add output_tokens to the "
            "labeled rows to count them"
        )
    if metrics["apgr"] is None:
        notes.append(
            f"APGR n/a: always-{tiers[0]} is as good as always-{tiers[-1]} on these "
            f"{len(y)} requests (mean quality {metrics['weak_quality']:.3f} vs "
            f"{metrics['strong_quality']:.3f}), so there is no quality gap to recover"
        )
    if metrics["strong_quality"] <= 0:
        notes.append(
            f"quality retained n/a: tier {tiers[-1]!r} has mean quality 0 on these "
            f"{len(y)} requests (check the labels or scores)"
        )
    at = E.sweep(cum, Q, cost, grid=[lam])[0] if lam is not None else curve[-1]
    all_large = float(cost[:, -1].sum())
    saved = all_large - at["cost"]
    return {
        "rows": len(y),
        **E.classification_report(proba, y, tiers),
        "calibration": E.calibration_report(proba, y),
        "routellm": metrics,
        "baselines": E.baselines(Q, y, data.frame["log_prompt_tokens"].to_numpy(), cost),
        "at_threshold": {
            "lambda": lam,
            "shares": {t: s for t, s in zip(tiers, at["shares"], strict=True)},
            "quality_retained": at["quality_retained"],
            "quality_loss": at["loss"],
            "cost_usd": at["cost"],
            "all_large_cost_usd": all_large,
            "saved_usd": saved,
            "saved_pct": saved / all_large if all_large else 0.0,
        },
        "prices": price,
        "curve": [
            {
                k: v
                for k, v in p.items()
                if k in ("lambda", "share_large", "quality_retained", "cost_ratio", "shares")
            }
            for p in [*curve[::5], curve[-1]]
        ],
        "output_tokens_missing": int(data.frame["output_tokens"].null_count()),
        "notes": notes,
    }


def one_line(evaluation: Mapping[str, Any], tiers: list[str], *, held_out: bool = True) -> str:
    """The headline of an evaluation, e.g. for `make demo`.

    `held_out=False` when the rows include the artifact's own training rows (`evaluate`
    on its training file): the figures are then optimistic and must not be called held-out.
    """
    at = evaluation["at_threshold"]
    rows = (
        "held-out requests"
        if held_out
        else "requests that include the artifact's training rows (optimistic, not held-out)"
    )
    m = evaluation["routellm"]
    shares = " ".join(f"{t}={at['shares'][t]:.0%}" for t in tiers)
    return (
        f"router: accuracy {evaluation['accuracy']:.2f}, APGR {_num(m['apgr'])} "
        f"(length heuristic {_num(evaluation['baselines']['length']['apgr'])}, random "
        f"{_num(evaluation['baselines']['random']['apgr'])}), CPT50 {_pct(m['cpt50'])} CPT80 "
        f"{_pct(m['cpt80'])}; at lambda={at['lambda']}: {shares}; "
        + E.dollars_line(
            at["saved_usd"], at["saved_pct"], at["quality_retained"], f"all on {tiers[-1]}"
        )
        + f" on {evaluation['rows']} {rows}"
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
