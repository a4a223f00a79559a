"""Durable read positions for tailed log files.

Why this shape: a follower is killed at any instant (kill -9, OOM, reboot).
The lake batch is written first and the checkpoint second, each atomically
(temp file, fsync, rename, fsync of the folder). A crash between the two
re-reads lines that are already in the lake; deterministic row keys and
content-fingerprinted Parquet files make that re-read add nothing. A crash
can therefore duplicate work, never rows, and never lose a line.

Files are identified by device + inode *and* a hash of their first bytes, so
a rotated file (`shim.log` -> `shim.log.1`) keeps its position, while a new
file that reuses a freed inode, or a file truncated in place, starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FINGERPRINT_BYTES = 1024


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it and says what to do."""


@dataclass
class FileState:
    """Where reading of one physical file stands."""

    path: str
    dev: int
    ino: int
    offset: int = 0  # bytes consumed (always just after a newline, or EOF of a final file)
    line: int = 0  # lines consumed
    fp: str = ""  # hash of the first fp_len bytes
    fp_len: int = 0
    header: str | None = None  # CSV header line, kept so later chunks can be parsed
    done: bool = False  # whole-file formats (Parquet): loaded once

    @property
    def key(self) -> str:
        return f"{self.dev}:{self.ino}"


def head_fingerprint(path: Path, length: int) -> str:
    """Hash of a file's first `length` bytes ('' when it is shorter)."""
    if length <= 0:
        return ""
    with open(path, "rb") as fh:
        head = fh.read(length)
    if len(head) < length:
        return ""
    return hashlib.blake2b(head, digest_size=12).hexdigest()


@dataclass
class Checkpoint:
    """All file states of one log source, stored as one JSON file."""

    path: Path
    pattern: str
    files: dict[str, FileState] = field(default_factory=dict)

    @classmethod
    def for_source(cls, checkpoint_dir: Path, pattern: str, kind: str) -> Checkpoint:
        """The checkpoint of a source; the name derives from the absolute pattern."""
        digest = hashlib.blake2b(f"{kind}\0{pattern}".encode(), digest_size=8).hexdigest()
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(pattern).name)[:40]
        path = Path(checkpoint_dir) / f"{kind}-{stem}-{digest}.json"
        return cls.load(path, pattern)

    @classmethod
    def load(cls, path: Path, pattern: str) -> Checkpoint:
        """Read a checkpoint; a damaged one raises CheckpointError naming it (never a
        bare TypeError), since guessing positions could skip or re-read lines."""
        try:
            doc: Any = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path=path, pattern=pattern)
        except (OSError, ValueError) as exc:
            raise _unusable(path, f"unreadable ({exc})") from exc
        raws = doc.get("files", []) if isinstance(doc, dict) else None
        if not isinstance(raws, list):
            raise _unusable(path, 'expected a JSON object with a "files" list')
        files = {}
        for i, raw in enumerate(raws):
            problem = _file_state_problem(raw)
            if problem:
                raise _unusable(path, f"files[{i}]: {problem}")
            state = FileState(**raw)
            files[state.key] = state
        return cls(path=path, pattern=pattern, files=files)

    def save(self) -> None:
        """Atomic replace + fsync: after a crash the file is the old or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {
                "version": 1,
                "pattern": self.pattern,
                "files": [asdict(s) for s in self.files.values()],
            },
            indent=1,
        ).encode()
        tmp = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# field -> accepted types of a FileState entry (bool is not an int here)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "path": (str,),
    "dev": (int,),
    "ino": (int,),
    "offset": (int,),
    "line": (int,),
    "fp": (str,),
    "fp_len": (int,),
    "header": (str, type(None)),
    "done": (bool,),
}


def _file_state_problem(raw: Any) -> str | None:
    """What is wrong with one stored file state, or None when it is usable."""
    if not isinstance(raw, dict):
        return f"expected an object, got {type(raw).__name__}"
    missing = [k for k in ("path", "dev", "ino") if k not in raw]
    if missing:
        return f"missing field(s) {missing}"
    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    if unknown:
        return f"unknown field(s) {unknown}"
    for name, value in raw.items():
        types = _FIELD_TYPES[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"field {name!r}: expected {want}, got {value!r}"
    return None


def _unusable(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: checkpoint {problem}; move it away to re-read from the start "
        "(duplicates are dropped by the lake's keys)"
    )
