"""The lake with other processes at work: killed writers, compactions at once, epoch units."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds

from collectors.cache_events import AvoidedTokens
from finops.lake import Lake, coerce

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
import sys, time
from pathlib import Path
from finops.lake import Lake
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print("compacting", flush=True)
Lake(sys.argv[1], fsync=False).compact("requests")
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
    """A lake that another process compacts right after the first listing of `requests`."""

    compacted = False

    def files(self, table: str) -> list[Path]:
        listed = super().files(table)
        if table == "requests" and not self.compacted:
            self.compacted = True
            subprocess.run(
                [sys.executable, "-c", COMPACT, str(self.path), str(self.path)], check=True
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
