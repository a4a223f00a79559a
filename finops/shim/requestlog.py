"""The request log: one JSONL record per request, in the lake's `requests` columns.

Why a thread and a deque: the response path only does `deque.append` (atomic
under the GIL, never blocks, never wakes another thread, never touches the
disk); a daemon thread wakes every `interval` seconds, takes the batch, serializes them with orjson and writes them. Files live in the log
folder as `requests-<UTC start>-<pid>-<seq>-<token>.jsonl` (the pid is always the
third dash-separated field; the random token keeps two writers of one pid in one
second apart); the one being written ends in `.jsonl.open` and is renamed to
`.jsonl` when it rotates (size or age) or the shim stops, after an fsync, so an
ingester that reads `*.jsonl` never sees half a line. Its writer holds an exclusive
`flock` on it until then: that is how a shim starting on the folder tells a live
writer's file (another shim sharing the folder, from any pid namespace) from one a dead
writer left, which it closes out. A rename never replaces a
file: a name that is taken gets a fresh token. A write that fails (disk full)
closes the file out after its last whole line and keeps the records that did not
reach it in memory for the next try (every `retry_s`, or at once on `flush`), up to
`max_backlog` records: only past that are records dropped, counted as errors and
warned about. The folder is made again when a file is opened (a clean-up job removed
it); a file whose name disappears while open (folder removed, moved or unmounted) is
still readable through its descriptor and is copied into a new file, so records
counted as written are on disk; one that another process closed out (published under
another name in the folder) is not copied: its records are published, and new ones go
to a new file. Every record is ingestible by
`Lake.append("requests", ...)`.

Prompt text is only written when enabled, and then redacted: e-mail
addresses, phone numbers, card/account numbers (13+ digits, in groups or not) and
other runs of 6+ digits (accounts, IDs) become `[EMAIL]`, `[PHONE]`, `[NUMBER]`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from finops.schemas import REQUESTS

logger = logging.getLogger("finops.shim")

COLUMNS: tuple[str, ...] = tuple(REQUESTS.columns)
# Records a failing disk may hold back in memory (about 0.5-1 kB each, more with prompt
# text); twice the backlog the shim warns about (app.LOG_BACKLOG_WARN), so the warning
# comes first. Past it newer records are dropped and counted as errors.
MAX_BACKLOG = 200_000

# Local part: letters of any script, digits and . % + ' - (not leading '); domain labels
# of any script; a top-level domain of letters. Starts only where a run of such
# characters starts and the parts are bounded (RFC 5321 sizes), so a long run without
# an @ costs one scan, not one per character (quadratic: seconds on a 40 kB prompt).
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-][\w.%+'-]{0,63}@[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.[^\W\d_]{2,24}"
)
# Separators people (and word processors) put between digit groups: spaces (no-break
# and thin ones too), a dot, a hyphen or one of Unicode's dashes and minus sign.
_DASHES = "\u2010-\u2015\u2212"
_S = rf"[\s.\-{_DASHES}]"
# Digits in groups of 3+ (a short last group allowed: IBANs, 19-digit cards) split by
# one or two spaces, or a dash, dot or underscore (spaces around it allowed); 13+ digits
# in all (checked in `_long`) is a card or an account.
_SEP = rf"(?:[ \t\xa0\u2009\u202f]{{1,2}}|[ \t]?[-._{_DASHES}][ \t]?)"
_DIGIT_GROUPS = re.compile(rf"(?<![\w+])\d{{3,}}(?:{_SEP}\d{{3,}})*(?:{_SEP}\d{{1,4}})?(?!\w)")
# An extension after a number: x123, ext. 12, extension 4
_EXT = r"(?:[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6})?"
# `+` or `00` then the country code, an area code in brackets (a trunk "(0)" included)
# and up to 5 groups; 7+ digits in all.
_PHONE_INTL = re.compile(
    rf"(?<!\w)(?:\+|00)\d{{1,3}}(?:{_S}?\(\d{{1,4}}\)\d{{0,8}})?(?:{_S}\d{{1,8}}){{1,5}}{_EXT}"
    r"(?![\w(]|[.,]\d)"
)
# National: [1-3 digit prefix] (area) or area, then 3-4 and 4 digits (555-123-4567,
# 020 7946 0958, (415) 555-0100); an area code in brackets then 2-5 digit groups
# (8 (495) 123-45-67, (11) 91234-5678); five pairs from a trunk 0 (01 23 45 67 89,
# 06.12.34.56.78); a trunk 0 and one long group (07700 900123); two groups of 5 (India's
# 98765 43210); 555-0100, 555 0100 (not 555.0100: that is a decimal number as often).
# Each may end in an extension. A label's dot may come before (Tel.415.555.0100), not a
# number's (1.555-0100). The last group has 4+ digits or the pairs start with 0, so
# dotted quads (IP addresses) and dates never match.
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[.,])(?:"
    rf"(?:\d{{1,3}}{_S})?(?:\(\d{{2,4}}\){_S}?|\d{{2,5}}{_S})\d{{3,4}}{_S}\d{{4}}"
    rf"|(?:\d{{1,3}}{_S}?)?\(\d{{2,5}}\){_S}?\d{{2,5}}(?:{_S}\d{{2,4}}){{1,3}}"
    rf"|0\d(?:{_S}\d{{2}}){{4}}"
    r"|0\d{2,4}[\s-]\d{6,8}"
    rf"|(?:\d{{1,3}}{_S})?\d{{5}}{_S}\d{{5}}"
    rf"|\d{{3}}[\- \xa0{_DASHES}]\d{{4}}"
    rf"){_EXT}(?![\w(]|[.,]\d)"
)
# US social security numbers: 3-2-4 digits
_SSN = re.compile(r"(?<![\w.+-])\d{3}([- ])\d{2}\1\d{4}(?![\w-]|[.,]\d)")
_DIGITS = re.compile(r"\d{6,}")
_DIGIT = re.compile(r"\d")


def _ndigits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _long(m: re.Match) -> str:
    return "[NUMBER]" if _ndigits(m.group(0)) >= 13 else m.group(0)


def _intl(m: re.Match) -> str:
    return "[PHONE]" if _ndigits(m.group(0)) >= 7 else m.group(0)


def redact(text: str) -> str:
    """Mask e-mails, long digit groups (cards), phone numbers and long digit runs (in that order)."""
    text = _EMAIL.sub("[EMAIL]", text)
    if _DIGIT.search(text) is None:  # nothing else to mask: skip the other passes
        return text
    text = _DIGIT_GROUPS.sub(_long, text)
    text = _PHONE_INTL.sub(_intl, text)
    text = _SSN.sub("[NUMBER]", text)
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


def _token() -> str:
    return secrets.token_hex(4)


def _fresh_name(final: Path) -> Path:
    """`final` with a new random token as the last dash-separated part of its name."""
    name = final.name
    stem, suffix = name.split(".", 1)
    parts = stem.split("-")
    if len(parts) >= 5:  # requests-<stamp>-<pid>-<seq>-<token>
        parts[-1] = _token()
    else:  # an older name without a token
        parts.append(_token())
    return final.with_name("-".join(parts) + "." + suffix)


def _rename_no_replace(src: Path, final: Path) -> Path:
    """Rename `src` to `final`, or to a fresh name if `final` is taken; returns the name.

    A hard link fails if the target exists, so nothing is ever overwritten; where the
    file system has no hard links, the target is checked first, then renamed.
    """
    for _ in range(100):
        try:
            os.link(src, final)
        except FileExistsError:
            final = _fresh_name(final)
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if os.path.lexists(final):
                final = _fresh_name(final)
                continue
            os.rename(src, final)
            return final
        with contextlib.suppress(OSError):  # published under `final`: never link it twice
            os.unlink(src)
        return final
    raise FileExistsError(errno.EEXIST, "no free name", str(final))


_CLAIM = ".claim"

# flock errors that say the file system cannot lock (some network file systems; EBADF: NFS
# wants a writable descriptor): the writer's pid alone decides then
_NO_FLOCK = frozenset(
    {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.EBADF}
)


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive `flock` on `fd` without waiting.

    True: taken. False: another open file holds it, in any process (this one too: a flock
    belongs to the open file, not to the process), in any pid namespace on this kernel.
    None: the file system cannot lock.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise
    return True


def _published_name(path: Path) -> Path:
    """`requests-....jsonl` for a `.jsonl.open` file or a claim of one."""
    return path.with_name(path.name.split(".jsonl", 1)[0] + ".jsonl")


def _close_out(path: Path) -> Path | None:
    """Cut `path` (a dead writer's `.jsonl.open`) after its last whole line and publish it.

    The file is first renamed to a name of this process's own, `<name>.<pid>-<token>.claim`
    (atomic: of two processes closing out the same file, one gets it, the other finds it
    gone and skips it), so a file is never published twice. Returns the `.jsonl` name,
    or None (empty: removed; already taken by another process: skipped).
    """
    base = path.name.split(".jsonl", 1)[0] + ".jsonl.open"
    claim = path.with_name(f"{base}.{os.getpid()}-{_token()}{_CLAIM}")
    try:
        os.rename(path, claim)
    except FileNotFoundError:
        return None
    if os.stat(claim).st_nlink > 1:  # its writer died between publishing and unlinking it
        claim.unlink()
        return None
    data = claim.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(claim, "r+b") as fh:
            fh.truncate(len(keep))
    if not keep:
        claim.unlink()
        return None
    return _rename_no_replace(claim, _published_name(path))


def _close_out_unlocked(path: Path) -> Path | None:
    """`_close_out(path)` unless a live writer holds the file's lock (then None).

    The lock is taken without waiting and held until the file is published: its writer
    is gone (a process's locks go with it), and a second closer finds it held too. Where
    the file system cannot lock, the caller's pid check alone decided.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another process closed it out first
        return None
    try:
        if _try_lock(fd) is False:  # its writer is alive (or another closer has it)
            return None
        return _close_out(path)
    finally:
        os.close(fd)


def _taken_over(fh: Any, path: Path) -> bool:
    """Whether the open file `fh`, made as `path`, now has another name in its folder.

    Then another process closed it out (claimed and published it; only one that does not
    see the writer's lock does that), so its records are published already. Not when
    the file has no name left (its folder removed) or is not in the folder (the folder
    moved or unmounted): only the open file has its bytes then.
    """
    try:
        st = os.fstat(fh.fileno())
        if st.st_nlink == 0:
            return False
        # claims and published names keep `requests-<stamp>-<pid>-<seq>`; the token may change
        head = path.name.split(".jsonl", 1)[0].rsplit("-", 1)[0]
        for other in path.parent.glob(f"{head}-*"):
            with contextlib.suppress(OSError):
                o = os.stat(other)
                if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                    return True
    except OSError:
        return False
    return False


def _discard(fh: Any, path: Path) -> None:
    """Close and remove a file this writer just made and cannot use (errors ignored)."""
    with contextlib.suppress(OSError):
        fh.close()
        path.unlink()


def _claimer_pid(path: Path) -> int | None:
    """The pid of the process that claimed a file (`....jsonl.open.<pid>-<token>.claim`)."""
    head = path.name[: -len(_CLAIM)].rsplit(".", 1)[-1].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _writer_pid(path: Path) -> int | None:
    """The pid in a log file's name (the third dash-separated field), or None."""
    parts = path.name.split("-")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return int(parts[2])


def recover_open_files(folder: Path, pid: int) -> list[Path]:
    """Close out the files a dead writer (process `pid`) left open; returns them.

    A process killed hard never renames its `.jsonl.open` file, so ingesters that read
    `*.jsonl` would skip every record in it. The supervisor of several workers calls
    this when one dies: the file is cut after its last complete line (a half-written
    record is dropped; the whole ones are kept) and renamed to `.jsonl`. A file whose
    lock is held is left alone: a live writer of the same pid in another pid namespace
    (another container sharing the folder) made it.
    """
    done = []
    for path in sorted(Path(folder).glob(f"requests-*-{pid}-*.jsonl.open")):
        if _writer_pid(path) != pid:  # the glob also matches seq/token == pid
            continue
        final = _close_out_unlocked(path)
        if final is not None:
            done.append(final)
    return done


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without sending anything).

    A process of another user answers EPERM: it exists. Only "no such process" is dead;
    pid 0 and negative pids (process groups) are never treated as dead. Only this pid
    namespace is seen: a writer in another container may look dead, or its pid be
    another process's here.
    """
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # unsure: keep the file
    return True


def _maybe_dead(pid: int, own_pid_is_stale: bool) -> bool:
    """Whether a file named with `pid` may be a dead writer's, going by the pid alone."""
    if pid == os.getpid():
        return own_pid_is_stale
    return not pid_alive(pid)


def recover_dead_writers(folder: Path, *, own_pid_is_stale: bool = False) -> list[Path]:
    """Close out every `.jsonl.open` file in `folder` whose writer is no longer running.

    Called when a shim starts with a log folder (one process, or the supervisor of
    several before its workers start): a shim killed hard (kill -9, OOM, power loss)
    leaves its open file behind, and no one else would ever close it out. Files of
    live processes (another shim sharing the folder) are never touched: a writer holds
    an exclusive flock on its file while it writes it, so a file is closed out only if
    that lock can be taken; that works across pid namespaces (two containers sharing
    the folder), where pids say nothing. A file named with a pid alive here is left alone
    too (a writer that does not lock: an older shim, a file system without flock).
    `own_pid_is_stale`: this process has not opened a log file yet, so a file named
    with its pid was left by an earlier process that had the same pid (a container
    restarted: the shim is pid 1 again), or is a live writer's of another pid namespace
    (whose lock keeps it). Returns the `.jsonl` files published.
    """
    done = []
    try:
        paths = sorted(Path(folder).glob("requests-*.jsonl.open"))
        # a process that died while closing out a file leaves it claimed: finish its work
        claims = sorted(Path(folder).glob(f"requests-*.jsonl.open.*{_CLAIM}"))
    except OSError:
        return done
    for path in claims:
        pid = _claimer_pid(path)
        if pid is not None and _maybe_dead(pid, own_pid_is_stale):
            with contextlib.suppress(FileNotFoundError):
                final = _close_out_unlocked(path)
                if final is not None:
                    done.append(final)
    for path in paths:
        pid = _writer_pid(path)
        if pid is None or not _maybe_dead(pid, own_pid_is_stale):
            continue
        final = _close_out_unlocked(path)
        if final is not None:
            done.append(final)
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
        max_backlog: int = MAX_BACKLOG,
        retry_s: float = 1.0,
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self.fsync = fsync
        self.max_backlog = max_backlog
        self.retry_s = retry_s
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
        self._ident: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the open file
        self._opened_at = 0.0
        self._size = 0
        self._nrec = 0  # records in the open file
        # closed, not yet renamed: (path, size, still-open file, records); the file stays
        # open so its bytes can be copied out if its name disappears before the rename
        self._pending: list[tuple[Path, int, Any, int]] = []
        self._retry_at = 0.0
        self._dropped = 0  # records dropped over max_backlog since writes last worked
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

    @property
    def backlog(self) -> int:
        """Records queued and not yet written (nor counted as errors)."""
        return max(0, self._enqueued - self.written - self.errors)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything enqueued so far is written (tests, shutdown).

        Records a failing disk holds back are retried at once; False if they still are not
        written (nor dropped) by `timeout`.
        """
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
    def _create(self) -> tuple[Any, Path]:
        """A new empty `.jsonl.open` file under a fresh name (the folder made again if gone)."""
        assert self.folder is not None
        # a clean-up job may have removed the folder: without it every later record is lost
        self.folder.mkdir(parents=True, exist_ok=True)
        seq = self._seq + 1
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        head = f"requests-{stamp}-{os.getpid()}-{seq:04d}"
        while True:  # a fresh name, never one another writer (same pid, same second) has
            path = self.folder / f"{head}-{_token()}.jsonl.open"
            try:
                # unbuffered: one write per batch, and a failed write says how much got in;
                # readable too: if its name is gone its bytes are copied out through it
                fh = open(path, "x+b", buffering=0)  # noqa: SIM115 (kept open across batches)
            except FileExistsError:
                continue
            try:
                # held until the file is closed: a shim starting on the folder leaves it alone
                locked = _try_lock(fh.fileno())
                # a closer that took the lock first (sure this pid is dead: another pid
                # namespace) may have taken the new, empty file away: make another
                if locked is not False:
                    st = os.fstat(fh.fileno())
                    now = os.stat(path)
                    if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                        self._seq = seq  # failed tries leave no gaps in the numbers
                        return fh, path
            except FileNotFoundError:
                pass
            except OSError:
                _discard(fh, path)
                raise
            with contextlib.suppress(OSError):
                fh.close()

    def _open(self) -> None:
        self._fh, self._path = self._create()
        st = os.fstat(self._fh.fileno())
        self._ident = (st.st_dev, st.st_ino)
        self._opened_at = time.monotonic()
        self._size = 0
        self._nrec = 0
        if self._pending:  # writes work again: close out what an earlier failure left
            self._finish_pending()

    def _name_gone(self) -> bool:
        """Whether the open file's name no longer leads to it (its folder removed, moved,
        unmounted): what is written to it then would be lost with the file."""
        try:
            st = os.stat(self._path)  # type: ignore[arg-type]
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:  # no permission to look: the file is still written through its fd
            return False
        return (st.st_dev, st.st_ino) != self._ident

    def _copy_out(self, fh: Any, size: int) -> tuple[Any, Path]:
        """Copy the first `size` bytes of `fh`, a file whose name is gone, into a new file.

        Its bytes stay readable through the open file until it is closed.
        """
        new, path = self._create()
        try:
            src = fh.fileno()
            off = 0
            while off < size:
                chunk = os.pread(src, min(size - off, 1 << 20), off)
                if not chunk:
                    raise OSError(errno.EIO, "the file ended early", str(path))
                view = memoryview(chunk)
                while view:
                    n = new.write(view)
                    if not n:
                        raise OSError(errno.EIO, "write made no progress")
                    view = view[n:]
                off += len(chunk)
        except OSError:
            with contextlib.suppress(OSError):
                new.close()
                path.unlink()
            raise
        logger.warning(
            "request log: a log file lost its name in %s (the folder was removed, moved or "
            "unmounted); its %d bytes were copied into %s",
            self.folder,
            size,
            path.name,
        )
        return new, path

    def _taken_over_warning(self, path: Path, nrec: int) -> None:
        logger.warning(
            "request log: %s in %s was taken over and published by another process while "
            "this one wrote it (a shim sharing the folder that cannot see this one's lock: "
            "another host without working flock, or an older shim); its %d records are "
            "published there, new ones go to a new file",
            path.name,
            self.folder,
            nrec,
        )

    def _recover_open_file(self) -> None:
        """Move the open file whose name is gone into a new one and go on writing there.

        One another process closed out is published already: never copied (its records
        would be published twice); new records go to a new file.
        """
        if _taken_over(self._fh, self._path):
            old, path, nrec = self._fh, self._path, self._nrec
            self._fh = self._path = None
            if self.fsync:
                with contextlib.suppress(OSError):
                    os.fsync(old.fileno())
            with contextlib.suppress(OSError):
                old.close()
            self._taken_over_warning(path, nrec)  # type: ignore[arg-type]
            self._open()
            return
        fh, path = self._copy_out(self._fh, self._size)
        try:
            st = os.fstat(fh.fileno())
        except OSError:
            _discard(fh, path)
            raise
        with contextlib.suppress(OSError):
            self._fh.close()
        self._fh, self._path, self._ident = fh, path, (st.st_dev, st.st_ino)

    def _note(self, exc: OSError) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _write_batch(self, lines: list[bytes]) -> int:
        """Append `lines` to the current file (opening one if needed); returns how many got in.

        On an error the file is cut after its last whole line and closed out; the records
        that did not get in whole are the caller's to keep for the next try.
        """
        try:
            if self._fh is None:
                self._open()
            elif self._name_gone():  # one stat per batch, not per record
                self._recover_open_file()
        except OSError as exc:
            self._note(exc)
            return 0
        data = memoryview(b"".join(lines))
        done = 0
        try:
            while done < len(data):
                n = self._fh.write(data[done:])
                if not n:
                    raise OSError(errno.EIO, "write made no progress")
                done += n
        except OSError as exc:
            self._note(exc)
            whole = kept = 0
            for line in lines:
                if kept + len(line) > done:
                    break
                kept += len(line)
                whole += 1
            self._size += kept
            self._nrec += whole
            self._close_file(cut=True)
            return whole
        self._size += done
        self._nrec += len(lines)
        return len(lines)

    def _write_lines(self, lines: list[bytes]) -> int:
        """Write `lines` in order, rotating by size; returns how many got in (a failure stops)."""
        done = 0
        # size rotation at record boundaries: a file ends once it reaches
        # rotate_bytes, even mid-batch (it overshoots by at most one record)
        while done < len(lines):
            room = self.rotate_bytes - (self._size if self._fh is not None else 0)
            end = done
            used = 0
            while end < len(lines) and (end == done or used + len(lines[end]) <= room):
                used += len(lines[end])
                end += 1
            got = self._write_batch(lines[done:end])
            done += got
            if done < end:
                break
            if done < len(lines) and self._fh is not None:
                self._close_file()
        return done

    def _close_file(self, cut: bool = False) -> None:
        """Fsync the current file and rename it; a failed rename is retried later.

        `cut`: a write failed, so drop whatever is past the last whole line first.
        """
        fh, path, size = self._fh, self._path, self._size
        if fh is None or path is None:
            return
        self._fh = None
        self._path = None
        try:
            if cut:
                os.ftruncate(fh.fileno(), size)
            if self.fsync and size:
                os.fsync(fh.fileno())
        except OSError as exc:
            self._note(exc)  # the records are written; the rename below still publishes them
        self._pending.append((path, size, fh, self._nrec))
        self._finish_pending()

    def _finish_pending(self) -> None:
        """Rename closed `.jsonl.open` files to `.jsonl` (an empty one is removed).

        A file whose name is gone (its folder removed) is copied into a new one first.
        """
        left = []
        renamed = False
        for path, size, fh, nrec in self._pending:
            final = None
            try:
                fd = fh.fileno()
                if os.fstat(fd).st_size > size:  # the cut after a failed write did not happen
                    os.ftruncate(fd, size)
                if size == 0:
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        path.unlink()
                else:
                    try:
                        final = _rename_no_replace(path, path.with_suffix(""))  # drop ".open"
                    except (FileNotFoundError, NotADirectoryError):
                        if _taken_over(fh, path):  # published by another process
                            self._taken_over_warning(path, nrec)
                            with contextlib.suppress(OSError):
                                fh.close()
                            continue
                        new, new_path = self._copy_out(fh, size)
                        with contextlib.suppress(OSError):
                            fh.close()
                        fh, path = new, new_path
                        if self.fsync:
                            with contextlib.suppress(OSError):
                                os.fsync(fh.fileno())
                        final = _rename_no_replace(path, path.with_suffix(""))
            except OSError as exc:
                self._note(exc)
                left.append((path, size, fh, nrec))
                continue
            with contextlib.suppress(OSError):
                fh.close()
            if final is not None:
                self.files.append(final)
                renamed = True
        self._pending = left
        if renamed and self.fsync and self.folder is not None:
            try:
                fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass

    def _give_up(self, held: int) -> int:
        """At shutdown: records that never reached a file, or only one whose name is gone
        and could not be copied out, are lost; returns how many were counted written."""
        unwritten = 0
        for path, _size, fh, nrec in self._pending:
            if not os.path.lexists(path):
                unwritten += nrec
            with contextlib.suppress(OSError):
                fh.close()  # a file still there is closed out when a shim next starts
        self._pending = []
        if held or unwritten:
            logger.warning(
                "request log: %d records could not be written to %s before shutdown (%s); "
                "they are lost",
                held + unwritten,
                self.folder,
                self.last_error or "unknown error",
            )
        return unwritten

    def _run(self) -> None:
        held: list[bytes] = []  # serialized, not yet in a file: a failed write keeps them
        while True:
            woken = self._wake.wait(self.interval)  # set by flush() and close()
            self._wake.clear()
            stop = self._stop
            batch = []
            q = self._q
            while q:
                batch.append(q.popleft())
            lost = 0
            for r in batch:
                try:
                    held.append(orjson.dumps(r) + b"\n")
                except TypeError as exc:  # orjson.JSONEncodeError: counted as an error
                    lost += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
            ok = 0
            # after a failure, retry every retry_s, or at once for flush() and close()
            if held and (woken or stop or time.monotonic() >= self._retry_at):
                ok = self._write_lines(held)
                del held[:ok]
                if held:
                    self._retry_at = time.monotonic() + self.retry_s
                elif self._dropped:
                    logger.warning(
                        "request log: writes to %s work again; %d records were dropped meanwhile",
                        self.folder,
                        self._dropped,
                    )
                    self._dropped = 0
            if len(held) > self.max_backlog:  # writes have failed for long: bound the memory
                over = len(held) - self.max_backlog
                del held[self.max_backlog :]
                lost += over
                if not self._dropped:
                    logger.warning(
                        "request log: %d records are held in memory waiting for the disk "
                        "(%s), the most it keeps: newer ones are dropped and counted as "
                        "write errors until writes work again",
                        len(held),
                        self.last_error or "writes fail",
                    )
                self._dropped += over
            if self._fh is not None and (
                stop
                or self._size >= self.rotate_bytes
                or time.monotonic() - self._opened_at >= self.rotate_s
            ):
                self._close_file()
            if stop and self._pending:
                self._finish_pending()
            last = stop and not self._q
            unwritten = 0
            if last and (held or self._pending):
                unwritten = self._give_up(len(held))
                lost += len(held)
                held.clear()
            with self._flushed:
                self.written += ok - unwritten
                self.errors += lost + unwritten
                self._flushed.notify_all()
            if last:
                return
