"""What a request-log ingest says it did: detection, dropped fields, cache events, re-reads.

Each test is a reviewer's repro (the summary said something the lake did not hold),
run against real files and a real Parquet lake.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from collectors.logs import LogSource, ingest_file
from collectors.mapping import MappingError
from finops.cli import app
from finops.lake import Lake

UTC = dt.UTC


def _rec(i: int, **over: object) -> dict:
    """A shim request-log record (the requests table's own column names)."""
    ts = dt.datetime(2026, 11, 20, tzinfo=UTC) + dt.timedelta(seconds=i)
    rec = {
        "request_id": f"req-{i:08d}",
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "tenant": f"t{i % 5}",
        "response_model": "llama-8b",
        "tier": "small",
        "input_tokens": 0 if i % 5 == 3 else 100 + i,
        "output_tokens": 10 + i % 7,
        "status_code": 200,
        "stream": False,
        "cache_status": "hit" if i % 5 == 3 else "miss",
        "prompt_fingerprint": f"fp{i % 3}",
        "attempt": 1,
    }
    rec.update(over)
    return rec


def _write(path: Path, recs: list[dict], mode: str = "w") -> Path:
    with open(path, mode) as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _q(lake: Path, sql: str) -> list[tuple]:
    return finops.connect(lake).execute(sql).fetchall()


def _ingest(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, ["ingest", "requests", *args])
    return res.exit_code, res.stdout, res.stderr


# --------------------------------------------------------------------------- foreign fields


GATEWAY = {
    "request_id": "g1",
    "ts": "2026-11-20T01:00:00Z",
    "model": "llama-8b",
    "prompt_tokens": 120,
    "completion_tokens": 30,
    "user": "acme",
}


def test_gateway_log_with_id_and_ts_is_not_read_as_the_shims(tmp_path: Path) -> None:
    """request_id + ts made any JSONL the shim's format: a gateway record with
    prompt_tokens/completion_tokens loaded as "loaded 1" with every token null."""
    log = _write(tmp_path / "gw.jsonl", [GATEWAY])
    lake = tmp_path / "lake"
    code, out, err = _ingest(str(log), "--lake", str(lake))
    assert code != 0, out  # that file's error (exit 1), or the command's (2)
    assert "none of the token columns" in err
    assert "prompt_tokens" in err and "--mapping" in err
    # the error's hint is a mapping that works
    assert 'input_tokens = "prompt_tokens"' in err
    assert 'output_tokens = "completion_tokens"' in err
    assert not lake.exists() or not Lake(lake).files("requests")
    mapping = tmp_path / "gw.toml"
    mapping.write_text(
        '[mapping]\nname = "gw"\n[columns]\nrequest_id = "request_id"\nts = "ts"\n'
        'input_tokens = "prompt_tokens"\noutput_tokens = "completion_tokens"\n'
        'response_model = "model"\ntenant = "user"\n'
    )
    code, out, err = _ingest(str(log), "--lake", str(lake), "-m", str(mapping))
    assert code == 0, err
    assert _q(lake, "SELECT input_tokens, output_tokens, tenant FROM requests") == [
        (120, 30, "acme")
    ]


def test_gateway_log_a_shipped_mapping_reads_is_read_with_it(tmp_path: Path) -> None:
    """An OpenAI usage record that also carries request_id and ts is OpenAI usage."""
    rec = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1795136400,
        "model": "llama-8b",
        "usage": {"prompt_tokens": 50, "completion_tokens": 7},
        "request_id": "r1",
        "ts": "2026-11-20T01:00:00Z",
    }
    log = _write(tmp_path / "gw.jsonl", [rec])
    report = ingest_file(log, Lake(tmp_path / "lake"))
    assert report.mapping == "openai-usage" and report.loaded == 1
    assert _q(tmp_path / "lake", "SELECT input_tokens, output_tokens FROM requests") == [(50, 7)]


def test_dropped_fields_are_named_in_the_summary(tmp_path: Path) -> None:
    """AppendResult.ignored_columns was collected and never shown."""
    log = _write(tmp_path / "s.jsonl", [_rec(i, model="x", user="u") for i in range(3)])
    lake = tmp_path / "lake"
    code, out, err = _ingest(str(log), "--lake", str(lake))
    assert code == 0, err
    assert (
        f"warning: {log}: ignored columns not in the requests schema: model, user — "
        "use --mapping" in err
    )
    code, out, _ = _ingest(str(log), "--lake", str(lake), "--format", "json")
    assert json.loads(out)[0]["ignored_columns"] == ["model", "user"]
    # a log with nothing foreign says nothing
    clean = _write(tmp_path / "c.jsonl", [_rec(i) for i in range(3, 6)])
    code, out, err = _ingest(str(clean), "--lake", str(lake))
    assert code == 0 and "ignored" not in err


def test_collector_log_target_names_dropped_fields_once(tmp_path: Path) -> None:
    log = _write(tmp_path / "s.jsonl", [_rec(i, model="x") for i in range(3)])
    args = ["collect", "--once", "--lake", str(tmp_path / "lake"), "--log", str(log)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "up   log" in res.output
    assert "ignored columns not in the requests schema: model" in res.output
    src = LogSource(log, Lake(tmp_path / "lake2"), tmp_path / "cp")
    src.poll(final=True)
    assert any("ignored columns" in e and "model" in e for e in src.errors)
    _write(log, [_rec(i, model="x") for i in range(3, 5)], mode="a")
    src.poll(final=True)
    assert not any("ignored columns" in e for e in src.errors)  # said once


# --------------------------------------------------------------------------- cache events


def test_no_cache_event_for_a_request_the_lake_rejected(tmp_path: Path) -> None:
    """'loaded 0, rejected 2' still wrote 2 cache events claiming 110 tokens saved."""
    log = _write(
        tmp_path / "o.jsonl",
        [
            _rec(0, request_id="o1", input_tokens=100, output_tokens=5, cache_status="hit",
                 stream="maybe"),
            _rec(1, request_id="o3", input_tokens=1.5, output_tokens=5, cache_status="hit"),
            _rec(2, request_id="o4", input_tokens=40, output_tokens=2, cache_status="hit"),
        ],
    )  # fmt: skip
    lake = tmp_path / "lake"
    report = ingest_file(log, Lake(lake))
    assert (report.loaded, report.rejected, report.cache_events) == (1, 2, 1)
    assert _q(lake, "SELECT request_id, tokens FROM cache_events") == [("o4", 42)]


def test_a_rejected_request_is_no_original_of_a_later_hit(tmp_path: Path) -> None:
    bad = _rec(0, request_id="orig", input_tokens=500, output_tokens=20, stream="maybe")
    hit = _rec(
        1, request_id="hit", input_tokens=0, output_tokens=0, cache_status="hit", tenant="t0"
    )
    log = _write(
        tmp_path / "h.jsonl", [bad, {**hit, "prompt_fingerprint": bad["prompt_fingerprint"]}]
    )
    lake = tmp_path / "lake"
    report = ingest_file(log, Lake(lake))
    assert (report.loaded, report.rejected) == (1, 1)
    # the hit is kept, but what it saved is unknown: the original is in no table
    assert _q(lake, "SELECT request_id, tokens FROM cache_events") == [("hit", None)]


# --------------------------------------------------------------------------- re-reads


def test_rerun_summary_separates_new_rows_from_rows_already_in_the_lake(tmp_path: Path) -> None:
    """A re-read said "loaded 1000"; after 5 appended lines "loaded 1005", as if all new."""
    log = _write(tmp_path / "r.jsonl", [_rec(i) for i in range(1000)])
    lake = tmp_path / "lake"
    first = ingest_file(log, Lake(lake))
    assert (first.loaded, first.new, first.already_in_lake) == (1000, 1000, 0)
    again = ingest_file(log, Lake(lake))
    assert (again.loaded, again.new, again.already_in_lake) == (1000, 0, 1000)
    _write(log, [_rec(i) for i in range(1000, 1005)], mode="a")
    grown = ingest_file(log, Lake(lake), chunk_bytes=4096)  # a write per chunk: mixed ones
    assert (grown.loaded, grown.new, grown.already_in_lake) == (1005, 5, 1000)
    assert _q(lake, "SELECT count(*) FROM requests") == [(1005,)]
    # only the 5 new lines were written: the raw rows did not double (were 2,005)
    assert _q(lake, "SELECT count(*) FROM raw.requests") == [(1005,)]
    code, out, err = _ingest(str(log), "--lake", str(lake), "--format", "json")
    assert code == 0, err
    row = json.loads(out)[0]
    assert (row["loaded"], row["new"], row["already_in_lake"]) == (1005, 0, 1005)
    _, out, _ = _ingest(str(log), "--lake", str(lake))
    assert "already_in_lake" in out and "1005" in out


def test_new_rows_count_across_dates_and_a_changed_row(tmp_path: Path) -> None:
    """A row of a date already written, changed: still a key the lake held."""
    day = 86_400
    recs = [_rec(i * 3600) for i in range(30)]  # two dates
    log = _write(tmp_path / "d.jsonl", recs)
    lake = tmp_path / "lake"
    ingest_file(log, Lake(lake))
    recs[5] = {**recs[5], "output_tokens": 999}
    recs.append(_rec(2 * day + 7))  # a third date
    _write(log, recs)
    report = ingest_file(log, Lake(lake))
    assert (report.loaded, report.new, report.already_in_lake) == (31, 1, 30)
    # the changed row and the new one are written; the 29 others are not written again
    assert _q(lake, "SELECT count(*) FROM raw.requests") == [(32,)]
    assert _q(lake, "SELECT output_tokens FROM requests WHERE request_id = 'req-00018000'") == [
        (999,)
    ]
    # changed back: the first version is written again, so it is the latest one again
    recs[5] = {**recs[5], "output_tokens": _rec(5 * 3600)["output_tokens"]}
    _write(log, recs)
    back = ingest_file(log, Lake(lake))
    assert (back.loaded, back.new, back.already_in_lake) == (31, 0, 31)
    assert _q(lake, "SELECT output_tokens FROM requests WHERE request_id = 'req-00018000'") == [
        (recs[5]["output_tokens"],)
    ]
    assert _q(lake, "SELECT count(*) FROM raw.requests") == [(33,)]


def test_a_reread_file_with_repeated_lines_counts_them_as_held(tmp_path: Path) -> None:
    """An exact repeated line is loaded once; read again, it and its copy were both there."""
    recs = [_rec(i) for i in range(10)]
    log = _write(tmp_path / "dup.jsonl", [*recs, recs[3], _rec(20)])
    lake = tmp_path / "lake"
    first = ingest_file(log, Lake(lake))
    assert (first.loaded, first.new, first.already_in_lake) == (12, 12, 0)
    _write(log, [_rec(21)], mode="a")
    again = ingest_file(log, Lake(lake))
    assert (again.loaded, again.new, again.already_in_lake) == (13, 1, 12)
    assert _q(lake, "SELECT count(*) FROM raw.requests") == [(12,)]


# --------------------------------------------------------------------------- rejects


@pytest.mark.parametrize("how", ["relative", "dot", "absolute", "collect"])
def test_the_same_bad_line_is_one_reject_however_the_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """`06.jsonl`, `./06.jsonl` and its absolute path wrote the reject once each."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "06.jsonl", [_rec(0, input_tokens=-1), _rec(1)])
    lake = tmp_path / "lake"
    code, _, err = _ingest("06.jsonl", "--lake", str(lake))
    assert code == 0
    assert "06.jsonl:1: field 'input_tokens': must be >= 0" in err  # as typed
    again = {
        "relative": ["ingest", "requests", "06.jsonl"],
        "dot": ["ingest", "requests", "./06.jsonl"],
        "absolute": ["ingest", "requests", str(tmp_path / "06.jsonl")],
        "collect": ["collect", "--once", "--log", "06.jsonl"],
    }[how]
    res = CliRunner().invoke(app, [*again, "--lake", str(lake)])
    assert res.exit_code == 0, res.output
    locations = _q(lake, "SELECT location FROM rejects")
    assert locations == [(f"{os.path.realpath(tmp_path / '06.jsonl')}:1",)]
    raw = pl.concat([pl.read_parquet(f) for f in Lake(lake).files("rejects")])
    assert raw["location"].n_unique() == 1


def test_foreign_fields_in_cache_events_log_are_named(tmp_path: Path) -> None:
    log = _write(
        tmp_path / "ce.jsonl",
        [{"ts": "2026-11-20T01:00:00Z", "event": "hit", "tokens": 5, "cache_name": "kv"}],
    )
    report = ingest_file(log, Lake(tmp_path / "lake"), table="cache_events")
    assert report.ignored_columns == ["cache_name"]
    assert "not in the cache_events schema: cache_name" in (report.ignored_message() or "")


def test_a_shim_log_without_token_fields_still_loads(tmp_path: Path) -> None:
    """Only foreign token fields make it a gateway log: a refusal record has no tokens."""
    log = _write(tmp_path / "s.jsonl", [{"request_id": "x", "ts": "2026-11-20T01:00:00Z",
                                         "status_code": 429}])  # fmt: skip
    report = ingest_file(log, Lake(tmp_path / "lake"))
    assert (report.mapping, report.loaded) == ("shim", 1)
    with pytest.raises(MappingError, match="none of the token columns"):
        ingest_file(
            _write(
                tmp_path / "u.jsonl",
                [{"request_id": "x", "ts": "2026-11-20T01:00:00Z", "usage": {"total_tokens": 3}}],
            ),
            Lake(tmp_path / "lake"),
        )
