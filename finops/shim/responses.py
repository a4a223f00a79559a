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
- no response cache, no coalescing, no Idempotency-Key replay (the header is not
  honoured, as vLLM does not honour it) and no context caps: every record says
  `cache_status` "bypass".
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from finops.router.features import estimate_prompt_tokens
from finops.shim.caps import estimate_body_tokens
from finops.shim.proxy import (
    Ctx,
    ProxyEndpoint,
    _body_and_model,
    _fingerprint_prompt,
    _prompt_text,
    _resolve,
    _route,
    _stream_flag,
    sse_json,
)
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


def as_chat_body(body: dict) -> dict:
    """A chat-shaped view of a Responses request, for the router and the record.

    `instructions` becomes a system message; `input` (a string, or a list of items) the
    turns: a message item keeps its role and the text of its content, a tool call's
    output is a `tool` turn, and other items (function calls, reasoning) are assistant
    turns with what text they carry. `tools` are kept (the router looks at whether there
    are any).
    """
    msgs: list[dict] = []
    ins = body.get("instructions")
    if isinstance(ins, str) and ins:
        msgs.append({"role": "system", "content": ins})
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        for item in inp:
            if isinstance(item, str):
                msgs.append({"role": "user", "content": item})
                continue
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            role = item.get("role")
            if isinstance(role, str):
                text = _item_text(item.get("content"))
            elif kind == "function_call_output":
                role = "tool"
                text = _item_text(item.get("output"))
            else:
                role = "assistant"
                text = _item_text(item.get("arguments")) or _item_text(item.get("summary"))
            msgs.append({"role": role, "content": text or ""})
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
        # the input tokens a record reports when vLLM gave no usage (a client that left)
        ctx.input_count = estimate_body_tokens(chat)

        tier = _resolve(shim, model)
        if tier == "@route":
            tier = _route(ctx, shim.router, chat, feature)  # on the chat-shaped view
        ctx.tier = tier
        ctx.body = body
        rec["cache_status"] = "bypass"
        shim.metrics.cache.labels("bypass").inc()
        await self._forward(ctx, send, receive, None)

    # -- upstream --
    def _upstream_payload(self, ctx: Ctx, up: Upstream) -> bytes:
        # the tier's model name only: the Responses API has no stream_options
        return orjson.dumps({**ctx.body, "model": up.model})

    async def _over_cap(self, ctx: Ctx, up: Upstream) -> bool:
        return False  # context caps are not applied to Responses requests

    # -- answers --
    async def _respond_full(
        self, ctx: Ctx, up: Upstream, resp: Any, data: bytes, send: Any, store_key: str | None
    ) -> tuple[dict, bytes] | None:
        out = await super()._respond_full(ctx, up, resp, data, send, store_key)
        if resp.status == 200 and ctx.answer is not None:
            ctx.rec["finish_reason"] = _finish_reason(ctx.answer)
        return out

    def _usage_into(self, rec: dict, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        rec["input_tokens"] = usage.get("input_tokens")
        rec["output_tokens"] = usage.get("output_tokens")
        det = usage.get("input_tokens_details")
        cached = det.get("cached_tokens") if isinstance(det, dict) else None
        rec["cached_input_tokens"] = cached if cached is not None else 0

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
        if kind == "response.created" and ctx.rec["response_model"] is None:
            r = obj.get("response")
            if isinstance(r, dict):
                ctx.rec["response_model"] = r.get("model")
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


def _finish_reason(r: dict) -> Any:
    """A Responses answer's finish, for the record: why it is incomplete
    (`max_output_tokens`, ...), else its status (`completed`, `failed`)."""
    det = r.get("incomplete_details")
    if isinstance(det, dict) and det.get("reason"):
        return det["reason"]
    return r.get("status")
