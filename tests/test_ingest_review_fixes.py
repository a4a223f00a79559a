"""Ingest review findings: mapping time zones, mixed-type JSONL fields, OpenAI records
without usage, broken CSV quoting and headers, mapping-file mistakes, --interval, and
re-ingest cache-event counts. Real files, a real Parquet lake, the real CLI.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import finops
from collectors.logs import LogError, ingest_file
from collectors.mapping import MappingError, load_mapping
from finops.cli import app
from finops.lake import Lake

UTC = dt.UTC


def _q(lake: Path, sql: str) -> list[tuple]:
    return finops.connect(lake).execute(sql).fetchall()


def _rejects(lake: Path) -> list[tuple[str, str]]:
    return _q(lake, "SELECT location, reason FROM rejects ORDER BY location")


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- 1: timezone


def test_timezone_without_format_reads_naive_times_in_that_zone(tmp_path: Path) -> None:
    """`timezone` alone was ignored: 01:00 New York loaded as 01:00 UTC, and a time the
    spring-forward skips loaded instead of being rejected."""
    m = _toml(
        tmp_path / "m.toml",
        '[mapping]\nformat = "csv"\n[columns]\nrequest_id = "id"\n'
        'ts = { from = "time", timezone = "America/New_York" }\ninput_tokens = "n"\n',
    )
    csv = tmp_path / "x.csv"
    csv.write_text(
        "id,time,n\n"
        "a,2026-11-20 01:00:00,1\n"
        "b,2026-03-08 02:30:00,2\n"  # skipped by the clocks in New York
        "c,2026-11-20T01:00:00+02:00,3\n"  # its own offset: kept
        "d,2026-11-20T01:00,4\n"  # minutes without seconds
    )
    lake = tmp_path / "lake"
    report = ingest_file(csv, Lake(lake), mapping=load_mapping(m))
    assert (report.read, report.loaded, report.rejected) == (4, 3, 1)
    got = dict(_q(lake, "SELECT request_id, ts FROM requests"))
    assert got["a"] == dt.datetime(2026, 11, 20, 6, tzinfo=UTC)
    assert got["c"] == dt.datetime(2026, 11, 19, 23, tzinfo=UTC)
    assert got["d"] == dt.datetime(2026, 11, 20, 6, tzinfo=UTC)
    [(loc, reason)] = _rejects(lake)
    assert loc.endswith("x.csv:3")
    assert "does not exist in America/New_York" in reason


# --------------------------------------------------------------------------- 2: mixed types

_OAI = {"object": "chat.completion", "created": 1795000000, "model": "m"}


def _oai(i: str, **over: object) -> dict:
    return {"id": i, **_OAI, "usage": {"prompt_tokens": 10, "completion_tokens": 5}, **over}


def _jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_one_record_with_usage_as_text_is_rejected_alone(tmp_path: Path) -> None:
    """`"usage": "none"` on one line made the reader type usage as text: the other
    records lost their tokens (null input, 0 output) and nothing was rejected."""
    log = _jsonl(
        tmp_path / "o.jsonl",
        [_oai("c1"), _oai("c2"), _oai("c3", usage="none"), _oai("c4")],
    )
    lake = tmp_path / "lake"
    report = ingest_file(log, Lake(lake))
    assert (report.read, report.loaded, report.rejected) == (4, 3, 1)
    assert _q(lake, "SELECT DISTINCT input_tokens, output_tokens FROM requests") == [(10, 5)]
    [(loc, reason)] = _rejects(lake)
    assert loc.endswith("o.jsonl:3")
    # read as a missing usage in that record alone: the mapping's `required` rejects it
    assert "input_tokens (from usage.prompt_tokens)" in reason and "required" in reason


def test_one_record_with_an_object_for_a_number_is_rejected_alone(tmp_path: Path) -> None:
    """`"prompt_tokens": {"a": 1}` on one line rejected all four records."""
    bad = _oai("c2", usage={"prompt_tokens": {"a": 1}, "completion_tokens": 5})
    log = _jsonl(tmp_path / "o.jsonl", [_oai("c1"), bad, _oai("c3"), _oai("c4")])
    lake = tmp_path / "lake"
    report = ingest_file(log, Lake(lake))
    assert (report.loaded, report.rejected) == (3, 1)
    [(loc, reason)] = _rejects(lake)
    assert loc.endswith("o.jsonl:2")
    # JSON text in that record, as the whole-chunk reader makes it: the lake names it
    assert "field 'input_tokens'" in reason and '{"a":1}' in reason


def test_custom_mapping_nested_path_through_text_is_absent_in_that_record(
    tmp_path: Path,
) -> None:
    """`"metadata": "oops"` on one record refused the whole file (column not found). Now
    that record's tenant reads as absent, as a missing field does (the column is
    optional), and the others keep theirs."""
    m = _toml(
        tmp_path / "m.toml",
        '[mapping]\nformat = "jsonl"\n[columns]\nrequest_id = "rid"\nts = "t"\n'
        'input_tokens = "n"\ntenant = "metadata.team"\n',
    )
    t = "2026-11-20T01:00:00Z"
    log = _jsonl(
        tmp_path / "g.jsonl",
        [
            {"rid": "a", "t": t, "n": 1, "metadata": {"team": "x"}},
            {"rid": "b", "t": t, "n": 2, "metadata": "oops"},
            {"rid": "c", "t": t, "n": 3, "metadata": {"team": "y"}},
        ],
    )
    lake = tmp_path / "lake"
    report = ingest_file(log, Lake(lake), mapping=load_mapping(m))
    assert (report.loaded, report.rejected) == (3, 0)
    assert _q(lake, "SELECT request_id, tenant FROM requests ORDER BY 1") == [
        ("a", "x"),
        ("b", None),
        ("c", "y"),
    ]


# --------------------------------------------------------------------------- 3: no usage


def test_openai_record_without_usage_is_a_reject(tmp_path: Path) -> None:
    recs = [_oai("c1"), {"id": "c2", **_OAI}, _oai("c3", usage=None), _oai("c4", usage=[])]
    log = _jsonl(tmp_path / "o.jsonl", recs)
    lake = tmp_path / "lake"
    report = ingest_file(log, Lake(lake))
    assert (report.read, report.loaded, report.rejected) == (4, 1, 3)
    rejects = _rejects(lake)
    assert [loc.rsplit(":", 1)[1] for loc, _ in rejects] == ["2", "3", "4"]
    assert all("input_tokens" in r and "required" in r for _, r in rejects)


# --------------------------------------------------------------------------- 4, 6: CSV

_CM = '[mapping]\nname = "gw"\n[columns]\nrequest_id = "id"\nts = "time"\ninput_tokens = "n"\n'


def test_unterminated_quote_rejects_its_line_and_keeps_the_rows_after(tmp_path: Path) -> None:
    """The open quote swallowed every row after it: read 2 for 4 rows, no reject."""
    csv = tmp_path / "u.csv"
    csv.write_text(
        "id,time,n\n"
        "k1,2026-11-20T01:00:00Z,1\n"
        'k2,2026-11-20T01:00:01Z,"2\n'
        "k3,2026-11-20T01:00:02Z,3\n"
        "k4,2026-11-20T01:00:03Z,4\n"
    )
    lake = tmp_path / "lake"
    report = ingest_file(csv, Lake(lake), mapping=load_mapping(_toml(tmp_path / "m.toml", _CM)))
    assert (report.read, report.loaded, report.rejected) == (4, 3, 1)
    assert [r for (r,) in _q(lake, "SELECT request_id FROM requests ORDER BY 1")] == [
        "k1",
        "k3",
        "k4",
    ]
    [(loc, reason)] = _rejects(lake)
    assert loc.endswith("u.csv:3") and "opened on this line is never closed" in reason


def _ids(csv_text: str, tmp_path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    csv = tmp_path / "c.csv"
    csv.write_text(csv_text)
    lake = tmp_path / "lake"
    ingest_file(csv, Lake(lake), mapping=load_mapping(_toml(tmp_path / "m.toml", _CM)))
    loaded = [r for (r,) in _q(lake, "SELECT request_id FROM requests ORDER BY 1")]
    return loaded, [(loc.rsplit(":", 1)[1], why) for loc, why in _rejects(lake)]


def test_two_stray_quotes_do_not_merge_rows(tmp_path: Path) -> None:
    """Lenient reading closed the first stray quote at the second and loaded one garbage
    row made of two, silently; strict quoting rejects both lines."""
    loaded, rejects = _ids(
        "id,time,n\n"
        'k1,2026-11-20T01:00:00Z,"1\n'
        'k2,2026-11-20T01:00:01Z,"2\n'
        "k3,2026-11-20T01:00:02Z,3\n",
        tmp_path,
    )
    assert loaded == ["k3"]
    assert [line for line, _ in rejects] == ["2", "3"]
    assert "malformed quoting" in rejects[0][1] and "never closed" in rejects[1][1]


def test_a_closed_multi_line_field_in_a_ragged_row_is_one_reject(tmp_path: Path) -> None:
    """A quoted field that closes properly, in a row with a field too many: the row is
    rejected for its field count, and its continuation line is not read as a row."""
    loaded, rejects = _ids(
        'id,time,n\nk1,2026-11-20T01:00:00Z,"1\n2",extra\nk2,2026-11-20T01:00:01Z,2\n',
        tmp_path,
    )
    assert loaded == ["k2"]
    assert rejects == [("2", "expected 3 fields (id,time,n), got 4")]


def test_an_open_quote_before_a_long_tail_keeps_the_tail(tmp_path: Path) -> None:
    """Past the csv module's field limit (128 KiB) the error dropped the rest of the
    chunk, uncounted; now the line is rejected and every row after it loads."""
    tail = "".join(f"k{i:05d},2026-11-20T01:00:00Z,{i}\n" for i in range(6000))
    loaded, rejects = _ids('id,time,n\nbad,2026-11-20T01:00:00Z,"1\n' + tail, tmp_path)
    assert len(loaded) == 6000
    [(line, why)] = rejects
    assert line == "2" and "field limit" in why


def test_multi_line_quoted_field_still_loads(tmp_path: Path) -> None:
    csv = tmp_path / "q.csv"
    csv.write_text(
        'id,time,n,note\nk1,2026-11-20T01:00:00Z,1,"two\nlines"\nk2,2026-11-20T01:00:01Z,2,x\n'
    )
    m = _toml(tmp_path / "m.toml", _CM + 'feature = "note"\n')
    report = ingest_file(csv, Lake(tmp_path / "lake"), mapping=load_mapping(m))
    assert (report.read, report.loaded, report.rejected) == (2, 2, 0)


def test_duplicate_header_column_is_named(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("id,time,n,n\nk1,2026-11-20T01:00:00Z,1,2\n")
    with pytest.raises(LogError, match=r"duplicate column 'n' in the header of .*d\.csv"):
        ingest_file(
            csv, Lake(tmp_path / "lake"), mapping=load_mapping(_toml(tmp_path / "m.toml", _CM))
        )


# --------------------------------------------------------------------------- 5: mapping file


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[columns]\nts = { from = 5 }\n", r"\[columns\] ts from = 5: expected a column name"),
        ('[mapping]\ntable = ["requests"]\n[columns]\nts = "t"\n', r"table = \['requests'\]"),
        ('mapping = "x"\n[columns]\nts = "t"\n', r"expected a \[mapping\] table"),
        ("[columns]\ntenant = { value = [1, 2] }\n", r"tenant value = \[1, 2\]: expected one"),
        (
            '[mapping]\ntabel = "requests"\n[columns]\nts = "t"\n',
            r"unknown key\(s\) \['tabel'\].*table",
        ),
        ('[columns]\nts = { from = "t", optional = "yes" }\n', r"optional = 'yes': expected true"),
        ('[mapping]\nname = 5\n[columns]\nts = "t"\n', r"name = 5; expected a string"),
        ('[columns]\ninput_tokens = { value = "abc" }\n', r"value = 'abc': expected a value of"),
        ('[columns]\nts = "t"\n[key]\nline = "no"\n', r"\[key\] line = 'no'; expected true"),
    ],
)
def test_bad_mapping_values_are_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    path = _toml(tmp_path / "bad.toml", text)
    with pytest.raises(MappingError, match=expected) as info:
        load_mapping(path)
    assert str(path) in str(info.value)


def test_bad_mapping_is_an_error_line_in_the_cli(tmp_path: Path) -> None:
    path = _toml(tmp_path / "bad.toml", "[columns]\nts = { from = 5 }\n")
    (tmp_path / "x.csv").write_text("t\n1\n")
    res = CliRunner().invoke(
        app,
        ["ingest", "requests", str(tmp_path / "x.csv"), "--mapping", str(path), "--lake",
         str(tmp_path / "lake")],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "error:" in res.stderr and "bad.toml" in res.stderr and "Traceback" not in res.output


# --------------------------------------------------------------------------- 7, 8: CLI


@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf"])
def test_follow_interval_must_be_positive(tmp_path: Path, interval: str) -> None:
    res = CliRunner().invoke(
        app,
        ["ingest", "requests", str(tmp_path / "x.jsonl"), "--follow", "--interval", interval,
         "--lake", str(tmp_path / "lake")],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "--interval: expected a number of seconds > 0" in res.stderr


def _shim(i: int, hit: bool) -> dict:
    ts = dt.datetime(2026, 11, 20, tzinfo=UTC) + dt.timedelta(seconds=i)
    return {
        "request_id": f"r{i}",
        "ts": ts.isoformat(),
        "tenant": "t",
        "input_tokens": 0 if hit else 100,
        "output_tokens": 5,
        "status_code": 200,
        "cache_status": "hit" if hit else "miss",
        "prompt_fingerprint": "fp",
    }


def test_reingest_reports_cache_events_already_in_lake(tmp_path: Path) -> None:
    log = _jsonl(tmp_path / "s.jsonl", [_shim(i, hit=i % 2 == 1) for i in range(6)])
    lake = tmp_path / "lake"
    first = ingest_file(log, Lake(lake))
    assert first.cache_events == 3 and first.cache_events_in_lake == 0
    again = ingest_file(log, Lake(lake))
    assert (again.cache_events, again.cache_events_in_lake) == (3, 3)
    assert _q(lake, "SELECT count(*) FROM cache_events") == [(3,)]
    res = CliRunner().invoke(
        app, ["ingest", "requests", str(log), "--lake", str(lake), "--format", "json"]
    )
    [row] = json.loads(res.stdout)
    assert (row["cache_events_new"], row["cache_events_already_in_lake"]) == (0, 3)


# --------------------------------------------------------------------------- 9: JSON array


def test_json_array_file_is_refused_with_the_conversion(tmp_path: Path) -> None:
    """A pretty-printed JSON array got one 'invalid JSON' reject per line."""
    arr = tmp_path / "arr.jsonl"
    arr.write_text(
        '[\n {"request_id": "a1", "ts": "2026-11-20T01:00:00Z", "input_tokens": 1},\n'
        ' {"request_id": "a2", "ts": "2026-11-20T01:00:00Z", "input_tokens": 1}\n]\n'
    )
    with pytest.raises(LogError, match=r"a JSON array .*expected JSON Lines.*jq -c"):
        ingest_file(arr, Lake(tmp_path / "lake"))
