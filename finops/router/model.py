"""The router model: a scikit-learn Pipeline and its fast single-request scorer.

Training uses an ordinary Pipeline (ColumnTransformer of hashed word and char n-grams,
scaled numeric metadata, one-hot categorical metadata, then a multinomial
LogisticRegression wrapped in CalibratedClassifierCV with temperature scaling). Hashing
keeps the model independent of a fitted vocabulary and the artifact small.

On the request path, calling `pipeline.predict_proba` on one row costs several
milliseconds of validation and sparse-matrix overhead. `CompiledScorer` reads the fitted
pieces (the vectorizers' own analyzers, scaler means, encoder categories, coefficients,
the temperature) and evaluates the same function with a few NumPy operations. It is
checked against `predict_proba` on probe rows every time an artifact is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from finops.router.features import CATEGORICAL_COLUMNS, NUMERIC_COLUMNS

WORD_HASH_FEATURES = 2**17
CHAR_HASH_FEATURES = 2**16


def build_pipeline(
    uses_text: bool, *, C: float = 0.5, cv: int = 3, max_iter: int = 200, seed: int = 0
) -> Any:
    """An unfitted Pipeline; input is a Polars frame with the columns of `features.extract`."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts: list[tuple[str, Any, Any]] = []
    if uses_text:
        parts.append(
            (
                "word",
                HashingVectorizer(
                    ngram_range=(1, 2),
                    n_features=WORD_HASH_FEATURES,
                    alternate_sign=False,
                    norm="l2",
                    token_pattern=r"(?u)\b\w+\b",
                ),
                "text",
            )
        )
        parts.append(
            (
                "char",
                HashingVectorizer(
                    analyzer="char_wb",
                    ngram_range=(3, 4),
                    n_features=CHAR_HASH_FEATURES,
                    alternate_sign=False,
                    norm="l2",
                ),
                "text_head",
            )
        )
    parts.append(("num", StandardScaler(), list(NUMERIC_COLUMNS)))
    parts.append(
        ("cat", OneHotEncoder(handle_unknown="ignore", dtype=np.float64), list(CATEGORICAL_COLUMNS))
    )
    features = ColumnTransformer(parts, remainder="drop", sparse_threshold=1.0)
    clf = CalibratedClassifierCV(
        LogisticRegression(C=C, max_iter=max_iter, tol=2e-3, solver="saga"),
        method="temperature",
        cv=StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed),
        ensemble=False,
    )
    return Pipeline([("features", features), ("clf", clf)])


@dataclass
class _Hashed:
    analyzer: Any
    column: str
    offset: int
    n_features: int
    norm: str | None
    binary: bool


class CompileError(ValueError):
    """The fitted pipeline has a piece the fast scorer does not know how to evaluate."""


class CompiledScorer:
    """Evaluate a fitted router Pipeline on one feature row with plain NumPy.

    Supports exactly the pieces `build_pipeline` produces; anything else raises
    `CompileError` (so a foreign model file cannot silently be scored wrongly).
    """

    def __init__(self, pipeline: Any) -> None:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.compose import ColumnTransformer
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        if not isinstance(pipeline, Pipeline) or [n for n, _ in pipeline.steps] != [
            "features",
            "clf",
        ]:
            raise CompileError("expected a Pipeline with steps ['features', 'clf']")
        ct = pipeline.named_steps["features"]
        clf = pipeline.named_steps["clf"]
        if not isinstance(ct, ColumnTransformer) or not isinstance(clf, CalibratedClassifierCV):
            raise CompileError("expected ColumnTransformer + CalibratedClassifierCV")
        if len(clf.calibrated_classifiers_) != 1 or clf.method != "temperature":
            raise CompileError("expected one temperature-scaled calibrated classifier")
        cal = clf.calibrated_classifiers_[0]
        lr = cal.estimator
        if not isinstance(lr, LogisticRegression):
            raise CompileError(f"expected LogisticRegression, got {type(lr).__name__}")
        self.classes = np.asarray(clf.classes_)
        self.coef = np.ascontiguousarray(lr.coef_, dtype=np.float64)
        self.intercept = np.asarray(lr.intercept_, dtype=np.float64)
        if self.coef.shape[0] != len(self.classes) or len(self.classes) < 3:
            raise CompileError("expected a multinomial model over three or more tiers")
        self.beta = float(cal.calibrators[0].beta_)
        self.hashed: list[_Hashed] = []
        self.num_cols: list[str] = []
        self.cat_cols: list[str] = []
        offset = 0
        slices = ct.output_indices_
        for name, trans, cols in ct.transformers_:
            if name == "remainder":
                if trans != "drop" and len(cols):
                    raise CompileError("remainder columns are not supported")
                continue
            start = slices[name].start
            if start != offset:
                raise CompileError(f"unexpected column layout at {name}")
            if isinstance(trans, HashingVectorizer):
                if trans.alternate_sign or trans.norm not in ("l2", None):
                    raise CompileError("hashing vectorizer must use alternate_sign=False")
                col = cols if isinstance(cols, str) else cols[0]
                self.hashed.append(
                    _Hashed(
                        trans.build_analyzer(),
                        col,
                        offset,
                        trans.n_features,
                        trans.norm,
                        trans.binary,
                    )
                )
                offset += trans.n_features
            elif isinstance(trans, StandardScaler):
                self.num_cols = list(cols)
                self.mean = np.asarray(
                    trans.mean_ if trans.with_mean else np.zeros(len(cols)), dtype=np.float64
                )
                self.scale = np.asarray(
                    trans.scale_ if trans.with_std else np.ones(len(cols)), dtype=np.float64
                )
                self.num_offset = offset
                offset += len(cols)
            elif isinstance(trans, OneHotEncoder):
                if trans.drop is not None or getattr(trans, "_infrequent_enabled", False):
                    raise CompileError("one-hot encoder must not drop or group categories")
                self.cat_cols = list(cols)
                self.cat_index: list[dict[Any, int]] = []
                for cats in trans.categories_:
                    self.cat_index.append({c: offset + i for i, c in enumerate(cats)})
                    offset += len(cats)
            else:
                raise CompileError(f"unsupported transformer {type(trans).__name__}")
        if offset != self.coef.shape[1]:
            raise CompileError(f"feature width {offset} != model width {self.coef.shape[1]}")
        if self.num_cols != list(NUMERIC_COLUMNS) or self.cat_cols != list(CATEGORICAL_COLUMNS):
            raise CompileError("numeric/categorical columns differ from this finops version's")
        from sklearn.utils import murmurhash3_32

        self._murmur = murmurhash3_32
        self._hash_cache: list[dict[str, int]] = [{} for _ in self.hashed]
        self._cache_limit = 200_000
        self.uses_text = bool(self.hashed)
        # Numeric block folded into the coefficients: W_num @ ((x - mean) / scale).
        self._w_num = self.coef[:, self.num_offset : self.num_offset + len(self.num_cols)] / (
            self.scale
        )
        self._b = self.intercept - self._w_num @ self.mean

    def _hash_block(self, k: int, h: _Hashed, text: str) -> tuple[np.ndarray, np.ndarray]:
        cache = self._hash_cache[k]
        counts: dict[int, float] = {}
        for tok in h.analyzer(text):
            idx = cache.get(tok)
            if idx is None:
                hv = self._murmur(tok, seed=0)
                idx = (
                    (2147483647 - (h.n_features - 1)) % h.n_features
                    if hv == -2147483648
                    else abs(hv) % h.n_features
                )
                if len(cache) < self._cache_limit:
                    cache[tok] = idx
            counts[idx] = counts.get(idx, 0.0) + 1.0
        if not counts:
            return np.empty(0, dtype=np.intp), np.empty(0)
        idx = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
        val = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        if h.binary:
            val[:] = 1.0
        if h.norm == "l2":
            val /= np.sqrt(val @ val)
        return idx + h.offset, val

    def logits(self, row: dict[str, Any]) -> np.ndarray:
        """Uncalibrated decision values of the LogisticRegression for one row."""
        z = self._b + self._w_num @ np.array([float(row[c]) for c in self.num_cols])
        for k, h in enumerate(self.hashed):
            idx, val = self._hash_block(k, h, row[h.column])
            if idx.size:
                z = z + self.coef[:, idx] @ val
        cat_idx = [
            m[v] for m, c in zip(self.cat_index, self.cat_cols, strict=True) if (v := row[c]) in m
        ]
        if cat_idx:
            z = z + self.coef[:, cat_idx].sum(axis=1)
        return z

    def predict_proba(self, row: dict[str, Any]) -> np.ndarray:
        """Calibrated class probabilities (order: `self.classes`)."""
        z = self.beta * self.logits(row)
        z -= z.max()
        e = np.exp(z)
        return e / e.sum()
