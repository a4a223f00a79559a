"""/v1/responses: OpenAI's Responses API (`client.responses.create`, the Agents SDK's
default), proxied to vLLM's own /v1/responses.

A `ProxyEndpoint` with the same auth, tenant, feature header, model resolution (the
routing alias classified by the router, other names by the explicit policy), fallback
before the first byte (streaming too), client-disconnect cancel and one request-log
record per request (operation `responses`). What differs from chat:

- `model: "auto"` is routed on a chat-shaped view of the request (`as_chat_body`:
  `instructions` as a system message, `input` as the turns), which is also what the
  record's prompt fields (`turn_count`, `prompt_tokens_est`, fingerprint, text) are
  computed from;
- nothing is injected upstream (a Responses stream reports its usage in its terminal
  event, `response.completed` / `response.incomplete` / `response.failed`) and nothing is
  stripped: the events (`event:` line, then `data:`) are forwarded verbatim;
- usage is `input_tokens` / `output_tokens` (`input_tokens_details.cached_tokens`);
- a stream has no `data: [DONE]`: its terminal event ends it (the client's response is
  ended there, without waiting for the upstream's body end), and a stream that ends
  without one is incomplete (502 `upstream_stream_error`); a stream the shim has to cut
  after the first byte ends with an `event: error` in the Responses shape;
- context caps apply as for chat, counted on the chat-shaped view (`_cap`);
- the response cache and coalescing as for chat, for deterministic requests (not
  background ones, nor those asking for logprobs): an answer is cached when a replay
  can rebuild its stream (text messages and function calls: `responses_replayable`),
  and streamed and plain requests replay each other (`replay_responses`); a hit keeps
  the original response id, so follow-ups on it still reach its replica;
- an `Idempotency-Key` is honoured as for chat (`ProxyEndpoint._idempotent`): a retry
  with the key replays the first answer (a stream as the client got it), logged as a
  retry and not billed again; a concurrent duplicate waits for the first;
- stored responses (stored.py): each answer's id is indexed with its tenant and the
  replica that answered; a follow-up (`previous_response_id`) goes to that replica only
  (no routing, no fallback to a server without it) and only for that tenant (404
  otherwise, as vLLM says for an unknown id). `StoredResponseEndpoint` forwards
  retrieve, cancel, delete and input_items calls the same way; those are not inference
  and write no request-log record (counted in finops_shim_stored_response_calls).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from finops.router.features import estimate_prompt_tokens
from finops.shim.auth import AuthError, authorization, tenant_for
from finops.shim.cache import responses_replayable
from finops.shim.caps import TEXT_PART_TYPES, applicable_cap, estimate_body_tokens
from finops.shim.proxy import (
    ClientGone,
    Ctx,
    DisconnectWatch,
    HTTPError,
    ProxyEndpoint,
    _body_and_model,
    _fingerprint_prompt,
    _json_object,
    _prompt_text,
    _resolve,
    _route,
    _send_simple,
    _stream_flag,
    error_body,
    read_body,
    sse_json,
)
from finops.shim.stored import StoredResponse
from finops.shim.upstreams import Upstream

# the events that end a Responses stream (each carries the final `response`, usage included)
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _item_text(content: Any) -> str | None:
    """The text of an input item's `content`: a string, or the `text` of its parts
    (`input_text`, `output_text`, `text`); None when it has none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return " ".join(texts) if texts else None
    return None


def _chat_part(part: dict) -> dict:
    """A Responses media part as chat's: an `input_image` by URL is chat's `image_url`
    (what vLLM's /tokenize reads); other kinds (files, audio, an image by file id) are
    kept as they are, which /tokenize refuses and the estimate counts as media."""
    url = part.get("image_url")
    if part.get("type") == "input_image" and isinstance(url, str):
        image = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    return part


def _item_content(content: Any) -> str | list | None:
    """An input item's content for the chat view: its text, and beside it (as chat parts)
    any images, files or audio it carries, so that caps count them as they count a chat
    request's (text alone let any number of images past a cap)."""
    text = _item_text(content)
    if not isinstance(content, list):
        return text
    media = [
        _chat_part(p)
        for p in content
        if isinstance(p, dict) and p.get("type") not in TEXT_PART_TYPES
    ]
    if not media:
        return text
    return ([{"type": "text", "text": text}] if text else []) + media


def as_chat_body(body: dict, sources: list[int] | None = None) -> dict:
    """A chat-shaped view of a Responses request, for the router, the record and caps.

    `instructions` becomes a system message; `input` (a string, or a list of items) the
    turns: a message item keeps its role and the text of its content (with its media
    parts, as chat parts, when it has any), a tool call's
    output is a `tool` turn, and other items (function calls, reasoning) are assistant
    turns with what text they carry. `tools` are kept (the router looks at whether there
    are any). `sources`, if given, gets each message's index in `input` (-1: not an
    item), so a truncation of the view maps back to items.
    """
    msgs: list[dict] = []
    src: list[int] = sources if sources is not None else []
    ins = body.get("instructions")
    if isinstance(ins, str) and ins:
        msgs.append({"role": "system", "content": ins})
        src.append(-1)
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
        src.append(-1)
    elif isinstance(inp, list):
        for j, item in enumerate(inp):
            if isinstance(item, str):
                msgs.append({"role": "user", "content": item})
                src.append(j)
                continue
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            role = item.get("role")
            text: str | list | None
            if isinstance(role, str):
                text = _item_content(item.get("content"))
            elif kind == "function_call_output":
                role = "tool"
                text = _item_text(item.get("output"))
            else:
                role = "assistant"
                # a call's arguments; a reasoning item's summary and its reasoning text
                texts = [_item_text(item.get(k)) for k in ("arguments", "summary", "content")]
                text = " ".join(t for t in texts if t)
            msgs.append({"role": role, "content": text or ""})
            src.append(j)
    chat: dict[str, Any] = {"messages": msgs}
    if body.get("tools"):
        chat["tools"] = body["tools"]
    return chat


class ResponsesEndpoint(ProxyEndpoint):
    """ASGI app for /v1/responses (operation `responses`); see the module docstring.

    Reuses ProxyEndpoint's request handling (`__call__`: auth, body, error answers,
    the record), its upstream attempts and fallback (`_forward`), its full and
    streamed responses; overrides the request step (`_handle`), the upstream payload,
    usage, the stream's event reading and how a cut stream ends.
    """

    stream_end = "a terminal event (response.completed)"
    USAGE_FIELDS = ("input_tokens", "output_tokens", "input_tokens_details")

    def __init__(self, shim: Any) -> None:
        super().__init__(shim, "responses")
        self.endpoint = "responses"
        self.path = "/v1/responses"

    async def _handle(
        self, ctx: Ctx, raw: bytes, feature: str, idem: str | None, receive: Any, send: Any
    ) -> None:
        shim = self.shim
        cfg = shim.cfg
        rec = ctx.rec
        ctx.feature = feature
        body, model = _body_and_model(raw, rec)
        ctx.body = body  # (the cap step may change it)
        if "request_id" in body:
            # vLLM makes it the response's id: a client-chosen id could overwrite another
            # tenant's stored response on a shared replica
            raise HTTPError(
                400,
                "`request_id` is not accepted through the shim: response ids are the "
                "server's. Send an `X-Request-Id` header to trace a request.",
                "invalid_request_error",
                "request_id_not_allowed",
                param="request_id",
            )
        ctx.stream = rec["stream"] = _stream_flag(body)
        # the client's stream carries its own usage (in its terminal event): the shim
        # asks for nothing more and strips nothing
        ctx.include_usage = True
        chat = as_chat_body(body)
        rec["turn_count"] = sum(1 for m in chat["messages"] if m["role"] == "user")
        rec["has_tools"] = bool(body.get("tools"))
        rec["prompt_tokens_est"] = estimate_prompt_tokens(chat)
        rec["prompt_fingerprint"] = _fingerprint_prompt(chat)
        if cfg.log_prompts:
            rec["prompt_text"] = _prompt_text(chat)
        # the input tokens a record reports when vLLM gave no usage (a client that left),
        # and what a fallback tier's cap is checked against when no cap step counted
        ctx.input_count = estimate_body_tokens(chat)

        tier = _resolve(shim, model)
        prev = body.get("previous_response_id")

        async def answer() -> tuple[dict, bytes] | None:
            t = tier
            if prev is not None:
                # a follow-up: only the replica that stored `prev` has it (and only its
                # tenant may use it)
                t = await self._pin(ctx, prev, t)
            routed = prev is None and t == "@route"
            if routed:
                t = _route(ctx, shim.router, chat, feature)  # on the chat-shaped view
            ctx.tier = t
            if shim.cfg.caps:  # (may move a routed request up a tier: ctx.tier)
                ctx.body = await self._cap(ctx, body, t, feature, routed=routed)
            else:
                ctx.body = body
            if _cacheable(ctx.body):  # deterministic ones only: checked there, as for chat
                return await self._cached_or_forward(ctx, ctx.body, ctx.tier, send, receive)
            rec["cache_status"] = "bypass"
            shim.metrics.cache.labels("bypass").inc()
            return await self._forward(ctx, send, receive, None)

        if idem:  # as for chat: a retry with the key replays the answer, not billed again
            await self._idempotent(ctx, raw, idem, receive, send, answer)
        else:
            await answer()

    async def _pin(self, ctx: Ctx, prev: Any, tier: str) -> str:
        """Pin a follow-up to the replica holding `prev`; the tier it goes to.

        The routing alias takes the tier that answered `prev` (no classification: the
        conversation lives on that server); an explicit name must be a tier that
        replica serves.
        """
        shim = self.shim
        if not isinstance(prev, str) or not prev:
            raise HTTPError(
                400,
                "`previous_response_id` must be a non-empty string.",
                "invalid_request_error",
                "invalid_previous_response_id",
                param="previous_response_id",
            )
        entry = await shim.find_response(prev, ctx.rec["tenant"])
        if entry is None:
            raise HTTPError(
                404,
                f"Response with id '{prev}' not found.",
                "invalid_request_error",
                "previous_response_not_found",
                param="previous_response_id",
            )
        served = [u.tier for u in shim.pool.all() if u.url == entry.upstream]
        if not served:
            raise _gone(prev, entry, "previous_response_id")
        if tier == "@route":
            tier = entry.tier if entry.tier in served else served[0]
        elif tier not in served:
            raise HTTPError(
                400,
                f"Response '{prev}' is stored on the replica of tier `{entry.tier}`; a "
                f"follow-up can only go there: use model `{shim.cfg.alias}` or one of "
                f"{sorted(set(served))}.",
                "invalid_request_error",
                "previous_response_elsewhere",
                param="model",
            )
        ctx.pin = entry.upstream
        return tier

    def _finish(self, ctx: Ctx) -> None:
        super()._finish(ctx)  # (fills in the status of a request the client left)
        if ctx.body.get("previous_response_id") is not None:
            # a follow-up, by how it ended (not by whether it could be pinned)
            status = str(ctx.rec["status_code"])
            self.shim.metrics.stored_response_calls.labels("follow_up", status).inc()

    def _remember(self, ctx: Ctx, response: Any) -> Any:
        """Index a stored answer's id (the request's `store`, on unless false); the shared
        store's write, if there is one to wait for."""
        if ctx.body.get("store", True) is False or not isinstance(response, dict):
            return None
        rid = response.get("id")
        rec = ctx.rec
        if isinstance(rid, str) and rid and rec["upstream"] and rec["tier"]:
            return self.shim.remember_response(
                rid, StoredResponse(rec["tenant"], rec["tier"], rec["upstream"])
            )
        return None

    # -- upstream --
    def _upstream_payload(self, ctx: Ctx, up: Upstream) -> bytes:
        # the tier's model name only: the Responses API has no stream_options
        return orjson.dumps({**ctx.body, "model": up.model})

    async def _cap(
        self, ctx: Ctx, body: dict, tier: str, feature: str, *, routed: bool = False
    ) -> dict:
        """The context cap that applies, counted on the chat-shaped view (what the
        request sends: a stored conversation it continues is not counted); the body to
        send. `truncate` drops the oldest turns' input items (a tool call with its
        output), never `instructions` or the last turn. A `routed` request over its
        tier's cap goes up a tier that takes it whole, as for chat (`ctx.tier`)."""
        shim = self.shim
        rec = ctx.rec
        rule = applicable_cap(shim.cfg.caps, tier, feature, rec["tenant"])
        if rule is None:
            return body
        sources: list[int] = []
        chat = as_chat_body(body, sources)
        if routed:
            tier, rule = await self._fit_routed(ctx, tier, rule, feature, chat)
            ctx.tier = tier
            if rule is None:
                return body
        out = await self._apply_cap(ctx, rule, tier, chat, "input")
        if not out.truncated_tokens:
            return body
        kept = {id(m) for m in out.body["messages"]}
        drop = {
            j
            for m, j in zip(chat["messages"], sources, strict=True)
            if id(m) not in kept and j >= 0
        }
        if body.get("previous_response_id") is not None:
            # items before the first user message answer the stored response (a tool
            # call's output): without them the conversation is broken, so it is a reject
            first_user = next(
                (j for m, j in zip(chat["messages"], sources, strict=True) if m["role"] == "user"),
                None,
            )
            if any(first_user is None or j < first_user for j in drop):
                shim.metrics.cap_rejections.labels(tier).inc()
                rec["input_tokens"] = out.input_tokens + out.truncated_tokens
                raise HTTPError(
                    400,
                    f"This request has {out.input_tokens + out.truncated_tokens} input tokens; "
                    f"the cap for it is {rule.max_input_tokens} (tier {rule.tier}, feature "
                    f"{rule.feature}, tenant {rule.tenant}) and fitting it would drop the items "
                    "that answer `previous_response_id`: shorten the input.",
                    "invalid_request_error",
                    "context_length_exceeded",
                    param="input",
                )
        rec["truncated_tokens"] = out.truncated_tokens
        shim.metrics.truncated_tokens.labels(tier).inc(out.truncated_tokens)
        return {**body, "input": [it for j, it in enumerate(body["input"]) if j not in drop]}

    # -- answers --
    async def _respond_full(
        self, ctx: Ctx, up: Upstream, resp: Any, data: bytes, send: Any, store_key: str | None
    ) -> tuple[dict, bytes] | None:
        replayable = True
        if resp.status == 200 and ctx.answer is not None:
            write = self._remember(ctx, ctx.answer)
            if write is not None:  # in the shared store before the client has the id
                await write
            ctx.rec["finish_reason"] = _finish_reason(ctx.answer)  # also into the cache's meta
            replayable = responses_replayable(ctx.answer)
            if not replayable:
                store_key = None  # a cache hit could not stream it back as vLLM would
        out = await super()._respond_full(ctx, up, resp, data, send, store_key)
        if not replayable:
            # nor can a coalesced follower that asked for a stream have it: followers run
            # on their own (the answer still goes to an Idempotency-Key record)
            ctx.result = None
        return out

    async def _respond_cached(
        self, ctx: Ctx, meta: dict, payload: bytes, send: Any, *, fresh_id: bool = False
    ) -> bytes:
        # (fresh_id is not used: a Responses answer's id names the stored response, which
        # a hit's follow-ups continue)
        if not meta.get("sse"):
            # the id is indexed again (for as long as the index keeps ids): a hit's
            # follow-ups must find the replica even after the index let the id go
            ctx.rec["tier"] = meta.get("tier")
            ctx.rec["upstream"] = meta.get("upstream")
            write = self._remember(ctx, _json_object(payload))
            if write is not None:
                await write
        return await super()._respond_cached(ctx, meta, payload, send)

    def _inspect_event(
        self, ev: bytes, state: dict, strip_usage: bool, collect: list | None, ctx: Ctx
    ) -> bool:
        """Read one Responses event (`event:` and `data:` lines); always forwarded."""
        obj = sse_json(ev)
        if not isinstance(obj, dict):
            return True
        seq = obj.get("sequence_number")
        if isinstance(seq, int):
            state["seq"] = seq
        kind = obj.get("type")
        if not isinstance(kind, str):
            if "error" in obj:  # an error object without a type (vLLM's chat-style one)
                err = obj["error"]
                state["error"] = err if isinstance(err, dict) else {"message": str(err)}
                state["done"] = True
            return True
        if kind.endswith(".delta"):
            # text, reasoning or tool-call arguments: about one token each (vLLM holds a
            # token that ends mid-UTF-8 character back), the partial count of a cut stream
            state["content_chunks"] += 1
            if state["first_token"] is None:
                state["first_token"] = time.perf_counter()
            return True
        if kind in TERMINAL:
            state["done"] = True
            r = obj.get("response")
            if isinstance(r, dict):
                rec = ctx.rec
                if collect is not None:  # the whole answer, for the cache
                    collect.append(r)
                if r.get("usage"):
                    state["usage"] = r["usage"]
                if rec["response_model"] is None:
                    rec["response_model"] = r.get("model")
                rec["finish_reason"] = _finish_reason(r)
                if kind == "response.failed":
                    e = r.get("error")
                    state["error"] = e if isinstance(e, dict) else {"message": "response.failed"}
            elif kind == "response.failed":
                state["error"] = {"message": "response.failed"}
            return True
        if kind == "error":
            # the Responses API's in-band error (vLLM ends its stream after it): passed on
            # as sent, and the request is a failure
            state["error"] = obj
            state["done"] = True
            return True
        if kind == "response.created":
            r = obj.get("response")
            if isinstance(r, dict):
                if ctx.rec["response_model"] is None:
                    ctx.rec["response_model"] = r.get("model")
                self._remember(ctx, r)  # before the event (the id) reaches the client
        return True

    def _stream_error_end(self, state: dict, err: bytes) -> bytes:
        """A cut stream ends with the Responses API's `error` event (no [DONE] there)."""
        e = orjson.loads(err).get("error") or {}
        seq = state.get("seq")
        ev = {
            "type": "error",
            "code": e.get("code"),
            "message": e.get("message"),
            "param": None,
            "sequence_number": seq + 1 if isinstance(seq, int) else 0,
        }
        return b"event: error\ndata: " + orjson.dumps(ev) + b"\n\n"


def _cacheable(body: dict) -> bool:
    """May go through the response cache (which takes deterministic requests only): not
    a background request (its answer is a placeholder) nor one asking for logprobs."""
    if body.get("background"):
        return False
    inc = body.get("include")
    return not (isinstance(inc, list) and any("logprobs" in str(x) for x in inc))


def _finish_reason(r: dict) -> Any:
    """A Responses answer's finish, for the record: why it is incomplete
    (`max_output_tokens`, ...), else its status (`completed`, `failed`)."""
    det = r.get("incomplete_details")
    if isinstance(det, dict) and det.get("reason"):
        return det["reason"]
    return r.get("status")


def _gone(rid: str, entry: StoredResponse, param: str) -> HTTPError:
    return HTTPError(
        404,
        f"Response '{rid}' was stored on replica {entry.upstream}, which the shim no "
        "longer has in its config.",
        "invalid_request_error",
        "response_replica_removed",
        param=param,
    )


# (method, path after the id) -> operation; vLLM serves retrieve and cancel, the others
# are OpenAI's and forwarded all the same (an upstream without them answers 404/405)
STORED_OPS = {
    ("GET", ""): "retrieve",
    ("DELETE", ""): "delete",
    ("POST", "/cancel"): "cancel",
    ("GET", "/input_items"): "input_items",
}
PREFIX = "/v1/responses/"


class StoredResponseEndpoint:
    """`/v1/responses/{id}` (GET, DELETE), `.../cancel` (POST), `.../input_items` (GET).

    Forwarded to the replica that stored the response, for the tenant that made it: an
    id unknown here or another tenant's is a 404, in vLLM's words for an unknown id.
    The query string is passed on (a background response's `?stream=true` replays its
    events: the answer is streamed through as it comes). No request-log record (no
    inference); counted in finops_shim_stored_response_calls.
    """

    def __init__(self, shim: Any) -> None:
        self.shim = shim

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        shim = self.shim
        rid, _, tail = scope["path"][len(PREFIX) :].partition("/")
        tail = "/" + tail.rstrip("/") if tail.rstrip("/") else ""
        op = STORED_OPS.get((scope["method"], tail))
        status = 500
        self_time = _SelfTime()
        up: Upstream | None = None
        try:
            if op is None or not rid:
                allowed = [m for (m, t) in STORED_OPS if t == tail]
                if rid and allowed:
                    exc = HTTPError(
                        405,
                        f"Method {scope['method']} is not allowed on `{scope['path'][:200]}`.",
                        "invalid_request_error",
                        "method_not_allowed",
                    )
                    exc.headers.append((b"allow", ", ".join(allowed).encode()))
                    raise exc
                raise HTTPError(
                    404,
                    f"Unknown path `{scope['path'][:200]}`. Stored responses are at "
                    "/v1/responses/{id} (GET, DELETE), /v1/responses/{id}/cancel (POST) "
                    "and /v1/responses/{id}/input_items (GET).",
                    "invalid_request_error",
                    "not_found",
                )
            auth = authorization(scope["headers"])
            declared = None
            for k, v in scope["headers"]:
                if k == b"content-length" and v.isdigit():
                    declared = int(v)
            cfg = shim.cfg
            try:
                tenant = tenant_for(auth, cfg.api_keys, cfg.default_tenant)
            except AuthError as e:
                raise HTTPError(
                    401, e.message, "invalid_request_error", "invalid_api_key"
                ) from None
            body = await read_body(receive, cfg.max_body_bytes, cfg.body_timeout_s, declared)
            entry = await shim.find_response(rid, tenant)
            if entry is None:
                raise HTTPError(
                    404,
                    f"Response with id '{rid}' not found.",
                    "invalid_request_error",
                    "response_not_found",
                    param="response_id",
                )
            reps = [u for u in shim.pool.all() if u.url == entry.upstream]
            if not reps:
                raise _gone(rid, entry, "response_id")
            up = next((u for u in reps if u.tier == entry.tier), reps[0])
            # a client that leaves (a long event replay) closes the upstream call
            watch = DisconnectWatch(receive)
            status = await watch.run(self._forward(scope, up, tail, rid, body, send, self_time))
            if op == "delete" and status == 200:
                shim.forget_response(rid)
        except HTTPError as exc:
            status = exc.status
            headers = [*exc.headers]
            if up is not None:  # the call reached a replica: the shim's headers, as on answers
                headers += self._headers(up, None, self_time.ms())
            await _send_simple(send, exc.status, exc.body, headers)
        except ClientGone:
            status = 499
        except Exception:  # a bug must still answer (if nothing was sent) and be logged
            shim.logger.exception("unexpected error in %s", scope["path"][:200])
            status = 500
            with contextlib.suppress(Exception):
                body = error_body(
                    "Internal error in the finops shim.", "server_error", "internal_error"
                )
                await _send_simple(send, 500, body, [])
        finally:
            shim.metrics.stored_response_calls.labels(op or "other", str(status)).inc()

    @staticmethod
    def _headers(up: Upstream, resp: Any, overhead_ms: float) -> list[tuple[bytes, bytes]]:
        """The shim's headers, and what the replica says about its answer (a 405's
        methods, a 503's wait)."""
        return [
            (b"x-finops-tier", up.tier.encode()),
            (b"x-finops-cache", b"bypass"),
            (b"x-finops-overhead-ms", f"{overhead_ms:.3f}".encode()),
            *(
                (k.encode(), resp.headers[k].encode("latin-1"))
                for k in ("allow", "retry-after")
                if resp is not None and k in resp.headers
            ),
        ]

    async def _forward(
        self,
        scope: dict,
        up: Upstream,
        tail: str,
        rid: str,
        body: bytes,
        send: Any,
        self_time: _SelfTime,
    ) -> int:
        """Send the call to `up` and stream its answer back; the status."""
        shim = self.shim
        url = up.url + PREFIX + quote(rid, safe="") + tail
        qs = scope.get("query_string", b"")
        if qs:
            url += "?" + qs.decode("latin-1")
        headers = {"accept-encoding": "identity"}
        if body:
            headers["content-type"] = "application/json"
        if up.api_key:
            headers["authorization"] = f"Bearer {up.api_key}"
        client = shim.client
        req = client.build_request(scope["method"], url, content=body or None, headers=headers)
        t_send = time.perf_counter()
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            self_time.waited += time.perf_counter() - t_send
            shim.logger.warning("stored response %s: %s did not answer: %r", rid, up.url, exc)
            raise HTTPError(
                502,
                f"The replica that stored response '{rid}' ({shim.pool.public(up.url)}) did "
                f"not answer: {type(exc).__name__}",
                "server_error",
                "upstream_connect",
            ) from None
        self_time.waited += time.perf_counter() - t_send
        try:
            if resp.status_code in (404, 405) and "json" in resp.headers.get("content-type", ""):
                # the replica's web framework refusing a route it does not serve (vLLM has
                # no DELETE or input_items), not an OpenAI-shaped answer: say so in one
                try:
                    data = await resp.aread()
                except httpx.HTTPError as exc:
                    shim.logger.warning("stored response %s: %s cut: %r", rid, up.url, exc)
                    raise HTTPError(
                        502,
                        f"The replica that stored response '{rid}' "
                        f"({shim.pool.public(up.url)}) cut its {resp.status_code} answer: "
                        f"{type(exc).__name__}",
                        "server_error",
                        "upstream_disconnect",
                    ) from None
                got = _json_object(data)
                if got is not None and "error" not in got:
                    raise _unsupported(
                        scope, shim.pool.public(up.url), resp.status_code, got, resp.headers
                    )
                await _send_simple(
                    send, resp.status_code, data, self._headers(up, resp, self_time.ms())
                )
                return resp.status_code
            start = {
                "type": "http.response.start",
                "status": resp.status_code,
                "headers": [
                    (
                        b"content-type",
                        resp.headers.get("content-type", "application/json").encode(),
                    ),
                    *self._headers(up, resp, self_time.ms()),
                ],
            }
            if "content-length" in resp.headers:  # raw bytes are passed: the same length
                start["headers"].append(
                    (b"content-length", resp.headers["content-length"].encode("latin-1"))
                )
            await send(start)
            try:
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                # mid-answer: nothing clean can be added; the client sees the body end early
                # (short of its length, when the replica gave one: the server then closes)
                shim.logger.warning("stored response %s from %s cut: %s", rid, up.url, exc)
                with contextlib.suppress(RuntimeError):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return 502
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return resp.status_code
        finally:
            await resp.aclose()


class _SelfTime:
    """A stored-response call's own time in the shim: since it came, less the replica's."""

    __slots__ = ("t0", "waited")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.waited = 0.0

    def ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.t0 - self.waited) * 1000.0)


def _unsupported(scope: dict, replica: str, status: int, got: dict, headers: Any) -> HTTPError:
    """An OpenAI-shaped error for a route the replica does not serve (FastAPI's
    `{"detail": ...}`), naming it; its `Allow` is kept."""
    detail = got.get("detail")
    exc = HTTPError(
        status,
        f"The replica that stored this response ({replica}) does not serve "
        f"{scope['method']} {scope['path'][:200]} (it answered {status}: {detail!r}); vLLM "
        "serves GET /v1/responses/{id} and POST /v1/responses/{id}/cancel.",
        "invalid_request_error",
        "unsupported_by_upstream",
    )
    if "allow" in headers:
        exc.headers.append((b"allow", headers["allow"].encode("latin-1")))
    return exc
