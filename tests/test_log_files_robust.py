"""Reading log files that are not plain, finished UTF-8 JSONL/CSV.

Rotated archives (logrotate's `compress`: `requests-x.jsonl.1.gz`), files of
a format that cannot be told among files that can, a last line its writer is
still writing, and text that is not UTF-8 (PowerShell 5's UTF-16, stray
Latin-1 bytes). One such file is that file's error or note, naming it; the
other files still load, and nothing valid is lost.
"""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import json
import lzma
import os
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from collectors.logs import LogError, LogSource, ingest_file
from collectors.mapping import MappingError
from finops.cli import app
from finops.lake import Lake

UTC = dt.UTC


def record(i: int, **over: object) -> dict:
    """One shim request-log record."""
    ts = dt.datetime(2026, 11, 16, tzinfo=UTC) + dt.timedelta(seconds=i)
    rec = {
        "request_id": f"req-{i:07d}",
        "ts": ts.isoformat().replace("+00:00", "Z"),
        "tenant": f"tenant-{i % 3}",
        "response_model": "llama-3.1-8b-instruct",
        "input_tokens": 100 + i,
        "output_tokens": 10 + i,
        "status_code": 200,
        "cache_status": "miss",
    }
    rec.update(over)
    return rec


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def q(lake: Lake | Path, sql: str) -> pl.DataFrame:
    return finops.connect(lake.path if isinstance(lake, Lake) else lake).sql(sql).pl()


def request_ids(lake: Lake | Path) -> list[str]:
    return q(lake, "SELECT request_id FROM requests ORDER BY 1")["request_id"].to_list()


def reject_count(lake: Lake) -> int:
    return sum(pl.read_parquet(f).height for f in lake.files("rejects"))


def settle(path: Path) -> None:
    old = time.time() - 3600
    os.utime(path, (old, old))


CSV_MAPPING = """
[mapping]
name = "gateway-csv"
format = "csv"
table = "requests"
[columns]
request_id = "id"
ts = { from = "time" }
input_tokens = "tok"
"""


# --------------------------------------------------------------------------- compressed files


@pytest.mark.parametrize(
    ("suffix", "opener"), [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)]
)
def test_one_shot_reads_a_compressed_archive(
    lake: Lake, tmp_path: Path, suffix: str, opener
) -> None:
    path = tmp_path / f"requests-x.jsonl.1{suffix}"
    with opener(path, "wt") as fh:
        fh.write(jsonl([record(i) for i in range(50)]))
    report = ingest_file(path, lake, chunk_bytes=1024)  # many blocks, lines across reads
    assert (report.read, report.loaded, report.rejected, report.error) == (50, 50, 0, None)
    assert report.mapping == "shim"
    assert request_ids(lake) == [f"req-{i:07d}" for i in range(50)]
    assert reject_count(lake) == 0


@pytest.mark.parametrize("name", ["gw.csv.jsonl", "export.parquet.jsonl.1.gz", "a.tsv.jsonl.open"])
def test_the_rightmost_extension_says_the_format(lake: Lake, tmp_path: Path, name: str) -> None:
    """Was: a JSONL file with `.csv.` (or `.parquet.`) anywhere in its name was read as
    that format: read 0, loaded 0, exit 0."""
    path = tmp_path / name
    body = jsonl([record(i) for i in range(5)])
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(body)
    else:
        path.write_text(body)
    report = ingest_file(path, lake)
    assert (report.read, report.loaded, report.error) == (5, 5, None)


def test_one_shot_reads_a_gzipped_csv_and_its_bad_lines_keep_their_numbers(
    lake: Lake, tmp_path: Path
) -> None:
    mapping = tmp_path / "m.toml"
    mapping.write_text(CSV_MAPPING)
    path = tmp_path / "gw.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("id,time,tok\na,2026-11-16T00:00:00Z,1\nb,oops,2\nc,2026-11-16T00:00:02Z,3\n")
    report = ingest_file(path, lake, mapping=str(mapping))
    assert (report.read, report.loaded, report.rejected) == (3, 2, 1)
    locations = [pl.read_parquet(f)["location"][0] for f in lake.files("rejects")]
    assert locations == [f"{os.path.realpath(path)}:3"]


def test_a_truncated_archive_loads_what_precedes_the_damage_and_names_it(
    lake: Lake, tmp_path: Path
) -> None:
    """logrotate still compressing it, or a damaged copy: an error, not a silent half."""
    whole = gzip.compress(jsonl([record(i) for i in range(3000)]).encode())
    path = tmp_path / "requests-y.jsonl.2.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LogError) as err:
        ingest_file(path, lake)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot read past line ")
    assert "gzip data truncated or damaged" in message
    report = err.value.report
    assert report is not None and report.error == message
    line = int(message.split("cannot read past line ")[1].split(" ")[0].replace(",", ""))
    assert 0 < line < 3000
    assert report.loaded == report.read == line  # every whole line before the damage
    assert request_ids(lake) == [f"req-{i:07d}" for i in range(line)]
    assert reject_count(lake) == 0


def test_zstd_is_refused_by_name(lake: Lake, tmp_path: Path) -> None:
    path = tmp_path / "requests-z.jsonl.1.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 20)
    with pytest.raises(LogError, match=r"requests-z\.jsonl\.1\.zst: zstd-compressed.*zstdcat"):
        ingest_file(path, lake)


def test_cli_glob_with_an_archive_and_an_unknown_file_loads_every_readable_file(
    tmp_path: Path,
) -> None:
    """The README's glob `'requests-*.jsonl*'` matches logrotate's `.gz` copies."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "requests-a.jsonl").write_text(jsonl([record(i) for i in range(10)]))
    with gzip.open(logs / "requests-b.jsonl.1.gz", "wt") as fh:
        fh.write(jsonl([record(i) for i in range(10, 40)]))
    (logs / "requests-c.jsonl").write_text('{"when": 1, "tok": 3}\n')  # not a request log
    (logs / "requests-d.jsonl").write_text(jsonl([record(i) for i in range(40, 45)]))
    lake_dir = tmp_path / "lake"
    glob = str(logs / "requests-*.jsonl*")
    args = ["ingest", "requests", glob, "--lake", str(lake_dir), "--format", "json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output  # a file failed: non-zero, after the summary
    rows = {Path(r["file"]).name: r for r in json.loads(res.stdout)}
    assert [rows[n]["loaded"] for n in sorted(rows)] == [10, 30, 0, 5]
    assert all(rows[n]["error"] is None for n in sorted(rows) if n != "requests-c.jsonl")
    error = rows["requests-c.jsonl"]["error"]
    assert error.startswith(f"{logs / 'requests-c.jsonl'}: cannot tell the log format")
    assert f"error: {error}" in res.stderr
    assert "writing to" not in res.stderr
    assert len(request_ids(lake_dir)) == 45


def test_unknown_format_without_a_mapping_is_a_log_error_and_still_a_mapping_error(
    lake: Lake, tmp_path: Path
) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text('{"when": 1, "tok": 3}\n')
    with pytest.raises(LogError, match="cannot tell the log format") as err:
        ingest_file(path, lake)
    assert isinstance(err.value, MappingError)  # what callers caught before


def test_follow_skips_an_archive_with_one_note_and_loads_the_rest(
    lake: Lake, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "requests-a.jsonl").write_text(jsonl([record(i) for i in range(10)]))
    archive = logs / "requests-0.jsonl.1.gz"
    with gzip.open(archive, "wt") as fh:
        fh.write(jsonl([record(i) for i in range(100, 200)]))
    (logs / "requests-c.jsonl").write_text('{"when": 1, "tok": 3}\n')
    (logs / "requests-d.jsonl").write_text(jsonl([record(i) for i in range(10, 15)]))
    src = LogSource(str(logs / "requests-*.jsonl*"), lake, tmp_path / "cp")
    res = src.poll(final=True)  # no raise: each file is its own error
    assert (res.read, res.loaded, res.rejected) == (15, 15, 0)
    notes = [e for e in src.errors if str(archive) in e]
    assert notes == [
        f"{archive}: gzip-compressed, not followed: a rotated copy (logrotate `compress`) of "
        "a log read under its uncompressed name; to load an archive that was never "
        f"followed, ingest it once: finops ingest requests '{archive}'"
    ]
    assert any(
        e.startswith(f"{logs / 'requests-c.jsonl'}: cannot tell the log format") for e in src.errors
    )
    assert request_ids(lake) == [f"req-{i:07d}" for i in range(15)]
    # the note is said once: the checkpoint holds the archive as done
    src.poll()
    assert not [e for e in src.errors if str(archive) in e]
    again = LogSource(str(logs / "requests-*.jsonl*"), lake, tmp_path / "cp")
    again.poll()
    assert not [e for e in again.errors if str(archive) in e]
    # the unknown file stays an error (it may become readable); others go on loading
    assert any("requests-c.jsonl" in e for e in again.errors)
    with open(logs / "requests-d.jsonl", "a") as fh:
        fh.write(jsonl([record(15)]))
    assert again.poll().loaded == 1


def test_collect_once_with_an_archive_in_the_glob_is_up(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "requests-a.jsonl").write_text(jsonl([record(i) for i in range(20)]))
    with gzip.open(logs / "requests-0.jsonl.1.gz", "wt") as fh:
        fh.write(jsonl([record(i) for i in range(100, 110)]))
    (logs / "requests-c.jsonl").write_text(jsonl([record(i) for i in range(20, 30)]))
    args = ["collect", "--once", "--lake", str(tmp_path / "lake")]
    res = CliRunner().invoke(app, [*args, "--log", str(logs / "requests-*.jsonl*")])
    assert res.exit_code == 0, res.output
    assert "up   log" in res.output and "30 samples" in res.output
    assert "gzip-compressed, not followed" in res.output
    assert len(request_ids(tmp_path / "lake")) == 30


# --------------------------------------------------------------------------- unterminated last line


def test_incomplete_unterminated_last_line_is_left_for_its_writer(
    lake: Lake, tmp_path: Path
) -> None:
    path = tmp_path / "live.jsonl"
    second = json.dumps(record(1))
    path.write_text(json.dumps(record(0)) + "\n" + second[:40])
    report = ingest_file(path, lake)
    assert (report.read, report.loaded, report.rejected) == (1, 1, 0)
    assert report.warnings == [
        f"last line of {path} (line 2) unterminated and incomplete: left unread, "
        "still being written?"
    ]
    assert reject_count(lake) == 0
    with open(path, "a") as fh:
        fh.write(second[40:] + "\n")  # the writer finishes it
    report = ingest_file(path, lake)
    assert (report.read, report.loaded, report.rejected) == (2, 2, 0)
    assert report.warnings == []
    assert request_ids(lake) == ["req-0000000", "req-0000001"]
    assert reject_count(lake) == 0  # no stale reject of the half line


def test_complete_unterminated_last_line_loads(lake: Lake, tmp_path: Path) -> None:
    """Hand-written files often lack the final newline."""
    path = tmp_path / "hand.jsonl"
    path.write_text(json.dumps(record(0)) + "\n" + json.dumps(record(1)))
    report = ingest_file(path, lake)
    assert (report.read, report.loaded, report.rejected, report.warnings) == (2, 2, 0, [])
    only = tmp_path / "one.jsonl"  # the whole file one line, BOM and all
    only.write_bytes(b"\xef\xbb\xbf" + json.dumps(record(2)).encode())
    assert ingest_file(only, lake).loaded == 1
    assert len(request_ids(lake)) == 3


def test_csv_incomplete_last_row_is_left_unread_a_whole_one_loads(
    lake: Lake, tmp_path: Path
) -> None:
    mapping = tmp_path / "m.toml"
    mapping.write_text(CSV_MAPPING)
    path = tmp_path / "gw.csv"
    path.write_text("id,time,tok\na,2026-11-16T00:00:00Z,1\nb,2026-11-16T00:00:01")
    report = ingest_file(path, lake, mapping=str(mapping))
    assert (report.read, report.loaded, report.rejected) == (1, 1, 0)
    assert report.warnings == [
        f"last line of {path} (line 3) unterminated and incomplete: left unread, "
        "still being written?"
    ]
    quoted = tmp_path / "q.csv"
    quoted.write_text('id,time,tok\nc,2026-11-16T00:00:02Z,"1')  # a quoted field left open
    assert (
        ingest_file(quoted, lake, mapping=str(mapping))
        .warnings[0]
        .startswith(f"last line of {quoted} (line 2) unterminated")
    )
    with open(path, "a") as fh:
        fh.write("Z,2")  # now whole, still without a newline
    report = ingest_file(path, lake, mapping=str(mapping))
    assert (report.read, report.loaded, report.rejected, report.warnings) == (2, 2, 0, [])
    assert request_ids(lake) == ["a", "b"]
    assert reject_count(lake) == 0


def test_final_poll_leaves_a_live_files_half_line_but_takes_a_rotated_ones(
    lake: Lake, tmp_path: Path
) -> None:
    log = tmp_path / "shim.jsonl"
    half = json.dumps(record(1))[:30]
    log.write_text(json.dumps(record(0)) + "\n" + half)
    settle(log)
    src = LogSource(log, lake, tmp_path / "cp", settle_seconds=30)
    res = src.poll(final=True)  # `collect --once` while the writer is mid-line
    assert (res.read, res.loaded, res.rejected) == (1, 1, 0)
    assert f"last line of {log} (line 2) unterminated and incomplete" in "\n".join(src.errors)
    with open(log, "a") as fh:
        fh.write(json.dumps(record(1))[30:] + "\n")
    res = src.poll(final=True)
    assert (res.read, res.loaded, res.rejected) == (1, 1, 0)
    # rotated away and settled: no writer will finish it; read (and rejected) as before
    with open(log, "a") as fh:
        fh.write(json.dumps(record(2))[:30])
    log.rename(tmp_path / "shim.jsonl.1")
    settle(tmp_path / "shim.jsonl.1")
    res = src.poll(final=True)
    assert (res.read, res.loaded, res.rejected) == (1, 0, 1)
    assert reject_count(lake) == 1


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("encoding", "iconv", "what"),
    [
        ("utf-16", "UTF-16", "UTF-16 text (little-endian, byte-order mark FF FE"),
        ("utf-16-be", None, None),
        ("utf-16-le", "UTF-16LE", "UTF-16 text (little-endian, no byte-order mark"),
        ("utf-32", "UTF-32", "UTF-32 text (little-endian, byte-order mark FF FE 00 00"),
    ],
)
def test_utf16_and_utf32_files_fail_once_with_how_to_convert(
    lake: Lake, tmp_path: Path, encoding: str, iconv: str | None, what: str | None
) -> None:
    path = tmp_path / "ps.jsonl"
    text = jsonl([record(i) for i in range(3)])
    data = text.encode(encoding)
    if encoding == "utf-16-be":  # with its mark, as `iconv -t UTF-16BE` + BOM writes
        data = b"\xfe\xff" + data
        iconv, what = "UTF-16", "UTF-16 text (big-endian, byte-order mark FE FF)"
    path.write_bytes(data)
    with pytest.raises(LogError) as err:
        ingest_file(path, lake)
    message = str(err.value)
    assert message.startswith(f"{path}: {what}")
    assert message.endswith(
        f", expected UTF-8; convert it and ingest the copy: "
        f"iconv -f {iconv} -t UTF-8 '{path}' > '{tmp_path / 'ps.utf8.jsonl'}'"
    )
    assert reject_count(lake) == 0 and not lake.files("requests")
    # the command it names works
    converted = tmp_path / "ps.utf8.jsonl"
    converted.write_text(data.decode(iconv.replace("UTF-", "utf-").lower()).lstrip("\ufeff"))
    assert ingest_file(converted, lake).loaded == 3


def test_cli_and_follower_name_the_encoding(lake: Lake, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    bad = logs / "requests-ps.jsonl"
    bad.write_bytes(jsonl([record(0)]).encode("utf-16"))
    (logs / "requests-ok.jsonl").write_text(jsonl([record(1)]))
    res = CliRunner().invoke(
        app, ["ingest", "requests", str(logs / "requests-*"), "--lake", str(tmp_path / "l")]
    )
    assert res.exit_code == 1
    assert f"error: {bad}: UTF-16 text" in res.stderr and "iconv -f UTF-16 -t UTF-8" in res.stderr
    assert "invalid JSON" not in res.output
    src = LogSource(str(logs / "requests-*"), lake, tmp_path / "cp")
    assert src.poll().loaded == 1
    assert [e for e in src.errors if e.startswith(f"{bad}: UTF-16 text")]


def test_invalid_utf8_loads_and_is_counted_per_file(lake: Lake, tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(record(i)).encode() for i in range(40)]
    for i in (7, 8, 30):
        lines[i] = lines[i].replace(b'"tenant-', b'"caf\xe9-')
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = ingest_file(path, lake, chunk_bytes=1024)  # the bad lines in several blocks
    assert (report.read, report.loaded, report.rejected) == (40, 40, 0)
    assert report.warnings == [
        f"{path}: 3 line(s) with invalid UTF-8 (first: line 8) loaded with U+FFFD (\ufffd) "
        "in place of the bad bytes; if the file is Latin-1/Windows-1252, convert it before "
        "ingesting (iconv -f WINDOWS-1252 -t UTF-8)"
    ]
    sql = "SELECT tenant FROM requests WHERE tenant LIKE 'caf%' ORDER BY request_id"
    assert q(lake, sql)["tenant"].to_list() == ["caf\ufffd-1", "caf\ufffd-2", "caf\ufffd-0"]
    clean = tmp_path / "utf8.jsonl"  # real UTF-8 beyond ASCII: no note
    clean.write_text(jsonl([record(100, tenant="café-☕")]), encoding="utf-8")
    assert ingest_file(clean, lake).warnings == []
    src = LogSource(path, lake, tmp_path / "cp")
    src.poll()
    assert [e for e in src.errors if "3 line(s) with invalid UTF-8 (first: line 8)" in e]


def test_cli_summary_of_a_truncated_archive_counts_what_loaded(tmp_path: Path) -> None:
    whole = gzip.compress(jsonl([record(i) for i in range(3000)]).encode())
    path = tmp_path / "requests-y.jsonl.2.gz"
    path.write_bytes(whole[: len(whole) // 2])
    args = ["ingest", "requests", str(path), "--lake", str(tmp_path / "l"), "--format", "json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1
    (row,) = json.loads(res.stdout)
    assert row["error"].startswith(f"{path}: cannot read past line {row['read']:,} ")
    assert row["loaded"] == row["read"] > 0
    assert len(request_ids(tmp_path / "l")) == row["read"]
