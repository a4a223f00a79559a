"""Thresholds calibrated to a quality target with a stated confidence.

The decision rule has one knob, lambda: route to the cheapest tier t whose calibrated
P(needed tier <= t) >= lambda. A larger lambda sends more traffic up the tiers.

Quality loss of a request = quality with the large tier minus quality with the tier it
was routed to (clipped to [0, 1]); with plain labels it is 1 when the request was sent
below the tier it needed. Target: mean loss <= alpha = 1 - quality_target.

The target is ABSOLUTE, in quality-score units on the 0-1 scale, not a fraction of the
large tier's quality: mean loss <= 0.02 is "quality >= 98% of the all-large baseline"
only when the large tier's mean quality is 1 (plain labels, where the large tier always
succeeds). With judge scores where the large tier averages 0.5, the same 0.02 is a 4%
relative loss. The guarantee text says so and the manifest records, in
`guarantee_terms`, the bound with the calibration split's mean large-tier quality so a
reader can convert (relative loss bound ~= max_loss / mean large quality, at the
calibration mean; that conversion is an estimate, not part of the guarantee).

(A relative target can be tested with the same machinery, via the bounded loss
loss + alpha * (1 - q_large) whose mean is <= alpha iff mean loss <= alpha * mean
q_large; it is valid but the p-values lose most of their power when the large tier's
quality is well below 1 (everything goes to the large tier), so it is not used.)

Method (Learn-then-Test, Angelopoulos, Bates et al. 2021, "risk-controlling prediction
sets" style): on a held-out calibration split that the model never saw, test the null
"risk(lambda) > alpha" for lambda = 1.0, 0.995, ... downwards (fixed-sequence testing),
with an exact binomial p-value for 0/1 losses or the Hoeffding-Bentkus p-value for
losses in [0, 1]; stop at the first lambda that cannot be rejected at level delta and
keep the last rejected one. Guarantee: with probability >= 1 - delta over the draw of
the calibration set, the expected quality loss on new requests from the same
distribution is <= alpha. `method="crc"` gives conformal risk control's guarantee in
expectation instead (E[loss] <= alpha), for comparison.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

GRID = np.round(np.linspace(1.0, 0.0, 201), 6)


def route_indices(cum: np.ndarray, lam: float | None) -> np.ndarray:
    """Tier index per row: the cheapest t < K-1 with cum[:, t] >= lam, else the last."""
    k = cum.shape[1]
    if lam is None:
        return np.full(cum.shape[0], k - 1)
    ok = cum[:, :-1] >= lam
    return np.where(ok.any(axis=1), ok.argmax(axis=1), k - 1)


def losses(quality: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-request quality loss vs serving everything with the last (largest) tier."""
    got = quality[np.arange(len(idx)), idx]
    return np.clip(quality[:, -1] - got, 0.0, 1.0)


def _h1(a: float, b: float) -> float:
    a = min(max(a, 1e-12), 1 - 1e-12)
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def p_value(loss: np.ndarray, alpha: float, binary: bool) -> float:
    """p-value of H0: E[loss] > alpha given these calibration losses."""
    n = len(loss)
    r = float(loss.mean())
    if binary:
        return float(stats.binom.cdf(round(float(loss.sum())), n, alpha))
    hoeffding = math.exp(-n * _h1(min(r, alpha), alpha))
    bentkus = math.e * float(stats.binom.cdf(math.ceil(float(loss.sum()) - 1e-9), n, alpha))
    return min(hoeffding, bentkus, 1.0)


def min_calibration_rows(quality_target: float, confidence: float, binary: bool = True) -> int:
    """Fewest calibration rows that can certify any lambda (if none of them has a loss).

    Found with `p_value` itself, so it is the bound `calibrate` tests: below this many
    rows even a flawless calibration split cannot reject "risk > alpha" at level delta,
    and the decision is lambda=None (everything to the last tier).
    """
    alpha, delta = 1.0 - quality_target, 1.0 - confidence
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))  # (1 - alpha)^n <= delta
    while p_value(np.zeros(n), alpha, binary) > delta:
        n += 1
    while n > 1 and p_value(np.zeros(n - 1), alpha, binary) <= delta:
        n -= 1
    return n


def calibrate(
    cum: np.ndarray,
    quality: np.ndarray,
    *,
    quality_target: float = 0.98,
    confidence: float = 0.95,
    method: str = "ltt",
    grid: np.ndarray = GRID,
) -> dict[str, Any]:
    """Pick lambda on the calibration split; returns the decision section of the manifest."""
    if not 0 < quality_target < 1 or not 0 < confidence < 1:
        raise ValueError("quality_target and confidence must be in (0, 1)")
    alpha = 1.0 - quality_target
    delta = 1.0 - confidence
    n = cum.shape[0]
    binary = bool(np.isin(quality, (0.0, 1.0)).all())
    large_q = float(quality[:, -1].mean()) if n else 0.0
    large_always_1 = bool(n and (quality[:, -1] == 1.0).all())
    chosen: float | None = None
    risk_at = None
    for lam in grid:
        loss = losses(quality, route_indices(cum, float(lam)))
        r = float(loss.mean())
        if method == "ltt":
            ok = p_value(loss, alpha, binary) <= delta
        elif method == "crc":
            ok = (n * r + 1.0) / (n + 1) <= alpha
        else:
            raise ValueError(f"method must be 'ltt' or 'crc', got {method!r}")
        if not ok:
            break
        chosen, risk_at = float(lam), r
    idx = route_indices(cum, chosen)
    shares = np.bincount(idx, minlength=cum.shape[1]) / max(1, n)
    bound = (
        f"mean quality loss vs routing everything to the large tier <= {alpha:.3g} "
        "(absolute, in quality-score units on the 0-1 scale)"
    )
    scope = (
        f"on traffic like the {n}-request calibration split, whose large tier always "
        f"succeeded, so quality >= {quality_target:.1%} of the all-large baseline"
        if large_always_1
        else f"on traffic like the {n}-request calibration split, whose mean large-tier "
        f"quality is {large_q:.3f} (at that level, a relative loss of about "
        f"{alpha / large_q:.1%})"
        if large_q > 0
        else f"on traffic like the {n}-request calibration split (its large tier never succeeded)"
    )
    guarantee = (
        f"with {confidence:.0%} confidence, {bound}, {scope}"
        if method == "ltt"
        else f"in expectation (conformal risk control), {bound}, {scope}"
    )
    return {
        "rule": "cheapest tier t with P(needed tier <= t) >= lambda; else the last tier",
        "lambda": chosen,
        "quality_target": quality_target,
        "confidence": confidence,
        "alpha": alpha,
        "method": {
            "ltt": "learn-then-test, fixed-sequence, "
            + ("exact binomial" if binary else "Hoeffding-Bentkus")
            + " p-values",
            "crc": "conformal risk control (expectation)",
        }[method],
        "loss": "0/1 (routed below the needed tier)" if binary else "quality drop vs large, [0,1]",
        "calibration_rows": n,
        "calibration_loss": risk_at if chosen is not None else 0.0,
        "calibration_shares": [float(s) for s in shares],
        "guarantee": guarantee,
        # machine-readable form of `guarantee`; `quality_target` and `alpha` stay for readers
        "guarantee_terms": {
            "kind": "absolute_mean_quality_loss",
            "statement": "E[clip(q_large - q_routed, 0, 1)] <= max_loss",
            "max_loss": round(alpha, 12),
            "confidence": confidence if method == "ltt" else None,
            "holds": (
                "with probability >= confidence over the calibration draw"
                if method == "ltt"
                else "in expectation over the calibration draw"
            ),
            "calibration_rows": n,
            "calibration_mean_large_quality": large_q,
            "calibration_mean_loss": risk_at if chosen is not None else 0.0,
        },
    }
