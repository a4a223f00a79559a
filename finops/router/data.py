"""Labeled traffic for the router: the data contract, loaders, and the demo generator.

Contract (one row per request; JSONL, CSV or Parquet):

- `prompt` (string) or `messages` (OpenAI chat messages; a JSON string in CSV). Both may
  be absent when prompt capture is off: the router then trains on metadata alone.
- optional metadata: `feature`, `tenant`, `prompt_tokens`, `turn_count`, `has_tools`,
  `output_tokens` (used for dollar figures), `request_id`, and `prompt_tokens_est`: the
  router's own prompt-token feature as the shim computed it when serving (the request
  log's column of that name). When given it is the feature, with or without text, so a
  router trained from the log sees what it will see live; `prompt_tokens` (vLLM's count,
  chat template included) then only prices the request.
- a target: `label` (a tier name: the cheapest tier that served the request well) and/or
  `scores` (an object tier -> quality in [0, 1], e.g. judge scores or pass/fail). With
  scores only, the label is the cheapest tier whose score reaches the quality bar.

A row that breaks the contract is skipped and reported (`file:line`, the field, what was
expected); nothing valid is dropped with it, and nothing is skipped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from finops.router import features as F
from finops.router.model import MIN_TIERS

DEFAULT_TIERS = ("small", "mid", "large")
DEFAULT_QUALITY_BAR = 0.7


class DataError(ValueError):
    """The input as a whole cannot be used (no file, unknown format, no valid rows...)."""


@dataclass(frozen=True)
class BadRow:
    location: str  # file:line
    field: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.location}: field {self.field!r}: expected {self.expected}, got {self.got}"


@dataclass
class LabeledData:
    """Feature rows, targets and the per-tier quality matrix of a labeled set.

    `frame` has the feature columns of `features.extract`, `label` (tier index, cheapest
    first), `q_<tier>` (quality of serving the request with that tier), `input_tokens`,
    `output_tokens`, `row_hash` (see `row_hash`) and `location`.
    """

    frame: pl.DataFrame
    tiers: list[str]
    bad_rows: list[BadRow]
    read: int
    sha256: str
    source: str
    label_kind: str  # label | scores | mixed
    has_text: bool  # every row carries prompt text
    quality_bar: float = DEFAULT_QUALITY_BAR
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label"].to_numpy()

    @property
    def quality(self) -> np.ndarray:
        """(n, K) matrix: quality of each request when served by each tier."""
        return self.frame.select([f"q_{t}" for t in self.tiers]).to_numpy()

    def features(self, uses_text: bool) -> pl.DataFrame:
        """The model's input frame (text columns blanked when the model is metadata-only)."""
        cols = self.frame.select(list(_FRAME_SCHEMA))
        if not uses_text:
            cols = cols.with_columns([pl.lit("").alias(c) for c in F.TEXT_COLUMNS])
        return cols

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.labels, minlength=len(self.tiers))
        return {
            "source": self.source,
            "sha256": self.sha256,
            "rows_read": self.read,
            "rows_loaded": self.frame.height,
            "rows_bad": len(self.bad_rows),
            "label_kind": self.label_kind,
            "has_prompt_text": self.has_text,
            "quality_bar": self.quality_bar,
            "label_shares": {
                t: round(float(c) / max(1, self.frame.height), 4)
                for t, c in zip(self.tiers, counts, strict=True)
            },
        }

    def take(self, idx: np.ndarray) -> LabeledData:
        return LabeledData(
            self.frame[idx],
            self.tiers,
            self.bad_rows,
            len(idx),
            self.sha256,
            self.source,
            self.label_kind,
            self.has_text,
            self.quality_bar,
            self.notes,
        )


_FRAME_SCHEMA: dict[str, Any] = {
    **{c: pl.String for c in F.TEXT_COLUMNS},
    **{c: pl.Float64 for c in F.NUMERIC_COLUMNS},
    **{c: pl.String for c in F.CATEGORICAL_COLUMNS},
}


def parse_tiers(spec: str | Sequence[str] | None) -> list[str]:
    """`small,mid,large` (cheapest first) -> list of 3+ distinct names.

    Three or more, because the model is a multinomial classifier whose fast scorer (and
    so every artifact's load check) needs one row of coefficients per tier; with two
    tiers training would export an artifact that can never be loaded.
    """
    if spec is None:
        return list(DEFAULT_TIERS)
    tiers = [str(t).strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    if any(not t for t in tiers) or len(set(tiers)) != len(tiers):
        raise DataError(f"--tiers: expected distinct non-empty names, cheapest first, got {spec!r}")
    if len(tiers) < MIN_TIERS:
        raise DataError(
            f"--tiers: expected {MIN_TIERS}+ tiers, cheapest first, got {len(tiers)} ({spec!r}); "
            "the router's model ranks three or more tiers (with fewer, route by rule instead)"
        )
    return tiers


class _RowError(Exception):
    def __init__(self, field: str, expected: str, got: Any):
        super().__init__(field)
        self.field = field
        self.expected = expected
        self.got = got if isinstance(got, str) and got.startswith("<") else _show(got)


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _missing(v: Any) -> bool:
    return (
        v is None
        or (isinstance(v, str) and v.strip() == "")
        or (isinstance(v, float) and math.isnan(v))
    )


def _maybe_json(v: Any, field: str, expected: str) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:  # JSONDecodeError, or an integer too long to convert
            raise _RowError(field, expected, v) from None
    return v


def _utf8(field: str, s: str | None) -> str | None:
    """`s` unchanged, or a row error when it holds a lone surrogate (JSON's "\\ud800").

    Python's json accepts such escapes, but the text cannot be encoded, so the frame,
    the hashing vectorizers and any UTF-8 writer would fail on it later.
    """
    if s is not None:
        try:
            s.encode()
        except UnicodeEncodeError as exc:
            raise _RowError(
                field, "text that encodes to UTF-8", f"<lone surrogate at character {exc.start}>"
            ) from None
    return s


def _num(raw: Mapping[str, Any], key: str, *, integer: bool = False, minimum: float = 0) -> Any:
    v = raw.get(key)
    if _missing(v):
        return None
    try:
        x = float(v) if not isinstance(v, bool) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past 1e308
        x = None
    if x is None or not math.isfinite(x) or x < minimum or (integer and x != int(x)):
        kind = "an integer" if integer else "a number"
        raise _RowError(key, f"{kind} >= {minimum:g}", v)
    return int(x) if integer else x


def _bool(raw: Mapping[str, Any], key: str) -> bool | None:
    v = raw.get(key)
    if _missing(v):
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise _RowError(key, "a boolean (true/false/1/0)", v)


def _str(raw: Mapping[str, Any], key: str) -> str | None:
    v = raw.get(key)
    if _missing(v):
        return None
    if not isinstance(v, str | int):
        raise _RowError(key, "a string", v)
    return str(v)


# set by load_lake on rows whose prompt_text is not null: capture was on, so an empty
# prompt_text is text "" (the name keeps it out of any file's columns)
_CAPTURED = "\x00prompt_captured"


def parse_row(
    raw: Mapping[str, Any], tiers: Sequence[str], quality_bar: float = DEFAULT_QUALITY_BAR
) -> dict[str, Any]:
    """Validate one contract row; returns a frame row or raises _RowError."""
    text: str | None = None
    turns: int | None = None
    if not _missing(raw.get("messages")):
        msgs = _maybe_json(raw["messages"], "messages", "a JSON list of chat messages")
        if hasattr(msgs, "tolist"):
            msgs = msgs.tolist()
        if not isinstance(msgs, list) or not all(
            isinstance(m, Mapping) and "role" in m for m in msgs
        ):
            raise _RowError("messages", "a list of {role, content} objects", msgs)
        text, turns = F.messages_text(msgs)
        text = _utf8("messages", text)
        turns = max(turns, 1)
    elif not _missing(raw.get("prompt")):
        if not isinstance(raw["prompt"], str):
            raise _RowError("prompt", "a string", raw["prompt"])
        text = _utf8("prompt", raw["prompt"])
    elif raw.get(_CAPTURED) is True and raw.get("prompt") == "":
        # the shim captured the prompt and it had no text (a token-ID prompt, an image):
        # that is text "", as route() saw it, not capture off
        text = ""
    prompt_tokens = _num(raw, "prompt_tokens")
    served_estimate = _num(raw, "prompt_tokens_est")
    turn_count = _num(raw, "turn_count", integer=True, minimum=1)
    has_tools = _bool(raw, "has_tools")
    feature = _utf8("feature", _str(raw, "feature"))
    tenant = _utf8("tenant", _str(raw, "tenant"))
    output_tokens = _num(raw, "output_tokens")
    if text is None and prompt_tokens is None and served_estimate is None and feature is None:
        raise _RowError(
            "prompt", "prompt or messages (or, with capture off, prompt_tokens/feature)", "<none>"
        )
    k = len(tiers)
    label: int | None = None
    if not _missing(raw.get("label")):
        lab = str(raw["label"]).strip()
        if lab not in tiers:
            raise _RowError("label", f"one of {list(tiers)}", raw["label"])
        label = tiers.index(lab)
    q: list[float] | None = None
    if not _missing(raw.get("scores")):
        sc = _maybe_json(raw["scores"], "scores", "a JSON object tier -> quality in [0, 1]")
        if not isinstance(sc, Mapping) or set(sc) != set(tiers):
            raise _RowError("scores", f"an object with exactly the tiers {list(tiers)}", sc)
        q = []
        for t in tiers:
            v = sc[t]
            try:  # bool counts as 0/1; an int past 1e308 overflows float()
                x = float(v) if isinstance(v, int | float) else math.nan
            except OverflowError:
                x = math.nan
            if not 0.0 <= x <= 1.0:
                raise _RowError(f"scores.{t}", "a number in [0, 1]", v)
            q.append(x)
        if label is None:
            label = next((i for i, v in enumerate(q) if v >= quality_bar), k - 1)
    if label is None:
        raise _RowError("label", f"a tier name in {list(tiers)} or a scores object", "<none>")
    if q is None:
        q = [1.0 if i >= label else 0.0 for i in range(k)]
    row = F.extract(
        text=text,
        prompt_tokens=served_estimate if served_estimate is not None else prompt_tokens,
        turn_count=turn_count if turn_count is not None else turns,
        has_tools=has_tools,
        feature=feature,
        tenant=tenant,
        count_from_text=served_estimate is None,
    )
    row["label"] = label
    row["_has_text"] = text is not None
    row["_kind"] = "scores" if not _missing(raw.get("scores")) else "label"
    row["input_tokens"] = (
        prompt_tokens
        if prompt_tokens is not None
        else served_estimate
        if served_estimate is not None
        else (len(text) / F.CHARS_PER_TOKEN if text else 0.0)
    )
    row["output_tokens"] = output_tokens
    for t, v in zip(tiers, q, strict=True):
        row[f"q_{t}"] = v
    row["row_hash"] = row_hash(raw.get("request_id"), text, row)
    return row


def row_hash(request_id: Any, text: str | None, row: Mapping[str, Any]) -> int:
    """A uint64 that names a request across files, so `evaluate` can tell training rows.

    The key is the `request_id` when the row has one, else the prompt text with its
    whitespace collapsed, else (capture off) the metadata features the model reads: two
    rows with the same key are the same request to the router. The hash is the first 8
    bytes of the key's sha256.
    """
    if not _missing(request_id):
        key = f"id\0{str(request_id).strip()}"
    elif text is not None:
        key = "text\0" + " ".join(text.split())
    else:
        meta = {c: row.get(c) for c in (*F.NUMERIC_COLUMNS, *F.CATEGORICAL_COLUMNS)}
        key = "row\0" + json.dumps(meta, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


# What `errors="surrogateescape"` turns an undecodable byte into (0x80-0xff -> U+DC80-U+DCFF);
# decoded UTF-8 never contains these, so finding one means the file had an invalid byte.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _invalid_utf8(s: str) -> str | None:
    """'<invalid UTF-8 byte 0x.. at character N>' for text read with surrogateescape, else None.

    Files are read this way (not with errors="replace") so a row with a bad byte is
    reported, as a lone surrogate is, instead of training on U+FFFD in its place.
    """
    m = _BAD_BYTE.search(s)
    if m is None:
        return None
    return f"<invalid UTF-8 byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start()}>"


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # utf-8-sig: a byte-order mark (Windows editors, Excel) is not part of the first row
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            loc = f"{path}:{n}"
            bad = _invalid_utf8(line)
            if bad:
                yield loc, _RowError("<line>", "UTF-8 text", bad)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield loc, _RowError("<line>", "a JSON object", f"<invalid JSON: {exc.msg}>")
                continue
            except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit
                why = str(exc).split(";")[0]  # drop the hint about sys.set_int_max_str_digits
                yield loc, _RowError("<line>", "a JSON object", f"<unreadable JSON: {why}>")
                continue
            if not isinstance(obj, dict):
                yield loc, _RowError("<line>", "a JSON object", f"<{type(obj).__name__}>")
                continue
            yield loc, obj


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would otherwise
    # become part of the first column's name
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            return
        for row in reader:
            loc = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                cells = len(row.get(None) or []) + sum(v is not None for k, v in row.items() if k)
                yield (
                    loc,
                    _RowError("<line>", f"{len(reader.fieldnames)} cells", f"<{cells} cells>"),
                )
                continue
            bad = next(((k, b) for k, v in row.items() if (b := _invalid_utf8(v))), None)
            if bad:
                yield loc, _RowError(bad[0], "UTF-8 text", bad[1])
                continue
            yield loc, row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:  # truncated, corrupt, not Parquet
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    for n, row in enumerate(df.iter_rows(named=True), 1):
        yield f"{path}:row {n}", row


# file suffix -> format, for reading labeled sets and writing the demo one
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}


def file_format(path: str | os.PathLike[str]) -> str:
    """jsonl, csv or parquet by the file's suffix; DataError for anything else."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def _reader(path: Path) -> Iterator[tuple[str, Any]]:
    readers = {"jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}
    return readers[file_format(path)](path)


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def from_records(
    records: Iterable[tuple[str, Any]],
    *,
    tiers: Sequence[str],
    source: str,
    sha256: str,
    quality_bar: float = DEFAULT_QUALITY_BAR,
) -> LabeledData:
    """Validate (location, raw row) pairs into LabeledData; bad rows are kept as BadRow."""
    tiers = parse_tiers(tiers)
    rows: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    read = 0
    for loc, raw in records:
        read += 1
        if isinstance(raw, _RowError):
            bad.append(BadRow(loc, raw.field, raw.expected, raw.got))
            continue
        try:
            row = parse_row(raw, tiers, quality_bar)
        except _RowError as exc:
            bad.append(BadRow(loc, exc.field, exc.expected, exc.got))
            continue
        row["location"] = loc
        rows.append(row)
    if not rows:
        detail = f"; first problem: {bad[0]}" if bad else ""
        raise DataError(f"{source}: no valid labeled rows ({read} read){detail}")
    schema = {
        **_FRAME_SCHEMA,
        "label": pl.Int64,
        "_has_text": pl.Boolean,
        "_kind": pl.String,
        "input_tokens": pl.Float64,
        "output_tokens": pl.Float64,
        **{f"q_{t}": pl.Float64 for t in tiers},
        "row_hash": pl.UInt64,
        "location": pl.String,
    }
    frame = pl.DataFrame(rows, schema=schema)
    kinds = set(frame["_kind"].unique().to_list())
    has_text = bool(frame["_has_text"].all())
    notes = []
    if frame["_has_text"].any() and not has_text:
        notes.append(
            f"{int((~frame['_has_text']).sum())} of {frame.height} rows have no prompt text; "
            "training on metadata features only"
        )
    counts = np.bincount(frame["label"].to_numpy(), minlength=len(tiers))
    empty = [t for t, c in zip(tiers, counts, strict=True) if c == 0]
    if empty:
        notes.append(f"no rows labeled {empty}")
    return LabeledData(
        frame=frame.drop("_has_text", "_kind"),
        tiers=tiers,
        bad_rows=bad,
        read=read,
        sha256=sha256,
        source=source,
        label_kind=kinds.pop() if len(kinds) == 1 else "mixed",
        has_text=has_text,
        quality_bar=quality_bar,
        notes=notes,
    )


def load_labeled(
    path: str | os.PathLike[str],
    *,
    tiers: Sequence[str] | str | None = None,
    quality_bar: float = DEFAULT_QUALITY_BAR,
) -> LabeledData:
    """Load a labeled set from a JSONL, CSV or Parquet file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    tiers = parse_tiers(tiers)
    return from_records(
        _reader(p), tiers=tiers, source=str(p), sha256=sha256_path(p), quality_bar=quality_bar
    )


def load_lake(
    lake: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    *,
    tiers: Sequence[str] | str | None = None,
    quality_bar: float = DEFAULT_QUALITY_BAR,
) -> LabeledData:
    """Join the lake's requests (prompt_text where capture was on) with a labels file.

    The labels file (JSONL/CSV/Parquet) has `request_id` plus `label` and/or `scores`.
    Requests without captured text train on metadata only (feature, tenant, tokens,
    turns, tools), which is the privacy default.
    """
    import finops

    tiers = parse_tiers(tiers)
    lp = Path(labels)
    if not lp.is_file():
        raise DataError(f"{lp}: no such labels file")
    label_rows: dict[str, tuple[str, Any]] = {}
    bad: list[BadRow] = []
    read = 0  # lines that never reach from_records (which counts the rest)
    for loc, raw in _reader(lp):
        if isinstance(raw, _RowError):
            read += 1
            bad.append(BadRow(loc, raw.field, raw.expected, raw.got))
            continue
        if _missing(raw.get("request_id")):
            read += 1
            bad.append(BadRow(loc, "request_id", "a request id from the lake", "<none>"))
            continue
        rid = str(raw["request_id"])
        if rid in label_rows:  # keep the first label; a later one must not replace it silently
            read += 1
            bad.append(
                BadRow(
                    loc,
                    "request_id",
                    f"one label per request (first labeled at {label_rows[rid][0]})",
                    _show(raw["request_id"]),
                )
            )
            continue
        label_rows[rid] = (loc, raw)
    db = finops.connect(lake)
    reqs = db.sql(
        "SELECT request_id, prompt_text, feature, tenant, input_tokens, output_tokens, "
        "turn_count, has_tools, prompt_tokens_est FROM clean.requests WHERE request_id IN "
        "(SELECT unnest(?::VARCHAR[]))",
        params=[list(label_rows)],
    ).pl()
    by_id = {r["request_id"]: r for r in reqs.iter_rows(named=True)}

    def records() -> Iterator[tuple[str, Any]]:
        for rid, (loc, raw) in label_rows.items():
            req = by_id.get(rid)
            if req is None:
                yield loc, _RowError("request_id", "a request id present in the lake", rid)
                continue
            yield (
                loc,
                {
                    "request_id": rid,
                    "prompt": req["prompt_text"],
                    _CAPTURED: req["prompt_text"] is not None,
                    "feature": req["feature"],
                    "tenant": req["tenant"],
                    "prompt_tokens": req["input_tokens"],
                    # the router's feature as served (logs from before it: vLLM's count)
                    "prompt_tokens_est": req["prompt_tokens_est"],
                    "output_tokens": req["output_tokens"],
                    "turn_count": req["turn_count"] if (req["turn_count"] or 0) >= 1 else None,
                    "has_tools": req["has_tools"],
                    "label": raw.get("label"),
                    "scores": raw.get("scores"),
                },
            )

    data = from_records(
        records(),
        tiers=tiers,
        source=f"lake {lake} + {lp}",
        sha256=lake_labels_sha256(sha256_path(lp), Path(lake)),
        quality_bar=quality_bar,
    )
    data.bad_rows = bad + data.bad_rows
    data.read += read
    return data


def lake_labels_sha256(labels_sha256: str, lake: Path) -> str:
    """The training-data hash of a labels file joined with a lake (`load_lake`); `evaluate`
    recomputes it to tell an artifact's own training data."""
    return hashlib.sha256((labels_sha256 + _lake_fingerprint(lake)).encode()).hexdigest()


def _lake_fingerprint(lake: Path) -> str:
    """Names and sizes of the requests table's files (content-fingerprinted by the lake)."""
    h = hashlib.sha256()
    for f in sorted((lake / "requests").glob("date=*/*.parquet")):
        h.update(f"{f.relative_to(lake)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Demo labeled set
# ---------------------------------------------------------------------------------------

_PRODUCTS = ["invoice", "order", "subscription", "shipment", "account", "refund", "warranty"]
_LANGS = ["French", "German", "Spanish", "Japanese", "Portuguese", "Italian"]
_FIELDS = ["invoice number", "due date", "customer email", "order total", "tracking id", "IBAN"]
_NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jo"]
_SENT = [
    "The delivery was late again and nobody answered my emails.",
    "Great service, the replacement arrived the next day!",
    "I was charged twice for the same order and support keeps closing my ticket.",
    "The app works, but the new layout makes invoices hard to find.",
    "Honestly not sure the premium plan is worth it, though the support team was kind.",
    "Your courier left the parcel in the rain; the contents are ruined.",
]
_TABLES = ["orders", "customers", "invoices", "events", "subscriptions", "payments"]
_LANGS_CODE = ["Python", "TypeScript", "Go", "Java", "SQL", "Rust"]
_DOMAINS = ["employment contract", "data processing agreement", "lease", "NDA", "SaaS terms"]
_MED = ["metformin", "warfarin", "ibuprofen", "lisinopril", "amoxicillin", "sertraline"]
_TOOLS = ["search_orders", "get_weather", "create_ticket", "lookup_customer", "run_sql"]
_FILLER = [
    "Please keep it short.",
    "Thanks in advance!",
    "This is for a customer-facing page.",
    "Use a friendly tone.",
    "Answer in plain English.",
    "We need this today.",
]
_HARD_CUES = [
    "Be careful: the two requirements conflict in some cases; explain how you resolve it.",
    "Handle the edge case where the date is missing or ambiguous across time zones.",
    "Consider the exceptions and cite the clause you rely on.",
    "Think through each step and check the arithmetic.",
    "There are several constraints; make sure all of them hold at once.",
]


def _code_blob(rng: np.random.Generator, lines: int) -> str:
    out = []
    for i in range(lines):
        v = rng.choice(["total", "items", "user", "cfg", "row", "acc", "ts"])
        kind = rng.integers(0, 4)
        if kind == 0:
            out.append(
                f"    {v}_{i} = {v}.get('{rng.choice(_TABLES)}', {int(rng.integers(0, 99))})"
            )
        elif kind == 1:
            out.append(f"    if {v} is None or len({v}) > {int(rng.integers(1, 50))}:")
        elif kind == 2:
            out.append(f"        return process_{v}({v}, retries={int(rng.integers(1, 5))})")
        else:
            out.append(f"    for x in {v}: acc += x * {int(rng.integers(2, 9))}")
    return "def handler(event, context):\n" + "\n".join(out)


def _doc_blob(rng: np.random.Generator, sentences: int) -> str:
    parts = []
    for _ in range(sentences):
        parts.append(
            f"{rng.choice(_NAMES)} reported that the {rng.choice(_PRODUCTS)} "
            f"{rng.choice(['was not updated', 'shows a wrong amount', 'arrived damaged', 'is still pending', 'was cancelled by mistake'])} "
            f"on {int(rng.integers(1, 28))} {rng.choice(['March', 'June', 'October', 'November'])}."
        )
    return " ".join(parts)


# family: (feature, weight, tier distribution [small, mid, large], generator)
def _fam_reformat(rng):
    return (
        f"Convert this {rng.choice(_PRODUCTS)} record to JSON with keys name, date, amount: "
        f"{rng.choice(_NAMES)}, {int(rng.integers(1, 28))}/{int(rng.integers(1, 12))}/2026, "
        f"{rng.integers(10, 9999)}.{rng.integers(10, 99)} EUR. {rng.choice(_FILLER)}"
    )


def _fam_translate(rng):
    return f"Translate to {rng.choice(_LANGS)}: {rng.choice(_SENT)}"


def _fam_extract(rng):
    doc = _doc_blob(rng, int(rng.integers(1, 12)))
    return f"Extract the {rng.choice(_FIELDS)} from the text below. Return only the value.\n\n{doc}"


def _fam_sentiment(rng):
    return f'Classify the sentiment (positive, negative, mixed): "{rng.choice(_SENT)}"'


def _fam_summarize(rng):
    doc = _doc_blob(rng, int(rng.integers(3, 25)))
    return f"Summarize this support ticket in three bullet points for the {rng.choice(_PRODUCTS)} team.\n\n{doc}"


def _fam_reply(rng):
    return (
        f'Draft a reply to {rng.choice(_NAMES)} who wrote: "{rng.choice(_SENT)}" '
        f"Offer a {rng.choice(['refund', 'replacement', 'call back', 'discount'])}. {rng.choice(_FILLER)}"
    )


def _fam_sql(rng):
    a, b = rng.choice(_TABLES, 2, replace=False)
    return (
        f"Write a SQL query that returns the top {int(rng.integers(3, 20))} {a} by revenue "
        f"last month, joined with {b}. {rng.choice(_FILLER)}"
    )


def _fam_reasoning(rng):
    n = int(rng.integers(3, 9))
    return (
        f"A {rng.choice(_PRODUCTS)} plan costs {int(rng.integers(5, 90))} per seat with a "
        f"{int(rng.integers(5, 30))}% discount above {n} seats, billed quarterly, and a prorated "
        f"refund on cancellation after {int(rng.integers(10, 80))} days. What does a team of "
        f"{n + int(rng.integers(1, 40))} pay in year one if {int(rng.integers(1, 9))} people leave "
        f"in month {int(rng.integers(2, 11))}? {rng.choice(_HARD_CUES)}"
    )


def _fam_legal(rng):
    return (
        f"Review this clause of our {rng.choice(_DOMAINS)} and tell me whether it is enforceable "
        f"for a contractor in {rng.choice(['Germany', 'California', 'Ontario', 'France'])}: "
        f'"The {rng.choice(["Supplier", "Employee", "Processor"])} shall not, for a period of '
        f'{int(rng.integers(6, 36))} months, solicit any customer." {rng.choice(_HARD_CUES)}'
    )


def _fam_medical(rng):
    a, b = rng.choice(_MED, 2, replace=False)
    return (
        f"A patient on {a} was prescribed {b}. Summarize the interaction risk and what to "
        f"monitor, for a pharmacist. {rng.choice(_HARD_CUES)}"
    )


def _fam_refactor(rng):
    code = _code_blob(rng, int(rng.integers(8, 60)))
    return (
        f"Refactor this {rng.choice(_LANGS_CODE)} code to remove duplication and add error "
        f"handling; keep behaviour identical.\n\n{code}\n\n{rng.choice(_HARD_CUES)}"
    )


def _fam_codefix(rng):
    code = _code_blob(rng, int(rng.integers(3, 15)))
    return f"Why does this raise a KeyError? Fix it.\n\n{code}"


def _fam_tools(rng):
    return (
        f"Use {rng.choice(_TOOLS)} to find {rng.choice(_NAMES)}'s last "
        f"{rng.choice(_PRODUCTS)}, then decide whether a refund is allowed under our policy "
        f"and open a ticket if not. {rng.choice(_FILLER)}"
    )


def _fam_rag(rng):
    doc = _doc_blob(rng, int(rng.integers(4, 30)))
    return (
        f"Using only the context, answer: when was the {rng.choice(_PRODUCTS)} for "
        f"{rng.choice(_NAMES)} {rng.choice(['cancelled', 'updated', 'shipped'])}?\n\nContext:\n{doc}"
    )


_FAMILIES: list[tuple[str, str, float, tuple[float, float, float], Any, float]] = [
    # name, feature, weight, P(needed tier), generator, P(tools)
    ("reformat", "extract", 0.14, (0.90, 0.08, 0.02), _fam_reformat, 0.0),
    ("translate", "translate", 0.12, (0.85, 0.12, 0.03), _fam_translate, 0.0),
    ("extract", "extract", 0.12, (0.80, 0.17, 0.03), _fam_extract, 0.0),
    ("sentiment", "classify", 0.13, (0.88, 0.10, 0.02), _fam_sentiment, 0.0),
    ("summarize", "summarize", 0.11, (0.40, 0.52, 0.08), _fam_summarize, 0.0),
    ("reply", "chat-assistant", 0.10, (0.45, 0.48, 0.07), _fam_reply, 0.0),
    ("sql", "code-complete", 0.07, (0.25, 0.60, 0.15), _fam_sql, 0.05),
    ("rag", "rag-qa", 0.07, (0.40, 0.45, 0.15), _fam_rag, 0.0),
    ("codefix", "code-complete", 0.05, (0.15, 0.55, 0.30), _fam_codefix, 0.05),
    ("tools", "chat-assistant", 0.04, (0.05, 0.45, 0.50), _fam_tools, 0.9),
    ("reasoning", "chat-assistant", 0.04, (0.03, 0.30, 0.67), _fam_reasoning, 0.0),
    ("legal", "chat-assistant", 0.02, (0.02, 0.23, 0.75), _fam_legal, 0.0),
    ("medical", "rag-qa", 0.02, (0.02, 0.20, 0.78), _fam_medical, 0.0),
    ("refactor", "code-complete", 0.02, (0.02, 0.25, 0.73), _fam_refactor, 0.0),
]
_TENANTS = ["acme", "globex", "initech", "umbrella", "hooli", "stark"]


def demo_labeled_rows(
    n: int = 20_000, seed: int = 0, *, noise: float = 0.10, scores: bool = False
) -> list[dict[str, Any]]:
    """Realistic labeled traffic for the three tiers teams run (deterministic for a seed).

    Families straddle tiers (a ticket summary usually needs `mid`, sometimes `small`),
    vocabulary overlaps across tiers (tickets, invoices, code appear everywhere), a hard
    cue in the text raises the needed tier only probabilistically, length is weakly
    informative, and `noise` of the labels move to a neighbouring tier, as a judge's
    disagreements would. Shares come out near 55/30/15 (small/mid/large).
    """
    rng = np.random.default_rng(seed)
    weights = np.array([f[2] for f in _FAMILIES])
    weights /= weights.sum()
    fam_idx = rng.choice(len(_FAMILIES), size=n, p=weights)
    rows = []
    for i, fi in enumerate(fam_idx):
        name, feature, _, dist, gen, p_tools = _FAMILIES[fi]
        text = gen(rng)
        need = int(rng.choice(3, p=dist))
        # cross-family cues: a routine request sometimes carries a hard constraint
        if need < 2 and rng.random() < 0.06:
            text = f"{text} {rng.choice(_HARD_CUES)}"
            need = min(2, need + int(rng.random() < 0.6))
        if rng.random() < noise:  # a judge disagreeing flips to a neighbouring tier
            label = need + (1 if need == 0 else -1 if need == 2 else int(rng.choice([-1, 1])))
        else:
            label = need
        turns = 1 + int(rng.poisson(0.4 + 0.6 * need))
        has_tools = bool(rng.random() < p_tools)
        if turns > 1:
            messages = [{"role": "system", "content": "You are a helpful assistant for Acme."}]
            for _turn in range(turns - 1):
                messages.append({"role": "user", "content": rng.choice(_SENT)})
                messages.append({"role": "assistant", "content": rng.choice(_FILLER)})
            messages.append({"role": "user", "content": text})
            prompt_field: dict[str, Any] = {"messages": messages}
        else:
            prompt_field = {"prompt": text}
        out_tokens = int(rng.lognormal(4.0 + 0.5 * need, 0.6))
        row: dict[str, Any] = {
            "request_id": f"demo-{seed}-{i:06d}",
            **prompt_field,
            "feature": feature,
            "tenant": str(rng.choice(_TENANTS)),
            "turn_count": turns,
            "has_tools": has_tools,
            "output_tokens": out_tokens,
            "family": name,
        }
        if scores:
            # judge scores: tiers at or above the needed one pass, cheaper ones mostly fail
            sc = {}
            for t, tier in enumerate(DEFAULT_TIERS):
                base = rng.uniform(0.75, 1.0) if t >= label else rng.uniform(0.0, 0.65)
                sc[tier] = round(float(base), 3)
            row["scores"] = sc
        else:
            row["label"] = DEFAULT_TIERS[label]
        rows.append(row)
    return rows


def write_demo_labeled(
    out: str | os.PathLike[str], n: int = 20_000, seed: int = 0, *, scores: bool = False
) -> Path:
    """Write the demo labeled set as JSONL, CSV or Parquet by the suffix of `out`.

    The suffixes are the ones `load_labeled` reads (anything else is refused before
    writing), so the file written can always be trained on.
    """
    p = Path(out)
    fmt = file_format(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = demo_labeled_rows(n, seed, scores=scores)
    if fmt == "parquet":
        df = pl.DataFrame(
            [
                {
                    **r,
                    "messages": json.dumps(r["messages"]) if "messages" in r else None,
                    **({"scores": json.dumps(r["scores"])} if "scores" in r else {}),
                }
                for r in rows
            ],
            infer_schema_length=None,
        )
        df.write_parquet(p)
    elif fmt == "csv":
        buf = io.StringIO()
        cols = sorted({k for r in rows for k in r})
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()}
            )
        p.write_text(buf.getvalue())
    else:
        with open(p, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return p
