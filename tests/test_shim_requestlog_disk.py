"""The request log against a log folder that goes away or stops taking writes.

Real files in tmp_path: the folder removed while a file is open (a clean-up job), made
unwritable for a while, the disk full mid-batch, and a failure long enough to pass the
bound on what is held in memory.
"""

from __future__ import annotations

import builtins
import errno
import shutil
import time
from pathlib import Path

import orjson

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
