"""The request log against a log folder that goes away or stops taking writes.

Real files in tmp_path: the folder removed while a file is open (a clean-up job), made
unwritable for a while, the disk full mid-batch, and a failure long enough to pass the
bound on what is held in memory; and a folder shared with other writers, live or dead.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from finops.shim import requestlog as rl
from finops.shim.requestlog import RequestLog, new_record


def _rec(i: int) -> dict:
    r = new_record()
    r.update(request_id=f"r{i}", ts="2026-01-01T00:00:00Z", source="shim", status_code=200)
    return r


def _ids(folder: Path, pattern: str = "requests-*.jsonl") -> list[str]:
    """request_ids of the published files, in file order (by sequence number)."""
    files = sorted(folder.glob(pattern), key=lambda p: int(p.name.split("-")[3]))
    return [orjson.loads(x)["request_id"] for p in files for x in p.read_bytes().splitlines()]


class _Blocked:
    """Make `folder` refuse new files: mode 0o500, or where that does not stop this user
    (root), the folder moved aside and a regular file put in its place."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.aside = folder.with_name(folder.name + ".aside")
        self.by_mode = False

    def __enter__(self) -> _Blocked:
        self.folder.chmod(0o500)
        probe = self.folder / "probe"
        try:
            probe.touch(exist_ok=False)
        except PermissionError:
            self.by_mode = True
            return self
        probe.unlink()  # root: the mode does not block writes
        self.folder.chmod(0o700)
        self.folder.rename(self.aside)
        self.folder.write_bytes(b"not a folder\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.by_mode:
            self.folder.chmod(0o700)
        else:
            self.folder.unlink()
            self.aside.rename(self.folder)


def test_folder_removed_while_a_file_is_open_loses_no_record(tmp_path, caplog):
    """rm -rf of the log folder with a file open, twice: the open file's bytes are copied
    into a new file in the folder made again, and every record counted written is on disk."""
    d = tmp_path / "log"
    log = RequestLog(d, rotate_bytes=1 << 30, rotate_s=3600, fsync=True, interval=0.01)
    with caplog.at_level("WARNING", logger="finops.shim"):
        for i in range(3):
            log.write(_rec(i))
        assert log.flush()
        shutil.rmtree(d)  # the open file (r0-r2) loses its name
        for i in range(3, 6):
            log.write(_rec(i))
        assert log.flush()
        assert d.is_dir() and len(list(d.glob("*.jsonl.open"))) == 1
        shutil.rmtree(d)  # again, and nothing is written before the shim stops
        log.close()
    assert not list(d.glob("*.open"))
    assert _ids(d) == [f"r{i}" for i in range(6)]
    assert (log.written, log.errors, log.backlog) == (6, 0, 0)
    assert sorted(d.iterdir()) == sorted(log.files)
    assert f"lost its name in {d}" in caplog.text


def test_folder_removed_and_open_file_rotated_by_age(tmp_path):
    """The folder is gone when the idle open file is rotated: it is still published."""
    d = tmp_path / "log"
    log = RequestLog(d, rotate_s=0.3, fsync=False, interval=0.01)
    for i in range(4):
        log.write(_rec(i))
    assert log.flush()
    shutil.rmtree(d)
    deadline = time.monotonic() + 5
    while not list(d.glob("*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.02)
    for i in range(4, 6):  # later records go to a new file in the folder made again
        log.write(_rec(i))
    assert log.flush()
    log.close()
    assert sorted(_ids(d)) == [f"r{i}" for i in range(6)]
    assert (log.written, log.errors) == (6, 0) and not log._pending


def test_unwritable_folder_keeps_records_until_it_takes_writes(tmp_path):
    """No new file can be made for a while: the records wait in memory (backlog, not
    errors) and are written in order once the folder takes writes again."""
    d = tmp_path / "log"
    # every batch closes its file, so each one needs a new file in the folder
    log = RequestLog(d, rotate_bytes=1, rotate_s=3600, fsync=False, interval=0.01)
    log.write(_rec(0))
    assert log.flush()
    with _Blocked(d):
        for i in range(1, 6):
            log.write(_rec(i))
        assert not log.flush(timeout=0.3)  # cannot be written yet
        assert (log.written, log.errors, log.backlog) == (1, 0, 5)
        assert log.last_error
    for i in range(6, 8):
        log.write(_rec(i))
    assert log.flush()
    log.close()
    assert _ids(d) == [f"r{i}" for i in range(8)]
    assert (log.written, log.errors, log.backlog) == (8, 0, 0)
    assert not list(d.glob("*.open"))


class _FullDisk:
    """Wraps a real file; once `budget` is set, lets that many more bytes in, then ENOSPC."""

    budget: int | None = None

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        budget = _FullDisk.budget
        if budget is None:
            return self._fh.write(data)
        if budget == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        part = bytes(data[:budget])
        _FullDisk.budget = budget - len(part)
        return self._fh.write(part)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def test_disk_full_mid_batch_keeps_the_rest_for_later(tmp_path, monkeypatch):
    """The whole lines before the failure are published; the rest are retried, once each."""

    def full_disk_open(*a, **k):
        return _FullDisk(builtins.open(*a, **k))

    monkeypatch.setattr(rl, "open", full_disk_open, raising=False)
    monkeypatch.setattr(_FullDisk, "budget", None)
    log = RequestLog(tmp_path, rotate_bytes=1 << 30, rotate_s=3600, fsync=False, interval=0.01)
    for i in range(3):
        log.write(_rec(i))
    assert log.flush()
    _FullDisk.budget = len(orjson.dumps(_rec(3))) + 11  # r3 whole, r4 cut short, r5 not at all
    for i in range(3, 6):
        log.write(_rec(i))
    assert not log.flush(timeout=0.3)
    assert not list(tmp_path.glob("*.open"))  # closed out after its last whole line
    assert _ids(tmp_path) == [f"r{i}" for i in range(4)]
    assert (log.written, log.errors, log.backlog) == (4, 0, 2)
    assert "No space left" in (log.last_error or "")
    _FullDisk.budget = None
    log.write(_rec(6))
    assert log.flush()
    log.close()
    assert _ids(tmp_path) == [f"r{i}" for i in range(7)]
    assert (log.written, log.errors) == (7, 0)


def test_backlog_bound_drops_newer_records_counts_and_warns(tmp_path, caplog):
    """Past max_backlog held records, newer ones are dropped: counted as errors and said
    so; at shutdown with the folder still unwritable the held ones are lost, and said so."""
    d = tmp_path / "log"
    log = RequestLog(d, rotate_bytes=1, rotate_s=3600, fsync=False, interval=0.01, max_backlog=5)
    with caplog.at_level("WARNING", logger="finops.shim"):
        with _Blocked(d):
            for i in range(8):
                log.write(_rec(i))
            assert not log.flush(timeout=0.3)
            assert (log.written, log.errors, log.backlog) == (0, 3, 5)
            assert "newer ones are dropped" in caplog.text
        assert log.flush()
        assert (log.written, log.errors, log.backlog) == (5, 3, 0)
        assert _ids(d) == [f"r{i}" for i in range(5)]  # the oldest are kept, in order
        assert "3 records were dropped" in caplog.text
        caplog.clear()
        blocked = _Blocked(d)
        blocked.__enter__()
        try:
            for i in range(8, 10):
                log.write(_rec(i))
            log.close()
        finally:
            blocked.__exit__()
    assert (log.written, log.errors, log.backlog) == (5, 5, 0)
    assert "2 records could not be written" in caplog.text and "they are lost" in caplog.text
    assert _ids(d) == [f"r{i}" for i in range(5)]


def _open_file(log: RequestLog) -> Path:
    (path,) = log.folder.glob("*.jsonl.open")
    return path


def test_a_second_shim_on_the_folder_leaves_a_live_writers_file_alone(tmp_path, monkeypatch):
    """Two shims on one folder from two containers: pids say nothing across pid namespaces
    (both shims are pid 1; or the other's pid is no process here). The start-up close-out
    of the second leaves the first's open file alone (its writer holds its lock), and the
    first goes on writing it: every record published once."""
    d = tmp_path / "log"
    a = RequestLog(d, rotate_bytes=1 << 30, rotate_s=3600, fsync=False, interval=0.01)
    for i in range(3):
        a.write(_rec(i))
    assert a.flush()
    live = _open_file(a)
    # B is pid 1 too (a file with its own pid looks like an earlier pid 1's) ...
    assert rl.recover_dead_writers(d, own_pid_is_stale=True) == []
    # ... or A's pid is no process in B's namespace; or a supervisor there lost a worker
    # that had A's pid
    monkeypatch.setattr(rl, "pid_alive", lambda pid: False)
    assert rl.recover_dead_writers(d) == []
    assert rl.recover_open_files(d, os.getpid()) == []
    assert live.exists() and live.read_bytes().count(b"\n") == 3
    b = RequestLog(d, rotate_bytes=1 << 30, rotate_s=3600, fsync=False, interval=0.01)
    for i in range(3, 5):
        a.write(_rec(i))
        b.write(_rec(i + 10))
    assert a.flush() and b.flush()
    assert live.exists()  # still A's, still open
    a.close()
    b.close()
    assert not list(d.glob("*.open")) and not list(d.glob("*.claim"))
    assert sorted(_ids(d)) == sorted([f"r{i}" for i in range(5)] + ["r13", "r14"])
    assert len(a.files) == 1 and a.files[0].name == live.name.removesuffix(".open")
    assert (a.written, a.errors, b.written, b.errors) == (5, 0, 2, 0)


_DEAD_WRITER = """
import os, sys
from finops.shim.requestlog import RequestLog, new_record
log = RequestLog(sys.argv[1], fsync=False, interval=0.01)
for i in range(3):
    r = new_record()
    r.update(request_id=f"dead{i}", ts="2026-01-01T00:00:00Z", source="shim", status_code=200)
    log.write(r)
assert log.flush()
os._exit(0)  # killed hard: the file is never renamed
"""


def test_files_whose_writer_is_gone_are_still_closed_out(tmp_path):
    """A writer that died (its lock went with it) leaves a `.jsonl.open`: closed out at
    start, as is one named with this process's pid by an earlier process (a container
    restarted: pid 1 again); a live writer's file next to them is kept."""
    d = tmp_path / "log"
    subprocess.run([sys.executable, "-c", _DEAD_WRITER, str(d)], check=True, timeout=60)
    (dead,) = d.glob("*.jsonl.open")
    earlier = d / f"requests-20240101T000000Z-{os.getpid()}-0001-0badcafe.jsonl.open"
    earlier.write_bytes(b'{"request_id": "earlier"}\n{"request_id": "ha')
    live = RequestLog(d, rotate_bytes=1 << 30, rotate_s=3600, fsync=False, interval=0.01)
    live.write(_rec(0))
    assert live.flush()
    mine = (set(d.glob("*.jsonl.open")) - {dead, earlier}).pop()
    done = rl.recover_dead_writers(d, own_pid_is_stale=True)
    assert sorted(p.name for p in done) == sorted(
        [dead.name.removesuffix(".open"), earlier.name.removesuffix(".open")]
    )
    assert set(d.glob("*.jsonl.open")) == {mine}
    assert sorted(_ids(d)) == ["dead0", "dead1", "dead2", "earlier"]
    live.write(_rec(1))
    live.close()
    assert sorted(_ids(d)) == ["dead0", "dead1", "dead2", "earlier", "r0", "r1"]


@pytest.mark.parametrize("then", ["write", "close"])
def test_a_writer_whose_file_was_taken_over_does_not_publish_it_again(tmp_path, caplog, then):
    """A closer that cannot see the writer's lock (a network file system without working
    flock, an older shim) publishes the live file: its records are published, so the
    writer does not copy them into a new file; later records go to a new one."""
    d = tmp_path / "log"
    log = RequestLog(d, rotate_bytes=1 << 30, rotate_s=3600, fsync=True, interval=0.01)
    with caplog.at_level("WARNING", logger="finops.shim"):
        for i in range(3):
            log.write(_rec(i))
        assert log.flush()
        published = rl._close_out(_open_file(log))  # the lock not looked at
        assert published is not None and _ids(d) == ["r0", "r1", "r2"]
        n = 5 if then == "write" else 3
        for i in range(3, n):
            log.write(_rec(i))
        assert log.flush()
        log.close()
    assert not list(d.glob("*.open"))
    assert sorted(_ids(d)) == [f"r{i}" for i in range(n)]  # each once
    assert (log.written, log.errors) == (n, 0)
    assert "taken over and published by another process" in caplog.text
    assert "lost its name" not in caplog.text


def test_without_flock_the_pid_decides_and_nothing_is_published_twice(tmp_path, monkeypatch):
    """A file system that cannot lock: the writer still writes; a start-up close-out then
    goes by pids alone, and where that closes out a live file (two containers, both pid 1)
    the writer starts a new file instead of publishing its records again."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_flock)
    d = tmp_path / "log"
    log = RequestLog(d, rotate_bytes=1 << 30, rotate_s=3600, fsync=False, interval=0.01)
    for i in range(3):
        log.write(_rec(i))
    assert log.flush()
    assert rl.recover_dead_writers(d) == []  # a pid alive here: kept
    assert len(rl.recover_dead_writers(d, own_pid_is_stale=True)) == 1
    for i in range(3, 5):
        log.write(_rec(i))
    assert log.flush()
    log.close()
    assert sorted(_ids(d)) == [f"r{i}" for i in range(5)]
    assert (log.written, log.errors) == (5, 0)
