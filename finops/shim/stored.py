"""Which replica stored a Responses API answer, and which tenant owns it.

Why: vLLM keeps a stored response (`store`, on by default in the API, kept when vLLM
runs with VLLM_ENABLE_RESPONSES_API_STORE=1) in the memory of the one server that
answered it. A follow-up (`previous_response_id`), a retrieval (`GET
/v1/responses/{id}`) or a cancel must reach that server, not whichever replica the
load balancer picks (the others answer 404), and must come from the tenant that made
it: replicas are shared by every tenant, so the shim is the only place that can refuse
another tenant's id.

The index lives in each shim process (bounded, least recently used dropped first,
entries expire after `[cache] response_index_ttl_s`) and, with `[cache] redis_url`,
also in Redis, so another worker or host finds it; signed like every Redis value when
`[cache] redis_secret_env` is set. Without Redis, the workers of one `--workers`
supervisor share it through a SQLite file in a folder the supervisor makes
(`SharedFileIndex`).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

MAX_ENTRIES = 100_000  # about 25 MB of index at most per process


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """Where a response id lives: the tenant that made it, and the tier and replica that answered."""

    tenant: str
    tier: str
    upstream: str

    def as_meta(self) -> dict:
        return {"tenant": self.tenant, "tier": self.tier, "upstream": self.upstream}

    @classmethod
    def from_meta(cls, meta: dict) -> StoredResponse | None:
        """From a shared-store record; None when it is not one (a foreign value)."""
        vals = (meta.get("tenant"), meta.get("tier"), meta.get("upstream"))
        if not all(isinstance(v, str) and v for v in vals):
            return None
        return cls(*vals)  # type: ignore[arg-type]


def shared_key(response_id: str) -> str:
    """The shared-store key of an id (hashed: ids come from clients, keys stay short and safe)."""
    # not the response cache's `resp:` prefix
    return "respidx:" + hashlib.sha256(response_id.encode()).hexdigest()


class ResponseIndex:
    """This process' id -> StoredResponse map: LRU-bounded, each entry for `ttl_s`."""

    def __init__(self, ttl_s: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._d: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def put(self, response_id: str, entry: StoredResponse) -> bool:
        """Index `response_id`; False (and nothing changed) if another tenant holds it."""
        held = self.get(response_id)
        if held is not None and held.tenant != entry.tenant:
            return False
        d = self._d
        d[response_id] = (time.monotonic() + self.ttl_s, entry)
        d.move_to_end(response_id)
        while len(d) > self.max_entries:
            d.popitem(last=False)
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        got = self._d.get(response_id)
        if got is None:
            return None
        if got[0] < time.monotonic():
            del self._d[response_id]
            return None
        self._d.move_to_end(response_id)
        return got[1]

    def forget(self, response_id: str) -> None:
        self._d.pop(response_id, None)


# set by the workers' supervisor (workers.py) to a folder its workers share
STATE_DIR_ENV = "FINOPS_SHIM_STATE_DIR"
_PRUNE_EVERY = 1000  # puts between deletions of expired rows


class SharedFileIndex:
    """The index in one SQLite file that the workers of one supervisor share.

    Why: without Redis each worker knew only the ids it answered itself, and the kernel
    hands a client's next connection to any worker, so with auth on a follow-up or a
    retrieval was a 404 about half the time with two workers. One host's workers need
    no Redis for this: a WAL-mode SQLite file takes a few tens of microseconds per
    call, paid by Responses requests only. An error (a locked or full disk) is a miss,
    logged once.
    """

    def __init__(self, path: Path, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._puts = 0
        self._failed = False
        db = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # an index lost with the host is rebuilt by use
        db.execute(
            "CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
            "tier TEXT NOT NULL, upstream TEXT NOT NULL, expires REAL NOT NULL)"
        )
        self._db = db

    def _error(self, op: str, exc: sqlite3.Error) -> None:
        if not self._failed:
            self._failed = True
            logging.getLogger("finops.shim").warning(
                "shared response index: %s failed (%s); treated as a miss", op, exc
            )

    def put(self, response_id: str, entry: StoredResponse) -> bool:
        """Index `response_id`; False if another tenant holds it (a file that fails is
        a miss, not a refusal: True, and this process' own index still has it)."""
        now = time.time()
        try:
            cur = self._db.execute(
                "INSERT INTO ids VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "tenant = excluded.tenant, tier = excluded.tier, upstream = excluded.upstream, "
                "expires = excluded.expires WHERE ids.tenant = excluded.tenant OR ids.expires < ?",
                (response_id, entry.tenant, entry.tier, entry.upstream, now + self.ttl_s, now),
            )
            self._puts += 1
            if self._puts % _PRUNE_EVERY == 0:
                self._db.execute("DELETE FROM ids WHERE expires < ?", (now,))
            return cur.rowcount > 0
        except sqlite3.Error as exc:
            self._error("write", exc)
            return True

    def get(self, response_id: str) -> StoredResponse | None:
        try:
            row = self._db.execute(
                "SELECT tenant, tier, upstream FROM ids WHERE id = ? AND expires >= ?",
                (response_id, time.time()),
            ).fetchone()
        except sqlite3.Error as exc:
            self._error("read", exc)
            return None
        return StoredResponse(*row) if row else None

    def forget(self, response_id: str) -> None:
        try:
            self._db.execute("DELETE FROM ids WHERE id = ?", (response_id,))
        except sqlite3.Error as exc:
            self._error("delete", exc)

    def close(self) -> None:
        self._db.close()
