"""The shim application: shared state (`Shim`), hot reload, and the ASGI app factory.

`create_app(cfg)` returns an ASGI callable. The hot paths
(`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`) are
dispatched by a dict lookup on the path before Starlette sees the request, so
they skip its middleware stack, as do stored responses (`/v1/responses/{id}...`,
responses.StoredResponseEndpoint); everything else (`/v1/models`, `/healthz`,
`/readyz`, `/metrics`, lifespan) is a plain Starlette app.

Hot reload (`Shim.reload()`, SIGHUP, or a file watch with `[server] watch =
true`): the new config and router are built and verified first, then swapped
in as whole objects. Requests in flight keep the objects they started with,
so nothing is dropped; a config or artifact that fails validation is refused
and the old one keeps serving (metric `finops_shim_reloads{result="refused"}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from finops.shim.auth import AuthError, authorization, tenant_for
from finops.shim.cache import (
    SKIPPED,
    BadSignature,
    Coalescer,
    MemoryCache,
    RedisCache,
    RedisKeyError,
    RedisUnavailable,
)
from finops.shim.caps import TokenizeGate
from finops.shim.config import ConfigError, ShimConfig, load_config, redis_secret, reread_config
from finops.shim.h1client import KEEPALIVE_EXPIRY_S
from finops.shim.h1client import Client as H1Client
from finops.shim.metrics import ShimMetrics
from finops.shim.policy import Router, load_policy
from finops.shim.proxy import (
    EmbeddingsEndpoint,
    HTTPError,
    ProxyEndpoint,
    circuit_snapshot,
    error_body,
)
from finops.shim.requestlog import RequestLog
from finops.shim.responses import ResponsesEndpoint, StoredResponseEndpoint
from finops.shim.stored import (
    STATE_DIR_ENV,
    ResponseIndex,
    SharedFileIndex,
    StoredResponse,
    shared_key,
)
from finops.shim.upstreams import Pool

logger = logging.getLogger("finops.shim")

# queued request-log records past which the shim warns (once per episode): ~100 MB of
# records in memory, which only a stuck or full disk produces
LOG_BACKLOG_WARN = 100_000
# the file watch also compares the watched files' signature this often (ms)
WATCH_POLL_MS = 2000
# An Idempotency-Key claim in Redis (one process runs a key at a time) expires this long
# after it was taken or last refreshed. Its holder refreshes it every third of that while
# the request runs, so a stream of any length keeps it, and a crashed worker's claim
# frees the key within this bound (a duplicate waiting on it then runs as a retry).
CLAIM_TTL_S = 30.0
# keys whose bad value or per-key Redis error was logged (once each, at most this many)
WARNED_KEYS = 1024

_META_TEXT = ("tier", "upstream", "response_model", "finish_reason", "endpoint")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# with auth off, an id no replica has is not looked for again for this long (a client
# polling a wrong id would otherwise cost a GET to every replica per request)
MISSING_ID_S = 5.0
# how long a stop waits for cut requests to write their records (their answers' ends take
# up to 1 s each)
RECORDS_WAIT_S = 3.0
MISSING_IDS_MAX = 10_000
# response ids are ~40 characters (vLLM's resp_ + 32 hex, OpenAI's ~50): a longer one is
# no id any server made (and, remembered as unknown, cost memory by its length)
MAX_RESPONSE_ID_CHARS = 256


def unpack_entry(v: Any, store: str) -> tuple[dict, bytes] | None:
    """(meta, payload) of a stored value if it is what the shim writes, else None.

    `store` is "cache" (meta + a JSON object answer), "idempotency" (the record:
    request id, body fingerprint, attempts; then an answer as JSON, the stream as SSE
    bytes, or `failed` with no answer) or "responses" (the response index: meta only). Anything else under a key the shim reads (a
    corrupt or foreign value) must be a miss, never a 500 or a 200 with garbage.
    """
    if not isinstance(v, bytes):
        return None
    i = v.find(b"\n")
    if i < 0:
        return None
    try:
        meta = orjson.loads(v[:i])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(meta, dict):
        return None
    for f in _META_TEXT:
        x = meta.get(f)
        if x is not None and not isinstance(x, str):
            return None
    payload = v[i + 1 :]
    if store == "responses":  # the response index: meta only (checked by StoredResponse)
        return (meta, payload) if not payload else None
    failed = meta.get("failed")
    if store == "idempotency":
        attempts = meta.get("attempts", 1)
        if (
            not isinstance(meta.get("request_id"), str)
            or not isinstance(meta.get("fp"), str)
            or not isinstance(attempts, int)
            or isinstance(attempts, bool)
            or attempts < 1
            or not (meta.get("created") is None or _number(meta["created"]))
            or failed not in (None, False, True)
        ):
            return None
        if failed:
            return meta, payload
        if meta.get("sse"):  # the stream as the client got it (a Responses one: `event:` first)
            ok = payload.startswith((b"data:", b"event:")) and payload.endswith(b"\n\n")
            return (meta, payload) if ok else None
    elif failed or meta.get("sse"):
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return (meta, payload) if isinstance(obj, dict) else None


# model-mismatch warnings already given in this process (and, forked, its workers):
# `finops shim serve` checks the router before binding, then the app loads it again
_WARNED: set[tuple[str, str, str, str]] = set()


def build_router(cfg: ShimConfig) -> Router:
    """Load (and verify) the configured router; raises on a bad artifact."""
    policy = load_policy(cfg.router_path, cfg.tier_names, cfg.rules)
    for tier, model in sorted(getattr(policy, "upstream_models", {}).items()):
        served = cfg.tiers[tier].model if tier in cfg.tiers else None
        key = (str(policy.version), tier, str(model), str(served))
        if served is not None and model and model != served and key not in _WARNED:
            _WARNED.add(key)
            # the artifact was trained for that model; the shim sends the tier's configured
            # name upstream, which may be a different model (or a name vLLM refuses)
            logger.warning(
                "router %s was trained with tier %s = %r, but this shim serves %s as %r "
                "(--model %s=NAME or [tiers.%s] model); check it is the same model",
                policy.version,
                tier,
                model,
                tier,
                served,
                tier,
                tier,
            )
    return Router(
        policy,
        cfg.tier_names,
        exploration_rate=cfg.exploration_rate,
        seed=cfg.exploration_seed,
        path=cfg.router_path,
    )


class Shim:
    """Everything a request needs, swapped atomically on reload."""

    def __init__(self, cfg: ShimConfig, *, router: Router | None = None) -> None:
        self.cfg = cfg
        self.logger = logger
        self.metrics = ShimMetrics()
        self.router = router if router is not None else build_router(cfg)
        self.metrics.set_router(self.router.version)
        self.pool = Pool(cfg)
        self.log = RequestLog(
            cfg.log_dir, rotate_bytes=cfg.log_rotate_bytes, rotate_s=cfg.log_rotate_s
        )
        self.coalescer = Coalescer()
        self.redis: RedisCache | None = (
            RedisCache(cfg.redis_url, secret=redis_secret(cfg.redis_secret_env))
            if cfg.redis_url
            else None
        )
        self.cache = self.redis or MemoryCache(cfg.cache_max_entries, cfg.cache_max_bytes)
        self.idem = self.redis or MemoryCache(
            cfg.idempotency_max_entries, cfg.cache_max_bytes, on_evict=self._idem_evicted
        )
        # Responses API ids -> (tenant, tier, replica): see stored.py
        self.responses = ResponseIndex(cfg.response_index_ttl_s)
        # without Redis, the workers of one supervisor share the index through a file
        self.shared_index = self._open_shared_index(cfg)
        self._writes: set[asyncio.Task] = set()  # shared-store writes nobody awaits
        # requests begun whose record is not written yet: a stop waits for them (below)
        self.open_requests = 0
        # ids no replica had when last asked (auth off): not asked again for a while
        self._missing_ids: OrderedDict[str, float] = OrderedDict()
        self.client: httpx.AsyncClient = None  # type: ignore[assignment]  # control plane, made in start()
        self.h1: H1Client = None  # type: ignore[assignment]  # the proxy's upstream connections
        self.started_at = time.time()
        self.last_reload_error: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._names = self._model_names(cfg)
        # (tier, url) label sets the per-upstream gauges report now; see refresh_gauges
        self._gauged: set[tuple[str, str]] = set()
        self._gauge_lock = threading.Lock()
        self._backlog_warned = False
        self.tokenize_gate = TokenizeGate()
        self._reload_lock = asyncio.Lock()
        self._warned: OrderedDict[str, None] = OrderedDict()

    def _open_shared_index(self, cfg: ShimConfig) -> SharedFileIndex | None:
        """The workers' shared index file, if this is a worker without Redis; None (with
        a warning: each worker then keeps its own) if it cannot be opened."""
        state = os.environ.get(STATE_DIR_ENV)
        if not state or self.redis is not None:
            return None
        path = Path(state) / "responses.sqlite3"
        try:
            return SharedFileIndex(path, cfg.response_index_ttl_s)
        except sqlite3.Error as exc:
            self.logger.warning(
                "shared response index %s cannot be opened (%s): this worker keeps its own "
                "(a follow-up another worker answered is a 404 here with auth on)",
                path,
                exc,
            )
            return None

    # -- model names --
    @staticmethod
    def _model_names(cfg: ShimConfig) -> dict[str, Any]:
        """Every name a client may send as `model`, resolved once per config.

        The explicit policy applies to every name that picks a tier: the tier's
        name, its upstream model name, and `model_aliases` that target a tier.
        Names that resolve to the routing alias (the alias, `extra_aliases`,
        `model_aliases` that target one of them) are always routed.
        """
        names: dict[str, Any] = {}
        for t in cfg.tiers.values():
            names.setdefault(t.model, t.name)
        for t in cfg.tiers:
            names[t] = t
        for a, target in cfg.model_aliases.items():
            names[a] = "@route" if target in cfg.aliases else target
        if cfg.explicit == "deny":
            for n, v in names.items():
                if v != "@route":
                    names[n] = HTTPError(
                        403,
                        f"Model `{n}` may not be requested directly here; use `{cfg.alias}`.",
                        "permission_error",
                        "model_not_allowed",
                        param="model",
                    )
        if cfg.explicit == "reroute":
            to = {
                src: "@route" if target in cfg.aliases else target
                for src, target in cfg.reroute.items()
            }
            # a rerouted tier is rerouted under every name that reaches it (not only its own)
            for n, v in names.items():
                if v in cfg.tiers and v in to:
                    names[n] = to[v]
            for src in to:
                if src not in cfg.tiers:  # a client name, e.g. {"gpt-4o" = "small"}
                    names[src] = to[src]
        for a in cfg.aliases:
            names[a] = "@route"
        return names

    def resolve_model(self, model: str) -> Any:
        """'@route' for the alias, a tier name, an HTTPError (denied), or None (unknown)."""
        return self._names.get(model)

    # -- cache and idempotency storage: meta JSON line + payload --
    @staticmethod
    def _pack(meta: dict, payload: bytes) -> bytes:
        return orjson.dumps(meta) + b"\n" + payload

    def _idem_evicted(self) -> None:
        """An Idempotency-Key record dropped for room before its TTL: a retry with that
        key would run (and be billed) again."""
        self.metrics.idempotency_evictions.inc()
        self._warn_once(
            "idempotency-evictions",
            "Idempotency-Key records are dropped before idempotency_ttl_s to make room "
            "([cache] idempotency_max_entries = %d): a retry with a dropped key runs again. "
            "Raise it, or share records through [cache] redis_url "
            "(finops_shim_idempotency_evictions_total counts them)",
            self.cfg.idempotency_max_entries,
        )

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        """Log about one key once (a bad value stays bad for its whole TTL: no line per request)."""
        seen = self._warned
        if key in seen:
            return
        seen[key] = None
        if len(seen) > WARNED_KEYS:
            seen.popitem(last=False)
        self.logger.warning(msg, *args)

    def _store_failed(self, op: str, key: str, exc: Exception) -> None:
        if isinstance(exc, RedisKeyError):
            self.metrics.cache_backend_errors.labels(op, "key").inc()
            self._warn_once(key, "redis %s of key %s failed, treated as a miss: %s", op, key, exc)
        else:
            self.metrics.cache_backend_errors.labels(op, "unavailable").inc()
            self.logger.warning("cache %s failed (skipped for a few seconds): %s", op, exc)

    async def _get(self, store: Any, key: str, kind: str) -> Any:
        try:
            v = await store.get(key)
        except RedisUnavailable:  # said once, when it failed
            return SKIPPED
        except Exception as exc:  # a Redis outage must not fail requests
            self._store_failed("get", key, exc)
            return None if isinstance(exc, RedisKeyError) else SKIPPED
        if v is None:
            return None
        if isinstance(v, BadSignature):
            self.metrics.cache_invalid.labels(kind).inc()
            self._warn_once(
                key,
                "%s value under %s (%d bytes) does not verify with [cache] redis_secret_env: "
                "written without it, with another secret, or not by a shim; treated as a miss",
                kind,
                key,
                v.size,
            )
            return None
        got = unpack_entry(v, kind)
        if got is None:
            self.metrics.cache_invalid.labels(kind).inc()
            self._warn_once(
                key,
                "%s value under %s is not one the shim wrote (%d bytes: %r...); treated as "
                "a miss until it is replaced or expires",
                kind,
                key,
                len(v) if isinstance(v, bytes) else -1,
                v[:40] if isinstance(v, bytes) else type(v).__name__,
            )
        return got

    async def _set(self, store: Any, key: str, meta: dict, payload: bytes, ttl: float) -> None:
        try:
            await store.set(key, self._pack(meta, payload), ttl)
        except RedisUnavailable:
            return
        except Exception as exc:
            self._store_failed("set", key, exc)

    async def cache_get(self, key: str) -> Any:
        """(meta, payload), None (a miss) or SKIPPED (the shared cache is out)."""
        return await self._get(self.cache, key, "cache")

    async def cache_put(self, key: str, meta: dict, payload: bytes) -> None:
        await self._set(self.cache, key, meta, payload, self.cfg.cache_ttl_s)

    async def idem_get(self, key: str) -> tuple[dict, bytes] | None:
        got = await self._get(self.idem, key, "idempotency")
        return None if got is SKIPPED else got

    async def idem_put(self, key: str, meta: dict, payload: bytes) -> None:
        """Store an Idempotency-Key record; it lives idempotency_ttl_s from the key's first
        request (`created`), however often it is rewritten (attempts, replays)."""
        ttl = self.cfg.idempotency_ttl_s
        created = meta.get("created")
        if _number(created):
            ttl -= time.time() - created
            if ttl <= 0:
                return  # past its lifetime: it has expired (or is about to)
        await self._set(self.idem, key, meta, payload, ttl)

    # -- stored Responses API answers: which replica has each, for which tenant --
    def remember_response(self, response_id: str, entry: StoredResponse) -> asyncio.Task | None:
        """Index a response id: at once in this process, and in the shared store by the
        returned task (awaited by whoever can wait for it before the client has the id)."""
        shared = self.shared_index
        if (shared is not None and not shared.put(response_id, entry)) or not self.responses.put(
            response_id, entry
        ):
            self._warn_once(
                response_id,
                "response id %s is held by another tenant; not re-indexed for %s",
                response_id,
                entry.tenant,
            )
            return None
        if self.redis is not None:
            return self._write_shared(shared_key(response_id), entry.as_meta())
        return None

    def forget_response(self, response_id: str) -> None:
        self.responses.forget(response_id)
        if self.shared_index is not None:
            self.shared_index.forget(response_id)
        if self.redis is not None:  # a tombstone (no delete in the store's API): read as a miss
            self._write_shared(shared_key(response_id), {"deleted": True}, 60.0)

    def _write_shared(self, key: str, meta: dict, ttl: float | None = None) -> asyncio.Task:
        ttl = self.cfg.response_index_ttl_s if ttl is None else ttl
        task = asyncio.get_running_loop().create_task(
            self._set(self.redis, key, meta, b"", ttl)  # errors are logged and counted there
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def find_response(self, response_id: str, tenant: str) -> StoredResponse | None:
        """Where `tenant`'s response `response_id` is stored; None when unknown here or
        another tenant's (the two are not told apart: ids are never confirmed to others).

        Looked up in this process, then the shared store (Redis, or the workers' file).
        With auth off (one tenant) an id neither knows (made before this process started,
        or by another host without Redis) is looked for on every replica.
        """
        if len(response_id) > MAX_RESPONSE_ID_CHARS:
            return None  # no server makes such ids: not looked up (nor remembered) anywhere
        entry = self.responses.get(response_id)
        if entry is None and self.shared_index is not None:
            entry = self.shared_index.get(response_id)
            if entry is not None:
                self.responses.put(response_id, entry)
        if entry is None and self.redis is not None:
            got = await self._get(self.redis, shared_key(response_id), "responses")
            if got is not None and got is not SKIPPED:
                entry = StoredResponse.from_meta(got[0])
                if entry is not None:
                    self.responses.put(response_id, entry)
        if entry is None and not self.cfg.auth_enabled:
            missing = self._missing_ids
            now = time.monotonic()
            if missing.get(response_id, 0.0) > now:
                return None  # asked every replica a moment ago: not again per request
            entry = await self._locate_response(response_id, tenant)
            if entry is not None:
                self.remember_response(response_id, entry)
            else:
                # oldest first (one lifetime for all): the expired go first, then the
                # oldest past the bound (they were only ever dropped by count)
                while missing and next(iter(missing.values())) <= now:
                    missing.popitem(last=False)
                missing[response_id] = now + MISSING_ID_S
                missing.move_to_end(response_id)
                while len(missing) > MISSING_IDS_MAX:
                    missing.popitem(last=False)
        if entry is None or entry.tenant != tenant:
            return None
        return entry

    async def _locate_response(self, response_id: str, tenant: str) -> StoredResponse | None:
        """Ask every replica for the id (GET /v1/responses/{id}); the one that has it."""
        by_url: dict[str, list] = {}
        for u in self.pool.all():
            by_url.setdefault(u.url, []).append(u)
        path = "/v1/responses/" + quote(response_id, safe="")

        async def ask(reps: list) -> StoredResponse | None:
            u = reps[0]
            headers = {"authorization": f"Bearer {u.api_key}"} if u.api_key else {}
            try:
                r = await self.client.get(
                    u.url + path, headers=headers, timeout=self.cfg.connect_timeout_s + 3
                )
            except httpx.HTTPError:
                return None
            if r.status_code != 200:
                return None
            try:
                model = r.json().get("model")
            except (ValueError, AttributeError):
                return None
            # the tier whose model answered it (one vLLM may serve several tiers' names)
            tier = next((x.tier for x in reps if x.model == model), u.tier)
            return StoredResponse(tenant, tier, u.url)

        found = await asyncio.gather(*(ask(reps) for reps in by_url.values()))
        return next((f for f in found if f is not None), None)

    # -- Idempotency-Key claims (shared store only): one process runs a key at a time --
    async def _claim_call(self, op: str, key: str, call: Any, default: Any) -> Any:
        try:
            return await call
        except RedisUnavailable:
            return default
        except Exception as exc:
            self._store_failed(op, key, exc)
            return default

    async def idem_next_attempt(self, key: str, meta: dict) -> int:
        """This replay's attempt number. With Redis it comes from one counter per key:
        duplicates waiting on another worker's claim wake together, and each read the
        same record (all were logged as attempt 2)."""
        after = int(meta.get("attempts", 1))
        r = self.redis
        if r is None:  # one process, one event loop: the record itself is the count
            return after + 1
        n = await self._claim_call(
            "attempt",
            key + ":attempts",
            r.next_attempt(key + ":attempts", after, self.cfg.idempotency_ttl_s),
            None,
        )
        return after + 1 if n is None else n

    async def idem_claim(self, key: str, owner: str) -> bool:
        """True if this request may run the key: claimed now for `owner`, or there is no
        shared store or it is out (run unclaimed, as without Redis). False: another
        request holds it."""
        r = self.redis
        if r is None:
            return True
        ck = key + ":claim"
        for _ in range(2):
            if await self._claim_call("claim", ck, r.claim(ck, owner, CLAIM_TTL_S), True):
                return True
            if await self.idem_claimed(key):
                return False
            # released between the two calls: try again; or a foreign value that is no
            # claim of ours (no request id), which must not block the key
        return True

    async def idem_claimed(self, key: str) -> bool:
        """Whether some request holds the key's claim (False when the store is out)."""
        r = self.redis
        if r is None:
            return False
        ck = key + ":claim"
        v = await self._claim_call("holder", ck, r.holder(ck), None)
        if v is None:
            return False
        if isinstance(v, bytes) and v.startswith(b"req-"):
            return True
        self.metrics.cache_invalid.labels("idempotency").inc()
        self._warn_once(ck, "idempotency claim %s holds a foreign value %r; ignored", ck, v[:40])
        return False

    async def idem_keep_claim(self, key: str, owner: str) -> None:
        """Refresh the claim until cancelled (the request is done)."""
        r = self.redis
        if r is None:
            return
        ck = key + ":claim"
        while True:
            await asyncio.sleep(CLAIM_TTL_S / 3)
            await self._claim_call("refresh", ck, r.refresh(ck, owner, CLAIM_TTL_S), False)

    async def idem_release(self, key: str, owner: str) -> None:
        r = self.redis
        if r is not None:
            ck = key + ":claim"
            await self._claim_call("release", ck, r.release(ck, owner), None)

    # -- lifecycle --
    async def start(self) -> None:
        cfg = self.cfg
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=cfg.max_connections,
                max_keepalive_connections=cfg.max_connections,
                # under uvicorn's 5 s (vLLM's server): /tokenize POSTs never meet a
                # connection the upstream is closing (h1client says why)
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout_s,
                read=cfg.read_timeout_s,
                write=30.0,
                pool=cfg.first_byte_timeout_s,
            ),
            trust_env=False,
        )
        self.h1 = H1Client(cfg.max_connections, cfg.connect_timeout_s)
        if not cfg.auth_enabled:
            self.logger.warning(
                "AUTH IS OFF: no API keys configured, every request is accepted as tenant %r. "
                "Give --api-key KEY=TENANT or [auth] keys to turn it on.",
                cfg.default_tenant,
            )
        self.logger.info("router %s serving tiers %s", self.router.version, cfg.tier_names)
        self._tasks.append(asyncio.create_task(self._health_loop()))
        if cfg.watch:
            self._tasks.append(asyncio.create_task(self._watch_loop()))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        self.logger.info("SIGHUP: reloading config and router")
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self.areload()))

    async def stop(self) -> None:
        # uvicorn runs this right after it cancels the requests its drain did not finish:
        # they still end their answers (a cut stream's error event, a 503: up to a second
        # each, longer to a slow reader) and write their records. The log closed under
        # them lost those records, unbilled tokens included.
        deadline = time.monotonic() + RECORDS_WAIT_S
        while self.open_requests > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.open_requests > 0:
            self.logger.warning(
                "stopping with %d request(s) still unfinished after %g s: their records are "
                "not written",
                self.open_requests,
                RECORDS_WAIT_S,
            )
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # that put back SIGHUP's default action (terminate): a reload asked for while
            # draining must not kill the process
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self.client is not None:
            await self.client.aclose()
        if self.h1 is not None:
            self.h1.close()
        if self._writes:  # shared-store writes still running: finished, not cut
            await asyncio.wait(list(self._writes), timeout=2.0)
        if self.redis is not None:
            await self.redis.close()
        if self.shared_index is not None:
            self.shared_index.close()
        self.log.close()

    def _build(self) -> tuple[ShimConfig, Router]:
        """New config (re-read when it came from a file) and router, verified; raises if bad.

        The command-line flags the process started with (`cfg.overrides`: `--api-key`,
        `--router`, `--log`, ...) are applied again over the re-read file, as at start.
        """
        cfg = reread_config(self.cfg)
        return cfg, build_router(cfg)

    def _refused(self, exc: BaseException) -> tuple[bool, str]:
        msg = f"reload refused, still serving router {self.router.version}: {type(exc).__name__}: {exc}"
        self.logger.error(msg)
        self.last_reload_error = msg
        self.metrics.reloads.labels("refused").inc()
        return False, msg

    def _swap(self, cfg: ShimConfig, router: Router) -> tuple[bool, str]:
        # whole-object swaps: requests in flight keep the router/pool they already hold
        self.pool = Pool(cfg, previous=self.pool)
        self.log.rotate_bytes = cfg.log_rotate_bytes  # read by the writer at each batch
        self.log.rotate_s = cfg.log_rotate_s
        self.responses.ttl_s = cfg.response_index_ttl_s  # entries put from now on
        if self.shared_index is not None:
            self.shared_index.ttl_s = cfg.response_index_ttl_s
        self._names = self._model_names(cfg)
        self.cfg = cfg
        self.router = router
        self.metrics.set_router(router.version)
        self.metrics.reloads.labels("ok").inc()
        self.last_reload_error = None
        self.refresh_gauges()  # drops the gauges of upstreams the new pool no longer has
        msg = f"reloaded: router {router.version}, tiers {cfg.tier_names}"
        self.logger.info(msg)
        return True, msg

    def reload(self) -> tuple[bool, str]:
        """Re-read config and router now (blocking); swap only if both are valid."""
        try:
            cfg, router = self._build()
        except Exception as exc:  # ConfigError, ArtifactError, OSError...
            return self._refused(exc)
        return self._swap(cfg, router)

    async def areload(self) -> tuple[bool, str]:
        """Like reload(), but loads the artifact in a thread so serving never pauses.

        One at a time: two overlapping reloads (two SIGHUPs, or SIGHUP and the file
        watch) could finish out of order, and the older file's reading, loaded slower,
        would win over what the file says now. Queued behind the lock, the later one
        reads the file after the earlier one is done. Upstreams new to the pool are
        probed at once, so /readyz does not report them unknown until the next round.
        """
        async with self._reload_lock:
            try:
                cfg, router = await asyncio.to_thread(self._build)
            except Exception as exc:
                return self._refused(exc)
            # replicas new to the pool are probed before the swap: swapped in unknown, a
            # tier moved to a new (healthy) replica read as down in /readyz until the
            # probe came back, and a load balancer's probe could take the shim out
            known = {u.url for u in self.pool.all()}
            fresh = {u for t in cfg.tiers.values() for u in t.upstreams if u not in known}
            probed: dict[str, bool] = {}
            if fresh and self.client is not None:
                with contextlib.suppress(Exception):
                    timeout = min(2.0, cfg.connect_timeout_s + 1)
                    got = await asyncio.gather(*(self._healthy(u, timeout) for u in fresh))
                    probed = dict(zip(fresh, got, strict=True))
            result = self._swap(cfg, router)
            for u in self.pool.all():
                if u.reachable is None and u.url in probed:
                    u.reachable = probed[u.url]
        if self.client is not None:
            with contextlib.suppress(Exception):  # the health loop reports failures
                # lengths asked again (a redeployed model's may change), the old ones
                # listed meanwhile
                await self.check_upstreams(refresh_lengths=True, report=True)
        return result

    async def _healthy(self, url: str, timeout: float) -> bool:
        try:
            r = await self.client.get(url + "/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return r.status_code < 500

    async def check_upstreams(self, *, refresh_lengths: bool = False, report: bool = False) -> None:
        """Probe every replica's /health (and /v1/models for its context length).

        `report` (at start and after a reload): a WARNING for each replica that is
        unreachable or does not serve its tier's model, so a typo in a URL or a model
        name is seen when it is made, not at the first failed request. Start does not
        fail on it: the replica may come up later (the health loop keeps probing).
        """
        problems: dict[tuple[str, str], str] = {}

        async def probe(u: Any) -> None:
            timeout = min(2.0, self.cfg.connect_timeout_s + 1)
            was = u.reachable
            u.reachable = await self._healthy(u.url, timeout)
            if not u.reachable:
                problems[(u.tier, u.url)] = "is unreachable (its /health did not answer)"
            # asked once, and again when the replica comes back (a restart may serve
            # another length), had not said (0: a model name it did not list yet) or a
            # reload asks (`refresh_lengths`, `report`)
            asked = refresh_lengths or report or u.max_model_len in (None, 0) or was is False
            if u.reachable and asked:
                n, listed = await self._model_listing(u, timeout)
                if n is not None or u.max_model_len is None:
                    u.max_model_len = n
                if listed is not None and u.model not in listed:
                    problems[(u.tier, u.url)] = (
                        f"serves models {listed}, not `{u.model}`: requests for this tier will fail"
                    )

        await asyncio.gather(*(probe(u) for u in self.pool.all()))
        if report:
            for tier, reps in self.pool.tiers.items():
                for k, u in enumerate(reps, 1):
                    if (tier, u.url) in problems:
                        self.logger.warning(
                            "upstream check: tier `%s` replica %d (%s) %s",
                            tier,
                            k,
                            u.url,
                            problems[(tier, u.url)],
                        )

    async def _model_listing(self, u: Any, timeout: float) -> tuple[int | None, list | None]:
        """`max_model_len` of the model `u` serves, from vLLM's /v1/models (0: not given;
        None: ask again at the next check), and the model ids listed there (None: no
        list came back)."""
        headers = {"authorization": f"Bearer {u.api_key}"} if u.api_key else {}
        try:
            r = await self.client.get(u.url + "/v1/models", headers=headers, timeout=timeout)
            data = r.json().get("data") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None, None
        if not isinstance(data, list):
            return 0, None
        listed = [m.get("id") for m in data if isinstance(m, dict)]
        for m in data:
            if isinstance(m, dict) and m.get("id") == u.model:
                n = m.get("max_model_len")
                ok = isinstance(n, int) and not isinstance(n, bool) and n > 0
                return (n if ok else 0), listed
        return 0, listed

    async def _health_loop(self) -> None:
        first = True  # the start's probe: its problems are reported
        while True:
            try:
                await self.check_upstreams(report=first)
                first = False
            except Exception as exc:
                self.logger.warning("health check failed: %s", exc)
            self.refresh_gauges()
            await asyncio.sleep(max(0.5, self.cfg.health_interval_s))

    def refresh_gauges(self) -> None:
        """Set the gauges read from state (circuits, in flight, log counts).

        Called on every scrape, by the health loop and after a reload: with several
        workers a scrape reaches one of them, and the others' values must not be older
        than one interval. The request path sets none of them: it would cost every
        request, and an in-flight request to an upstream a reload removed would report
        its circuit again after the reload stopped doing so. Upstreams a reload removed stop being reported (they would
        otherwise keep their last circuit state forever). The lock keeps a refresh from
        a reload in another thread from interleaving with one holding the old pool.
        """
        m = self.metrics
        with self._gauge_lock:
            seen = set()
            now = time.monotonic()
            for u in self.pool.all():
                seen.add((u.tier, u.url))
                m.circuit_state.labels(u.tier, u.url).set(u.breaker.shown_state(now))
                m.outstanding.labels(u.tier, u.url).set(u.outstanding)
            for tier, url in self._gauged - seen:
                m.drop_upstream(tier, url)
            self._gauged = seen
        m.log_records.set(self.log.written)
        m.log_errors.set(self.log.errors)
        backlog = self.log.backlog
        m.log_backlog.set(backlog)
        if backlog >= LOG_BACKLOG_WARN and not self._backlog_warned:
            self.logger.warning(
                "request log: %d records waiting for the disk (%s); they are kept in memory "
                "up to %d, then newer ones are dropped and counted as write errors",
                backlog,
                self.log.last_error or "writes are slow",
                self.log.max_backlog,
            )
        self._backlog_warned = backlog >= LOG_BACKLOG_WARN

    def _watch_targets(self) -> tuple[list[Path], list[Path]]:
        """(paths whose change triggers a reload, folders to watch for them).

        Each configured path counts as given (absolute) and resolved: a symlink swap
        (`current -> releases/v7`) changes the link's folder, an edit changes the target.
        """
        targets: list[Path] = []
        for p in (self.cfg.source_path, self.cfg.router_path):
            if p is None:
                continue
            given = Path(p).absolute()
            targets.append(given)
            real = given.resolve()
            if real != given:
                targets.append(real)
        dirs = {t.parent for t in targets if t.parent.is_dir()}
        dirs.update(t for t in targets if t.is_dir())
        return targets, sorted(dirs)

    @staticmethod
    def _watch_signature(targets: list[Path]) -> tuple:
        """What the watched paths are now: (inode, mtime, size) of each and of a folder's files."""
        sig: list[tuple] = []

        def add(p: Path) -> None:
            try:
                st = p.stat()
            except OSError:
                sig.append((str(p), None))
            else:
                sig.append((str(p), st.st_ino, st.st_mtime_ns, st.st_size))

        for t in targets:
            add(t)
            try:
                inside = sorted(t.iterdir()) if t.is_dir() else []
            except OSError:  # swapped away between the two calls: the next look sees it
                inside = []
            for f in inside:
                add(f)
        return tuple(sig)

    async def _watch_loop(self) -> None:
        """Reload when the config file or the router folder changes.

        The watch is on their parent folders (and the router folder's own files), not
        on the things themselves: a watch on a file or folder dies with it when it is
        replaced rather than edited in place, which is how editors save (write a new
        file, rename it over) and how artifacts are deployed (swap in a new folder or
        a symlink). After each change the watch is rebuilt, so a swapped-in folder, or
        a router path the reload changed, is the one watched next. A signature of the
        watched paths, taken before each reload and compared every couple of seconds,
        catches what lands while a reload runs or the watch is being set up.
        """
        from watchfiles import awatch

        seen = None
        while True:
            try:
                targets, dirs = self._watch_targets()
                if not dirs:
                    return
                sig = await asyncio.to_thread(self._watch_signature, targets)
                if seen is not None and sig != seen:
                    seen = await self._reload_from_watch()
                    continue
                seen = sig
                wanted = set(targets)

                def relevant(_change: object, path: str, wanted: set[Path] = wanted) -> bool:
                    p = Path(path)
                    return p in wanted or p.parent in wanted

                async with contextlib.aclosing(
                    awatch(
                        *dirs,
                        watch_filter=relevant,
                        recursive=False,
                        rust_timeout=WATCH_POLL_MS,
                        yield_on_timeout=True,
                    )
                ) as changes:
                    async for batch in changes:
                        if batch:
                            break
                        now = await asyncio.to_thread(self._watch_signature, targets)
                        if now != seen:
                            break
                seen = await self._reload_from_watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a watched folder vanished mid-setup: look again soon
                self.logger.warning("file watch restarting: %s", exc)
                await asyncio.sleep(1.0)

    async def _reload_from_watch(self) -> tuple:
        """Reload; returns the signature taken *before* it, so a change made while the
        reload ran differs from it and is reloaded next."""
        sig = await asyncio.to_thread(self._watch_signature, self._watch_targets()[0])
        await self.areload()
        return sig

    def readiness(self) -> tuple[bool, dict]:
        """Ready when the router is loaded and every tier's requests can be served: by a
        replica of its own or, through fallback, of a tier above it, counting replicas
        that answer /health and whose circuit lets requests through.

        A load balancer's readiness probe takes a shim out when it says no: one tier
        down is served by the fallback (its tiers are listed in `degraded`), but every
        replica's circuit open is not (it said ready, with nothing serving).
        """
        now = time.monotonic()
        tiers: dict[str, dict] = {}
        for name, reps in self.pool.tiers.items():
            tiers[name] = {
                "reachable": [u.url for u in reps if u.reachable],
                "serving": [u.url for u in reps if u.reachable and u.breaker.would_allow(now)],
                "replicas": len(reps),
            }
        served_by = None
        for name in reversed(self.pool.order):  # fallback goes up: the nearest serving tier
            if tiers[name]["serving"]:
                served_by = name
            tiers[name]["served_by"] = served_by
        ok = self.router is not None and all(t["served_by"] for t in tiers.values())
        return ok, {
            "ready": ok,
            "router_version": self.router.version if self.router else None,
            "tiers": tiers,
            "degraded": [n for n, t in tiers.items() if t["served_by"] not in (n, None)],
            "last_reload_error": self.last_reload_error,
        }


class ShimASGI:
    """Path-dict dispatch for the hot endpoints; Starlette for the rest."""

    def __init__(self, shim: Shim, rest: Starlette) -> None:
        self.shim = shim
        self.rest = rest
        self.state = rest.state
        self.fast = {
            "/v1/chat/completions": ProxyEndpoint(shim, "chat"),
            "/v1/completions": ProxyEndpoint(shim, "text_completion"),
            "/v1/embeddings": EmbeddingsEndpoint(shim),
            "/v1/responses": ResponsesEndpoint(shim),  # OpenAI's Responses API
        }
        self.stored = StoredResponseEndpoint(shim)  # /v1/responses/{id}[/cancel|/input_items]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ep = self.fast.get(scope["path"].rstrip("/") or "/")
            if ep is not None:
                await ep(scope, receive, send)
                return
            if scope["path"].startswith("/v1/responses/"):
                await self.stored(scope, receive, send)
                return
        await self.rest(scope, receive, send)


def create_app(cfg: ShimConfig, *, router: Router | None = None) -> ShimASGI:
    """The shim as an ASGI app (serve with uvicorn); `app.shim` is its state."""
    shim = Shim(cfg, router=router)

    async def models(request: Request) -> Response:
        try:
            # the raw bytes, as the other endpoints read them (Starlette's str is latin-1:
            # re-encoded as UTF-8, a non-ASCII key was refused here and accepted there)
            tenant_for(
                authorization(request.scope["headers"]),
                shim.cfg.api_keys,
                shim.cfg.default_tenant,
            )
        except AuthError as exc:
            return Response(
                error_body(exc.message, "invalid_request_error", "invalid_api_key"),
                401,
                media_type="application/json",
            )
        created = int(shim.started_at)
        c = shim.cfg
        names = shim._names
        # each tier's context length, as its replicas' vLLM says (the smallest, if they
        # differ); a name that routes gets the smallest over all tiers: it fits any
        lens: dict[str, int] = {}
        for u in shim.pool.all():
            if u.max_model_len:
                lens[u.tier] = min(lens.get(u.tier, u.max_model_len), u.max_model_len)
        routed_len = min(lens.values()) if len(lens) == len(c.tiers) and lens else None
        # every name a client may send (with explicit = "deny" the tiers answer 403, so
        # only the names that route are listed); each name once
        data: list[dict] = []
        seen: set[str] = set()

        def add(name: str, info: dict) -> None:
            target = names.get(name)
            if name in seen or target is None or isinstance(target, HTTPError):
                return
            seen.add(name)
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "finops-shim",
            }
            n = routed_len if target == "@route" else lens.get(target)
            if n:
                entry["max_model_len"] = n
            # where a request for the name goes, after every rule (a reroute included)
            entry["finops"] = {**info, "served_by": "router" if target == "@route" else target}
            data.append(entry)

        for a in c.aliases:
            add(a, {"kind": "alias", "router_version": shim.router.version, "tiers": c.tier_names})
        if c.explicit == "reroute":  # listed as reroutes: that is what their names do
            for src, target in c.reroute.items():
                add(src, {"kind": "reroute", "target": target})
        for name, t in c.tiers.items():
            add(
                name,
                {
                    "kind": "tier",
                    "upstream_model": t.model,
                    "replicas": len(t.upstreams),
                    "explicit": c.explicit,
                },
            )
        for t in c.tiers.values():  # the name vLLM serves the tier's model under
            add(t.model, {"kind": "upstream_model", "tier": t.name})
        for a, target in c.model_aliases.items():
            add(a, {"kind": "alias", "target": target})
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def healthz(request: Request) -> Response:
        # the pid says which worker answered when several share the port
        return JSONResponse(
            {"status": "ok", "router_version": shim.router.version, "pid": os.getpid()}
        )

    def operator(request: Request) -> AuthError | None:
        """Why this request may not read what only operators may (None: it may)."""
        keys = shim.cfg.operator_keys
        if not keys:
            return None
        try:
            tenant_for(authorization(request.scope["headers"]), dict.fromkeys(keys, ""), "")
        except AuthError as exc:
            return exc
        return None

    async def readyz(request: Request) -> Response:
        ok, detail = shim.readiness()
        if operator(request) is not None:
            # the probe's answer (its status) for anyone; replica URLs only for operators
            detail = {"ready": ok}
        else:
            detail["circuits"] = circuit_snapshot(shim)
        return Response(orjson.dumps(detail), 200 if ok else 503, media_type="application/json")

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        refused = operator(request)
        if refused is not None:
            return Response(
                error_body(
                    f"{refused.message} /metrics takes an operator key ([auth] operator_keys).",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                401,
                headers={"www-authenticate": "Bearer"},
                media_type="application/json",
            )
        shim.refresh_gauges()
        return Response(shim.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await shim.start()
        try:
            yield
        finally:
            await shim.stop()

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # unknown paths and wrong methods on the Starlette routes, in OpenAI's error shape
        path = request.url.path[:200]
        if exc.status_code == 404:
            msg, code = (
                f"Unknown path `{path}`. The shim serves POST /v1/chat/completions, "
                "/v1/completions, /v1/embeddings, /v1/responses, GET /v1/models and "
                "stored responses at /v1/responses/{id}.",
                "not_found",
            )
        elif exc.status_code == 405:
            msg, code = f"Method {request.method} is not allowed on `{path}`.", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return Response(
            error_body(msg, "invalid_request_error", code),
            exc.status_code,
            headers=exc.headers,
            media_type="application/json",
        )

    rest = Starlette(
        exception_handlers={StarletteHTTPException: http_error},
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            # vLLM's own liveness path: probes written for the vLLM the shim now fronts
            Route("/health", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    rest.state.shim = shim
    return ShimASGI(shim, rest)


def load_app(config_path: Path) -> ShimASGI:
    """create_app from a TOML file (raises ConfigError with file/key on bad input)."""
    return create_app(load_config(config_path))


__all__ = ["ConfigError", "Shim", "ShimASGI", "build_router", "create_app", "load_app"]
