"""A lake file that cannot be read (cut short, damaged pages, a foreign file with text
where a number belongs) is named in one error line by every reader, listed by
`finops lake info`, and left untouched by `finops lake compact`."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from finops.cli import app
from finops.lake import Lake, LakeFileError

runner = CliRunner()


def _rows(day: int, part: int) -> list[dict[str, object]]:
    return [
        {
            "request_id": f"r-{day}-{part}-{i}",
            "ts": f"2026-11-{day}T{10 + i}:00:00Z",
            "tenant": "acme",
            "input_tokens": 100 * (i + 1),
            "output_tokens": 10,
        }
        for i in range(3)
    ]


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    lake = Lake(tmp_path / "lake", fsync=False)
    for day in (16, 17):
        for part in range(2):  # two files per partition, so compaction has work
            lake.append("requests", _rows(day, part), source="test")
    return lake


def _cut_short(lake: Lake) -> Path:
    """The newer file of 2026-11-17, truncated as a full disk or killed copy leaves it."""
    bad = sorted((lake.path / "requests" / "date=2026-11-17").glob("*.parquet"))[-1]
    with bad.open("r+b") as fh:
        fh.truncate(200)
    return bad


def _damage_pages(lake: Lake) -> Path:
    """A file whose footer is sound but whose data pages are garbage (bit rot)."""
    bad = sorted((lake.path / "requests" / "date=2026-11-17").glob("*.parquet"))[-1]
    data = bytearray(bad.read_bytes())
    for i in range(4, len(data) // 2):
        data[i] = (data[i] * 31 + 7) & 255
    bad.write_bytes(bytes(data))
    return bad


def _foreign(lake: Lake) -> Path:
    """A hand-placed Parquet file with input_tokens as text, as another tool writes it."""
    path = lake.path / "requests" / "date=2026-11-17" / "part-foreign.parquet"
    pl.DataFrame(
        {
            "request_id": ["f-1"],
            "ts": pl.Series(["2026-11-17T12:00:00Z"]).str.to_datetime(time_zone="UTC"),
            "input_tokens": ["lots"],
        }
    ).write_parquet(path)
    return path


def test_connect_names_a_file_cut_short(lake: Lake) -> None:
    bad = _cut_short(lake)
    with pytest.raises(LakeFileError) as err:
        finops.connect(lake.path)
    assert err.value.problems[0][0] == bad
    assert str(bad) in str(err.value) and "not a readable Parquet file" in str(err.value)
    assert "move it out of the lake folder" in str(err.value)


@pytest.mark.parametrize(
    "args",
    [["sql", "SELECT 1"], ["costs"], ["simulate"]],
    ids=["sql", "costs", "simulate"],
)
def test_readers_give_one_error_line_naming_the_file(lake: Lake, args: list[str]) -> None:
    bad = _cut_short(lake)
    res = runner.invoke(app, [*args, "--lake", str(lake.path)])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # not a traceback
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: a lake file cannot be read: ")
    assert str(bad) in lines[0] and "finops lake info" in lines[0]


def test_lake_info_lists_the_unreadable_file(lake: Lake) -> None:
    bad = _cut_short(lake)
    res = runner.invoke(app, ["lake", "info", "--lake", str(lake.path), "--format", "json"])
    assert res.exit_code == 0, res.output
    info = {r["table"]: r for r in pl.read_json(res.stdout.encode()).to_dicts()}
    assert info["requests"]["files"] == 4 and info["requests"]["unreadable"] == 1
    assert info["requests"]["rows"] == 9  # the three readable files' rows
    assert f"warning: {bad}: not a readable Parquet file" in res.stderr


def test_compact_leaves_an_unreadable_file_and_merges_the_rest(lake: Lake) -> None:
    bad = _cut_short(lake)
    cut = bad.read_bytes()
    extra = lake.append("requests", _rows(17, 2), source="test").files
    res = runner.invoke(app, ["lake", "compact", "--lake", str(lake.path), "--table", "requests"])
    assert res.exit_code == 1, res.output
    assert f"warning: {bad}: not a readable Parquet file" in res.stderr
    assert "Traceback" not in res.output
    # the bad file is neither merged away (superseded) nor changed
    part = bad.parent
    assert bad.read_bytes() == cut
    assert bad.name not in (part / ".superseded").read_text()
    assert extra[0].name in (part / ".superseded").read_text()  # the readable ones merged
    assert bad in lake.files("requests")
    assert [f for f, _ in lake.unreadable("requests")] == [bad]
    bad.rename(lake.path.parent / bad.name)  # moved away: the lake reads again
    rows = finops.connect(lake.path).execute("SELECT count(*) FROM requests").fetchone()
    assert rows == (12,)  # 16th: 6, 17th: the first file's 3 and the appended 3


def test_compact_leaves_a_file_with_damaged_pages(lake: Lake) -> None:
    bad = _damage_pages(lake)
    damaged = bad.read_bytes()
    res = runner.invoke(app, ["lake", "compact", "--lake", str(lake.path)])
    assert res.exit_code == 1, res.output
    assert f"warning: {bad}: not a readable Parquet file" in res.stderr
    assert bad.read_bytes() == damaged and bad in lake.files("requests")


def test_a_foreign_file_names_its_column_and_the_type_expected(lake: Lake) -> None:
    path = _foreign(lake)
    for args in (["sql", "SELECT sum(input_tokens) FROM requests"], ["costs"]):
        res = runner.invoke(app, [*args, "--lake", str(lake.path)])
        assert res.exit_code == 1, res.output
        assert str(path) in res.stderr
        assert "column input_tokens is large_string, expected an integer column" in res.stderr
        assert "finops ingest requests FILE" in res.stderr
    info = runner.invoke(app, ["lake", "info", "--lake", str(lake.path)])
    assert info.exit_code == 0 and f"warning: {path}: column input_tokens" in info.stderr


def test_ingest_into_a_partition_with_an_unreadable_file_names_it(lake: Lake) -> None:
    """A re-read compares rows with the partition's files: one that cannot be read is
    named (an OSError, as the ingest command reports a failed write), nothing written."""
    bad = _cut_short(lake)
    before = sorted(bad.parent.iterdir())
    with pytest.raises(LakeFileError) as err:
        lake.append("requests", _rows(17, 5), source="test", skip_unchanged=True)
    assert isinstance(err.value, OSError)
    assert str(bad) in str(err.value)
    assert sorted(bad.parent.iterdir()) == before


def test_the_ingest_command_says_reading_the_lake_failed_not_writing(
    lake: Lake, tmp_path: Path
) -> None:
    """`finops ingest` into a partition holding a cut-short file: one error line naming it,
    saying it could not be read (was: "writing to LAKE failed ...")."""
    bad = _cut_short(lake)
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"request_id": "r-new", "ts": "2026-11-17T12:00:00Z", "tenant": "acme", '
        '"input_tokens": 5, "output_tokens": 1}\n'
    )
    res = runner.invoke(app, ["ingest", "requests", str(log), "--lake", str(lake.path)])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: loading {log}: a lake file")
    assert str(bad) in errors[0] and "writing to" not in errors[0]
