"""Exact response cache, in-flight coalescing and idempotency records.

Only deterministic requests are cached: `temperature == 0` or a fixed
`seed`, a single choice, and no logprobs (a replay could not rebuild them).
The key is sha256 over the tenant and the *normalized* request: keys
sorted (top-level fields and chat messages; user-given JSON whose key order
matters to the model, such as a `response_format` schema or `tools`, is kept
as sent: vLLM's guided decoding follows the schema's order), chat message
text with leading/trailing whitespace stripped and CRLF turned into LF
(every other string, such as `stop` or a completions `prompt`, is kept as
sent: a trailing space there changes the answer),
defaults vLLM never takes from the model filled in (`n=1`, `echo`; penalties and
`top_p`/`top_k`/`min_p` are never filled, the latter dropped for greedy requests), and
transport-only fields (`stream`, `stream_options`, `user`) removed, so a
streaming and a non-streaming request share an entry (streaming hits are
replayed as SSE) unless the request has tools (vLLM's tool parsers answer
the two differently). The resolved tier and the model it
serves are part of the key (a reload that changes a tier's model does not
serve the old model's answers), and so is the tenant: one tenant can never
read another's entry.

Backends: `MemoryCache` (per process; TTL, entry and byte bounds, LRU) and
`RedisCache` (redis-py asyncio; replicas share entries; TTL via SETEX, size
bounded by Redis' own `maxmemory` + `allkeys-lru`; with a secret, each value is
signed with HMAC-SHA256 over its key and bytes, so a value the shims did not write,
or one moved to another key (another tenant's), is a miss). Coalescing of identical
in-flight requests is per process; an Idempotency-Key is also claimed in Redis
(`RedisCache.claim`), so workers and hosts sharing it run a key once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from finops.shim.config import redacted_url

# API-level defaults, only those vLLM never takes from elsewhere. Sampling knobs and
# penalties are not filled: vLLM takes a missing one from the model's generation_config
# (its default `--generation-config auto`, or --override-generation-config), so
# "missing" and "0.0" can give different answers, greedy ones too (penalties apply to
# greedy decoding). top_p/top_k/min_p do not change a greedy answer: its key leaves
# them out altogether.
SAMPLING_ONLY = ("top_p", "top_k", "min_p")
DEFAULTS = {"n": 1, "echo": False}
TRANSPORT_ONLY = ("stream", "stream_options", "user", "model")
# ...except where an endpoint's answer echoes one: vLLM's Responses answer carries the
# request's `user`, so a hit must not show another end user's
ECHOED = {"responses": ("user",)}
# fields whose objects' key order means nothing (sorted in the key); every other field's
# value is kept in the order sent: JSON schemas (`response_format`, `guided_json`,
# `structured_outputs`, tool `parameters`) are generated in their properties' order
ORDER_FREE = ("messages", "logit_bias")

logger = logging.getLogger("finops.shim")

# Shim.cache_get: the shared cache is out (skipped or failing), nothing was looked up
SKIPPED: Any = object()


_BOOL_LOGPROBS = ("logprobs", "return_token_ids")  # chat's; completions' logprobs is a count


def is_deterministic(body: dict, operation: str = "chat") -> bool:
    """Cacheable: one choice, no logprobs of any kind, and temperature 0 or a fixed seed."""
    n = body.get("n", 1)
    if n not in (1, None):
        return False
    # logprobs: 0 still asks for the sampled token's logprob (OpenAI and vLLM), which a
    # replay cannot rebuild; prompt_logprobs and return_token_ids are vLLM's (the ids are
    # per token, as logprobs are). A completions request's `logprobs` is a number, and
    # vLLM reads `false` there as 0: it asks for logprobs too. `false` is "no" only in
    # the boolean fields.
    flags = ("return_token_ids",) if operation == "text_completion" else _BOOL_LOGPROBS
    for field in ("logprobs", "top_logprobs", "prompt_logprobs", "return_token_ids"):
        v = body.get(field)
        if v is not None and not (v is False and field in flags):
            return False
    t = body.get("temperature", 1.0)
    if isinstance(t, int | float) and not isinstance(t, bool) and t == 0:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def _norm_text(s: str) -> str:
    return s.replace("\r\n", "\n").strip()


def _norm_numbers(v: Any, sort: bool = False) -> Any:
    """Floats that are integers as ints (0.0 == 0 in the key); with `sort`, every
    object's keys sorted (for the order-insensitive parts of a request)."""
    if isinstance(v, dict):
        items = sorted(v.items()) if sort else v.items()
        return {k: _norm_numbers(x, sort) for k, x in items}
    if isinstance(v, list):
        return [_norm_numbers(x, sort) for x in v]
    if isinstance(v, float) and v.is_integer() and -(2**63) <= v < 2**63:
        return int(v)  # (a larger one stays a float: orjson writes no int past 64 bits)
    return v


def _norm_content(content: Any) -> Any:
    """A chat message's text, whitespace-normalized (a string, or a list with one text part).

    Several text parts are kept as sent: vLLM joins them with a newline, so a space at
    the end of one is inside the prompt, where a template's trim does not reach.
    """
    if isinstance(content, str):
        return _norm_text(content)
    if isinstance(content, list):
        texts = [
            i
            for i, p in enumerate(content)
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        if len(texts) == 1:
            i = texts[0]
            return [
                {**p, "text": _norm_text(p["text"])} if j == i else p for j, p in enumerate(content)
            ]
    return content


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# the values vLLM accepts for each sampling-only knob: an invalid one stays in the key,
# so the request misses and vLLM answers its 400 (a warm cache answered 200 instead)
_SAMPLING_VALID = {
    "top_p": lambda v: _num(v) and 0 < v <= 1,
    "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
    "min_p": lambda v: _num(v) and 0 <= v <= 1,
}


def normalized_request(
    body: dict, target: str, whitespace: bool = True, keep: tuple[str, ...] = ()
) -> bytes:
    """Canonical bytes of a request as the cache sees it (see module docstring).

    `whitespace=False` keeps chat message text exactly as sent, for chat templates that
    put it in the prompt verbatim (`[cache] normalize_whitespace = false`).
    """
    d = {k: v for k, v in body.items() if k not in TRANSPORT_ONLY or k in keep}
    for k, default in DEFAULTS.items():
        d.setdefault(k, default)
    t = d.get("temperature")
    if _num(t) and t == 0:
        for k in SAMPLING_ONLY:  # greedy decoding: the same answer whatever they are
            v = d.get(k)
            if v is None or _SAMPLING_VALID[k](v):
                d.pop(k, None)
    if d.get("seed") is None:
        d.pop("seed", None)
    msgs = d.get("messages")
    if whitespace and isinstance(msgs, list):
        d["messages"] = [
            {**m, "content": _norm_content(m["content"])}
            if isinstance(m, dict) and "content" in m
            else m
            for m in msgs
        ]
    if d.get("tools") or d.get("functions"):
        # vLLM's tool parsers answer a stream and a plain request differently (a cut-off
        # call is `tool_calls` streamed, `<tool_call>` text otherwise): no sharing
        d["_stream"] = body.get("stream") is True
    d["_target"] = target  # the resolved tier: "auto" and an explicit tier share when routed alike
    # top-level fields sorted; inside them only ORDER_FREE ones are (not OPT_SORT_KEYS:
    # a schema with properties b, a is another request than a, b for guided decoding).
    # Numbers are normalized in scalars and ORDER_FREE fields only: a schema's or a
    # tool's 2.0 is rendered "2.0" (templates' tojson, grammars), another prompt than 2.
    return orjson.dumps(
        {
            k: _norm_numbers(d[k], True)
            if k in ORDER_FREE or not isinstance(d[k], dict | list)
            else d[k]
            for k in sorted(d)
        }
    )


def cache_key(tenant: str, endpoint: str, body: dict, target: str, whitespace: bool = True) -> str:
    h = hashlib.sha256()
    h.update(tenant.encode())
    h.update(b"\x00")
    h.update(endpoint.encode())
    h.update(b"\x00")
    if endpoint == "chat" and body.get("logprobs") is False:
        # chat's logprobs is a flag: false is what a missing one means
        body = {k: v for k, v in body.items() if k != "logprobs"}
    h.update(normalized_request(body, target, whitespace, ECHOED.get(endpoint, ())))
    return h.hexdigest()


class Backend(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def close(self) -> None: ...


class MemoryCache:
    """LRU with per-entry expiry and entry/byte bounds (single event loop, no locks needed)."""

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.on_evict = on_evict  # called for each live entry dropped for room

    def __len__(self) -> int:
        return len(self._d)

    async def get(self, key: str) -> bytes | None:
        item = self._d.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            self._drop(key)
            return None
        self._d.move_to_end(key)
        return value

    def _drop(self, key: str) -> None:
        _, v = self._d.pop(key)
        self.bytes -= len(v)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._d:
            self._drop(key)
        self._d[key] = (time.monotonic() + ttl_s, value)
        self.bytes += len(value)
        while len(self._d) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._d))
            expired = self._d[oldest][0] < time.monotonic()
            self._drop(oldest)
            if not expired and self.on_evict is not None:
                self.on_evict()

    async def close(self) -> None:
        self._d.clear()
        self.bytes = 0


class BadSignature:
    """What `RedisCache.get` returns for a value whose signature does not verify."""

    def __init__(self, size: int) -> None:
        self.size = size  # the stored value's length, for the warning


MAC_BYTES = 32  # HMAC-SHA256


class RedisUnavailable(Exception):
    """Redis failed recently: calls are skipped until the cool-down ends."""


class RedisKeyError(Exception):
    """Redis answered, with an error about this key or command alone (WRONGTYPE on a
    key someone else wrote, ...): a miss for that key; Redis stays in use."""


# Lua: delete / extend a claim only while it is still ours (it may have expired and
# been taken over by another process meanwhile)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
# the next attempt number of an Idempotency-Key: the counter starts at the record's
# count (SET NX) and each replay takes the next one (INCR), however many run at once
_NEXT_ATTEMPT = (
    "redis.call('set', KEYS[1], ARGV[1], 'nx', 'px', ARGV[2]) return redis.call('incr', KEYS[1])"
)
_REFRESH = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


# what Redis says about a value (its type, a number that is not one): that key only.
# Anything else it refuses (OOM at maxmemory, READONLY after a failover, MISCONF, NOPERM,
# a database index out of range) refuses every write or every call: an outage.
_ONE_KEY_ERRORS = ("WRONGTYPE", "value is not", "not an integer", "not a valid float")


def _about_one_key(exc: Exception) -> bool:
    msg = str(exc)
    return any(m in msg for m in _ONE_KEY_ERRORS)


class RedisCache:
    """Shared cache on Redis: values are the same bytes MemoryCache holds.

    Every call is on the request path, so a Redis that stops answering must cost a
    request little: calls time out after `timeout_s`, and after a connection failure
    or a timeout Redis is skipped for `cooldown_s` (gets miss, sets are dropped:
    requests are served, just without the shared cache and Idempotency-Key records),
    then tried again; the first call that works after that is logged. An error Redis
    answers about one key's value (`RedisKeyError`: its type) concerns that key only:
    no cool-down. A refusal of every write (OOM at maxmemory, READONLY) is an outage.

    Anyone who can write to Redis can otherwise put an answer the shim will serve.
    With `secret`, values are stored as HMAC-SHA256(secret, key, value) + value and a
    value that does not verify is returned as a `BadSignature` (a miss). The key is in
    the MAC, so an entry copied under another key (another tenant's request) does not
    verify either. Idempotency claims (owner tokens, compared by Redis scripts) are
    not signed: a forged one can only make a request wait for its TTL.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "finops:shim:",
        *,
        timeout_s: float = 0.25,
        cooldown_s: float = 5.0,
        secret: bytes | None = None,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError

        self.url = url
        self.shown_url = redacted_url(url)  # for logs and errors: no password
        self.prefix = prefix
        self._secret = secret
        self.cooldown_s = cooldown_s
        self.skip_until = 0.0
        self.down_since = 0.0  # when the current outage began (0: Redis is answering)
        self._response_error = ResponseError
        # A pooled connection to a Redis that restarted fails on its next use: tried once
        # more on a fresh connection, so a restart is not taken for an outage (which
        # skipped Redis for cooldown_s, again and again as each old connection was used,
        # and let Idempotency-Key duplicates run unclaimed meanwhile). Timeouts are not
        # retried: a Redis that does not answer still costs one timeout.
        self._r = aioredis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
        )
        self._release = self._r.register_script(_RELEASE)
        self._refresh = self._r.register_script(_REFRESH)
        self._next_attempt = self._r.register_script(_NEXT_ATTEMPT)

    def _check(self) -> None:
        if self.skip_until and time.monotonic() < self.skip_until:
            raise RedisUnavailable(f"redis {self.shown_url} is skipped after a failure")

    async def _call(self, coro: Any) -> Any:
        try:
            v = await coro
        except self._response_error as exc:
            if _about_one_key(exc):
                raise RedisKeyError(str(exc)) from exc
            self._went_down()
            raise
        except Exception:
            self._went_down()
            raise
        if self.down_since and time.monotonic() >= self.skip_until:
            logger.warning(
                "redis %s answers again after %.1f s out (cache and Idempotency-Key "
                "records are shared again)",
                self.shown_url,
                time.monotonic() - self.down_since,
            )
            self.down_since = 0.0
        return v

    def _went_down(self) -> None:
        # the cool-down runs out on its own: a slow call that succeeds meanwhile must
        # not end it early
        now = time.monotonic()
        self.skip_until = now + self.cooldown_s
        if not self.down_since:
            self.down_since = now

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    def _mac(self, key: str, value: bytes) -> bytes:
        assert self._secret is not None
        m = hmac.new(self._secret, (self.prefix + key).encode(), hashlib.sha256)
        m.update(b"\0")
        m.update(value)
        return m.digest()

    async def get(self, key: str) -> bytes | BadSignature | None:
        self._check()
        v = await self._call(self._r.get(self.prefix + key))
        if v is None or self._secret is None:
            return v
        mac, value = v[:MAC_BYTES], v[MAC_BYTES:]
        if len(v) < MAC_BYTES or not hmac.compare_digest(mac, self._mac(key, value)):
            return BadSignature(len(v))
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._check()
        if self._secret is not None:
            value = self._mac(key, value) + value
        await self._call(self._r.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000))))

    # -- Idempotency-Key claims: one process runs a key at a time --
    async def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        """Take `key` for `owner` unless someone holds it (SET NX PX)."""
        self._check()
        px = max(1, int(ttl_s * 1000))
        return bool(await self._call(self._r.set(self.prefix + key, owner, nx=True, px=px)))

    async def next_attempt(self, key: str, after: int, ttl_s: float) -> int:
        """The next attempt number of a counter that starts at `after` (atomic)."""
        self._check()
        px = max(1, int(ttl_s * 1000))
        return int(await self._call(self._next_attempt(keys=[self.prefix + key], args=[after, px])))

    async def holder(self, key: str) -> bytes | None:
        self._check()
        return await self._call(self._r.get(self.prefix + key))

    async def refresh(self, key: str, owner: str, ttl_s: float) -> bool:
        self._check()
        px = max(1, int(ttl_s * 1000))
        return bool(await self._call(self._refresh(keys=[self.prefix + key], args=[owner, px])))

    async def release(self, key: str, owner: str) -> None:
        self._check()
        await self._call(self._release(keys=[self.prefix + key], args=[owner]))

    async def close(self) -> None:
        await self._r.aclose()


class Coalescer:
    """Identical in-flight requests wait for the first one's result (one upstream call)."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future] = {}

    def join(self, key: str) -> asyncio.Future | None:
        """The leader's future if one is in flight, else None (the caller becomes leader)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def finish(self, key: str, result: Any) -> None:
        """Hand `result` to waiting followers (None: no outcome to share, such as the
        leader's client leaving; the first follower to wake leads in its place)."""
        fut = self._inflight.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def __len__(self) -> int:
        return len(self._inflight)


_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")

# The fields vLLM (0.32) sends as null in a non-streaming answer, so that an answer rebuilt
# from a stream and replayed plain has the shape of one vLLM answered plain.
_CHAT_MESSAGE_NULLS = ("refusal", "annotations", "audio", "function_call", "reasoning")
_CHAT_CHOICE_NULLS = ("logprobs", "stop_reason", "token_ids", "routed_experts")
_TEXT_CHOICE_NULLS = (
    "logprobs",
    "stop_reason",
    "token_ids",
    "prompt_logprobs",
    "prompt_token_ids",
    "routed_experts",
)
_CHAT_RESPONSE_NULLS = (
    "service_tier",
    "system_fingerprint",
    "prompt_logprobs",
    "prompt_token_ids",
    "prompt_text",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
)
_TEXT_RESPONSE_NULLS = (
    "service_tier",
    "system_fingerprint",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
)


def assemble_stream(events: list[dict], operation: str) -> dict | None:
    """Rebuild the non-streaming response object from streamed chunks (for caching).

    Text fields are joined and tool calls merged by index (OpenAI streams a call's
    id and name once, then its arguments in pieces). A stream carrying anything this
    cannot rebuild (logprobs, a legacy `function_call`, malformed chunks) gives None:
    it is not cached rather than replayed wrong. A Responses stream's events are its
    terminal event's `response` (the whole answer already).
    """
    if not events:
        return None
    if operation == "responses":
        r = events[-1]
        return r if responses_replayable(r) else None
    first = events[0]
    choices: dict[int, dict] = {}
    usage = None
    fingerprint = None
    for ev in events:
        if "error" in ev or ev.get("object") == "error":
            return None  # the upstream failed partway: never a complete answer
        if ev.get("usage"):
            usage = ev["usage"]
        if ev.get("system_fingerprint"):  # vLLM sends it on the last chunk
            fingerprint = ev["system_fingerprint"]
        chs = ev.get("choices")
        if not chs:
            continue
        if not isinstance(chs, list):
            return None
        for ch in chs:
            if not isinstance(ch, dict) or ch.get("logprobs") is not None:
                return None
            i = ch.get("index", 0)
            c = choices.get(i)
            if c is None:
                c = choices[i] = {"role": "assistant", "finish_reason": None, "tools": {}}
                c.update((f, []) for f in (*_TEXT_FIELDS, "text"))
            if operation == "chat":
                delta = ch.get("delta") or {}
                if not isinstance(delta, dict):
                    return None
                for k, v in delta.items():
                    if v is None:
                        continue
                    if k == "role":
                        c["role"] = v
                    elif k in _TEXT_FIELDS and isinstance(v, str):
                        c[k].append(v)
                    elif k == "tool_calls" and isinstance(v, list):
                        if not _merge_tool_calls(c["tools"], v):
                            return None
                    else:
                        return None
            elif isinstance(ch.get("text"), str):
                c["text"].append(ch["text"])
            if ch.get("finish_reason"):
                c["finish_reason"] = ch["finish_reason"]
            if ch.get("stop_reason") is not None:
                c["stop_reason"] = ch["stop_reason"]
    out_choices = []
    for i in sorted(choices):
        c = choices[i]
        if not c["finish_reason"]:
            return None  # a choice that never finished is not an answer to replay
        if operation == "chat":
            msg: dict[str, Any] = {"role": c["role"]}
            tools = [c["tools"][k] for k in sorted(c["tools"])]
            # OpenAI's shape: no text beside tool calls is a null content
            text = "".join(c["content"])
            msg["content"] = text if text or not tools else None
            msg.update(dict.fromkeys(_CHAT_MESSAGE_NULLS))
            for f in ("reasoning_content", "reasoning", "refusal"):
                if c[f]:
                    msg[f] = "".join(c[f])
            if tools:
                msg["tool_calls"] = tools
            out = {"index": i, "message": msg, **dict.fromkeys(_CHAT_CHOICE_NULLS)}
        else:
            out = {"index": i, "text": "".join(c["text"]), **dict.fromkeys(_TEXT_CHOICE_NULLS)}
        out["finish_reason"] = c["finish_reason"]
        out["stop_reason"] = c.get("stop_reason")
        out_choices.append(out)
    out_resp = {
        "id": first.get("id"),
        "object": "chat.completion" if operation == "chat" else "text_completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": out_choices,
        **dict.fromkeys(_CHAT_RESPONSE_NULLS if operation == "chat" else _TEXT_RESPONSE_NULLS),
        "usage": usage,
    }
    out_resp["system_fingerprint"] = fingerprint
    return out_resp


def _merge_tool_calls(tools: dict[int, dict], deltas: list) -> bool:
    """Fold streamed tool-call pieces into whole calls by index; False if malformed."""
    for d in deltas:
        if not isinstance(d, dict):
            return False
        k = d.get("index", 0)
        call = tools.get(k)
        if call is None:
            call = tools[k] = {
                "id": None,
                "type": "function",
                "function": {"name": "", "arguments": ""},
            }
        if d.get("id"):
            call["id"] = d["id"]
        if d.get("type"):
            call["type"] = d["type"]
        fn = d.get("function")
        if fn is not None:
            if not isinstance(fn, dict):
                return False
            if isinstance(fn.get("name"), str):
                call["function"]["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["function"]["arguments"] += fn["arguments"]
    return True


def responses_replayable(r: Any) -> bool:
    """A Responses answer `replay_responses` can stream again as vLLM would: finished,
    its output messages of text parts and function calls only (no reasoning items,
    logprobs or other kinds, which it would replay wrong)."""
    if not isinstance(r, dict) or r.get("status") not in ("completed", "incomplete"):
        return False
    out = r.get("output")
    if not isinstance(out, list) or not isinstance(r.get("id"), str):
        return False
    for item in out:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return False
        kind = item.get("type")
        if kind == "function_call":
            if not isinstance(item.get("arguments"), str):
                return False
        elif kind == "message":
            parts = item.get("content")
            if not isinstance(parts, list):
                return False
            for part in parts:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "output_text"
                    and isinstance(part.get("text"), str)
                    and not part.get("logprobs")
                ):
                    return False
        else:
            return False
    return True


def replay_responses(resp: dict) -> list[bytes]:
    """A cached Responses answer as the stream vLLM sends: created, in_progress, each
    output item (added, its text or arguments as one delta, done) and the terminal
    event (vLLM ends with `response.completed` for an incomplete answer too)."""
    out: list[bytes] = []

    def ev(obj: dict) -> None:
        obj["sequence_number"] = len(out)
        out.append(b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n")

    start = {**resp, "status": "in_progress", "output": [], "usage": None}
    start["incomplete_details"] = None
    ev({"type": "response.created", "response": start})
    ev({"type": "response.in_progress", "response": start})
    for i, item in enumerate(resp["output"]):
        iid = item["id"]
        if item["type"] == "function_call":
            ev(
                {
                    "type": "response.output_item.added",
                    "output_index": i,
                    "item": {**item, "arguments": "", "status": "in_progress"},
                }
            )
            base = {"item_id": iid, "output_index": i}
            ev(
                {
                    "type": "response.function_call_arguments.delta",
                    **base,
                    "delta": item["arguments"],
                }
            )
            ev(
                {
                    "type": "response.function_call_arguments.done",
                    **base,
                    "arguments": item["arguments"],
                    "name": item.get("name"),
                }
            )
        else:  # a message of output_text parts
            ev(
                {
                    "type": "response.output_item.added",
                    "output_index": i,
                    "item": {**item, "content": [], "status": "in_progress"},
                }
            )
            for k, part in enumerate(item["content"]):
                base = {"item_id": iid, "output_index": i, "content_index": k}
                empty = {**part, "text": "", "logprobs": []}
                ev({"type": "response.content_part.added", **base, "part": empty})
                ev(
                    {
                        "type": "response.output_text.delta",
                        **base,
                        "delta": part["text"],
                        "logprobs": [],
                    }
                )
                ev(
                    {
                        "type": "response.output_text.done",
                        **base,
                        "text": part["text"],
                        "logprobs": [],
                    }
                )
                ev({"type": "response.content_part.done", **base, "part": part})
        ev({"type": "response.output_item.done", "output_index": i, "item": item})
    ev({"type": "response.completed", "response": resp})
    return out


def replay_as_sse(
    resp: dict, operation: str, include_usage: bool, *, continuous: bool = False
) -> list[bytes]:
    """SSE events for a cached response: role, text, tool calls, finish, optional usage, [DONE]
    (a Responses answer: its typed events, `replay_responses`).

    `continuous` (vLLM's `continuous_usage_stats`, with include_usage) puts usage on every
    chunk as vLLM does, the completion tokens so far: none on the role chunk, all of
    them once the text is out.
    """
    if operation == "responses":
        return replay_responses(resp)
    base = {"id": resp.get("id"), "created": resp.get("created"), "model": resp.get("model")}
    if resp.get("system_fingerprint"):
        base["system_fingerprint"] = resp["system_fingerprint"]
    out: list[bytes] = []
    obj = "chat.completion.chunk" if operation == "chat" else "text_completion"
    usage = resp.get("usage") if include_usage and continuous else None
    if not isinstance(usage, dict):
        usage = None
    start = None
    if usage is not None:
        prompt = usage.get("prompt_tokens") or 0
        start = {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0}
    for ch in resp.get("choices") or ():
        i = ch.get("index", 0)
        if operation == "chat":
            msg = ch.get("message") or {}
            chunks = [
                {
                    "index": i,
                    "delta": {"role": msg.get("role", "assistant"), "content": ""},
                    "finish_reason": None,
                }
            ]
            for f in ("reasoning_content", "reasoning", "refusal"):
                if msg.get(f):
                    chunks.append({"index": i, "delta": {f: msg[f]}, "finish_reason": None})
            if msg.get("content") or not msg.get("tool_calls"):
                chunks.append(
                    {
                        "index": i,
                        "delta": {"content": msg.get("content") or ""},
                        "finish_reason": None,
                    }
                )
            for k, call in enumerate(msg.get("tool_calls") or ()):
                chunks.append(
                    {
                        "index": i,
                        "delta": {"tool_calls": [{"index": k, **call}]},
                        "finish_reason": None,
                    }
                )
            chunks.append({"index": i, "delta": {}, "finish_reason": ch.get("finish_reason")})
            for c in chunks:
                c["logprobs"] = None  # as OpenAI and vLLM send it on every chat chunk
        else:
            chunks = [
                {"index": i, "text": ch.get("text") or "", "finish_reason": None, "logprobs": None},
                {
                    "index": i,
                    "text": "",
                    "finish_reason": ch.get("finish_reason"),
                    "logprobs": None,
                },
            ]
        if "stop_reason" in ch:  # vLLM's: the stop string or token that ended it
            chunks[-1]["stop_reason"] = ch["stop_reason"]
        for k, c in enumerate(chunks):
            ev = {**base, "object": obj, "choices": [c]}
            if usage is not None:
                ev["usage"] = usage if k or operation != "chat" else start
            out.append(b"data: " + orjson.dumps(ev) + b"\n\n")
    if include_usage and resp.get("usage"):
        out.append(
            b"data: "
            + orjson.dumps({**base, "object": obj, "choices": [], "usage": resp["usage"]})
            + b"\n\n"
        )
    out.append(b"data: [DONE]\n\n")
    return out
