"""The lake with other processes at work: killed writers, compactions at once, queries and
writes during a compaction, epoch units."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.dataset as ds
import pytest
from polars.testing import assert_frame_equal

import finops
import finops.lake as lake_module
from collectors.cache_events import AvoidedTokens
from finops.lake import CompactResult, Lake, coerce

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)

# a writer that dies inside the atomic write, before the rename (as under SIGKILL)
DIES_MID_WRITE = """
import os, sys
from pathlib import Path
from finops.lake import _atomic_file
with _atomic_file(Path(sys.argv[1]), "wb", fsync=False) as fh:
    fh.write(b"PAR1 half a file")
    fh.flush()
    os._exit(9)
"""


def _requests(n: int, offset: int = 0, day: int = 16) -> pl.DataFrame:
    ids = range(offset, offset + n)
    return pl.DataFrame(
        {
            "request_id": [f"r-{day}-{i}" for i in ids],
            "ts": [dt.datetime(2026, 11, day, i % 24, i % 60, tzinfo=dt.UTC) for i in ids],
            "tenant": [f"t{i % 3}" for i in ids],
            "prompt_fingerprint": [f"fp-{i}" for i in ids],
            "input_tokens": [10 * i for i in ids],
            "output_tokens": list(ids),
        }
    )


def _many_files(path: Path, files: int, rows: int = 20) -> Lake:
    lake = Lake(path, fsync=False)
    for k in range(files):
        for day in (16, 17):
            lake.append("requests", _requests(rows, k * rows, day), source="t", now=NOW)
    return lake


def _leave_temp_file(dest: Path) -> Path:
    before = set(dest.parent.iterdir())
    proc = subprocess.run([sys.executable, "-c", DIES_MID_WRITE, str(dest)], check=False)
    assert proc.returncode == 9
    (left,) = set(dest.parent.iterdir()) - before
    return left


def test_a_killed_writers_temp_file_is_hidden_and_old_ones_are_compacted_away(
    tmp_path: Path,
) -> None:
    lake = _many_files(tmp_path / "lake", files=2)
    part = lake.files("requests")[0].parent
    old = _leave_temp_file(part / "part-00000000000000000001-x.parquet")
    fresh = _leave_temp_file(part / "part-00000000000000000002-y.parquet")
    # other engines skip only names starting with '.' or '_'
    table = ds.dataset(lake.path / "requests", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 4 * 20
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    lake.compact("requests")
    assert not old.exists()  # a killed writer's leftover
    assert fresh.exists()  # may be a write in progress
    assert lake.info().filter(pl.col("table") == "requests")["rows"].item() == 4 * 20


COMPACT = """
import datetime as dt, sys, time
from pathlib import Path
from finops.lake import Lake
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print("compacting", flush=True)
lake = Lake(sys.argv[1], fsync=False)
lake.compact("requests")
if sys.argv[3:] == ["--delete"]:  # a later compaction, past the grace: merged-away files go
    lake.compact("requests", grace=dt.timedelta(0))
print("done")
"""


def test_two_compactions_at_once_both_finish_with_every_row(tmp_path: Path) -> None:
    lake = _many_files(tmp_path / "lake", files=150)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COMPACT, str(lake.path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(2)  # both are importing and then waiting for the start
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert out.split() == ["compacting", "done"]
    assert len(lake.files("requests")) == 2
    info = lake.info().filter(pl.col("table") == "requests")
    assert info["rows"].item() == 2 * 150 * 20


def test_a_compaction_waits_while_another_holds_the_table(tmp_path: Path) -> None:
    lake = _many_files(tmp_path / "lake", files=3)
    with open(lake.path / "requests" / ".compact.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # what a compaction in another process holds
        proc = subprocess.Popen(
            [sys.executable, "-c", COMPACT, str(lake.path), str(lake.path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "compacting"
        time.sleep(1.0)
        assert proc.poll() is None
        assert len(lake.files("requests")) == 6
    assert proc.wait(timeout=60) == 0
    assert len(lake.files("requests")) == 2


class _CompactedAfterListing(Lake):
    """A lake that another process compacts right after the first listing of `requests`,
    and compacts again once the files it merged away are old enough to be deleted."""

    compacted = False

    def files(self, table: str) -> list[Path]:
        listed = super().files(table)
        if table == "requests" and not self.compacted:
            self.compacted = True
            subprocess.run(
                [sys.executable, "-c", COMPACT, str(self.path), str(self.path), "--delete"],
                check=True,
            )
        return listed


def test_info_sees_the_lake_a_compaction_just_rewrote(tmp_path: Path) -> None:
    _many_files(tmp_path / "lake", files=5)
    lake = _CompactedAfterListing(tmp_path / "lake")
    info = lake.info().filter(pl.col("table") == "requests").row(0, named=True)
    assert lake.compacted
    assert (info["rows"], info["files"]) == (2 * 5 * 20, 2)


def test_cache_hit_lookup_sees_the_lake_a_compaction_just_rewrote(tmp_path: Path) -> None:
    _many_files(tmp_path / "lake", files=5)
    lake = _CompactedAfterListing(tmp_path / "lake")
    hits = pl.DataFrame(
        {
            "ts": [dt.datetime(2026, 11, 18, tzinfo=dt.UTC)] * 2,
            "tenant": ["t1", "t2"],
            "prompt_fingerprint": ["fp-7", "fp-95"],
            "retry_of": ["r-16-4", None],
            "input_tokens": [0, 0],
            "output_tokens": [0, 0],
        }
    )
    tokens = AvoidedTokens(lake).resolve(hits)
    assert lake.compacted
    assert tokens.to_list() == [44, 1045]


def test_epoch_nanoseconds_are_read_as_nanoseconds(lake: Lake) -> None:
    ns = 1763287200123456789  # 2025-11-16T10:00:00.123456789Z, as OTel time_unix_nano
    want = dt.datetime(2025, 11, 16, 10, 0, 0, 123456, tzinfo=dt.UTC)
    ts = pl.Datetime("us", "UTC")
    assert coerce(pl.Series([ns]), ts).to_list() == [want]
    assert coerce(pl.Series([str(ns)]), ts).to_list() == [want]
    # the other units are still told apart by magnitude
    assert coerce(pl.Series([1763287200123456, 1763287200123, 1763287200]), ts).to_list() == [
        want,
        want.replace(microsecond=123000),
        want.replace(microsecond=0),
    ]
    res = lake.append("requests", [{"request_id": "otel-1", "ts": ns}], source="otel", now=NOW)
    assert (res.loaded, res.rejected) == (1, 0)
    assert [f.parent.name for f in lake.files("requests")] == ["date=2025-11-16"]


def _corrected_lake(path: Path) -> Lake:
    """One partition of five files: requests, a batch loaded twice, and a correction last
    (so the merged file takes the correction's write time: the two tie on it)."""
    lake = Lake(path, fsync=False)
    lake.append("requests", _requests(30), source="t", now=NOW)
    lake.append("requests", _requests(30, offset=30), source="t", now=NOW)
    lake.append("requests", _requests(30, offset=30), source="again", now=NOW)
    lake.append("requests", _requests(5, offset=60), source="t", now=NOW)
    fixed = _requests(3, offset=10).with_columns(tenant=pl.lit("fixed"), output_tokens=999)
    lake.append("requests", fixed, source="fix", now=NOW)
    assert len(lake.files("requests")) == 5
    return lake


CLEAN_REQUESTS = "SELECT request_id, tenant, output_tokens, source FROM clean.requests"


def test_a_query_that_listed_the_files_before_a_compaction_still_reads_them(
    tmp_path: Path,
) -> None:
    """DuckDB expands a view's glob when it binds a query and opens the files later; a
    compaction in between must not delete them ("Cannot open file ...")."""
    lake = _corrected_lake(tmp_path / "lake")
    db = finops.connect(lake.path)
    want = db.sql(f"{CLEAN_REQUESTS} ORDER BY request_id").pl()
    assert want.height == 65
    assert want.filter(pl.col("request_id") == "r-16-11")["tenant"].to_list() == ["fixed"]

    compactions: list[list[CompactResult]] = []

    def compact_now(x: int) -> int:  # runs after the query is bound, before the scan
        if not compactions:
            compactions.append(lake.compact("requests"))
        return x

    db.create_function("compact_now", compact_now, ["BIGINT"], "BIGINT", side_effects=True)
    during = db.sql(f"{CLEAN_REQUESTS} WHERE 1 IN (SELECT compact_now(1)) ORDER BY request_id").pl()
    assert compactions and compactions[0][0].partitions == 1, compactions
    assert_frame_equal(during, want)
    # the merged file and the files it replaced, read together (a fresh connection, as
    # a notebook opened now): the correction still wins, tie on write time included
    assert len(list((lake.path / "requests").glob("date=*/*.parquet"))) == 6
    again = finops.connect(lake.path)
    assert_frame_equal(again.sql(f"{CLEAN_REQUESTS} ORDER BY request_id").pl(), want)
    assert_frame_equal(db.sql(f"{CLEAN_REQUESTS} ORDER BY request_id").pl(), want)


def test_merged_away_files_are_deleted_by_a_later_compaction_past_the_grace(
    tmp_path: Path,
) -> None:
    lake = _corrected_lake(tmp_path / "lake")
    part = lake.files("requests")[0].parent
    before = set(lake.files("requests"))
    (res,) = lake.compact("requests")
    assert (res.files_before, res.files_after, res.rows_after) == (5, 1, 65)
    # left in place for queries already running, but no longer part of the table
    assert all(f.exists() for f in before)
    assert set(lake_module._superseded(part)) == {f.name for f in before}
    (merged,) = lake.files("requests")
    info = lake.info().filter(pl.col("table") == "requests").row(0, named=True)
    assert (info["rows"], info["files"], info["bytes"]) == (65, 1, merged.stat().st_size)
    # raw shows their rows until they are deleted (documented); clean does not
    db = finops.connect(lake.path)
    assert db.sql("SELECT count(*) FROM raw.requests").fetchall() == [(30 + 30 + 30 + 5 + 3 + 65,)]
    assert db.sql("SELECT count(*) FROM clean.requests").fetchall() == [(65,)]
    # a batch merged away is still recognised; nothing is merged twice
    assert lake.append("requests", _requests(30), source="t", now=NOW).files == []
    (res,) = lake.compact("requests")
    assert (res.partitions, res.files_before, res.files_after) == (0, 1, 1)
    (res,) = lake.compact("requests", grace=dt.timedelta(hours=1))
    assert all(f.exists() for f in before)
    # a later compaction once they are older than the grace deletes them and the list
    (res,) = lake.compact("requests", grace=dt.timedelta(0))
    assert (res.partitions, res.files_before, res.files_after, res.deleted) == (0, 1, 1, 5)
    assert not any(f.exists() for f in before)
    assert not (part / ".superseded").exists()
    assert sorted(part.glob("*.parquet")) == [merged]
    db = finops.connect(lake.path)
    assert db.sql("SELECT count(*) FROM raw.requests").fetchall() == [(65,)]
    fixed = "SELECT tenant FROM clean.requests WHERE request_id = 'r-16-12'"
    assert db.sql(fixed).fetchall() == [("fixed",)]
    assert lake.append("requests", _requests(30), source="t", now=NOW).files == []


def _request_r(latency_ms: float) -> list[dict]:
    return [{"request_id": "R", "ts": "2026-11-16T10:00:00Z", "latency_ms": latency_ms}]


def _latency_of_r(lake: Lake) -> list[tuple]:
    q = "SELECT latency_ms FROM clean.requests WHERE request_id = 'R'"
    return finops.connect(lake.path).sql(q).fetchall()


class _Thread(threading.Thread):
    """A thread whose exception fails the test in `join`."""

    def __init__(self, name: str, target: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn, self.error = target, None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # re-raised in join
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def test_a_correction_encoded_while_a_compaction_runs_still_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The correction's write time is when it lands, not when its encoding began: the
    merged file, stamped as its newest input, must not outrank it."""
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("requests", _request_r(1.0))
    encoding, resume = threading.Event(), threading.Event()
    write_parquet = pl.DataFrame.write_parquet

    def slow_in_writer(df: pl.DataFrame, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "corrector":
            encoding.set()
            assert resume.wait(10), "the test never let the correction finish"
        write_parquet(df, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", slow_in_writer)
    writer = _Thread("corrector", lambda: lake.append("requests", _request_r(2.0)))
    writer.start()
    assert encoding.wait(10), "the correction never started encoding"
    lake.append("requests", [{"request_id": "D", "ts": "2026-11-16T11:00:00Z"}])
    (res,) = lake.compact("requests")
    assert (res.files_before, res.files_after) == (2, 1)
    resume.set()
    writer.join(10)
    assert _latency_of_r(lake) == [(2.0,)]
    lake.compact("requests")
    assert _latency_of_r(lake) == [(2.0,)]


def test_a_compaction_lists_no_file_while_a_writer_stamps_and_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that took its write time but has not renamed its file yet holds off the
    compaction's listing: otherwise the merged file, stamped as a newer input, wins."""
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("requests", _request_r(1.0))
    stamped, resume = threading.Event(), threading.Event()
    write_stamp = lake_module._write_stamp

    def stamp_then_wait() -> int:
        stamp = write_stamp()
        if threading.current_thread().name == "corrector":
            stamped.set()
            assert resume.wait(10), "the test never let the correction finish"
        return stamp

    monkeypatch.setattr(lake_module, "_write_stamp", stamp_then_wait)
    writer = _Thread("corrector", lambda: lake.append("requests", _request_r(2.0)))
    writer.start()
    assert stamped.wait(10), "the correction never took its write time"
    lake.append("requests", [{"request_id": "D", "ts": "2026-11-16T11:00:00Z"}])
    compaction = _Thread("compaction", lambda: lake.compact("requests"))
    compaction.start()
    compaction.join(1.0)
    assert compaction.is_alive(), "the compaction listed files while a writer was renaming"
    resume.set()
    writer.join(10)
    compaction.join(30)
    assert not compaction.is_alive()
    assert _latency_of_r(lake) == [(2.0,)]
    assert len(lake.files("requests")) == 1  # it merged the correction too


def test_a_writing_lake_deletes_merged_away_files_past_their_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collectors and ingest write all the time: their appends delete what a compaction
    merged away once its grace is over, so raw.* does not read every row twice until
    someone runs `finops lake compact` again."""
    lake = _corrected_lake(tmp_path / "lake")
    before = set(lake.files("requests"))
    lake.compact("requests")
    writer = Lake(lake.path, fsync=False)
    writer.append("requests", _requests(3, offset=500), source="t", now=NOW)
    assert all(f.exists() for f in before)  # within the grace: queries may still read them
    # while a compaction holds the table a sweep waits for no one and deletes nothing
    with open(lake.path / "requests" / ".compact.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        assert writer.sweep_superseded("requests", grace=dt.timedelta(0)) == 0
    assert all(f.exists() for f in before)
    monkeypatch.setattr(lake_module, "SUPERSEDED_GRACE", dt.timedelta(0))
    writer.append("requests", _requests(3, offset=600), source="t", now=NOW)
    assert all(f.exists() for f in before)  # this Lake swept under a minute ago
    monkeypatch.setattr(lake_module, "SWEEP_EVERY", dt.timedelta(0))
    writer.append("requests", _requests(3, offset=700), source="t", now=NOW)
    assert not any(f.exists() for f in before)
    db = finops.connect(lake.path)
    raw = db.sql("SELECT count(*) FROM raw.requests").fetchall()
    assert raw == db.sql("SELECT count(*) FROM clean.requests").fetchall() == [(65 + 9,)]
