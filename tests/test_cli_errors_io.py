"""CLI error paths around files on disk: damaged checkpoints, failed lake writes, a lake
path that is a file. Each is one `error:` line naming the path, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finops.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _log(path: Path, n: int = 20) -> Path:
    """A small shim request log (the requests table's column names)."""
    rows = [
        {
            "request_id": f"req-{i:04d}",
            "ts": f"2026-11-16T00:{i // 60:02d}:{i % 60:02d}Z",
            "tenant": f"tenant-{i % 3}",
            "response_model": "llama-3.1-8b-instruct",
            "tier": "mid",
            "input_tokens": 100 + i,
            "output_tokens": 10 + i,
            "status_code": 200,
            "latency_ms": 420.5,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_error_line(output: str, needle: str) -> None:
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert needle in errors[0], output


DAMAGE = {
    "not json": ('{"files": [{"path": "x"\n', "checkpoint unreadable (Expecting"),
    "missing field": (
        '{"version": 1, "files": [{"path": "x", "dev": 1}]}',
        "checkpoint files[0]: missing field(s) ['ino']",
    ),
    "wrong type": (
        '{"version": 1, "files": [{"path": "x", "dev": 1, "ino": 2, "offset": "9"}]}',
        "checkpoint files[0]: field 'offset': expected int, got '9'",
    ),
    "not an object": ("[1, 2]", 'checkpoint expected a JSON object with a "files" list'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["collect --once", "ingest --follow"])
def test_a_damaged_checkpoint_is_one_error_line(tmp_path: Path, damage: str, command: str) -> None:
    log, lake = _log(tmp_path / "log.jsonl"), tmp_path / "lake"
    first = runner.invoke(app, ["collect", "--once", "--log", str(log), "--lake", str(lake)])
    assert first.exit_code == 0, first.output
    (cp,) = (lake / "_state").glob("requests-log.jsonl-*.json")
    body, needle = DAMAGE[damage]
    cp.write_text(body)
    if command == "collect --once":
        args = ["collect", "--once", "--log", str(log), "--lake", str(lake)]
    else:
        args = ["ingest", "requests", "--follow", str(log), "--lake", str(lake)]
        args += ["--checkpoint-dir", str(lake / "_state")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    _one_error_line(result.output, f"{cp}: {needle}")
    assert "move it away" in result.output
    assert cp.read_text() == body  # left for the user to look at, not overwritten


def _finops_limited(tmp_path: Path, blocks: int, *args: str) -> subprocess.CompletedProcess:
    """The real CLI with files capped at `blocks` KiB (`ulimit -f`): writes fail as on a
    full disk, with EFBIG (Python ignores SIGXFSZ)."""
    return subprocess.run(
        [
            "bash",
            "-c",
            f'ulimit -f {blocks}; exec "$@"',
            "_",
            sys.executable,
            "-c",
            "from finops.cli import main; main()",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_failed_lake_write_in_ingest_is_one_error_line(tmp_path: Path) -> None:
    log, lake = _log(tmp_path / "log.jsonl"), tmp_path / "lake"
    res = _finops_limited(tmp_path, 2, "ingest", "requests", str(log), "--lake", str(lake))
    assert res.returncode == 1, res.stderr
    _one_error_line(res.stderr, f"error: writing to {lake} failed while loading {log}: ")
    # nothing valid lost: once there is room, a rerun loads every row
    again = runner.invoke(app, ["ingest", "requests", str(log), "--lake", str(lake)])
    assert again.exit_code == 0, again.output
    total = runner.invoke(
        app, ["sql", "SELECT count(*) AS n FROM requests", "--lake", str(lake), "--format", "csv"]
    )
    assert total.output.splitlines()[-1] == "20"


def test_a_failed_lake_write_in_collect_once_says_it_does_not_retry(tmp_path: Path) -> None:
    log, lake = _log(tmp_path / "log.jsonl"), tmp_path / "lake"
    res = _finops_limited(tmp_path, 2, "collect", "--once", "--log", str(log), "--lake", str(lake))
    assert res.returncode == 1, res.stderr
    _one_error_line(res.stderr, f"error: writing to {lake} failed: ")
    assert "(--once: not retrying)" in res.stderr
    assert "will retry" not in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["ingest", "requests", "LOG"],
        ["collect", "--once", "--log", "LOG"],
        ["lake", "info"],
        ["sql", "SELECT 1"],
    ],
    ids=["ingest", "collect", "lake-info", "sql"],
)
def test_a_lake_path_that_is_a_file_is_refused(tmp_path: Path, args: list[str]) -> None:
    log = _log(tmp_path / "log.jsonl")
    not_a_folder = tmp_path / "l1"
    not_a_folder.write_text("x\n")
    argv = [str(log) if a == "LOG" else a for a in args] + ["--lake", str(not_a_folder)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    _one_error_line(result.output, f"{not_a_folder}: not a lake folder (it is a file)")
    assert not_a_folder.read_text() == "x\n"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--prometheus", "http://127.0.0.1:9", "--query", "up", "--since", "1dd"], "--since: "),
        (["--dcgm", "http://127.0.0.1:9", "--interval", "0"], "--interval: must be > 0"),
        (["--prometheus", "http://127.0.0.1:9", "--query", "up", "--step", "0"], "--step: "),
    ],
)
def test_collect_flag_errors_name_the_flag(tmp_path: Path, args: list[str], said: str) -> None:
    """A typo in a flag was reported under its config key (`target #1 (prometheus).lookback`)."""
    res = runner.invoke(app, ["collect", "--once", "--lake", str(tmp_path / "lake"), *args])
    assert res.exit_code != 0
    assert f"error: {said}" in res.output and "target #1" not in res.output, res.output


@pytest.mark.parametrize(
    "command", [["sql", "SELECT count(*) FROM requests"], ["costs", "--headline"]]
)
def test_an_unreadable_lake_file_is_one_error_line_naming_it(
    tmp_path: Path, command: list[str]
) -> None:
    """Was: a truncated or foreign .parquet in the lake ended every command in a DuckDB
    traceback."""
    lake = tmp_path / "lake"
    ok = runner.invoke(
        app, ["ingest", "requests", str(_log(tmp_path / "log.jsonl")), "--lake", str(lake)]
    )
    assert ok.exit_code == 0, ok.output
    bad = lake / "requests" / "date=2026-11-16" / "zz-truncated.parquet"
    bad.write_bytes(b"not parquet")
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from finops.cli import main; main()",
            *command,
            "--lake",
            str(lake),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr
    _one_error_line(res.stderr, f"error: a lake file cannot be read: {bad}: not a readable")
    assert "move it out of the lake folder" in res.stderr


def test_damaged_pages_under_a_sound_footer_are_one_error_line(tmp_path: Path) -> None:
    """A file whose footer reads but whose data pages are garbage (bit rot) passes the
    footer checks; DuckDB's error then names no file. Was: a traceback ending in
    `_duckdb.Error: ...`; now one line naming the file, or saying how to find it."""
    import pyarrow.parquet as pq

    from finops.lake import Lake

    lake = Lake(tmp_path / "lake")
    rows = [
        {"request_id": f"r{i}", "ts": f"2026-11-17T10:{i % 60:02d}:00Z", "tenant": "acme",
         "input_tokens": 100 + i, "output_tokens": 10}
        for i in range(300)
    ]  # fmt: skip
    lake.append("requests", rows, source="test")
    (bad,) = lake.files("requests")
    chunk = next(
        c
        for c in (pq.ParquetFile(bad).metadata.row_group(0).column(j) for j in range(20))
        if c.path_in_schema == "input_tokens"
    )
    data = bytearray(bad.read_bytes())
    for i in range(
        chunk.data_page_offset + 8, chunk.data_page_offset + chunk.total_compressed_size
    ):
        data[i] = (data[i] * 31 + 7) & 255
    bad.write_bytes(bytes(data))
    res = subprocess.run(
        [sys.executable, "-c", "from finops.cli import main; main()", "costs", "--lake",
         str(lake.path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    _one_error_line(res.stderr, "error: a lake file cannot be read (")
    # DuckDB names the file for some damage ("Could not read enough bytes from file
    # \"...\""), not for other ("don't know what type"): the line names it, or says how
    assert str(bad) in res.stderr or (
        "`finops lake compact` reads every page and names each damaged file" in res.stderr
    )
