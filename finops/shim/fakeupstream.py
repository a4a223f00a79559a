"""A canned OpenAI-compatible upstream on loopback, for benchmarks and failure tests.

It answers `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/responses`, `/tokenize` and `/health` in vLLM's shapes (usage included, one token per
SSE chunk, a usage-only chunk when `stream_options.include_usage` is set)
with almost no work of its own, so that measuring the shim against it shows
the shim's cost. `mode` makes it misbehave on purpose:

- ``ok``: answer normally (``tokens`` output tokens, ``delay_s`` between chunks);
- ``error500``: answer 500 with an OpenAI error body;
- ``rate_limited``: answer 429 with ``Retry-After: 7``;
- ``hang``: accept the request and never answer;
- ``die_mid_stream``: stream ``die_after`` chunks, then drop the connection;
- ``error_mid_stream``: stream ``die_after`` chunks, then an error event (code
  ``error_code``, 500 by default) and ``[DONE]``, as vLLM reports a failure inside a
  stream;
- ``slow``: like ok with ``delay_s`` between chunks (for disconnect tests).

``tool_calls=True`` answers chat requests with a tool call instead of text (streamed
as OpenAI and vLLM do: id and name first, the arguments in pieces); ``crlf=True``
ends SSE lines with CRLF, as servers built on sse-starlette do; ``tokenize_fails=True``
answers /tokenize with a 500. A non-streaming
answer with ``delay_s`` watches for the client leaving, as vLLM does.

It counts calls, completed answers and the client disconnects it saw.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson

TOOL_CALL = {
    "id": "call_fake1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
}


FINGERPRINT = "fake-0.1"  # system_fingerprint, on a stream's last chunk as vLLM sends it


class FakeUpstream:
    def __init__(
        self,
        mode: str = "ok",
        *,
        tokens: int = 8,
        delay_s: float = 0.0,
        die_after: int = 2,
        name: str = "fake",
        empty_every: int = 0,
        linger_s: float = 0.0,
        tool_calls: bool = False,
        crlf: bool = False,
        tokenize_fails: bool = False,
        error_code: int = 500,
        max_model_len: int = 4096,
        store_responses: bool = False,
        reasoning: bool = False,
    ) -> None:
        self.mode = mode
        # as vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1: Responses answers get their own
        # ids and are kept (`store`, default true) for retrieval and follow-ups
        self.store_responses = store_responses
        # Responses answers start with a reasoning item (a reasoning model's), in full
        # answers and a stream's terminal event (no reasoning events are streamed)
        self.reasoning = reasoning
        self.stored: dict[str, dict] = {}
        self.stored_calls: list[tuple[str, str]] = []  # (method, path) of retrieve/cancel/...
        self.max_model_len = max_model_len
        self.error_code = error_code
        self.tokenize_fails = tokenize_fails
        self.tokenize_calls = 0
        self.tokens = tokens
        self.delay_s = delay_s
        self.die_after = die_after
        self.name = name
        # every n-th streamed token has empty text, as vLLM sends a token that ends
        # mid-UTF-8 character: usage must count chunks, not text
        self.empty_every = empty_every
        # hold the end of a streamed body this long after [DONE] (the chunked terminator
        # comes late): the shim must end its own response at [DONE], not wait for it
        self.linger_s = linger_s
        self.tool_calls = tool_calls
        self.crlf = crlf
        self.calls = 0
        self.completed = 0
        self.disconnects = 0
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.keep_bodies = True
        self._canned: dict[tuple[str, int], bytes] = {}

    async def _client_left(self, receive: Any, seconds: float) -> bool:
        """Take `seconds` to answer, as vLLM generating; True (counted) if the client
        left meanwhile."""
        watcher = asyncio.create_task(_watch_disconnect(receive))
        done, _ = await asyncio.wait([watcher], timeout=seconds)
        watcher.cancel()
        if done:
            self.disconnects += 1
        return bool(done)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/health":
            await _reply(send, 200, b"")
            return
        if path == "/v1/models":  # as vLLM lists its served name
            entry = {"id": self.name, "object": "model", "max_model_len": self.max_model_len}
            await _reply(send, 200, orjson.dumps({"object": "list", "data": [entry]}))
            return
        chunks = []
        while True:
            m = await receive()
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        raw = b"".join(chunks)
        body = orjson.loads(raw) if raw else {}
        if path == "/tokenize":
            self.tokenize_calls += 1
            if self.tokenize_fails:
                await _reply(send, 500, b'{"error": {"message": "tokenizer down"}}')
                return
            n = _count(body)
            await _reply(
                send,
                200,
                orjson.dumps({"count": n, "max_model_len": 4096, "tokens": list(range(n))}),
            )
            return
        if path.startswith("/v1/responses/"):
            await self._stored_call(send, scope["method"], path)
            return
        self.calls += 1
        if self.keep_bodies:
            self.bodies.append(body)
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        mode = self.mode
        if mode == "error500":
            await _reply(
                send,
                500,
                b'{"error":{"message":"injected failure","type":"server_error","code":500}}',
            )
            return
        if mode == "rate_limited":
            await _reply(
                send,
                429,
                b'{"error":{"message":"slow down","type":"rate_limit_error","code":429}}',
                [(b"retry-after", b"7")],
            )
            return
        if mode == "hang":
            await asyncio.sleep(3600)
            return
        model = body.get("model", self.name)
        if path == "/v1/embeddings":
            inp = body.get("input")
            n = len(inp) if isinstance(inp, list) else 1
            data = [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(n)
            ]
            await _reply(
                send,
                200,
                orjson.dumps(
                    {
                        "object": "list",
                        "data": data,
                        "model": model,
                        "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n},
                    }
                ),
            )
            return
        if path == "/v1/responses":
            await self._responses(send, receive, body, model)
            return
        chat = path == "/v1/chat/completions"
        ptoks = _count(body)
        ntok = int(body.get("max_tokens") or self.tokens)
        ntok = min(ntok, self.tokens) if self.tokens else ntok
        tools = self.tool_calls and chat
        if not body.get("stream"):
            key = (model, ptoks * 100000 + ntok + (1 << 40 if chat else 0))
            payload = self._canned.get(key)
            if payload is None:
                payload = _full(chat, model, ptoks, ntok, tools)
                if len(self._canned) < 1000:
                    self._canned[key] = payload
            if self.delay_s and await self._client_left(receive, self.delay_s * ntok):
                return
            await _reply(send, 200, payload)
            self.completed += 1
            return
        if tools:
            await self._stream_tool_call(send, receive, body, model, ptoks)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        so = body.get("stream_options") or {}
        include_usage = bool(so.get("include_usage"))
        # vLLM adds usage to every chunk only when both are set
        per_chunk = include_usage and bool(so.get("continuous_usage_stats"))
        lp = body.get("logprobs")
        want_logprobs = lp is not None and lp is not False
        base = {
            "id": "cmpl-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        watcher = asyncio.create_task(_watch_disconnect(receive))
        try:
            for i in range(ntok):
                if mode == "die_mid_stream" and i >= self.die_after:
                    raise ConnectionAbortedError("injected mid-stream death")
                if mode == "error_mid_stream" and i >= self.die_after:
                    err = {
                        "message": "injected failure",
                        "type": "InternalServerError"
                        if self.error_code >= 500
                        else "BadRequestError",
                        "code": self.error_code,
                    }
                    body = self._event({"error": err}) + self._event("[DONE]")
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                if watcher.done():
                    self.disconnects += 1
                    return
                text = "" if self.empty_every and i % self.empty_every == 1 else f"t{i} "
                if chat:
                    if i == 0:  # vLLM announces the role in a chunk of its own
                        role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                        ev = {**base, "choices": [{**role, "finish_reason": None}]}
                        await send(
                            {
                                "type": "http.response.body",
                                "body": self._event(ev),
                                "more_body": True,
                            }
                        )
                    delta = {"content": text}
                    ch = {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": "length" if i == ntok - 1 else None,
                    }
                else:
                    ch = {
                        "index": 0,
                        "text": text,
                        "finish_reason": "length" if i == ntok - 1 else None,
                    }
                if want_logprobs:  # as vLLM streams them: one entry per token
                    ch["logprobs"] = (
                        {"content": [{"token": text, "logprob": -0.5, "top_logprobs": []}]}
                        if chat
                        else {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": None}
                    )
                ev = {**base, "choices": [ch]}
                if i == ntok - 1 and not include_usage:
                    ev["system_fingerprint"] = FINGERPRINT  # vLLM: on the last chunk only
                if per_chunk:
                    ev["usage"] = {
                        "prompt_tokens": ptoks,
                        "completion_tokens": i + 1,
                        "total_tokens": ptoks + i + 1,
                    }
                await send(
                    {
                        "type": "http.response.body",
                        "body": self._event(ev),
                        "more_body": True,
                    }
                )
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            if mode == "die_mid_stream" and self.die_after >= ntok:
                # every token sent, then gone before the usage chunk and [DONE]
                raise ConnectionAbortedError("injected death after the last token")
            tail = b""
            if include_usage:
                usage = {
                    "prompt_tokens": ptoks,
                    "completion_tokens": ntok,
                    "total_tokens": ptoks + ntok,
                }
                tail = self._event(
                    {**base, "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT}
                )
            await self._end_stream(send, tail + self._event("[DONE]"))
        finally:
            watcher.cancel()

    async def _end_stream(self, send: Any, tail: bytes) -> None:
        """The stream's last bytes; the body's end `linger_s` later, if set."""
        await send({"type": "http.response.body", "body": tail, "more_body": self.linger_s > 0})
        if self.linger_s > 0:
            await asyncio.sleep(self.linger_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.completed += 1

    def _event(self, obj: Any) -> bytes:
        data = b"[DONE]" if obj == "[DONE]" else orjson.dumps(obj)
        return b"data: " + data + (b"\r\n\r\n" if self.crlf else b"\n\n")

    async def _responses(self, send: Any, receive: Any, body: dict, model: str) -> None:
        """/v1/responses as vLLM answers it: a `response` object, or a stream of typed
        events (an `event:` line, then `data:`) ending with `response.completed`, which
        carries the usage; no [DONE]. The modes apply as for chat: `die_mid_stream` drops
        the connection after `die_after` text deltas, `error_mid_stream` sends an `error`
        event there and ends the stream, `slow` paces the deltas by `delay_s`."""
        prev = body.get("previous_response_id")
        if prev is not None and prev not in self.stored:
            await _reply(send, 404, _not_found(prev))
            return
        ptoks = _count_responses(body)
        ntok = int(body.get("max_output_tokens") or self.tokens)
        ntok = min(ntok, self.tokens) if self.tokens else ntok
        full = _response_obj(model, ptoks, ntok, "completed")
        full["previous_response_id"] = prev
        full["user"] = body.get("user")  # vLLM echoes it
        if self.reasoning:
            think = {"type": "reasoning_text", "text": "let me think"}
            full["output"] = [
                {"id": "rs_fake", "type": "reasoning", "summary": [], "content": [think]},
                *full["output"],
            ]
        if self.store_responses:
            full["id"] = "resp_" + uuid.uuid4().hex
            if body.get("store", True):
                self.stored[full["id"]] = full
        if not body.get("stream"):
            if self.delay_s and await self._client_left(receive, self.delay_s * ntok):
                return
            await _reply(send, 200, orjson.dumps(full))
            self.completed += 1
            return
        seq = 0

        def event(obj: dict) -> bytes:
            nonlocal seq
            obj = {**obj, "sequence_number": seq}
            seq += 1
            nl = b"\r\n" if self.crlf else b"\n"
            return b"event: " + obj["type"].encode() + nl + b"data: " + orjson.dumps(obj) + nl + nl

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        start = {**full, "status": "in_progress", "output": [], "usage": None}
        item = {"id": "msg_fake", "type": "message", "role": "assistant", "status": "in_progress"}
        head = (
            event({"type": "response.created", "response": start})
            + event({"type": "response.in_progress", "response": start})
            + event({"type": "response.output_item.added", "output_index": 0, "item": item})
            + event(
                {
                    "type": "response.content_part.added",
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
        )
        await send({"type": "http.response.body", "body": head, "more_body": True})
        watcher = asyncio.create_task(_watch_disconnect(receive))
        try:
            for i in range(ntok):
                if self.mode == "die_mid_stream" and i >= self.die_after:
                    raise ConnectionAbortedError("injected mid-stream death")
                if self.mode == "error_mid_stream" and i >= self.die_after:
                    err = {
                        "type": "error",
                        "code": str(self.error_code),
                        "message": "injected failure",
                        "param": None,
                    }
                    await send({"type": "http.response.body", "body": event(err)})
                    return
                if watcher.done():
                    self.disconnects += 1
                    return
                delta = {
                    "type": "response.output_text.delta",
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": f"t{i} ",
                    "logprobs": [],
                }
                await send({"type": "http.response.body", "body": event(delta), "more_body": True})
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            text = "".join(f"t{i} " for i in range(ntok))
            done_item = full["output"][-1]  # the message (after any reasoning item)
            tail = (
                event(
                    {
                        "type": "response.output_text.done",
                        "item_id": "msg_fake",
                        "output_index": 0,
                        "content_index": 0,
                        "text": text,
                    }
                )
                + event({"type": "response.output_item.done", "output_index": 0, "item": done_item})
                + event({"type": "response.completed", "response": full})
            )
            await self._end_stream(send, tail)
        finally:
            watcher.cancel()

    async def _stored_call(self, send: Any, method: str, path: str) -> None:
        """/v1/responses/{id} (GET) and /v1/responses/{id}/cancel (POST) as vLLM answers
        them; what vLLM does not serve (DELETE, input_items) as FastAPI refuses it."""
        self.stored_calls.append((method, path))
        rid, _, tail = path[len("/v1/responses/") :].partition("/")
        if tail == "" and method == "GET":
            r = self.stored.get(rid)
            await _reply(send, 200 if r else 404, orjson.dumps(r) if r else _not_found(rid))
        elif tail == "cancel" and method == "POST":
            if rid not in self.stored:
                await _reply(send, 404, _not_found(rid))
                return
            err = {
                "message": "Cannot cancel a synchronous response.",
                "type": "invalid_request_error",
                "param": "response_id",
                "code": 400,
            }
            await _reply(send, 400, orjson.dumps({"error": err}))
        elif tail == "":
            await _reply(send, 405, b'{"detail":"Method Not Allowed"}', [(b"allow", b"GET")])
        else:
            await _reply(send, 404, b'{"detail":"Not Found"}')

    async def _stream_tool_call(
        self, send: Any, receive: Any, body: dict, model: str, ptoks: int
    ) -> None:
        """One tool call, streamed in OpenAI's pieces: id, type and name, then the arguments."""
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        args = TOOL_CALL["function"]["arguments"]
        first = {**TOOL_CALL, "index": 0, "function": {"name": "get_weather", "arguments": ""}}
        deltas = [
            {"role": "assistant", "content": None},
            {"tool_calls": [first]},
            *(
                {"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 9]}}]}
                for i in range(0, len(args), 9)
            ),
        ]
        events = [
            {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas
        ]
        events.append(
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        )
        ntok = len(deltas) - 1
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": ptoks,
                "completion_tokens": ntok,
                "total_tokens": ptoks + ntok,
            }
            events.append({**base, "choices": [], "usage": usage})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for ev in events:
            await send({"type": "http.response.body", "body": self._event(ev), "more_body": True})
        await send({"type": "http.response.body", "body": self._event("[DONE]")})
        self.completed += 1


async def _watch_disconnect(receive: Any) -> None:
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return


def _count(body: dict) -> int:
    msgs = body.get("messages")
    if isinstance(msgs, list):
        return (
            sum(len(str(m.get("content", "")).split()) + 4 for m in msgs if isinstance(m, dict)) + 3
        )
    p = body.get("prompt")
    return len(p.split()) if isinstance(p, str) else 1


def _count_responses(body: dict) -> int:
    """Input tokens of a /v1/responses request: words of `instructions` and `input`
    (+4 per item, +3), as `_count` counts chat."""
    n = 3
    ins = body.get("instructions")
    if isinstance(ins, str):
        n += len(ins.split()) + 4
    inp = body.get("input")
    items = [inp] if isinstance(inp, str) else inp if isinstance(inp, list) else []
    for it in items:
        c = it.get("content", "") if isinstance(it, dict) else it
        if isinstance(c, list):
            c = " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
        n += len(str(c).split()) + 4
    return n


def _not_found(rid: str) -> bytes:
    """vLLM's answer for a response id it does not have."""
    err = {
        "message": f"Response with id '{rid}' not found.",
        "type": "invalid_request_error",
        "param": "response_id",
        "code": 404,
    }
    return orjson.dumps({"error": err})


def _response_obj(model: str, ptoks: int, ntok: int, status: str) -> dict:
    """A Responses API `response` object as vLLM returns it (usage included)."""
    text = "".join(f"t{i} " for i in range(ntok))
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": status,
        "incomplete_details": None,
        "output": [
            {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": ptoks,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": ntok,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": ptoks + ntok,
        },
    }


def _full(chat: bool, model: str, ptoks: int, ntok: int, tools: bool = False) -> bytes:
    text = "".join(f"t{i} " for i in range(ntok))
    if tools:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            "finish_reason": "tool_calls",
        }
    elif chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
    return orjson.dumps(
        {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": ptoks,
                "completion_tokens": ntok,
                "total_tokens": ptoks + ntok,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }
    )


async def _reply(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the fast one


def _canned_http(stream: bool, chat: bool, tokens: int) -> bytes:
    if stream:
        base = {
            "id": "cmpl-fast",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1,
            "model": "fast",
        }
        parts = []
        for i in range(tokens):
            ch = (
                {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
                if chat
                else {"index": 0, "text": f"t{i} ", "finish_reason": None}
            )
            parts.append(b"data: " + orjson.dumps({**base, "choices": [ch]}) + b"\n\n")
        parts.append(
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 12,
                        "completion_tokens": tokens,
                        "total_tokens": 12 + tokens,
                    },
                }
            )
            + b"\n\n"
        )
        parts.append(b"data: [DONE]\n\n")
        body = b"".join(parts)
        ct = b"text/event-stream"
    else:
        body = _full(chat, "fast", 12, tokens)
        ct = b"application/json"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + ct
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class _FastProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies only; answers from precomputed bytes."""

    def __init__(self, canned: dict[tuple[bool, bool], bytes], delay_s: float = 0.0) -> None:
        self.canned = canned
        self.delay_s = delay_s
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = self.buf[:i].lower()
            j = head.find(b"content-length:")
            n = (
                int(head[j + 15 : head.find(b"\r\n", j) if head.find(b"\r\n", j) > 0 else None])
                if j >= 0
                else 0
            )
            if len(self.buf) < i + 4 + n:
                return
            body = self.buf[i + 4 : i + 4 + n]
            self.buf = self.buf[i + 4 + n :]
            if head.startswith(b"get /health"):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                continue
            stream = b'"stream":true' in body
            chat = b"/chat/" in head[:60]
            reply = self.canned[(stream, chat)]
            if self.delay_s > 0:
                # a timer, not a task: pacing costs the upstream next to no CPU, so the
                # shim's throughput is measured against a model server's latency alone
                asyncio.get_running_loop().call_later(self.delay_s, self._send, reply)
            else:
                self.transport.write(reply)

    def _send(self, reply: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply)


async def serve_fast(
    port: int, tokens: int = 8, host: str = "127.0.0.1", delay_s: float = 0.0
) -> None:
    """A minimal fast OpenAI-shaped upstream (for measuring the shim's own cost).

    `delay_s` holds each whole response that long (a model server's latency
    without its CPU cost; responses on one connection keep their order).
    """
    canned = {(s, c): _canned_http(s, c, tokens) for s in (False, True) for c in (False, True)}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _FastProtocol(canned, delay_s), host, port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Canned OpenAI-compatible upstream on loopback.")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument(
        "--fast", action="store_true", help="raw asyncio server (no ASGI), for benchmarks"
    )
    ap.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="with --fast: answer each request after this long (a model's latency)",
    )
    a = ap.parse_args()
    if a.fast:
        asyncio.run(serve_fast(a.port, a.tokens, delay_s=a.delay_ms / 1000))
    else:
        import uvicorn

        uvicorn.run(
            FakeUpstream(tokens=a.tokens), host="127.0.0.1", port=a.port, log_level="warning"
        )
