"""The router model: a scikit-learn Pipeline and its fast single-request scorer.

Training uses an ordinary Pipeline (ColumnTransformer of hashed word and char n-grams,
scaled numeric metadata, one-hot categorical metadata, then a multinomial
LogisticRegression wrapped in CalibratedClassifierCV with temperature scaling). Hashing
keeps the model independent of a fitted vocabulary and the artifact small.

On the request path, calling `pipeline.predict_proba` on one row costs several
milliseconds of validation and sparse-matrix overhead. `CompiledScorer` reads the fitted
pieces (the vectorizers' own analyzers, scaler means, encoder categories, coefficients,
the temperature) and evaluates the same function on plain floats. It is checked against
`predict_proba` on probe rows every time an artifact is loaded.

Why plain floats and per-word caches: inside the shim, between requests, the network
code evicts the CPU caches, and a NumPy call costs several times its warm cost there
(the old gather-per-block scorer took 52 us in a loop but 134-166 us of CPU per request
in the running shim). The hot path now touches one dict entry per word or token and a
few dozen float operations; NumPy runs only when a word is seen for the first time.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections import Counter
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
    # char_wb n-grams never cross whitespace, so a text's n-grams are its words' n-grams:
    # the block can be scored word by word from a per-word cache (exact, not an estimate)
    per_word: bool


class CompileError(ValueError):
    """The fitted pipeline has a piece the fast scorer does not know how to evaluate."""


class CompiledScorer:
    """Evaluate a fitted router Pipeline on one feature row with plain Python floats.

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
                per_word = (
                    trans.analyzer == "char_wb"
                    and trans.preprocessor is None
                    and trans.strip_accents is None
                )
                self.hashed.append(
                    _Hashed(
                        trans.build_analyzer(),
                        col,
                        offset,
                        trans.n_features,
                        trans.norm,
                        trans.binary,
                        per_word,
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
        self.uses_text = bool(self.hashed)
        # Numeric block folded into the coefficients: W_num @ ((x - mean) / scale).
        self._w_num = self.coef[:, self.num_offset : self.num_offset + len(self.num_cols)] / (
            self.scale
        )
        self._b = self.intercept - self._w_num @ self.mean
        # The same numbers as Python floats, read on every request.
        self._b_list: list[float] = self._b.tolist()
        self._w_num_rows: list[list[float]] = self._w_num.tolist()
        # Rows of coef.T: one feature's weights for every class, side by side.
        self._coef_t = np.ascontiguousarray(self.coef.T)
        self._cat_weights: list[dict[Any, tuple[float, ...]]] = [
            {v: tuple(self._coef_t[i].tolist()) for v, i in m.items()} for m in self.cat_index
        ]
        # Per block: word (char_wb) or token -> (feature indices, summed class weights).
        # Bounded: once full, new pieces are scored without being kept (measured 420 bytes
        # an entry: at most ~42 MB for the two blocks; the token cache it replaces allowed
        # 200k entries a block).
        self._pieces: list[dict[str, tuple[array, tuple[float, ...]]]] = [{} for _ in self.hashed]
        self._piece_limit = 50_000

    def _feature_index(self, h: _Hashed, gram: str) -> int:
        """The column sklearn's FeatureHasher gives `gram` (alternate_sign=False)."""
        hv = self._murmur(gram, seed=0)
        if hv == -2147483648:
            return h.offset + (2147483647 - (h.n_features - 1)) % h.n_features
        return h.offset + abs(hv) % h.n_features

    def _piece(self, k: int, h: _Hashed, piece: str) -> tuple[array, tuple[float, ...]]:
        """Indices and summed weights of one word's n-grams (or of one token); cached."""
        grams = h.analyzer(piece) if h.per_word else (piece,)
        ids = array("q", [self._feature_index(h, g) for g in grams])
        if len(ids):
            w = tuple(self._coef_t[ids].sum(axis=0).tolist())
        else:
            w = (0.0,) * len(self.classes)
        entry = (ids, w)
        cache = self._pieces[k]
        if len(cache) < self._piece_limit:
            cache[piece] = entry
        return entry

    def _block(self, k: int, h: _Hashed, text: str) -> list[float] | None:
        """One hashed text block's contribution to the logits (None when it has no n-grams).

        The block's value is W @ (counts / ||counts||): the weighted sum comes from the
        cached per-piece sums, the norm from the counts per column (n-grams shared by
        several words, or hash collisions, land in the same column).
        """
        cache = self._pieces[k]
        ids: list[int] = []
        sums: list[tuple[float, ...]] = []
        for piece in text.split() if h.per_word else h.analyzer(text):
            entry = cache.get(piece)
            if entry is None:
                entry = self._piece(k, h, piece)
            ids += entry[0]
            sums.append(entry[1])
        if not ids:
            return None
        counts = Counter(ids)
        if h.binary:  # each column counts once, whatever its count
            ws = self._coef_t[list(counts)].sum(axis=0).tolist()
            norm = math.sqrt(len(counts))
        else:
            ws = [math.fsum(col) for col in zip(*sums, strict=True)]
            norm = math.hypot(*counts.values())
        if h.norm != "l2":
            return ws
        return [v / norm for v in ws]

    def logit_list(self, row: dict[str, Any]) -> list[float]:
        """Uncalibrated decision values of the LogisticRegression for one row, as floats."""
        xs = [float(row[c]) for c in self.num_cols]
        z = [
            b + math.fsum(map(operator.mul, w, xs))
            for b, w in zip(self._b_list, self._w_num_rows, strict=True)
        ]
        for k, h in enumerate(self.hashed):
            ws = self._block(k, h, row[h.column])
            if ws is not None:
                z = [a + v for a, v in zip(z, ws, strict=True)]
        for m, c in zip(self._cat_weights, self.cat_cols, strict=True):
            ws = m.get(row[c])
            if ws is not None:
                z = [a + v for a, v in zip(z, ws, strict=True)]
        return z

    def logits(self, row: dict[str, Any]) -> np.ndarray:
        """Uncalibrated decision values of the LogisticRegression for one row."""
        return np.array(self.logit_list(row))

    def proba_list(self, row: dict[str, Any]) -> list[float]:
        """Calibrated class probabilities (order: `self.classes`), as floats."""
        z = [self.beta * v for v in self.logit_list(row)]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = math.fsum(e)
        return [v / total for v in e]

    def predict_proba(self, row: dict[str, Any]) -> np.ndarray:
        """Calibrated class probabilities (order: `self.classes`)."""
        return np.array(self.proba_list(row))
