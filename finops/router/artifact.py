"""The router artifact: a skops model file plus a manifest, verified on every load.

An artifact is a directory::

    model.skops      the fitted sklearn Pipeline, in skops' format (no pickle)
    training_rows.npy  sorted uint64 hashes of the rows the model was fitted on and the
                     thresholds calibrated with (`data.row_hash`; a plain .npy, read with
                     allow_pickle=False), so `evaluate` can leave them out; older
                     artifacts have none
    manifest.json    format version, tiers, upstream models, decision thresholds with the
                     quality target and confidence they were calibrated to, feature
                     schema, training-data fingerprint, evaluation figures, drift
                     reference, library versions, sha256 of every file, probe rows

`load_router(path)` refuses anything it cannot vouch for, with an `ArtifactError` that
says what is wrong: unknown format version, a manifest whose digest does not match, a
decision field out of range (a threshold that is not a number in [0, 1] or null, an empty
tier or upstream model name), a version that does not match the contents, a file whose
bytes changed or that was swapped, types in the model file outside an explicit trusted
list, a different scikit-learn major version, or a model that does not reproduce the
probability the manifest recorded for its probe rows.

The version names what decides routing: `{created}-{16 hex}` where the hex is the sha256
of the creation time, the model file's sha256, the tiers, the thresholds, the upstream
model names and the feature schema (`artifact_version`). It is what the shim reports in
its metrics and request logs, so a manifest with edited thresholds cannot report the
version of the artifact it was edited from: it is refused on load, and were its version
field rewritten to match, it would be a different version. Artifacts written before the
version covered the decision (`{created}-{first 8 hex of the model sha256}`) still load;
their `Router.version` is the one their contents imply, so it differs from the manifest's
field and changes whenever the thresholds do.

What the checks are not: every hash here (the files', `manifest_sha256`, the version)
is an unkeyed sha256 that the artifact carries for itself. They catch corruption, a
truncated copy, a swapped file and careless hand edits; they do not stop a determined
forger, who can edit the manifest and recompute every hash. finops does not sign
artifacts: trust comes from where the directory came from (write access to it is the
ability to change routing), so keep it where only the deployer can write.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import platform
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from finops.router import features as F
from finops.router.model import MIN_TIERS

FORMAT = "finops-router"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MODEL_FILE = "model.skops"
MANIFEST_FILE = "manifest.json"
TRAINING_ROWS_FILE = "training_rows.npy"
PROBE_TOLERANCE = 1e-6

# Every type the model file may contain beyond skops' own safe defaults. Loading refuses
# a file that asks for anything else (skops.io.get_untrusted_types is checked first).
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._TemperatureScaling",
    "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.feature_extraction.text.HashingVectorizer",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "builtins.slice",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.ObjectDType",
    "numpy.dtypes.StrDType",
    "numpy.float64",
    "numpy.int64",
    "numpy.ndarray",
)

REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "created": str,
    "version": str,
    "tiers": list,
    "upstream_models": dict,
    "decision": dict,
    "feature_schema": list,
    "uses_prompt_text": bool,
    "training_data": dict,
    "evaluation": dict,
    "drift": dict,
    "libraries": dict,
    "model": dict,
    "probes": list,
    "files": dict,
    "manifest_sha256": str,
}


class ArtifactError(RuntimeError):
    """The artifact is missing, malformed, tampered with or incompatible."""


@dataclass(frozen=True)
class Decision:
    """One routing decision.

    `score` is the calibrated probability that `tier` is good enough for the request
    (P(needed tier <= tier)); `probabilities` is P(needed tier == t) for every tier.
    """

    tier: str
    score: float
    probabilities: dict[str, float]
    cumulative: dict[str, float] = field(default_factory=dict)


def training_rows_bytes(hashes: np.ndarray) -> bytes:
    """The training-rows file: sorted unique uint64 row hashes as a plain .npy (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.unique(np.asarray(hashes, dtype=np.uint64)), allow_pickle=False)
    return buf.getvalue()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _threshold_key(v: Any) -> float | None:
    return None if v is None else float(v)


def artifact_version(manifest: Mapping[str, Any]) -> str:
    """The version the contents imply: creation time + a hash of everything that decides routing.

    Covers the model file's sha256, the tiers, the thresholds, the upstream model names,
    `uses_prompt_text` and the feature schema (thresholds compared as floats, so 1 and 1.0
    are the same decision). Expects a manifest that passed the shape checks.
    """
    dec = manifest["decision"]
    body = {
        "created": manifest["created"],
        "model_sha256": manifest["files"][MODEL_FILE],
        "tiers": list(manifest["tiers"]),
        "thresholds": {t: _threshold_key(v) for t, v in dec["thresholds"].items()},
        "upstream_models": dict(manifest["upstream_models"]),
        "uses_prompt_text": manifest["uses_prompt_text"],
        "feature_schema": manifest["feature_schema"],
    }
    return f"{manifest['created']}-{hashlib.sha256(_canonical(body)).hexdigest()[:16]}"


def _legacy_version(manifest: Mapping[str, Any]) -> str:
    """How versions were made before they covered the decision (model hash only)."""
    return f"{manifest['created']}-{str(manifest['files'].get(MODEL_FILE, ''))[:8]}"


def _check_version(m: Mapping[str, Any], where: Path) -> str:
    """The version to report: the manifest's when it matches the contents; else refuse.

    A legacy manifest (version from the model hash alone) reports the version its
    contents imply, so edited thresholds never report the unedited artifact's version.
    """
    want = artifact_version(m)
    got = m["version"]
    if got == want:
        return want
    if got == _legacy_version(m):
        warnings.warn(
            f"{where}: field 'version' {got!r} predates versions that cover the thresholds "
            f"(edits to them cannot be detected); reporting it as {want!r}. Retrain to "
            "export an artifact whose version is checked",
            stacklevel=3,
        )
        return want
    raise ArtifactError(
        f"{where}: field 'version': {got!r} does not match the artifact's contents, which "
        f"imply {want!r} (model file hash, tiers, decision.thresholds, upstream_models, "
        "feature schema); the manifest was edited after export"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def library_versions() -> dict[str, str]:
    import scipy
    import sklearn
    import skops

    return {
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "skops": skops.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def decide(cumulative: Sequence[float], thresholds: list[float | None]) -> int:
    """Index of the cheapest tier whose P(good enough) clears its threshold.

    `thresholds[t]` is None for "never" (and the last tier is always acceptable).
    """
    last = len(cumulative) - 1
    for t in range(last):
        th = thresholds[t]
        if th is not None and cumulative[t] >= th:
            return t
    return last


PROBE_REQUESTS: tuple[dict[str, Any], ...] = (
    {"text": "Translate to French: the meeting moved to Tuesday.", "feature": "translate"},
    {"text": "Summarize this support ticket and draft a reply to the customer.", "tenant": "t"},
    {
        "text": "Refactor this module to remove the global state, step by step:\n"
        "def f(x):\n    global y\n    return x + y\n" * 4,
        "has_tools": True,
        "turn_count": 3,
    },
    {"text": None, "prompt_tokens": 812, "feature": "rag-qa", "turn_count": 2},
    {"text": "", "prompt_tokens": 0},
)


def probe_rows() -> list[dict[str, Any]]:
    """Fixed synthetic rows (never training data: the manifest is not a place for prompts)."""
    return [F.extract(**p) for p in PROBE_REQUESTS]


class Router:
    """A verified router artifact, ready to route requests in-process."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        pipeline: Any,
        scorer: Any,
        version: str | None = None,
    ):
        self.path = path
        self.manifest = manifest
        self.pipeline = pipeline
        self._scorer = scorer
        self.version: str = version or manifest["version"]
        self.tiers: list[str] = list(manifest["tiers"])
        self.upstream_models: dict[str, str] = dict(manifest["upstream_models"])
        self.feature_schema: list[dict[str, str]] = list(manifest["feature_schema"])
        self.uses_prompt_text: bool = bool(manifest["uses_prompt_text"])
        th = manifest["decision"]["thresholds"]
        self.thresholds: list[float | None] = [th.get(t) for t in self.tiers[:-1]]
        self.quality_target: float = float(manifest["decision"]["quality_target"])
        self.confidence: float = float(manifest["decision"]["confidence"])
        # scorer classes are tier indices 0..K-1 (cheapest first)
        self._order = [int(c) for c in scorer.classes]
        # categorical columns trained with a missing value: a value unknown at serving
        # scores as that missing value (see `features.unknown_as_missing`)
        self._missing_known: dict[str, frozenset[Any]] = {
            c: frozenset(known)
            for c, known in zip(scorer.cat_cols, scorer.cat_index, strict=True)
            if F.MISSING in known
        }

    def training_row_hashes(self) -> np.ndarray | None:
        """Sorted uint64 hashes of the rows this artifact was fitted and calibrated on
        (`data.row_hash`), or None for an artifact written before it recorded them.

        The file is hashed again here: it is read after `load_router` verified it.
        """
        fp = self.manifest["training_data"].get("row_fingerprint")
        if fp is None:
            return None
        name = fp.get("file") if isinstance(fp, dict) else None
        files = self.manifest["files"]
        where = self.path / MANIFEST_FILE
        if not isinstance(name, str) or name not in files or Path(name).name != name:
            raise ArtifactError(
                f"{where}: field 'training_data.row_fingerprint': expected a file listed in "
                f"'files', got {fp!r}"
            )
        path = self.path / name
        if not path.is_file() or sha256_file(path) != files[name]:
            raise ArtifactError(
                f"{path}: missing, or its sha256 no longer matches the manifest (changed "
                "after the artifact was loaded)"
            )
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ArtifactError(f"{path}: not a plain .npy array: {exc}") from None
        if arr.dtype != np.uint64 or arr.ndim != 1:
            raise ArtifactError(
                f"{path}: expected a 1-D uint64 array of row hashes, got {arr.dtype} "
                f"with shape {arr.shape}"
            )
        return arr

    def as_served(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """The feature row as this router scores it (`pipeline.predict_proba` on it gives
        what `route()` gives): a name it never saw counts as missing when it learned one."""
        if self._missing_known:
            return F.unknown_as_missing(row, self._missing_known)
        return row

    def _tier_probabilities(self, row: Mapping[str, Any]) -> list[float]:
        # plain floats: on the request path, NumPy calls on three values cost more than
        # the arithmetic
        p = self._scorer.proba_list(self.as_served(row))
        probs = [0.0] * len(self.tiers)
        for i, o in enumerate(self._order):
            probs[o] = p[i]
        return probs

    def probabilities_for_rows(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """P(needed tier) per row, in tier order, for many rows at once (evaluation and
        replay): the pipeline on the rows as `route()` scores them (`as_served`)."""
        return self.pipeline.predict_proba(_probe_frame([self.as_served(r) for r in rows]))

    def probabilities_for_row(self, row: Mapping[str, Any]) -> np.ndarray:
        """P(needed tier == t) in tier order for a feature row (see `features.extract`)."""
        return np.array(self._tier_probabilities(row))

    def decide_row(self, row: Mapping[str, Any]) -> Decision:
        probs = self._tier_probabilities(row)
        cum = list(itertools.accumulate(probs))
        cum = [min(v, 1.0) for v in cum[:-1]] + [1.0]
        t = decide(cum, self.thresholds)
        return Decision(
            tier=self.tiers[t],
            score=cum[t],
            probabilities=dict(zip(self.tiers, probs, strict=True)),
            cumulative=dict(zip(self.tiers, cum, strict=True)),
        )

    def route(
        self, body: Mapping[str, Any], *, feature: str | None = None, tenant: str | None = None
    ) -> Decision:
        """Pick the cheapest adequate tier for an OpenAI chat/completions request body.

        The arguments are checked here because a wrong type deep in the feature hashing
        fails with a message that names neither the argument nor what was expected.
        """
        if not isinstance(body, Mapping):
            raise TypeError(
                f"route(): body must be a request body (a dict), got {type(body).__name__}"
            )
        for name, value in (("feature", feature), ("tenant", tenant)):
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"route(): {name} must be a str or None, got {type(value).__name__}"
                )
        return self.decide_row(F.from_body(body, feature=feature, tenant=tenant))

    def __repr__(self) -> str:
        return f"Router(version={self.version!r}, tiers={self.tiers}, path='{self.path}')"


def _check_manifest_shape(m: Any, where: Path) -> None:
    if not isinstance(m, dict):
        raise ArtifactError(f"{where}: manifest must be a JSON object")
    if m.get("format") != FORMAT:
        raise ArtifactError(
            f"{where}: field 'format': expected {FORMAT!r}, got {m.get('format')!r}"
        )
    fv = m.get("format_version")
    if fv not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(
            f"{where}: field 'format_version': this finops reads {list(SUPPORTED_FORMAT_VERSIONS)},"
            f" got {fv!r} (re-export the artifact with a matching finops)"
        )
    for key, typ in REQUIRED_KEYS.items():
        if key not in m:
            raise ArtifactError(f"{where}: missing field {key!r}")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise ArtifactError(
                f"{where}: field {key!r}: expected {getattr(typ, '__name__', typ)}, "
                f"got {type(m[key]).__name__}"
            )
    tiers = m["tiers"]
    if (
        len(tiers) < MIN_TIERS
        or not all(isinstance(t, str) and t for t in tiers)
        or len(set(tiers)) != len(tiers)
    ):
        # 3+: the model is multinomial (see finops.router.data.parse_tiers)
        raise ArtifactError(
            f"{where}: field 'tiers': expected {MIN_TIERS}+ distinct tier names, got {tiers!r}"
        )
    missing = [t for t in tiers if t not in m["upstream_models"]]
    if missing:
        raise ArtifactError(
            f"{where}: field 'upstream_models': no model name for tier(s) {missing}"
        )
    for t in tiers:
        name = m["upstream_models"][t]
        if not isinstance(name, str) or not name.strip():
            raise ArtifactError(
                f"{where}: field 'upstream_models.{t}': expected a non-empty model name "
                f"(string), got {name!r}"
            )
    dec = m["decision"]
    th = dec.get("thresholds")
    if not isinstance(th, dict) or set(th) != set(tiers[:-1]):
        raise ArtifactError(
            f"{where}: field 'decision.thresholds': expected one threshold per tier "
            f"except the last ({tiers[:-1]}), got {th!r}"
        )
    for t, v in th.items():
        if v is not None and not (_is_number(v) and 0.0 <= v <= 1.0):
            raise ArtifactError(
                f"{where}: field 'decision.thresholds.{t}': expected a number in [0, 1] "
                f"or null, got {v!r}"
            )
    for k in ("quality_target", "confidence"):
        v = dec.get(k)
        if not (_is_number(v) and 0.0 < v < 1.0):
            raise ArtifactError(
                f"{where}: field 'decision.{k}': expected a number in (0, 1), got {v!r}"
            )
    for k in ("rule", "guarantee"):  # shown by `inspect`: a missing one must fail here
        v = dec.get(k)
        if not isinstance(v, str) or not v.strip():
            raise ArtifactError(
                f"{where}: field 'decision.{k}': expected a non-empty string, got {v!r}"
            )
    lam = dec.get("lambda", "<missing>")
    if lam is not None and not (_is_number(lam) and 0.0 <= lam <= 1.0):
        raise ArtifactError(
            f"{where}: field 'decision.lambda': expected a number in [0, 1] or null, got {lam!r}"
        )
    if m["model"].get("file") != MODEL_FILE or m["model"].get("format") != "skops":
        raise ArtifactError(
            f"{where}: field 'model': expected file {MODEL_FILE!r} in skops format, "
            f"got {m['model']!r}"
        )
    names = [c.get("name") for c in m["feature_schema"] if isinstance(c, dict)]
    allowed = set(F.FEATURE_DOCS)
    if (
        len(names) != len(m["feature_schema"])
        or not all(isinstance(n, str) for n in names)
        or not set(names) <= allowed
    ):
        raise ArtifactError(
            f"{where}: field 'feature_schema': expected features among {sorted(allowed)}, "
            f"got {names}"
        )
    if m["uses_prompt_text"] != ("text" in names):
        raise ArtifactError(f"{where}: 'uses_prompt_text' disagrees with 'feature_schema'")
    probes, n = m["probes"], len(PROBE_REQUESTS)
    if len(probes) != n or not all(
        isinstance(p, list)
        and len(p) == len(tiers)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
        for p in probes
    ):  # checked here so a wrong type is this error, not NumPy's ValueError later
        raise ArtifactError(
            f"{where}: field 'probes': expected {n} lists of {len(tiers)} numbers "
            "(one probability per tier for each probe row)"
        )


def _check_sklearn(m: dict[str, Any], where: Path) -> None:
    import sklearn

    built = str(m["libraries"].get("sklearn", ""))
    here = sklearn.__version__
    if not built:
        raise ArtifactError(f"{where}: field 'libraries.sklearn' is missing")
    if built.split(".")[0] != here.split(".")[0]:
        raise ArtifactError(
            f"{where}: built with scikit-learn {built}, this environment has {here} "
            "(different major version); retrain or re-export with a matching scikit-learn"
        )
    if built.split(".")[:2] != here.split(".")[:2]:
        warnings.warn(
            f"{where}: built with scikit-learn {built}, running {here}; probe rows are "
            "checked, but consider re-exporting",
            stacklevel=3,
        )


def load_router(path: str | os.PathLike[str]) -> Router:
    """Load and verify an artifact directory; raise `ArtifactError` on any mismatch.

    This is what `finops router verify` runs. The hashes are unkeyed (see the module
    docstring): they detect corruption, swapped files and careless edits, not a forger
    who recomputes them; artifacts are not signed.
    """
    import skops.io as sio

    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not root.exists():
        raise ArtifactError(f"{root}: no such folder (expected a router artifact directory)")
    if not root.is_dir():
        raise ArtifactError(f"{root}: a file, not a folder (expected a router artifact directory)")
    if not mpath.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_FILE} (not a router artifact)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: also a 4300+ digit integer
        why = str(exc).split("; use sys.set_int_max_str_digits")[0]
        raise ArtifactError(f"{mpath}: not valid JSON: {why}") from None
    undefined = _non_finite(manifest)
    if undefined:  # Python's json reads NaN/Infinity, which are not JSON (nor hashable)
        raise ArtifactError(
            f"{mpath}: field {undefined[0]!r} is {undefined[1]} (not valid JSON: expected a "
            "finite number)"
        )
    _check_manifest_shape(manifest, mpath)
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise ArtifactError(
            f"{mpath}: manifest was modified after export (manifest_sha256 does not match)"
        )
    files = manifest["files"]
    if MODEL_FILE not in files or not isinstance(files[MODEL_FILE], str):
        raise ArtifactError(f"{mpath}: field 'files' does not list {MODEL_FILE}")
    for name, digest in files.items():
        fpath = root / name
        if Path(name).name != name:
            raise ArtifactError(f"{mpath}: field 'files': {name!r} is not a plain file name")
        if not fpath.is_file():
            raise ArtifactError(f"{fpath}: listed in the manifest but missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise ArtifactError(
                f"{fpath}: sha256 {actual[:12]}… does not match the manifest's {str(digest)[:12]}…"
                " (file changed or swapped)"
            )
    _check_sklearn(manifest, mpath)
    model_path = root / MODEL_FILE
    try:
        untrusted = sio.get_untrusted_types(file=model_path)
    except Exception as exc:  # skops raises several types for corrupt files
        raise ArtifactError(f"{model_path}: not a readable skops file: {exc}") from None
    unexpected = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if unexpected:
        raise ArtifactError(
            f"{model_path}: contains types outside the trusted list: {unexpected}; refusing to load"
        )
    try:
        pipeline = sio.load(model_path, trusted=list(TRUSTED_TYPES))
    except Exception as exc:
        raise ArtifactError(f"{model_path}: could not be loaded: {exc}") from None
    from finops.router.model import CompiledScorer, CompileError

    _check_model_arrays(pipeline, model_path)
    try:
        scorer = CompiledScorer(pipeline)
    except CompileError as exc:
        raise ArtifactError(f"{model_path}: not a finops router model: {exc}") from None
    except Exception as exc:  # NumPy/sklearn errors of a model whose parts do not fit together
        raise ArtifactError(
            f"{model_path}: internally inconsistent model: building the scorer failed "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if scorer.uses_text != manifest["uses_prompt_text"]:
        raise ArtifactError(f"{model_path}: model text use disagrees with the manifest")
    if [int(c) for c in scorer.classes] != list(range(len(manifest["tiers"]))):
        raise ArtifactError(
            f"{model_path}: model predicts {len(scorer.classes)} classes, manifest has "
            f"{len(manifest['tiers'])} tiers"
        )
    try:
        _check_probes(manifest, pipeline, scorer, mpath)
    except ArtifactError:
        raise
    except Exception as exc:  # scoring the probe rows crashed: the model cannot serve
        raise ArtifactError(
            f"{model_path}: internally inconsistent model: scoring the probe rows failed "
            f"({type(exc).__name__}: {exc})"
        ) from None
    # last, so a swapped model is named as such (probes) before its version is
    version = _check_version(manifest, mpath)
    return Router(root, manifest, pipeline, scorer, version)


def _probe_frame(rows: list[dict[str, Any]]) -> Any:
    import polars as pl

    return pl.DataFrame(rows, schema=_FRAME_SCHEMA())


def _FRAME_SCHEMA() -> dict[str, Any]:
    import polars as pl

    return {
        **{c: pl.String for c in F.TEXT_COLUMNS},
        **{c: pl.Float64 for c in F.NUMERIC_COLUMNS},
        **{c: pl.String for c in F.CATEGORICAL_COLUMNS},
    }


def _model_arrays(pipeline: Any) -> list[tuple[str, Any, int | None]]:
    """(name, array, expected length or None) of the fitted numbers the scorer reads.

    Walks only the parts that are there: a pipeline of another shape is refused by
    `CompiledScorer` (CompileError) with its own message.
    """
    steps = getattr(pipeline, "named_steps", None) or {}
    found: list[tuple[str, Any, int | None]] = []
    for name, trans, cols in getattr(steps.get("features"), "transformers_", None) or []:
        width = None if isinstance(cols, str) else len(cols)
        for attr in ("mean_", "scale_", "var_"):
            if getattr(trans, attr, None) is not None:
                found.append((f"features.{name}.{attr}", getattr(trans, attr), width))
    clf = steps.get("clf")
    for i, cc in enumerate(getattr(clf, "calibrated_classifiers_", None) or []):
        where = f"clf.calibrated_classifiers_[{i}]"
        est = getattr(cc, "estimator", None)
        coef = getattr(est, "coef_", None)
        if coef is not None:
            found.append((f"{where}.estimator.coef_", coef, None))
        if getattr(est, "intercept_", None) is not None:
            rows = int(np.shape(coef)[0]) if coef is not None and np.ndim(coef) == 2 else None
            found.append((f"{where}.estimator.intercept_", est.intercept_, rows))
        for j, cal in enumerate(getattr(cc, "calibrators", None) or []):
            if getattr(cal, "beta_", None) is not None:
                found.append((f"{where}.calibrators[{j}].beta_", cal.beta_, None))
    return found


def _check_model_arrays(pipeline: Any, where: Path) -> None:
    """Refuse fitted numbers that are not finite or do not fit their columns.

    The hashes only prove the file is the one the manifest lists: a model re-exported by
    a buggy tool can still carry a NaN weight (dormant until a request hits that column,
    then NaN scores route silently to the last tier) or a scaler of another width (a
    NumPy error that names neither the file nor the part).
    """
    for name, value, width in _model_arrays(pipeline):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ArtifactError(
                f"{where}: internally inconsistent model: {name} is not an array of numbers"
            ) from None
        if width is not None and (arr.ndim != 1 or arr.shape[0] != width):
            raise ArtifactError(
                f"{where}: internally inconsistent model: {name} has shape {arr.shape}, "
                f"expected ({width},) (one value per column it applies to)"
            )
        bad = ~np.isfinite(arr)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ArtifactError(
                f"{where}: model array {name} has {int(bad.sum())} non-finite value(s) "
                f"(first at index {first}: {arr[first]}); expected finite numbers"
            )
        if name.endswith(".scale_") and (arr == 0).any():
            raise ArtifactError(
                f"{where}: internally inconsistent model: {name} has a zero (features "
                "would be divided by it); expected non-zero scales"
            )


def _check_probes(manifest: dict[str, Any], pipeline: Any, scorer: Any, where: Path) -> None:
    rows = probe_rows()
    expected = np.asarray(manifest["probes"], dtype=np.float64)  # shape checked on load
    via_sklearn = pipeline.predict_proba(_probe_frame(rows))
    via_fast = np.vstack([scorer.predict_proba(r) for r in rows])
    if expected.shape != via_sklearn.shape or not np.allclose(
        via_sklearn, expected, atol=PROBE_TOLERANCE, rtol=0
    ):
        raise ArtifactError(
            f"{where}: the model file does not reproduce the manifest's probe predictions "
            "(model swapped, or an incompatible library version)"
        )
    if not np.allclose(via_fast, via_sklearn, atol=PROBE_TOLERANCE, rtol=0):
        raise ArtifactError(
            f"{where}: the fast scorer disagrees with scikit-learn on probe rows "
            f"(max diff {np.abs(via_fast - via_sklearn).max():.2e}); refusing to route with it"
        )


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_out_dir(
    out: str | os.PathLike[str], *, overwrite: bool = False, replaceable: bool = True
) -> bool:
    """Refuse an `out` that `write_artifact` could not fill; True when it would replace one.

    Cheap, so `train` calls it before fitting: a wrong --out fails in a second, not after
    the model is trained.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            # `replaceable`: the caller can overwrite (train's --force); say so when it
            # would work, i.e. the folder holds a router artifact
            hint = (
                " (or replace the router artifact there: --force, overwrite=True)"
                if replaceable and (out / MANIFEST_FILE).is_file()
                else ""
            )
            raise ArtifactError(f"{out}: exists and is not empty; choose a new directory{hint}")
        if not (out / MANIFEST_FILE).is_file():
            raise ArtifactError(f"{out}: not a router artifact; refusing to replace it")
        return True
    base = out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"{out}: cannot create the artifact directory here ({base} is not a writable directory)"
        )
    return False


def _staging_dir(out: Path) -> Path:
    """A fresh hidden directory next to `out`, renamed onto it once the artifact checks out."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ArtifactError(
            f"{out}: cannot create the artifact directory here: {exc.strerror or exc}"
        ) from None


def stable_skops_bytes(pipeline: Any) -> bytes:
    """skops bytes of `pipeline` that depend only on the fitted model.

    skops names arrays and shared objects by `id()` (a memory address) and stamps the
    zip entries with the time, so the same model would hash differently on every export
    and the same data + seed could not reproduce an artifact's sha256. Ids are renumbered
    in the schema's own (deterministic) order, times fixed, and HashingVectorizer's
    cached `_stop_words_id` (an address sklearn recomputes when absent) left out; `write_artifact` loads the
    result back and checks its probes, so a rewrite that changed the model is refused.
    """
    import skops.io as sio

    src = zipfile.ZipFile(io.BytesIO(sio.dumps(pipeline)))
    state = json.loads(src.read("schema.json"))
    ids: dict[int, int] = {}

    def renumber(obj: Any) -> Any:
        if isinstance(obj, list):
            return [renumber(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        out = {}
        for k, v in obj.items():
            if k == "_stop_words_id":  # a vectorizer's cached id(); recomputed when missing
                continue
            if k == "__id__" and isinstance(v, int):
                v = ids.setdefault(v, len(ids))
            elif k == "file" and isinstance(v, str) and v.endswith(".npy") and v[:-4].isdigit():
                v = f"{ids.setdefault(int(v[:-4]), len(ids))}.npy"
            out[k] = renumber(v)
        return out

    state = renumber(state)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = info.filename
            if name == "schema.json":
                data = json.dumps(state, indent=2).encode()
            else:
                data = src.read(info)
                if name.endswith(".npy") and name[:-4].isdigit():
                    name = f"{ids.setdefault(int(name[:-4]), len(ids))}.npy"
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def write_artifact(
    out: str | os.PathLike[str],
    pipeline: Any,
    *,
    tiers: list[str],
    upstream_models: Mapping[str, str],
    decision: Mapping[str, Any],
    uses_prompt_text: bool,
    training_data: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    drift: Mapping[str, Any],
    created: str | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write model.skops + manifest.json into `out` (atomically: a temp dir, then rename).

    The temp dir is loaded with `load_router` before the rename, so what lands at `out`
    is an artifact that loads (a model the fast scorer cannot evaluate never does).
    `overwrite=True` replaces an existing *artifact* directory (one with a manifest.json);
    any other non-empty directory is refused so a typo cannot delete unrelated files.
    """
    import skops.io as sio

    out = Path(out)
    replace = check_out_dir(out, overwrite=overwrite)
    tmp = _staging_dir(out)
    try:
        (tmp / MODEL_FILE).write_bytes(stable_skops_bytes(pipeline))
        untrusted = set(sio.get_untrusted_types(file=tmp / MODEL_FILE)) - set(TRUSTED_TYPES)
        if untrusted:
            raise ArtifactError(f"model contains types outside TRUSTED_TYPES: {sorted(untrusted)}")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        created = created or utc_now()
        probes = pipeline.predict_proba(_probe_frame(probe_rows())).tolist()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": created,
            "version": "",  # set below, from the finished decision fields
            "tiers": list(tiers),
            "upstream_models": {t: upstream_models[t] for t in tiers},
            "decision": dict(decision),
            "feature_schema": F.feature_schema(uses_prompt_text),
            "uses_prompt_text": uses_prompt_text,
            "training_data": dict(training_data),
            "evaluation": dict(evaluation),
            "drift": dict(drift),
            "libraries": library_versions(),
            "model": {
                "file": MODEL_FILE,
                "format": "skops",
                "trusted_types": list(TRUSTED_TYPES),
                "classes": "tier indices, cheapest first",
            },
            "probes": probes,
            "files": files,
        }
        undefined = _non_finite(manifest)
        if undefined:  # say which figure, not json's "Out of range float values"
            raise ArtifactError(
                f"{out}: manifest field {undefined[0]!r} is {undefined[1]} (not valid JSON); "
                "that figure is undefined on this data"
            )
        manifest["version"] = artifact_version(manifest)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        try:
            load_router(tmp)
        except ArtifactError as exc:
            raise ArtifactError(
                f"{out}: the exported artifact does not load, so nothing was written: {exc}"
            ) from None
        if replace:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _non_finite(obj: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN or infinity in a JSON-like object, else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path, obj
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def copy_verified(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Router:
    """Verify `src` and copy exactly its listed files to `dst` (atomically); return `dst` loaded."""
    router = load_router(src)
    dst = Path(dst)
    # a file, a path under a file, a non-empty or unwritable directory (never replaced)
    check_out_dir(dst, replaceable=False)
    tmp = _staging_dir(dst)
    try:
        for name in [*router.manifest["files"], MANIFEST_FILE]:
            shutil.copy2(Path(src) / name, tmp / name)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_router(dst)
