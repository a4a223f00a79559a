"""The request log: one JSONL record per request, in the lake's `requests` columns.

Why a thread and a deque: the response path only does `deque.append` (atomic
under the GIL, never blocks, never wakes another thread, never touches the
disk); a daemon thread wakes every `interval` seconds, takes the batch, serializes them with orjson and writes them. Files live in the log
folder as `requests-<UTC start>-<pid>-<seq>.jsonl`; the one being written
ends in `.jsonl.open` and is renamed to `.jsonl` when it rotates (size or age)
or the shim stops, after an fsync, so an ingester that reads `*.jsonl` never
sees half a line. Every record is ingestible by `Lake.append("requests", ...)`.

Prompt text is only written when enabled, and then redacted: e-mail
addresses, phone numbers and runs of 6+ digits (cards, accounts, IDs) become
`[EMAIL]`, `[PHONE]`, `[NUMBER]`.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from finops.schemas import REQUESTS

COLUMNS: tuple[str, ...] = tuple(REQUESTS.columns)

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(
    r"(?<!\w)(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{3,4}[\s.-]\d{3,4}(?:[\s.-]\d{2,4})?(?!\w)"
)
_DIGITS = re.compile(r"\d{6,}")


def redact(text: str) -> str:
    """Mask e-mails, phone numbers and long digit runs (in that order)."""
    text = _EMAIL.sub("[EMAIL]", text)
    text = _PHONE.sub("[PHONE]", text)
    return _DIGITS.sub("[NUMBER]", text)


_second: tuple[int, str] = (0, "1970-01-01T00:00:00")  # last whole second and its text


def iso_utc(ts: float) -> str:
    """`ts` as ISO 8601 UTC with microseconds and a Z, like `datetime.isoformat` gives.

    Every request record is stamped with one, so the date part is formatted once per
    second and reused (a datetime per call was 2 us of the shim's request path).
    Microseconds round as `datetime.fromtimestamp` rounds them (half to even, a carry
    into the next second included).
    """
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    elif us < 0:  # before 1970: modf gives a negative fraction
        sec -= 1
        us += 1_000_000
    global _second
    cached = _second
    if cached[0] != sec:
        # one tuple swapped in whole: another thread sees the old pair or the new one
        cached = (sec, dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _second = cached
    return f"{cached[1]}.{us:06d}Z"


def new_record() -> dict[str, Any]:
    """A record with every `requests` column present (None where unknown)."""
    return dict.fromkeys(COLUMNS)


def recover_open_files(folder: Path, pid: int) -> list[Path]:
    """Close out the files a dead writer (process `pid`) left open; returns them.

    A process killed hard never renames its `.jsonl.open` file, so ingesters that read
    `*.jsonl` would skip every record in it. The supervisor of several workers calls
    this when one dies: the file is cut after its last complete line (a half-written
    record is dropped; the whole ones are kept) and renamed to `.jsonl`.
    """
    done = []
    for path in sorted(Path(folder).glob(f"requests-*-{pid}-*.jsonl.open")):
        data = path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            with open(path, "r+b") as fh:
                fh.truncate(len(keep))
        final = path.with_suffix("")
        if keep:
            path.rename(final)
            done.append(final)
        else:
            path.unlink()
    return done


class RequestLog:
    """Background JSONL writer with rotation; `write(record)` never blocks."""

    def __init__(
        self,
        folder: Path | None,
        *,
        rotate_bytes: int = 64 << 20,
        rotate_s: float = 300.0,
        fsync: bool = True,
        interval: float = 0.05,
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self.fsync = fsync
        self.written = 0
        self.errors = 0
        self.last_error: str | None = None
        self.files: list[Path] = []
        self.interval = interval
        self._q: deque = deque()
        self._wake = threading.Event()
        self._stop = False
        self._seq = 0
        self._fh: Any = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._thread: threading.Thread | None = None
        self._flushed = threading.Condition()
        self._enqueued = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(
                target=self._run, name="finops-shim-requestlog", daemon=True
            )
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._thread is not None:
            self._enqueued += 1
            self._q.append(record)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything enqueued so far is written (tests, shutdown)."""
        target = self._enqueued
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self.written + self.errors < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._flushed.wait(left)
        return True

    def close(self) -> None:
        """Write what is queued, fsync and close the current file (rename to .jsonl)."""
        if self._thread is None:
            return
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._thread = None

    # -- writer thread --
    def _open(self) -> None:
        assert self.folder is not None
        self._seq += 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self._path = self.folder / f"requests-{stamp}-{os.getpid()}-{self._seq:04d}.jsonl.open"
        self._fh = open(self._path, "ab", buffering=1 << 16)  # noqa: SIM115 (kept open across batches)
        self._opened_at = time.monotonic()
        self._size = 0

    def _close_file(self) -> None:
        if self._fh is None or self._path is None:
            return
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        final = self._path.with_suffix("")  # drop ".open"
        os.replace(self._path, final)
        if self.fsync:
            try:
                fd = os.open(self._path.parent, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
        self.files.append(final)
        self._fh = None
        self._path = None

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stop = self._stop
            batch = []
            q = self._q
            while q:
                batch.append(q.popleft())
            try:
                if batch:
                    if self._fh is None:
                        self._open()
                    data = b"".join([orjson.dumps(r) + b"\n" for r in batch])
                    self._fh.write(data)
                    self._fh.flush()
                    self._size += len(data)
                if self._fh is not None and (
                    stop
                    or self._size >= self.rotate_bytes
                    or time.monotonic() - self._opened_at >= self.rotate_s
                ):
                    self._close_file()
                ok = len(batch)
            except OSError as exc:  # disk full etc.: count, keep serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.errors += len(batch)
                ok = 0
                self._fh = None
            with self._flushed:
                self.written += ok
                self._flushed.notify_all()
            if stop and not self._q:
                return
