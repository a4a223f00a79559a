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


def check_load_spread(
    x: np.ndarray, who: str, what: str = "load", *, zero_is_a_level: bool = False
) -> None:
    """Raise ValueError unless the load column spans more than one load level.

    Why: at a single load level every ceiling fits the points equally well, so
    a curve fit would invent one (and a small held-out error would vouch for
    it). The 5th-95th percentile of the non-zero loads must differ by
    MIN_LOAD_RATIO, so one stray window does not count as a second level.
    `zero_is_a_level`: windows at load 0 count as a level too (a latency measured
    while the sampled gauges read no request is the unloaded latency); a throughput
    window at load 0 says nothing about the curve.
    """
    x = np.asarray(x, dtype=float)
    pos = x[x >= 0] if zero_is_a_level else x[x > 0]
    lo, hi = (float(q) for q in np.quantile(pos, [0.05, 0.95])) if pos.size else (0.0, 0.0)
    if pos.size < 2 or hi < MIN_LOAD_RATIO * lo or hi <= lo:
        span = f"{x.min():.4g}-{x.max():.4g}" if x.size else "nothing"
        which = "windows" if zero_is_a_level else "non-idle windows"
        raise ValueError(
            f"{who} needs windows at more than one load level: {what} spans {span} "
            f"(5th-95th percentile of the {which} {lo:.4g}-{hi:.4g}); the busiest "
            f"must reach {MIN_LOAD_RATIO}x the quietest to show where the curve bends"
        )


class SaturatingRegressor(RegressorMixin, BaseEstimator):
    """Throughput that saturates with offered load (a Hill / Michaelis-Menten curve).

    The first column of X is the load (concurrency or request rate); further
    columns (e.g. mean prompt and output lengths) scale the ceiling `vmax`
    log-linearly: vmax_i = vmax * prod((x_ij / ref_j) ** coef_j). A batch of
    longer sequences saturates at fewer tokens/s; the coefficients say by how much.

    Why a robust fit: one window whose rate is a counter artefact (a replica's
    generation counter jumping by millions in five minutes) is thousands of noise
    levels off the curve, and least squares bends the whole curve to reach it; with
    the load range far below the half-saturation point the ceiling then lands
    anywhere (1e11 tokens/s, or 2% of the true one). The fit is least squares with
    a redescending (arctan) loss: windows within ROBUST_SCALE noise levels of the
    curve count as in plain least squares, so clean data fits as before, and a
    window far beyond that gets no weight, whichever column (rate or mean lengths)
    the artefact landed in. The noise level grows with the predicted rate (tokens/s
    noise is multiplicative), so the busiest windows, which carry the bend, keep
    their weight. A robust pilot fit on relative residuals gives the start and the
    noise levels. The ceiling is bounded at MAX_CEILING_RATIO times the highest rate
    observed (its 99th percentile), so a fit can never report a ceiling no replica
    could plausibly reach; `ceiling_bounded_` says when the bound was hit.

    Parameters
    ----------
    hill_exponent : bool
        Fit the Hill exponent h; False fixes h = 1 (Michaelis-Menten).
    relative_loss : bool
        Minimise relative rather than absolute residuals (what MAPE measures).

    Attributes
    ----------
    vmax_, k_, hill_, coef_ : float, float, float, ndarray
        The curve: ceiling at the reference lengths, half-saturation load, Hill
        exponent, and the length exponents.
    n_windows_ : int
        Windows (rows) fitted on.
    load_range_ : tuple of float
        The lowest and highest load (first column) seen.
    rate_top_ : float
        The 99th percentile of the observed rate.
    outliers_ : ndarray of bool
        Windows the robust loss gave (almost) no weight: more than ROBUST_SCALE noise
        levels off the fitted curve; `n_outliers_` counts them, `outlier_mask` tells
        them in other windows (e.g. held-out ones). None below MIN_ROBUST_WINDOWS
        windows, which are fitted by plain least squares.
    noise_ : tuple of float
        The residuals' robust absolute and relative sigmas (and a tiny floor).
    ceiling_bounded_ : bool
        The ceiling sits at its bound (MAX_CEILING_RATIO x `rate_top_`): the data do
        not pin it.
    """

    ROBUST_SCALE = 10.0  # noise levels (robust sigmas) beyond which a window loses its weight
    MAX_CEILING_RATIO = 1000.0  # ceiling bound, in multiples of the highest observed rate
    MIN_ROBUST_WINDOWS = 10  # fewer windows are fitted by plain least squares

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
        top = float(np.quantile(y, 0.99))
        # the ceiling's bound: a glitch window can neither set it nor push it past 1e11
        log_cap = float(np.log(max(top, 1e-9) * self.MAX_CEILING_RATIO))
        start = np.concatenate(
            [
                [min(np.log(max(top, 1e-9) * 1.5), log_cap), np.log(k0), 0.0],
                np.zeros(X.shape[1] - 1),
            ]
        )
        scale = np.abs(y) + max(float(np.mean(np.abs(y))) * 0.05, 1e-9)
        lo = np.concatenate([[-50, -50, np.log(0.2)], np.full(X.shape[1] - 1, -5.0)])
        hi = np.concatenate([[log_cap, 50, np.log(8.0)], np.full(X.shape[1] - 1, 5.0)])

        def fit_from(p0: np.ndarray, resid, loss, f_scale: float = 1.0) -> np.ndarray:
            kw = {"loss": loss, "f_scale": f_scale}
            return least_squares(resid, p0, bounds=(lo, hi), x_scale="jac", max_nfev=5000, **kw).x

        # pilot: relative residuals with a soft-L1 loss at 10%, robust whatever the rate's scale
        params = fit_from(start, lambda p: (self._predict_params(p, X) - y) / scale, "soft_l1", 0.1)
        rel = scale if self.relative_loss else np.ones_like(y)
        # noise levels from the pilot, then once more from the robust fit; a handful of
        # windows cannot tell their noise from an outlier: plain least squares for them
        robust = X.shape[0] >= self.MIN_ROBUST_WINDOWS
        for _ in range(2 if robust else 1):
            pred = self._predict_params(params, X)
            limit = self._outlier_limit(pred, self._noise(pred, y)) / rel
            loss = _arctan_loss(limit) if robust else "linear"
            params = fit_from(params, lambda p: (self._predict_params(p, X) - y) / rel, loss)
        pred = self._predict_params(params, X)
        self.params_ = params
        self.vmax_ = float(np.exp(params[0]))
        self.k_ = float(np.exp(params[1]))
        self.hill_ = float(np.exp(params[2])) if self.hill_exponent else 1.0
        self.coef_ = params[3:].copy()
        self.n_windows_ = int(X.shape[0])
        self.load_range_ = (float(x0.min()), float(x0.max()))
        self.rate_top_ = top
        self.noise_ = self._noise(pred, y)
        self.robust_ = robust
        self.outliers_ = self.outlier_mask(X, y)
        self.n_outliers_ = int(self.outliers_.sum())
        self.ceiling_bounded_ = bool(params[0] >= log_cap - 1e-3)
        return self

    @staticmethod
    def _noise(pred: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
        """Robust noise levels of the residuals: absolute and relative sigmas (1.4826 x
        the median absolute residual, and relative residual), and a tiny floor."""
        r = np.abs(pred - y)
        busy = np.abs(pred) > 1e-12
        rel = float(np.median(r[busy] / np.abs(pred[busy]))) if busy.any() else 0.0
        floor = 1e-9 * max(float(np.mean(np.abs(y))), 1e-12)
        return 1.4826 * float(np.median(r)), 1.4826 * rel, floor

    def _outlier_limit(self, pred: np.ndarray, noise: tuple[float, float, float]) -> np.ndarray:
        """Per window, the absolute residual beyond which it loses its weight: ROBUST_SCALE
        robust sigmas, the sigma growing with the predicted rate (multiplicative noise) and
        never below the residuals' overall robust sigma (idle and near-idle windows)."""
        sigma, rel, floor = noise
        return self.ROBUST_SCALE * np.maximum(np.maximum(sigma, rel * np.abs(pred)), floor)

    def outlier_mask(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which windows lie as far off the fitted curve as those the fit gave no weight
        (ROBUST_SCALE noise levels of the training residuals): e.g. held-out windows."""
        check_is_fitted(self, "params_")
        pred = self.predict(X)
        far = np.abs(pred - np.asarray(y, float)) > self._outlier_limit(pred, self.noise_)
        return far & self.robust_

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
    Windows at one load level are refused, as by the throughput regressors: they
    say nothing about how latency grows with load. Beyond the highest load seen
    (`load_range_`) the power law is an extrapolation that grows without bound;
    `beyond_range` tells which loads are.
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
        check_load_spread(x, "LoadLatencyRegressor", zero_is_a_level=True)
        xs = max(float(np.max(x)), 1e-9)
        self.load_scale_ = xs
        self.load_range_ = (float(np.min(x)), float(np.max(x)))

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

    def beyond_range(self, X: np.ndarray) -> np.ndarray:
        """Which rows' load lies above the highest load the fit saw (an extrapolation).

        Below the range the curve tends to `t0_`, the unloaded latency the lightest
        windows measure; above it the power law is unchecked by any measurement."""
        check_is_fitted(self, "t0_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X[:, 0] > self.load_range_[1] * (1 + 1e-9)


def _arctan_loss(limit: np.ndarray):
    """A least_squares loss (f_scale 1) that is plain least squares for residuals well
    inside `limit` (per window) and gives those far beyond it no weight:
    rho(z) = t^2 * arctan(z / t^2), z = r^2, t = limit."""
    t2 = np.asarray(limit, dtype=float) ** 2

    def rho(z: np.ndarray) -> np.ndarray:
        u = z / t2
        out = np.empty((3, z.size))
        out[0] = t2 * np.arctan(u)
        out[1] = 1.0 / (1.0 + u**2)
        out[2] = -2.0 * u / t2 / (1.0 + u**2) ** 2
        return out

    return rho


def mape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute percentage error over rows with a non-zero truth (as a fraction)."""
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    ok = np.abs(y_true) > 1e-12
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(y_pred[ok] - y_true[ok]) / np.abs(y_true[ok])))
