"""Curve-fit regressors with the scikit-learn estimator API.

Serving throughput and latency follow known shapes, so a three-parameter
curve fitted with scipy extrapolates where a generic regressor cannot: the
point of these models is to answer "what happens at 5x the load we have seen".
Both classes take plain constructor parameters, learn attributes ending in
`_`, and work with `sklearn.base.clone`, pipelines and cross-validation.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data


def hill(x: np.ndarray, vmax: float, k: float, h: float) -> np.ndarray:
    """vmax * x^h / (k^h + x^h): Michaelis-Menten when h = 1."""
    x = np.maximum(np.asarray(x, dtype=float), 0.0)
    xh = np.power(x, h)
    return vmax * xh / (np.power(k, h) + xh)


MIN_LOAD_RATIO = 1.5  # busiest over quietest busy window (95th/5th percentile) a fit needs


def check_load_spread(x: np.ndarray, who: str, what: str = "load") -> None:
    """Raise ValueError unless the load column spans more than one load level.

    Why: at a single load level every ceiling fits the points equally well, so
    a curve fit would invent one (and a small held-out error would vouch for
    it). The 5th-95th percentile of the non-zero loads must differ by
    MIN_LOAD_RATIO, so one stray window does not count as a second level.
    """
    x = np.asarray(x, dtype=float)
    pos = x[x > 0]
    lo, hi = (float(q) for q in np.quantile(pos, [0.05, 0.95])) if pos.size else (0.0, 0.0)
    if pos.size < 2 or hi < MIN_LOAD_RATIO * lo:
        span = f"{x.min():.4g}-{x.max():.4g}" if x.size else "nothing"
        raise ValueError(
            f"{who} needs windows at more than one load level: {what} spans {span} "
            f"(5th-95th percentile of the non-idle windows {lo:.4g}-{hi:.4g}); the busiest "
            f"must reach {MIN_LOAD_RATIO}x the quietest to show where the curve bends"
        )


class SaturatingRegressor(RegressorMixin, BaseEstimator):
    """Throughput that saturates with offered load (a Hill / Michaelis-Menten curve).

    The first column of X is the load (concurrency or request rate); further
    columns (e.g. mean prompt and output lengths) scale the ceiling `vmax`
    log-linearly: vmax_i = vmax * prod((x_ij / ref_j) ** coef_j). A batch of
    longer sequences saturates at fewer tokens/s; the coefficients say by how much.

    Parameters
    ----------
    hill_exponent : bool
        Fit the Hill exponent h; False fixes h = 1 (Michaelis-Menten).
    relative_loss : bool
        Minimise relative rather than absolute residuals (what MAPE measures).
    """

    def __init__(self, hill_exponent: bool = True, relative_loss: bool = False) -> None:
        self.hill_exponent = hill_exponent
        self.relative_loss = relative_loss

    def _predict_params(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        log_vmax, log_k, log_h = params[:3]
        h = np.exp(log_h) if self.hill_exponent else 1.0
        vmax = np.exp(log_vmax)
        if X.shape[1] > 1:
            z = np.log(np.maximum(X[:, 1:], 1e-9) / self.covariate_ref_)
            vmax = vmax * np.exp(z @ params[3:])
        return hill(X[:, 0], 1.0, np.exp(log_k), h) * vmax

    def fit(self, X: np.ndarray, y: np.ndarray) -> SaturatingRegressor:
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        if X.shape[0] < 3 + (X.shape[1] - 1):
            raise ValueError(
                f"SaturatingRegressor needs at least {3 + X.shape[1] - 1} samples, got {X.shape[0]}"
            )
        if np.any(X < 0) or np.any(y < 0):
            raise ValueError("SaturatingRegressor expects non-negative load and throughput")
        check_load_spread(X[:, 0], "SaturatingRegressor")
        self.covariate_ref_ = (
            np.exp(np.log(np.maximum(X[:, 1:], 1e-9)).mean(axis=0))
            if X.shape[1] > 1
            else np.ones(0)
        )
        x0 = X[:, 0]
        pos = x0[x0 > 0]
        k0 = float(np.median(pos)) if pos.size else 1.0
        start = np.concatenate(
            [[np.log(max(y.max(), 1e-9) * 1.5), np.log(k0), 0.0], np.zeros(X.shape[1] - 1)]
        )
        scale = np.abs(y) + max(float(np.mean(np.abs(y))) * 0.05, 1e-9)

        def resid(p: np.ndarray) -> np.ndarray:
            r = self._predict_params(p, X) - y
            return r / scale if self.relative_loss else r

        lo = np.concatenate([[-50, -50, np.log(0.2)], np.full(X.shape[1] - 1, -5.0)])
        hi = np.concatenate([[50, 50, np.log(8.0)], np.full(X.shape[1] - 1, 5.0)])
        sol = least_squares(resid, start, bounds=(lo, hi), x_scale="jac", max_nfev=5000)
        self.params_ = sol.x
        self.vmax_ = float(np.exp(sol.x[0]))
        self.k_ = float(np.exp(sol.x[1]))
        self.hill_ = float(np.exp(sol.x[2])) if self.hill_exponent else 1.0
        self.coef_ = sol.x[3:].copy()
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "params_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self._predict_params(self.params_, X)

    def ceiling(self, covariates: np.ndarray | None = None) -> float:
        """The saturation throughput (load -> infinity) at the given covariates."""
        check_is_fitted(self, "params_")
        if covariates is None or len(self.coef_) == 0:
            return self.vmax_
        z = np.log(np.maximum(np.asarray(covariates, float), 1e-9) / self.covariate_ref_)
        return float(self.vmax_ * np.exp(z @ self.coef_))


class StepTimeRegressor(RegressorMixin, BaseEstimator):
    """Decode step time vs running sequences, s(n) = a + b * n (robust linear fit).

    Why: a continuous-batching engine emits one token per running sequence per
    step, so throughput is T(n) = n / s(n) = (1/b) * n / (a/b + n): the
    Michaelis-Menten curve with vmax = 1/b and k = a/b. vLLM measures s(n)
    directly (the inter-token-latency histogram), window by window, and a line
    through those points pins the ceiling far better than a curve through noisy
    tokens/s at light load, where T(n) is nearly linear and says little about
    where it bends. The Huber loss keeps a window stretched by a prefill burst
    from tilting the line.

    X has one column: mean running sequences per window; y: mean step time (s).
    `sample_weight` (e.g. tokens per window) weights the better-measured windows.
    """

    def __init__(self, huber_scale: float = 1.5) -> None:
        self.huber_scale = huber_scale

    def fit(
        self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> StepTimeRegressor:
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        if X.shape[1] != 1:
            raise ValueError(f"StepTimeRegressor takes one load column, got {X.shape[1]}")
        if X.shape[0] < 3:
            raise ValueError(f"StepTimeRegressor needs at least 3 samples, got {X.shape[0]}")
        if np.any(y <= 0) or np.any(X < 0):
            raise ValueError("StepTimeRegressor expects positive step times and non-negative load")
        x = X[:, 0]
        check_load_spread(x, "StepTimeRegressor")
        w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, float)
        if w.shape != y.shape or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("sample_weight must be non-negative, one per sample, not all zero")
        sw = np.sqrt(w / w.mean())
        ys = float(np.median(y))  # work in units of the typical step: well-conditioned
        b0, a0 = np.polyfit(x, y / ys, 1, w=sw)
        mad = float(np.median(np.abs(y / ys - (a0 + b0 * x)))) * 1.4826
        sol = least_squares(
            lambda p: sw * (p[0] + p[1] * x - y / ys),
            [max(a0, 1e-6), max(b0, 1e-6)],
            bounds=([1e-9, 1e-9], [np.inf, np.inf]),
            loss="huber",
            f_scale=max(self.huber_scale * mad, 1e-6),
        )
        self.intercept_ = float(sol.x[0] * ys)
        self.slope_ = float(sol.x[1] * ys)
        self.vmax_ = 1.0 / self.slope_
        self.k_ = self.intercept_ / self.slope_
        self.hill_ = 1.0
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The step time (s) at the given running sequences."""
        check_is_fitted(self, "slope_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.intercept_ + self.slope_ * np.maximum(X[:, 0], 0.0)

    def throughput(self, n: np.ndarray) -> np.ndarray:
        """Generation tokens/s with `n` running sequences: n / s(n)."""
        check_is_fitted(self, "slope_")
        n = np.maximum(np.asarray(n, dtype=float), 0.0)
        return n / (self.intercept_ + self.slope_ * n)


class LoadLatencyRegressor(RegressorMixin, BaseEstimator):
    """Latency that grows with load: y = t0 + a * x^p (fitted on relative error).

    Latencies span orders of magnitude between idle and busy hours, so the fit
    minimises relative residuals; `p` > 1 captures the queueing knee.
    X has one column: the load (e.g. requests running+waiting per replica).
    """

    def __init__(self, max_exponent: float = 8.0) -> None:
        self.max_exponent = max_exponent

    def fit(self, X: np.ndarray, y: np.ndarray) -> LoadLatencyRegressor:
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        if X.shape[1] != 1:
            raise ValueError(f"LoadLatencyRegressor takes one load column, got {X.shape[1]}")
        if X.shape[0] < 3:
            raise ValueError(f"LoadLatencyRegressor needs at least 3 samples, got {X.shape[0]}")
        if np.any(y <= 0):
            raise ValueError("LoadLatencyRegressor expects positive latencies")
        x = np.maximum(X[:, 0], 0.0)
        xs = max(float(np.max(x)), 1e-9)
        self.load_scale_ = xs

        def f(p: np.ndarray) -> np.ndarray:
            return np.exp(p[0]) + np.exp(p[1]) * np.power(x / xs, p[2])

        start = np.array([np.log(np.min(y)), np.log(max(np.max(y) - np.min(y), 1e-9)), 2.0])
        sol = least_squares(
            lambda p: (f(p) - y) / y,
            start,
            bounds=([-30, -30, 0.1], [30, 30, self.max_exponent]),
            max_nfev=5000,
        )
        self.t0_ = float(np.exp(sol.x[0]))
        self.a_ = float(np.exp(sol.x[1]))
        self.exponent_ = float(sol.x[2])
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "t0_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        x = np.maximum(X[:, 0], 0.0)
        return self.t0_ + self.a_ * np.power(x / self.load_scale_, self.exponent_)


def mape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute percentage error over rows with a non-zero truth (as a fraction)."""
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    ok = np.abs(y_true) > 1e-12
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(y_pred[ok] - y_true[ok]) / np.abs(y_true[ok])))
