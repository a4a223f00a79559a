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
`[cache] redis_secret_env` is set.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

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
