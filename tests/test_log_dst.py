"""Local-time request logs across daylight-saving changes: real files, the real ingest path.

America/New_York repeats 01:00-02:00 on 2026-11-01 (EDT, UTC-4, then EST, UTC-5)
and skips 02:00-03:00 on 2026-03-08. A log written in time order tells the two
occurrences of the repeated hour apart by going back; where it cannot, the
earlier one is taken and the ingest says so, naming the lines.
"""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from collectors.logs import LogSource, ingest_file
from collectors.mapping import AmbiguousTimeWarning
from finops.cli import app
from finops.lake import Lake

UTC = dt.UTC
MAPPING = """
[mapping]
name = "ny"
[columns]
request_id = "id"
ts = { from = "when", format = "%Y-%m-%d %H:%M:%S", timezone = "America/New_York" }
input_tokens = "tin"
output_tokens = "tout"
"""

# id, local wall-clock time, the true UTC time
FALL_BACK = [
    ("a", "2026-11-01 00:59:00", dt.datetime(2026, 11, 1, 4, 59, tzinfo=UTC)),
    ("b", "2026-11-01 01:20:00", dt.datetime(2026, 11, 1, 5, 20, tzinfo=UTC)),  # EDT
    ("c", "2026-11-01 01:50:00", dt.datetime(2026, 11, 1, 5, 50, tzinfo=UTC)),
    ("j", "2026-11-01 01:48:00", dt.datetime(2026, 11, 1, 5, 48, tzinfo=UTC)),  # jitter
    ("d", "2026-11-01 01:05:00", dt.datetime(2026, 11, 1, 6, 5, tzinfo=UTC)),  # EST
    ("e", "2026-11-01 01:40:00", dt.datetime(2026, 11, 1, 6, 40, tzinfo=UTC)),
    ("k", "2026-11-01 01:39:00", dt.datetime(2026, 11, 1, 6, 39, tzinfo=UTC)),
    ("f", "2026-11-01 02:10:00", dt.datetime(2026, 11, 1, 7, 10, tzinfo=UTC)),
]


def _csv(path: Path, rows: list[tuple[str, str, dt.datetime]], *, header: bool = True) -> Path:
    with open(path, "a") as fh:
        if header:
            fh.write("id,when,tin,tout\n")
        for rid, when, _ in rows:
            fh.write(f"{rid},{when},1,1\n")
    return path


def _ts(lake: Lake) -> dict[str, dt.datetime]:
    df = finops.connect(lake.path).sql("SELECT request_id, ts FROM requests").pl()
    return dict(zip(df["request_id"], df["ts"], strict=True))


def _rejects(lake: Lake) -> dict[str, str]:
    files = lake.files("rejects")
    if not files:
        return {}
    df = pl.concat([pl.read_parquet(f) for f in files])
    return dict(zip(df["location"], df["reason"], strict=True))


@pytest.fixture
def mapping(tmp_path: Path) -> Path:
    p = tmp_path / "ny.toml"
    p.write_text(MAPPING)
    return p


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 40])
def test_repeated_hour_is_placed_by_the_files_order(
    lake: Lake, tmp_path: Path, mapping: Path, chunk_bytes: int
) -> None:
    """After 01:50 the log goes back to 01:05: from there on the hour is EST. A step back
    of two minutes (01:50 -> 01:48, a slow request logged late) is no clock change. With
    40-byte chunks every row is its own chunk: the order is carried from chunk to chunk."""
    data = _csv(tmp_path / "ny.csv", FALL_BACK)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousTimeWarning)
        report = ingest_file(data, lake, mapping=str(mapping), chunk_bytes=chunk_bytes)
    assert (report.read, report.loaded, report.rejected) == (8, 8, 0)
    assert _ts(lake) == {rid: want for rid, _, want in FALL_BACK}
    assert report.warnings == []


def test_order_that_cannot_tell_reads_earliest_and_says_so(
    lake: Lake, tmp_path: Path, mapping: Path
) -> None:
    """A file holding only the repeated hour (an hourly rotated log), going forward: it may
    be either occurrence. Its rows stay EDT and the warning names file, lines and rule."""
    data = _csv(tmp_path / "hour.csv", [FALL_BACK[0], FALL_BACK[4], FALL_BACK[5], FALL_BACK[7]])
    with pytest.warns(AmbiguousTimeWarning) as caught:
        report = ingest_file(data, lake, mapping=str(mapping))
    assert report.loaded == 4 and len(report.warnings) == 1
    msg = report.warnings[0]
    assert [str(w.message) for w in caught] == [msg]
    assert msg.startswith(f"{data}: lines 3-4 (2 row(s)), column ts: ")
    assert "2026-11-01 01:05:00-01:40:00" in msg and "America/New_York" in msg
    assert "read as the earlier one (UTC-04:00)" in msg
    got = _ts(lake)
    assert got["d"] == dt.datetime(2026, 11, 1, 5, 5, tzinfo=UTC)
    assert got["e"] == dt.datetime(2026, 11, 1, 5, 40, tzinfo=UTC)


def test_cli_single_row_in_the_repeated_hour_warns(tmp_path: Path, mapping: Path) -> None:
    """`finops ingest requests`: one row at 01:30 with nothing after it; and 02:30 on the
    spring-forward night, which does not exist: a reject naming its line, not a shift."""
    lake_dir = tmp_path / "lake"
    Lake(lake_dir)
    data = tmp_path / "one.csv"
    data.write_text(
        "id,when,tin,tout\n"
        "z,2026-11-01 01:30:00,1,1\n"
        "y,2026-03-08 02:30:00,1,1\n"
        "x,2026-03-08 03:30:00,1,1\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousTimeWarning)  # the CLI prints, never raises
        res = CliRunner().invoke(
            app,
            ["ingest", "requests", str(data), "--lake", str(lake_dir), "-m", str(mapping)],
        )
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and f"{data}: line 2 (1 row(s))" in warned[0], res.output
    assert "1 rejected" in res.output
    assert f"{data}:3" in res.output and "does not exist in America/New_York" in res.output
    lake = Lake(lake_dir)
    got = _ts(lake)
    assert got == {
        "z": dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
        "x": dt.datetime(2026, 3, 8, 7, 30, tzinfo=UTC),  # EDT: valid neighbours stay
    }
    assert "daylight saving" in _rejects(lake)[f"{data}:3"]


def test_follower_carries_the_order_across_polls(lake: Lake, tmp_path: Path, mapping: Path) -> None:
    """A follower reads the EDT hour in one poll and the EST hour in a later one: the step
    back is only visible against what earlier polls read. The first poll warns (nothing
    after its rows yet), once; the EST rows are then placed without a warning."""
    log = _csv(tmp_path / "live.csv", FALL_BACK[:2])
    src = LogSource(log, lake, tmp_path / "cp", str(mapping))
    assert src.poll().loaded == 2
    assert len(src.errors) == 1 and "line 3 (1 row(s))" in src.errors[0]
    _csv(log, FALL_BACK[2:4], header=False)
    assert src.poll().loaded == 2
    assert src.errors == []  # warned once per repeated hour, not per poll
    _csv(log, FALL_BACK[4:], header=False)
    assert src.poll().loaded == 4
    assert src.errors == []
    assert _ts(lake) == {rid: want for rid, _, want in FALL_BACK}
    assert len(src.reports[str(log)].warnings) == 1
