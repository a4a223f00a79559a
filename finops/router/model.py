"""The router model: a scikit-learn Pipeline and its fast single-request scorer.

Training uses an ordinary Pipeline (ColumnTransformer of hashed word and char n-grams,
scaled numeric metadata, one-hot categorical metadata, then a multinomial
LogisticRegression wrapped in CalibratedClassifierCV with temperature scaling). Hashing
keeps the model independent of a fitted vocabulary and the artifact small.

On the request path, calling `pipeline.predict_proba` on one row costs several
milliseconds of validation and sparse-matrix overhead. `CompiledScorer` reads the fitted
pieces (the vectorizers' own analyzers, scaler means, encoder categories, coefficients,
the temperature) and evaluates the same function, mostly on plain floats. It is checked
against `predict_proba` on probe rows every time an artifact is loaded.

Why plain floats and per-word caches: inside the shim, between requests, the network
code evicts the CPU caches, and a NumPy call costs several times its warm cost there
(the old gather-per-block scorer took 52 us in a loop but 134-166 us of CPU per request
in the running shim). A short prompt now costs one dict entry per word or n-gram and a
few dozen float operations; NumPy runs once per block only when a block touches more
than a few dozen columns (long prompts, where one gather beats a Python loop).
"""

from __future__ import annotations

import math
import operator
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from finops.router.features import CATEGORICAL_COLUMNS, NUMERIC_COLUMNS

WORD_HASH_FEATURES = 2**17
CHAR_HASH_FEATURES = 2**16
# Up to this many distinct columns a block's weights are summed on plain floats; past
# it one NumPy gather is cheaper (a long prompt touches hundreds).
_FEW_COLUMNS = 32
# A char_wb block learns at most this many new words per request; text with more is
# scored whole (one analyzer pass), so novel text costs what it cost before the cache.
_NEW_WORDS_PER_BLOCK = 8
# Tiers a router ranks, at least: the scorer reads one coefficient row per tier, which a
# multinomial LogisticRegression has only for three or more classes (two give one row).
MIN_TIERS = 3


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
        LogisticRegression(C=C, max_iter=max_iter, tol=2e-3, solver="saga", random_state=seed),
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
        if self.coef.shape[0] != len(self.classes) or len(self.classes) < MIN_TIERS:
            raise CompileError(f"expected a multinomial model over {MIN_TIERS} or more tiers")
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
        self._n = len(self.classes)
        # The same matrix flat, to read a few weights as Python floats without NumPy.
        self._w_flat = memoryview(self._coef_t).cast("B").cast("d")
        # Per block: n-gram -> column, and for char_wb blocks word -> (its n-grams'
        # columns, their summed class weights). Bounded: once full, new entries are
        # computed and not kept (a word entry measured ~420 bytes: ~21 MB at the limit).
        self._words: list[dict[str, tuple[array, tuple[float, ...]]]] = [{} for _ in self.hashed]
        self._columns: list[dict[str, int]] = [{} for _ in self.hashed]
        self._word_limit = 50_000
        self._column_limit = 200_000

    def _feature_index(self, h: _Hashed, gram: str) -> int:
        """The column sklearn's FeatureHasher gives `gram` (alternate_sign=False)."""
        hv = self._murmur(gram, seed=0)
        if hv == -2147483648:
            return h.offset + (2147483647 - (h.n_features - 1)) % h.n_features
        return h.offset + abs(hv) % h.n_features

    def _weighted(self, counts: Mapping[int, float]) -> list[float]:
        """sum_i counts[i] * coef_t[i]: plain floats for a few columns, one gather for many."""
        if len(counts) > _FEW_COLUMNS:
            idx = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            val = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            return (val @ self._coef_t[idx]).tolist()
        n = self._n
        w = self._w_flat
        ws = [0.0] * n
        for i, c in counts.items():
            base = i * n
            for j in range(n):
                ws[j] += c * w[base + j]
        return ws

    def _columns_of(self, k: int, h: _Hashed, grams: Iterable[str]) -> list[int]:
        """The columns of n-grams, from the block's gram cache (kept while there is room)."""
        columns = self._columns[k]
        out = []
        for gram in grams:
            i = columns.get(gram)
            if i is None:
                i = self._feature_index(h, gram)
                if len(columns) < self._column_limit:
                    columns[gram] = i
            out.append(i)
        return out

    def _word(self, k: int, h: _Hashed, word: str) -> tuple[array, tuple[float, ...]]:
        """One word's char n-gram columns and their summed weights (kept while there is room)."""
        ids = array("q", self._columns_of(k, h, h.analyzer(word)))
        entry = (ids, tuple(self._weighted(Counter(ids))))
        cache = self._words[k]
        if len(cache) < self._word_limit:
            cache[word] = entry
        return entry

    def _block(self, k: int, h: _Hashed, text: str) -> list[float] | None:
        """One hashed text block's contribution to the logits (None when it has no n-grams).

        The block's value is W @ (counts / ||counts||), counts per column (n-grams shared
        by several words, or hash collisions, land in the same column). A char_wb block
        sums its words' cached weight sums; other blocks weigh their columns' counts.
        """
        ids: list[int] = []
        ws: list[float] | None = None
        whole = not h.per_word
        if h.per_word:
            words = self._words[k]
            sums: list[tuple[float, ...]] = []
            new = 0
            for word in text.split():
                entry = words.get(word)
                if entry is None:
                    new += 1
                    if new > _NEW_WORDS_PER_BLOCK:
                        whole = True  # mostly new words: one analyzer pass over the text
                        break
                    entry = self._word(k, h, word)
                ids += entry[0]
                sums.append(entry[1])
            if not whole and sums and not h.binary:
                ws = [math.fsum(col) for col in zip(*sums, strict=True)]
        if whole:
            ids = self._columns_of(k, h, h.analyzer(text))
        if not ids:
            return None
        counts = Counter(ids)
        if h.binary:  # each column counts once, whatever its count
            ws = self._weighted(dict.fromkeys(counts, 1.0))
            norm = math.sqrt(len(counts))
        else:
            if ws is None:
                ws = self._weighted(counts)
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
