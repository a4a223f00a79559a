"""The vectorized exposition parser against prometheus_client, sample by sample.

The corpus in tests/data/exposition holds dcgm-exporter payloads in each label
variant, a real vLLM /metrics payload recorded from the CPU server, the
Prometheus documentation's text example plus hard label values, and an
OpenMetrics payload with exemplars and timestamps in seconds.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import orjson
import polars as pl
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from collectors.dcgm import render_payload
from collectors.exposition import parse

DATA = Path(__file__).parent / "data" / "exposition"
CORPUS = sorted(DATA.glob("*.txt"))


def reference_samples(text: str, openmetrics: bool, our_names: set[str]) -> list[tuple]:
    """prometheus_client's view, in our shape: (name, labels, value, timestamp_ms).

    Its 0.0.4 parser appends `_total` to samples of a counter family whose
    name lacks it (DCGM's energy counter); the exposition text does not, and
    neither do we, so that rename is undone here.
    """
    parser = om_families if openmetrics else text_families
    out = []
    for fam in parser(text):
        for s in fam.samples:
            name = s.name if s.name in our_names else s.name.removesuffix("_total")
            ts = None if s.timestamp is None else round(float(s.timestamp) * 1000)
            out.append((name, tuple(sorted(s.labels.items())), float(s.value), ts))
    return sorted(out, key=_key)


def _key(x: tuple) -> tuple:
    return (x[0], x[1], repr(x[2]), repr(x[3]))


def ours(text: str | bytes, **kw) -> tuple[list[tuple], object]:
    r = parse(text, **kw)
    rows = [(n, tuple(sorted(lab.items())), v, t) for n, lab, v, t in r.sample_tuples()]
    return sorted(rows, key=_key), r


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0] and x[1] == y[1] and x[3] == y[3], (x, y)
        assert x[2] == y[2] or (math.isnan(x[2]) and math.isnan(y[2])), (x, y)


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_matches_prometheus_client(path: Path) -> None:
    text = path.read_text()
    mine, result = ours(text)
    assert result.rejects.height == 0, result.rejects.to_dicts()
    assert mine, "corpus payload parsed to nothing"
    assert_same(mine, reference_samples(text, result.openmetrics, {m[0] for m in mine}))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_crlf_and_missing_final_newline(path: Path) -> None:
    """CRLF and bytes change nothing. Without its final line feed an OpenMetrics body
    (ended by `# EOF`) is still whole, while a 0.0.4 body's last line may have been cut
    mid-number: that line alone is rejected and every line before it still loads."""
    text = path.read_text()
    base, r0 = ours(text)
    crlf, r1 = ours(text.replace("\n", "\r\n"))
    no_nl, r2 = ours(text.rstrip("\n"))
    as_bytes, r3 = ours(text.encode())
    assert r1.rejects.height == r3.rejects.height == 0
    assert_same(crlf, base)
    assert_same(as_bytes, base)
    if r0.openmetrics:
        assert r2.rejects.height == 0
        assert_same(no_nl, base)
    else:
        lines = text.rstrip("\n").split("\n")
        assert r2.rejects["line"].to_list() == [len(lines)]
        assert "without a line feed" in r2.rejects["reason"][0]
        assert_same(no_nl, ours("\n".join(lines[:-1]) + "\n")[0])


def test_64_gpu_dcgm_payload_matches() -> None:
    text = render_payload(64, variant="k8s", pods={3: ("ns", "pod-3", "c")})
    mine, _ = ours(text)
    assert len(mine) == 64 * 26
    assert_same(mine, reference_samples(text, False, {m[0] for m in mine}))


def test_random_label_values_generated_by_prometheus_client() -> None:
    """Escapes, quotes, newlines, braces and unicode, written by the reference writer."""
    rng = random.Random(7)
    alphabet = ['"', "\\", "\n", "{", "}", ",", "=", " ", "#", "a", "Z", "é", "✓", "\t", "0"]
    reg = CollectorRegistry()
    g = Gauge("fuzz_gauge", "fuzzed label values", ["a", "b"], registry=reg)
    c = Counter("fuzz_requests", "a counter", ["path"], registry=reg)
    h = Histogram("fuzz_latency_seconds", "a histogram", ["m"], registry=reg)
    for i in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
        g.labels(a, b).set(rng.choice([rng.uniform(-1e6, 1e6), math.inf, -math.inf, i]))
        c.labels(a).inc(rng.randint(1, 5))
        h.labels(b).observe(rng.random())
    text = generate_latest(reg).decode()
    mine, result = ours(text)
    assert result.rejects.height == 0
    assert_same(mine, reference_samples(text, False, {m[0] for m in mine}))


def test_output_columns_types_and_canonical_labels() -> None:
    r = parse((DATA / "edge_cases.txt").read_text())
    assert r.samples.schema == pl.Schema(
        {
            "name": pl.String,
            "labels": pl.String,
            "value": pl.Float64,
            "timestamp_ms": pl.Int64,
            "type": pl.String,
            "line": pl.Int64,
        }
    )
    row = r.samples.filter(pl.col("name") == "msdos_file_access_time_seconds").row(0, named=True)
    assert orjson.loads(row["labels"]) == {
        "path": "C:\\DIR\\FILE.TXT",
        "error": 'Cannot find file:\n"FILE.TXT"',
    }
    # canonical: sorted keys, compact, the same string the lake's canonical_json makes
    from finops.lake import canonical_json

    for labels in r.samples["labels"]:
        assert labels == canonical_json(orjson.loads(labels))
    types = dict(r.samples.select("name", "type").unique().iter_rows())
    assert types["http_requests_total"] == "counter"
    assert types["http_request_duration_seconds_bucket"] == "histogram"
    assert types["rpc_duration_seconds"] == "summary"
    assert types["rpc_duration_seconds_count"] == "summary"
    assert types["metric_without_timestamp_and_labels"] == "untyped"
    # a sample after a family that does not belong to it is untyped, not the family's type
    assert types["untyped_after_family"] == "untyped"
    weird = r.samples.filter(pl.col("name") == "something_weird").row(0, named=True)
    assert weird["value"] == math.inf and weird["timestamp_ms"] == -3982045
    nan = r.samples.filter(pl.col("labels") == '{"kind":"nan"}')["value"][0]
    assert math.isnan(nan)
    assert r.samples.filter(pl.col("name") == "empty_labels")["labels"][0] == "{}"
    hist = r.metadata.filter(pl.col("name") == "http_request_duration_seconds").row(0, named=True)
    assert hist["type"] == "histogram" and hist["help"].startswith("A histogram")
    assert r.labels_map().dtype == pl.List(pl.Struct({"name": pl.String, "value": pl.String}))


def test_openmetrics_seconds_exemplars_created_and_unit() -> None:
    r = parse((DATA / "openmetrics.txt").read_text())
    assert r.openmetrics
    foo = dict(
        r.samples.filter(pl.col("name").str.starts_with("foo"))
        .select("name", "timestamp_ms")
        .iter_rows()
    )
    assert foo == {"foo_total": 1520879607789, "foo_created": 1520879607789}
    buckets = r.samples.filter(pl.col("name") == "hist_bucket")
    # the exemplar's own value and timestamp are ignored, never read as the sample's
    assert buckets["timestamp_ms"].null_count() == buckets.height
    assert buckets["value"].to_list() == [0.0, 8.0, 17.0]
    created = r.samples.filter(pl.col("name") == "hist_created").row(0, named=True)
    assert created["type"] == "histogram" and created["value"] == 1520430000.123
    unit = r.metadata.filter(pl.col("name") == "acme_http_router_request_seconds")["unit"][0]
    assert unit == "seconds"
    # read as 0.0.4 the same token is milliseconds (as prometheus_client reads it too)
    forced = parse((DATA / "openmetrics.txt").read_text(), openmetrics=False)
    assert forced.samples.filter(pl.col("name") == "foo_total")["timestamp_ms"][0] == 1520879608


def test_one_bad_line_is_rejected_with_its_number_and_the_rest_loads() -> None:
    good = (DATA / "dcgm_v3.txt").read_text().splitlines()
    lines = list(good)
    lines.insert(5, 'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-x} 12')  # unclosed quote
    lines.insert(9, "DCGM_FI_DEV_GPU_UTIL{gpu=0} 12")  # unquoted value
    lines.insert(12, 'DCGM_FI_DEV_GPU_UTIL{gpu="0"} twelve')  # not a number
    lines.insert(15, 'DCGM_FI_DEV_GPU_UTIL{gpu="0",gpu="1"} 1')  # duplicate label
    lines.insert(18, 'DCGM_FI_DEV_GPU_UTIL{bad\\escape="\\q"} 1')  # bad label name
    lines.insert(21, "3DCGM_BAD_NAME 1")  # invalid metric name
    lines.insert(24, 'DCGM_FI_DEV_GPU_UTIL{gpu="0"} 1 2 3')  # extra tokens
    lines.insert(27, "# TYPE DCGM_FI_X notatype")
    text = "\n".join(lines) + "\n"
    with pytest.raises(ValueError):
        list(text_families(text))  # the reference gives up on the whole payload
    r = parse(text)
    assert r.rejects["line"].to_list() == [6, 10, 13, 16, 19, 22, 25, 28]
    reasons = r.rejects["reason"].to_list()
    assert "missing closing" in reasons[0] or "not closed" in reasons[0]
    assert "quoted string" in reasons[1]
    assert "expected a number" in reasons[2] and "twelve" in reasons[2]
    assert "duplicate label name 'gpu'" in reasons[3]
    assert "label 'bad': expected '='" in reasons[4]
    assert "invalid metric name" in reasons[5]
    assert "unexpected text after the timestamp" in reasons[6]
    assert "unknown type 'notatype'" in reasons[7]
    assert r.rejects["raw"][0] == lines[5]
    mine, _ = ours("\n".join(good) + "\n")
    assert r.samples.height == len(mine)  # every valid sample still loaded


def test_bad_utf8_content_after_eof_and_a_huge_line() -> None:
    payload = b'a 1\nb{x="\xff\xfe"} 2\nc 3\n'
    r = parse(payload)
    assert r.samples["name"].to_list() == ["a", "c"]
    assert r.rejects.row(0, named=True)["line"] == 2
    assert "UTF-8" in r.rejects["reason"][0]

    r = parse("# TYPE a gauge\na 1\n# EOF\nb 2\n")
    assert r.samples["name"].to_list() == ["a"]
    assert r.rejects.row(0, named=True) == {
        "line": 4,
        "raw": "b 2",
        "reason": "content after '# EOF'",
    }

    huge = 'big{v="' + "x" * 10_000_000 + "\n"  # 10 MB, quote never closed
    r = parse("a 1\n" + huge + "c 3\n")
    assert r.samples["name"].to_list() == ["a", "c"]
    assert r.rejects["line"].to_list() == [2]
    assert len(r.rejects["raw"][0]) == 500  # the excerpt is bounded


def test_whitespace_tabs_leading_commas_and_quoted_utf8_names() -> None:
    text = (
        '  spaced{a="1"}\t 5\t 1000\n'
        "tabbed\t7\n"
        '{"my.metric", "my.label"="v"} 3\n'
        'x{a="1" , b = "2" ,} 4\n'
    )
    r = parse(text)
    assert r.rejects.height == 0, r.rejects.to_dicts()
    got = {n: (lab, v, t) for n, lab, v, t in r.sample_tuples()}
    assert got["spaced"] == ({"a": "1"}, 5.0, 1000)
    assert got["tabbed"] == ({}, 7.0, None)
    assert got["my.metric"] == ({"my.label": "v"}, 3.0, None)
    assert got["x"] == ({"a": "1", "b": "2"}, 4.0, None)


def test_empty_and_comment_only_payloads() -> None:
    for text in ("", "\n\n", "# just a comment\n", "# HELP a x\n# TYPE a gauge\n"):
        r = parse(text)
        assert r.samples.height == 0 and r.rejects.height == 0


def test_out_of_range_timestamp_is_rejected_not_fatal() -> None:
    """A timestamp beyond Int64 milliseconds rejects that line; the others still load."""
    from collectors.exposition import parse

    res = parse("m 1 67031658000000000000\nm 2\n")
    assert res.samples.height == 1
    assert res.samples["value"].to_list() == [2.0]
    assert res.rejects.height == 1
    assert res.rejects["line"].to_list() == [1]
    assert "out of range" in res.rejects["reason"][0]
