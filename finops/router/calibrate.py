"""Thresholds calibrated to a quality target with a stated confidence.

The decision rule has one knob, lambda: route to the cheapest tier t whose calibrated
P(needed tier <= t) >= lambda. A larger lambda sends more traffic up the tiers.

Quality loss of a request = quality with the large tier minus quality with the tier it
was routed to (clipped to [0, 1]); with plain labels it is 1 when the request was sent
below the tier it needed. Target: mean loss <= alpha = 1 - quality_target.

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
    guarantee = (
        f"with {confidence:.0%} confidence, expected quality loss <= {alpha:.2%} "
        f"(quality >= {quality_target:.1%} of the all-large baseline) on traffic like the "
        f"{n}-request calibration split"
        if method == "ltt"
        else f"expected quality loss <= {alpha:.2%} (conformal risk control, in expectation)"
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
    }
