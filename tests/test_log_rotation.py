"""logrotate schemes while a LogSource follows a plain path: no line is lost or doubled.

Each case reads 10 lines, appends 5 that are not yet read, rotates the file the
way logrotate does, then writes 3 lines to the new file. Real files, real lake.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from collectors.logs import LogSource
from finops.lake import Lake
from tests.test_logs_ingest import q, shim_record, write_jsonl

ALL = [f"req-{i:07d}" for i in range(18)]


def start(lake: Lake, tmp_path: Path) -> tuple[Path, LogSource]:
    """10 lines read, then 5 more written that the follower has not read yet."""
    log = tmp_path / "app.jsonl"
    write_jsonl(log, [shim_record(i) for i in range(10)])
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().loaded == 10
    write_jsonl(log, [shim_record(i) for i in range(10, 15)], mode="a")
    return log, src


def ids(lake: Lake, table: str = "requests") -> list[str]:
    return q(lake, f"SELECT request_id FROM {table} ORDER BY request_id")["request_id"].to_list()


def test_copytruncate_loses_nothing(lake: Lake, tmp_path: Path) -> None:
    log, src = start(lake, tmp_path)
    shutil.copy(log, tmp_path / "app.jsonl.1")  # logrotate copytruncate: copy...
    open(log, "w").close()  # ...then truncate in place (same inode)
    write_jsonl(log, [shim_record(i) for i in range(15, 18)], mode="a")
    res = src.poll()
    assert (res.read, res.loaded) == (8, 8)
    assert src.errors == []
    assert src.poll().read == 0
    assert ids(lake) == ALL
    assert ids(lake, "raw.requests") == ALL  # not one line read twice
    # the next copytruncate cycle: the old copy moves on, the new one has the tail
    write_jsonl(log, [shim_record(18)], mode="a")
    (tmp_path / "app.jsonl.1").rename(tmp_path / "app.jsonl.2")
    shutil.copy(log, tmp_path / "app.jsonl.1")
    open(log, "w").close()
    write_jsonl(log, [shim_record(19)])
    assert src.poll().read == 2
    assert ids(lake, "raw.requests") == [f"req-{i:07d}" for i in range(20)]


def test_copytruncate_with_a_longer_new_file_loses_nothing(lake: Lake, tmp_path: Path) -> None:
    """The truncated file already grew past the old offset: found by its new head."""
    log, src = start(lake, tmp_path)
    shutil.copy(log, tmp_path / "app.jsonl.1")
    write_jsonl(log, [shim_record(i) for i in range(15, 30)])  # truncate + 15 lines
    assert src.poll().read == 20
    assert ids(lake, "raw.requests") == [f"req-{i:07d}" for i in range(30)]


def test_dateext_rename_loses_nothing(lake: Lake, tmp_path: Path) -> None:
    log, src = start(lake, tmp_path)
    log.rename(tmp_path / "app-20261116.jsonl")  # dateext + extension .jsonl
    write_jsonl(log, [shim_record(i) for i in range(15, 18)])
    res = src.poll()
    assert (res.read, res.loaded) == (8, 8)
    assert src.errors == []
    assert ids(lake, "raw.requests") == ALL


def test_olddir_rotation_warns(lake: Lake, tmp_path: Path) -> None:
    """Moved to another folder: cannot be followed, so the follower says what it missed."""
    log, src = start(lake, tmp_path)
    (tmp_path / "old").mkdir()
    log.rename(tmp_path / "old" / "app.jsonl")
    write_jsonl(log, [shim_record(i) for i in range(15, 18)])
    assert src.poll().loaded == 3
    assert len(src.errors) == 1
    assert str(log) in src.errors[0]
    assert "moved out of its folder or deleted" in src.errors[0]
    assert "after byte" in src.errors[0] and "(line 10)" in src.errors[0]
    assert src.poll().read == 0
    assert src.errors == []  # said once, not on every poll


def test_deleted_with_known_unread_bytes_warns_with_count(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "app.jsonl"
    write_jsonl(log, [shim_record(0)])
    with open(log, "a") as fh:
        fh.write('{"request_id": "req-')  # a line still being written: waits
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().loaded == 1
    log.unlink()
    src.poll()
    assert src.errors == [
        f"{log}: moved out of its folder or deleted before it was read; "
        "20 unread bytes (from line 2) not loaded"
    ]


def test_fully_read_rotated_file_deleted_is_quiet(lake: Lake, tmp_path: Path) -> None:
    """Retention deleting an old, fully read rotation is normal: no warning."""
    log = tmp_path / "app.jsonl"
    write_jsonl(log, [shim_record(i) for i in range(3)])
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().loaded == 3
    log.rename(tmp_path / "app.jsonl.1")
    write_jsonl(log, [shim_record(3)])
    assert src.poll().loaded == 1
    (tmp_path / "app.jsonl.1").unlink()
    assert src.poll().read == 0
    assert src.errors == []
