"""The lake writer: round trip, atomic files, idempotence, rejects accounting, compaction."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import finops
from finops.lake import Lake, write_parquet_atomic
from finops.schemas import TABLES

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _requests(
    n: int, day: int = 16, prefix: str = "r", offset: int = 0, days: int = 1
) -> pl.DataFrame:
    ids = range(offset, offset + n)
    return pl.DataFrame(
        {
            "request_id": [f"{prefix}-{i}" for i in ids],
            "ts": [
                dt.datetime(2026, 11, day + i % days, i % 24, i % 60, tzinfo=dt.UTC) for i in ids
            ],
            "tenant": [f"t{i % 3}" for i in ids],
            "input_tokens": [10 * i for i in ids],
            "output_tokens": list(ids),
            "stream": [i % 2 == 0 for i in ids],
            "latency_ms": [1.5 * i for i in ids],
        }
    )


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.sort(df.columns, nulls_last=True)


def test_round_trip_rows_and_frames(lake: Lake) -> None:
    frame = _requests(50)
    res = lake.append("requests", frame, source="test", now=NOW)
    assert (res.read, res.loaded, res.rejected) == (50, 50, 0)
    rows = [{"request_id": "d-1", "ts": "2026-11-17T01:02:03.5+01:00", "input_tokens": "7"}]
    res2 = lake.append("requests", rows, source="dicts", now=NOW)
    assert res2.loaded == 1
    db = finops.connect(lake.path)
    back = db.sql("SELECT * FROM raw.requests ORDER BY request_id").pl()
    assert back.height == 51
    got = back.filter(pl.col("request_id") != "d-1").select(frame.columns)
    assert _sorted(got).equals(_sorted(frame))
    d = back.filter(pl.col("request_id") == "d-1").row(0, named=True)
    assert d["ts"] == dt.datetime(2026, 11, 17, 0, 2, 3, 500000, tzinfo=dt.UTC)
    assert d["input_tokens"] == 7 and d["source"] == "dicts"
    # partitions by event date, one immutable file each
    assert sorted(p.parent.name for p in lake.files("requests")) == [
        "date=2026-11-16",
        "date=2026-11-17",
    ]
    # read back with plain pyarrow too: the files are ordinary Parquet with the schema's columns
    table = pq.read_table(lake.files("requests")[0])
    assert table.column_names == list(TABLES["requests"].columns)


def test_atomic_write_cleans_up_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finops.lake as lake_mod

    def boom(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lake_mod.pq, "write_table", boom)
    dest = tmp_path / "t" / "date=2026-11-16" / "part-x.parquet"
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(_requests(3).to_arrow(), dest)
    assert list(dest.parent.iterdir()) == []


WRITER = """
import sys, datetime as dt, polars as pl
from finops.lake import Lake
lake = Lake(sys.argv[1])
n = 200_000
i = 0
while True:
    df = pl.DataFrame({
        "request_id": [f"k{i}-{j}" for j in range(n)],
        "ts": [dt.datetime(2026, 11, 16, tzinfo=dt.UTC)] * n,
        "tenant": ["x" * 40] * n,
        "input_tokens": list(range(n)),
    })
    lake.append("requests", df, source="killed",
                now=dt.datetime(2026, 11, 28, tzinfo=dt.UTC))
    print("wrote", i, flush=True)
    i += 1
"""


def test_killed_writer_leaves_no_visible_partial_file(tmp_path: Path) -> None:
    lake_path = tmp_path / "lake"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(lake_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("wrote 0")  # at least one complete file
        time.sleep(0.35)  # then kill it in the middle of a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lake = Lake(lake_path)
    files = lake.files("requests")
    assert files
    for f in files:  # every visible file is complete
        assert pq.read_table(f).num_rows == 200_000
    leftovers = [p for p in (lake_path / "requests").rglob("*") if ".tmp-" in p.name]
    assert all(not p.name.endswith(".parquet") for p in leftovers)
    db = finops.connect(lake_path)
    assert db.sql("SELECT count(*) FROM requests").fetchall()[0][0] == 200_000 * len(files)


def _snapshot(db: object) -> dict[str, pl.DataFrame]:
    views = db.sql(  # type: ignore[attr-defined]
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema IN ('raw', 'clean', 'marts') ORDER BY 1, 2"
    ).fetchall()
    out = {}
    for schema, name in views:
        df = db.sql(f"SELECT * FROM {schema}.{name}").pl()  # type: ignore[attr-defined]
        out[f"{schema}.{name}"] = _sorted(df)
    return out


def _same(a: dict[str, pl.DataFrame], b: dict[str, pl.DataFrame]) -> bool:
    return a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def test_double_load_is_idempotent(lake: Lake) -> None:
    batch = _requests(40)
    lake.append("requests", batch, source="test", now=NOW)
    db = finops.connect(lake.path)
    before = _snapshot(db)
    again = lake.append("requests", batch, source="test", now=NOW)
    assert again.loaded == 40 and again.files == [] and again.duplicate_files == 1
    shuffled = lake.append("requests", batch.reverse(), source="test", now=NOW)
    assert shuffled.files == []  # same rows in another order: same fingerprint, no new file
    assert _same(_snapshot(db), before)
    # an overlapping batch lands in raw but the clean views keep one row per key
    lake.append("requests", batch.head(10), source="test", now=NOW)
    assert db.sql("SELECT count(*) FROM raw.requests").fetchall()[0][0] == 50
    after = _snapshot(db)
    for name in ("clean.requests", "marts.requests_hourly", "marts.tenant_daily"):
        assert after[name].equals(before[name]), name


def test_rejects_accounting_names_the_field(lake: Lake) -> None:
    good = [
        {"request_id": f"ok-{i}", "ts": "2026-11-16T10:00:00Z", "input_tokens": i} for i in range(5)
    ]
    bad = [
        {"request_id": "b1", "ts": "2026-11-16T10:00:00Z", "input_tokens": "many"},
        {"ts": "2026-11-16T10:00:00Z", "input_tokens": 3},
        {"request_id": "b3", "ts": "2026-11-16T10:00:00Z", "output_tokens": -5},
        {"request_id": "b4", "ts": "2027-01-01T00:00:00Z"},
        {"request_id": "b5", "ts": "yesterday-ish"},
        {"request_id": "b6", "ts": "1970-01-01T00:00:10Z"},
        {"request_id": "b7", "ts": "2026-11-16T10:00:00Z", "stream": "perhaps"},
        {"request_id": "b8", "ts": "2026-11-16T10:00:00Z", "latency_ms": "fast"},
    ]
    rows = good[:2] + bad + good[2:]
    res = lake.append("requests", rows, source="feed", now=NOW)
    assert res.read == len(rows) == res.loaded + res.rejected
    assert (res.loaded, res.rejected) == (5, 8)
    db = finops.connect(lake.path)
    loaded = db.sql("SELECT request_id FROM requests ORDER BY 1").pl()["request_id"].to_list()
    assert loaded == [f"ok-{i}" for i in range(5)]
    rej = db.sql("SELECT location, raw, reason FROM rejects ORDER BY location").pl()
    assert rej.height == 8
    by_loc = dict(zip(rej["location"], rej["reason"], strict=True))
    # rows are numbered in input order (1-based), the reason names the field and what was wrong
    assert "field 'input_tokens': expected an integer, got 'many'" in by_loc["feed row 3"]
    assert "field 'request_id': required" in by_loc["feed row 4"]
    assert "field 'output_tokens': must be >= 0, got -5" in by_loc["feed row 5"]
    assert "field 'ts'" in by_loc["feed row 6"] and "future" in by_loc["feed row 6"]
    assert "field 'ts': expected a timestamp" in by_loc["feed row 7"]
    assert "yesterday-ish" in by_loc["feed row 7"]
    assert "before 2000" in by_loc["feed row 8"]
    assert "field 'stream': expected a boolean" in by_loc["feed row 9"]
    assert "field 'latency_ms': expected a number" in by_loc["feed row 10"]
    assert all(raw for raw in rej["raw"])
    assert '"many"' in rej.filter(pl.col("location") == "feed row 3")["raw"][0]


def test_rejects_keep_given_location_and_raw_text(lake: Lake) -> None:
    df = pl.DataFrame(
        {
            "request_id": ["a", "b"],
            "ts": ["2026-11-16T00:00:00Z", "not a time"],
            "_location": ["log.jsonl:1", "log.jsonl:2"],
            "_raw": ['{"request_id":"a"}', '{"request_id":"b","ts":"not a time"}'],
        }
    )
    res = lake.append("requests", df, source="ingest", now=NOW)
    assert (res.loaded, res.rejected) == (1, 1)
    rej = finops.connect(lake.path).sql("SELECT * FROM rejects").pl()
    assert rej["location"].to_list() == ["log.jsonl:2"]
    assert rej["raw"].to_list() == ['{"request_id":"b","ts":"not a time"}']
    assert rej["table_name"].to_list() == ["requests"]


def _busy_lake(lake: Lake) -> None:
    for k in range(4):  # overlapping batches: the same rows land in several files
        lake.append("requests", _requests(30, prefix="b", offset=10 * k, days=2), now=NOW)
    for k in range(3):
        lake.append(
            "serving_samples",
            [
                {
                    "ts": dt.datetime(2026, 11, 16, 0, m, tzinfo=dt.UTC),
                    "source": "t",
                    "target": "vllm-mid-0",
                    "metric": "vllm:prompt_tokens_total",
                    "type": "counter",
                    "labels": {"model_name": "m"},
                    "value": float(100 * m if m < 20 else 5 * (m - 20)),
                }
                for m in range(10 * k, 10 * k + 12)  # overlapping windows: duplicates
            ],
            now=NOW,
        )
    lake.append(
        "gpu_samples",
        [
            {"ts": f"2026-11-16T00:0{m}:00Z", "source": "t", "gpu_uuid": "GPU-1",
             "field": f, "value": v * m, "labels": {"tier": "mid"}, "gpu_model": "NVIDIA L4"}
            for m in range(6)
            for f, v in (("DCGM_FI_PROF_SM_ACTIVE", 0.1), ("DCGM_FI_DEV_GPU_UTIL", 10.0),
                         ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1e6))
        ],
        now=NOW,
    )  # fmt: skip


def test_rows_sharing_a_key_resolve_to_the_latest_write_on_every_query(lake: Lake) -> None:
    """A log re-ingested with a corrected mapping: the correction wins, every time."""
    wrong = _requests(300).with_columns(pl.col("latency_ms") / 1000.0)  # forgot the scale
    right = _requests(300)
    for batch in (wrong, right):
        assert lake.append("requests", batch, source="test", now=NOW).files
    want = float(right["latency_ms"].sum())
    for _ in range(12):  # a fresh connection each time: no cached plan, new scan order
        db = finops.connect(lake.path)
        assert db.sql("SELECT sum(latency_ms) FROM clean.requests").fetchall()[0][0] == want
        assert db.sql("SELECT count(*) FROM marts.request_work").fetchall()[0][0] == 300
    got = (
        finops.connect(lake.path)
        .sql("SELECT latency_ms FROM clean.requests WHERE request_id = 'r-7'")
        .fetchall()
    )
    assert got == [(1.5 * 7,)]
    # the same in one batch: the later line wins
    dup = pl.concat(
        [_requests(1, prefix="d"), _requests(1, prefix="d").with_columns(latency_ms=9.0)]
    )
    lake.append("requests", dup, source="test", now=NOW)
    db = finops.connect(lake.path)
    assert db.sql("SELECT latency_ms FROM clean.requests WHERE request_id = 'd-0'").fetchall() == [
        (9.0,)
    ]
    # compaction keeps the latest written too, and a correction after it still wins
    lake.compact("requests")
    db = finops.connect(lake.path)
    assert db.sql("SELECT sum(latency_ms) FROM clean.requests WHERE request_id LIKE 'r-%'"
                  ).fetchall()[0][0] == want  # fmt: skip
    # raw holds the merged-away files' rows until a later compaction deletes them
    lake.compact("requests", grace=dt.timedelta(0))
    db = finops.connect(lake.path)
    assert db.sql("SELECT count(*) FROM raw.requests").fetchall()[0][0] == 301
    lake.append("requests", wrong.head(1), source="again", now=NOW)  # a new batch: new file
    db = finops.connect(lake.path)
    assert db.sql("SELECT latency_ms FROM clean.requests WHERE request_id = 'r-0'").fetchall() == [
        (0.0,)
    ]


def test_compaction_keeps_the_latest_write_when_a_correction_moved_dates(lake: Lake) -> None:
    """A corrected request whose ts moved to the next day still wins after compaction, even
    when a later, unrelated append makes its old day's merged file newer than the fix."""
    base = {"request_id": "X", "tenant": "t"}
    lake.append("requests", [{**base, "ts": "2026-11-16T23:30:00Z", "latency_ms": 1.0}])
    lake.append("requests", [{**base, "ts": "2026-11-17T01:30:00Z", "latency_ms": 2.0}])
    lake.append("requests", [{"request_id": "Y", "ts": "2026-11-16T10:00:00Z"}])

    def x() -> list[tuple]:
        q = "SELECT latency_ms FROM clean.requests WHERE request_id = 'X'"
        return finops.connect(lake.path).sql(q).fetchall()

    assert x() == [(2.0,)]
    lake.compact("requests")
    assert x() == [(2.0,)]
    work = "SELECT ts FROM marts.request_work WHERE request_id = 'X'"
    assert finops.connect(lake.path).sql(work).fetchall()[0][0].day == 17
    assert all(r.partitions == 0 for r in lake.compact("requests"))  # nothing left to do
    assert x() == [(2.0,)]


def test_a_batch_compacted_away_is_still_recognised(lake: Lake) -> None:
    """Ingesting a file again after `finops lake compact` adds nothing, as before it."""
    a, b = _requests(40), _requests(40, offset=40)
    lake.append("requests", a, source="test", now=NOW)
    lake.append("requests", b, source="test", now=NOW)

    def compact() -> None:  # and delete the files merged away: only the record is left
        lake.compact("requests")
        lake.compact("requests", grace=dt.timedelta(0))

    compact()
    assert len(list(lake.path.glob("requests/date=*/*.parquet"))) == 1

    def rows() -> list[tuple]:
        return finops.connect(lake.path).sql("SELECT count(*) FROM raw.requests").fetchall()

    assert rows() == [(80,)]
    for batch in (a, b, b.reverse()):
        again = lake.append("requests", batch, source="test", now=NOW)
        assert again.files == [] and again.duplicate_files == 1
    assert rows() == [(80,)]
    # compacting again keeps what the first compaction recorded
    lake.append("requests", _requests(5, offset=100), source="test", now=NOW)
    compact()
    assert lake.append("requests", a, source="test", now=NOW).files == []
    assert rows() == [(85,)]


def test_compaction_keeps_every_view_identical(lake: Lake) -> None:
    _busy_lake(lake)
    reader = finops.connect(lake.path)  # a reader open across the compaction
    before = _snapshot(reader)
    assert before["clean.serving_increase"].height > 0
    files_before = sum(len(lake.files(t)) for t in TABLES)
    results = {r.table: r for r in lake.compact()}
    assert results["requests"].files_after < results["requests"].files_before
    assert sum(len(lake.files(t)) for t in TABLES) < files_before
    after_same_reader = _snapshot(reader)
    fresh = _snapshot(finops.connect(lake.path))
    for name, df in before.items():
        if name.startswith("raw."):  # raw loses exact duplicates by design
            continue
        assert_frame_equal(after_same_reader[name], df, check_exact=False, rel_tol=1e-9)
        assert_frame_equal(fresh[name], df, check_exact=False, rel_tol=1e-9)
    # compacting again changes nothing
    assert all(r.partitions == 0 for r in lake.compact())
    assert _same(_snapshot(reader), after_same_reader)


def test_unknown_table_and_bad_input_are_clear(lake: Lake) -> None:
    with pytest.raises(KeyError, match="unknown lake table 'nope'"):
        lake.append("nope", [])
    with pytest.raises(ValueError, match="not a single dict"):
        lake.append("requests", {"request_id": "x"})
    assert lake.append("requests", []).read == 0


def test_skip_unchanged_writes_only_rows_the_latest_write_lacks(lake: Lake) -> None:
    """A log read again after it grew: only the new and changed rows are written, across
    a compaction and files written before a column existed."""
    first = _requests(100, days=2)
    lake.append("requests", first, source="test", now=NOW)
    lake.compact("requests", grace=dt.timedelta(0))
    # a file of an older finops version: no `feature` column; its rows read feature NULL
    old = _requests(10, offset=200)
    other = Lake(lake.path.parent / "other")
    (written,) = other.append("requests", old, source="test", now=NOW).files
    write_parquet_atomic(
        pl.read_parquet(written).drop("feature"),
        lake.path / "requests/date=2026-11-16/part-old.parquet",
    )
    changed = first.with_columns(
        pl.when(pl.col("request_id") == "r-7").then(7000).otherwise(pl.col("output_tokens"))
        .alias("output_tokens")
    )  # fmt: skip
    grown = pl.concat([changed, old, _requests(5, offset=300)])
    res = lake.append("requests", grown, source="test", now=NOW, skip_unchanged=True)
    assert (res.loaded, res.unchanged, res.replaced) == (115, 109, 1)
    raw = finops.connect(lake.path).sql("SELECT count(*) FROM raw.requests").fetchall()
    assert raw == [(116,)]  # 110 + the changed row + 5 new
    db = finops.connect(lake.path)
    q = "SELECT output_tokens FROM clean.requests WHERE request_id = 'r-7'"
    assert db.sql(q).fetchall() == [(7000,)]
    # the same batch again: nothing to write
    again = lake.append("requests", grown, source="test", now=NOW, skip_unchanged=True)
    assert (again.files, again.unchanged, again.replaced) == ([], 115, 0)
    # without it, a batch written before is still recognised by its fingerprint alone
    assert lake.append("requests", first, source="test", now=NOW).files == []


def test_append_validated_writes_what_append_writes(lake: Lake, tmp_path: Path) -> None:
    """The collector's flush path: rows `validate` passed, written without a second check."""
    from finops.lake import validate
    from finops.schemas import schema_for

    rows = _requests(50, days=2).with_columns(source=pl.lit(None, dtype=pl.String))
    good = validate(rows, schema_for("requests"), source="x")[0].good
    # two payloads sharing a key: written once, the last kept
    res = lake.append_validated("requests", pl.concat([good, good.tail(1)]), source="shim")
    assert (res.read, res.loaded, res.rejected, len(res.files)) == (51, 51, 0, 2)
    other = Lake(tmp_path / "other")
    other.append("requests", rows, source="shim")

    def clean(path: Path) -> pl.DataFrame:
        return finops.connect(path).sql("SELECT * FROM clean.requests ORDER BY request_id").pl()

    assert_frame_equal(clean(lake.path), clean(other.path))
    assert finops.connect(lake.path).sql("SELECT count(*) FROM raw.requests").fetchall() == [(50,)]
    assert lake.append_validated("requests", good, source="shim").files == []  # same batch
