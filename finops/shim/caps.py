"""Context caps: a maximum input size per tier/feature/tenant, enforced before routing cost.

Token counts come from one of two counters (config `[caps] token_counter`):

- ``estimate`` (default, no network): ``ceil(utf8_bytes / 4)`` for every text
  part plus 4 tokens per chat message and 3 for the reply primer, the
  OpenAI-documented rule of thumb for English BPE vocabularies. It can be off
  by 2x for code or small vocabularies, so caps set against it need headroom.
  Every image, audio, video or file part counts 765 tokens (OpenAI's price of a
  1024x1024 image at high detail; vision models differ, but free media parts
  would let any cap be bypassed). Token-ID prompts count their IDs.
- ``upstream``: the tier's vLLM ``POST /tokenize`` (exact, chat template
  included), one extra loopback round trip, only for requests a cap applies to.
  If the call fails the estimate is used and the request still goes through, and
  that upstream's /tokenize is skipped (estimate used) for 30 s.

When several rules match a request the strictest (smallest) wins; on a tie
the more specific rule (fewer ``*`` among tier/feature/tenant), then `reject`,
then the first in config order. Policy
``reject`` answers an OpenAI-style 400 (code ``context_length_exceeded``);
``truncate`` drops the oldest non-system *turns* (a user message and the
replies that follow it) and never the system prompt or the last user turn; if
that is still too long the request is rejected. What was cut is logged as
``truncated_tokens``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from finops.shim.config import CapRule

PER_MESSAGE = 4
PRIMER = 3
MEDIA_PART = 765
TEXT_PART_TYPES = (None, "text", "input_text", "output_text", "refusal")
TRUNCATE_ROUNDS = 4
TOKENIZE_CONCURRENCY = 8  # /tokenize calls at a time for one batch prompt


def _text_bytes(content: Any) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):  # multi-part content
        n = 0
        for part in content:
            if isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    n += len(t.encode())
        return n
    return 0


def _media_parts(content: Any) -> int:
    """Parts of multi-part content that are not text (images, audio, video, files)."""
    if not isinstance(content, list):
        return 0
    return sum(
        1 for part in content if isinstance(part, dict) and part.get("type") not in TEXT_PART_TYPES
    )


def estimate_message_tokens(msg: Any) -> int:
    if not isinstance(msg, dict):
        return PER_MESSAGE
    content = msg.get("content")
    n = math.ceil(_text_bytes(content) / 4) + PER_MESSAGE + MEDIA_PART * _media_parts(content)
    if msg.get("tool_calls"):
        n += math.ceil(len(orjson.dumps(msg["tool_calls"])) / 4)
    return n


def estimate_body_tokens(body: dict) -> int:
    """Documented estimate of a request's input tokens (see module docstring)."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        n = sum(estimate_message_tokens(m) for m in msgs) + PRIMER
        if body.get("tools"):
            n += math.ceil(len(orjson.dumps(body["tools"])) / 4)
        return n
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return math.ceil(len(prompt.encode()) / 4)
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, int) for p in prompt):
            return len(prompt)
        # a batch: strings, or token-ID lists ([[ids], [ids]])
        return sum(
            math.ceil(_text_bytes(p) / 4) if isinstance(p, str) else len(p)
            for p in prompt
            if isinstance(p, str | list)
        )
    return 0


def _cap_rank(r: CapRule) -> tuple[int, int, int]:
    """Smaller is stricter: the cap, then more specific (fewer "*"), then `reject` first."""
    specific = sum(v != "*" for v in (r.tier, r.feature, r.tenant))
    return (r.max_input_tokens, -specific, 0 if r.policy == "reject" else 1)


def applicable_cap(
    rules: tuple[CapRule, ...], tier: str, feature: str, tenant: str
) -> CapRule | None:
    """The rule that applies (see the module docstring); None when no rule matches."""
    best: CapRule | None = None
    for r in rules:
        # strict <: on a full tie the first rule in config order stays
        if r.matches(tier, feature, tenant) and (best is None or _cap_rank(r) < _cap_rank(best)):
            best = r
    return best


class TokenizeGate:
    """Skips an upstream's /tokenize for `cooldown_s` after a call to it failed.

    A hung or broken /tokenize would otherwise cost every capped request its timeout;
    meanwhile those requests are counted by the estimate (as when the call fails).
    """

    def __init__(self, cooldown_s: float = 30.0) -> None:
        self.cooldown_s = cooldown_s
        self._until: dict[str, float] = {}

    def allows(self, url: str) -> bool:
        until = self._until.get(url)
        return until is None or time.monotonic() >= until

    def failed(self, url: str) -> None:
        self._until[url] = time.monotonic() + self.cooldown_s


async def upstream_token_count(
    client: httpx.AsyncClient,
    root_url: str,
    model: str,
    body: dict,
    timeout: float,
    gate: TokenizeGate | None = None,
) -> int | None:
    """Exact count from vLLM's /tokenize, or None when the upstream cannot say.

    A completions prompt list (a batch, or one string in a list as some SDKs send it) is
    counted string by string, token-ID prompts by their length: counted by the estimate
    instead, a list got past a cap the same text as a string could not.
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and not isinstance(body.get("messages"), list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if not all(isinstance(p, str | list) for p in prompt):
            return None
        ids = sum(len(p) for p in prompt if isinstance(p, list))
        texts = [p for p in prompt if isinstance(p, str)]
        limit = asyncio.Semaphore(TOKENIZE_CONCURRENCY)  # a big batch: a few calls at a time

        async def one(text: str) -> int | None:
            async with limit:
                return await upstream_token_count(
                    client, root_url, model, {"prompt": text}, timeout, gate
                )

        counts = await asyncio.gather(*(one(t) for t in texts))
        if any(c is None for c in counts):
            return None
        return ids + sum(c for c in counts if c is not None)
    req: dict[str, Any] = {"model": model}
    if isinstance(body.get("messages"), list):
        req["messages"] = body["messages"]
        if body.get("tools"):
            req["tools"] = body["tools"]
    elif isinstance(prompt, str):
        req["prompt"] = prompt
    else:
        return None
    if gate is not None and not gate.allows(root_url):
        return None
    count = None
    broken = True  # the endpoint's fault (not this request's): skip it for a while
    try:
        r = await client.post(
            root_url + "/tokenize",
            content=orjson.dumps(req),
            headers={"content-type": "application/json"},
            timeout=timeout,
        )
        broken = r.status_code >= 500 or r.status_code in (404, 405)
        if r.status_code == 200:
            n = orjson.loads(r.content).get("count")
            count = int(n) if isinstance(n, int) else None
            broken = count is None
    except (httpx.HTTPError, orjson.JSONDecodeError, ValueError):
        pass
    if count is None and broken and gate is not None:
        gate.failed(root_url)
    return count


@dataclass
class CapOutcome:
    body: dict
    input_tokens: int
    truncated_tokens: int = 0
    error: str | None = None  # set when the request must be rejected


def _turns(msgs: list) -> tuple[list[int], list[list[int]]]:
    """Indexes of system messages, and the other messages grouped into turns."""
    system: list[int] = []
    turns: list[list[int]] = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            system.append(i)
        elif role == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return system, turns


def truncate_messages(body: dict, count: int, cap: int, *, scale: float = 1.0) -> tuple[dict, int]:
    """Drop the oldest non-system turns until the estimate fits; returns (body, dropped_tokens).

    `scale` corrects the per-message estimate towards an exact total (exact /
    estimated), so that a count from /tokenize and the per-turn estimates agree.
    """
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return body, 0
    _, turns = _turns(msgs)
    drop: set[int] = set()
    dropped = 0
    remaining = count
    for turn in turns[:-1]:  # never the last turn
        if remaining <= cap:
            break
        t = round(sum(estimate_message_tokens(msgs[i]) for i in turn) * scale)
        drop.update(turn)
        dropped += t
        remaining -= t
    if not drop:
        return body, 0
    new = dict(body)
    new["messages"] = [m for i, m in enumerate(msgs) if i not in drop]
    return new, dropped


@dataclass
class TokenCounter:
    """How a request's input is counted against one upstream: its /tokenize when
    `counter` is ``upstream`` (and it answers), else the documented estimate."""

    counter: str = "estimate"
    client: httpx.AsyncClient | None = None
    root_url: str | None = None
    model: str | None = None
    timeout: float = 5.0
    gate: TokenizeGate | None = None
    # (body, its exact count) already asked of this upstream: not asked twice
    known: tuple[dict, int] | None = None

    async def exact(self, body: dict) -> int | None:
        """The upstream's count, or None (estimate counter, or the upstream cannot say)."""
        if self.known is not None and self.known[0] is body:
            return self.known[1]
        client, url, model = self.client, self.root_url, self.model
        if self.counter != "upstream" or client is None or url is None or model is None:
            return None
        return await upstream_token_count(client, url, model, body, self.timeout, self.gate)

    async def count(self, body: dict) -> int:
        n = await self.exact(body)
        return estimate_body_tokens(body) if n is None else n


async def apply_cap(rule: CapRule, body: dict, counter: TokenCounter) -> CapOutcome:
    """Enforce one cap rule on a request body (reject or truncate)."""
    if body.get("prompt_embeds") is not None and body.get("prompt") is None:
        # vLLM's embedded prompts: no text or IDs to count, so a cap cannot be kept
        return CapOutcome(
            body,
            0,
            error=(
                f"This request sends `prompt_embeds`, whose size cannot be checked against "
                f"the cap of {rule.max_input_tokens} input tokens (tier {rule.tier}, feature "
                f"{rule.feature}, tenant {rule.tenant}); send the prompt as text or token IDs."
            ),
        )
    est = estimate_body_tokens(body)
    n = await counter.exact(body)
    exact = n is not None
    count = est if n is None else n
    if count <= rule.max_input_tokens:
        return CapOutcome(body, count)
    if rule.policy == "truncate" and isinstance(body.get("messages"), list):
        cur, cur_count, cur_est = body, count, est
        # With an exact counter the per-turn estimates are scaled to the exact total; when
        # the dropped turns' real share was smaller than their estimate (code, CJK, images)
        # the recount is still over the cap, so drop more (a few /tokenize calls at most).
        for _ in range(TRUNCATE_ROUNDS):
            scale = cur_count / cur_est if cur_est else 1.0
            new, dropped = truncate_messages(cur, cur_count, rule.max_input_tokens, scale=scale)
            if new is cur:
                break  # only the last turn (and system prompts) left
            if exact:
                recount = await counter.exact(new)
                if recount is not None:
                    dropped = cur_count - recount
            cur, cur_count, cur_est = new, cur_count - dropped, estimate_body_tokens(new)
            if cur_count <= rule.max_input_tokens:
                return CapOutcome(cur, cur_count, truncated_tokens=count - cur_count)
            if not exact:
                break  # the estimate already dropped all it could
        return CapOutcome(
            body,
            count,
            error=(
                f"This request has {count} input tokens; the cap for it is {rule.max_input_tokens} "
                f"(tier {rule.tier}, feature {rule.feature}, tenant {rule.tenant}) and dropping older "
                "turns cannot fit it: shorten the last message or the system prompt."
            ),
        )
    return CapOutcome(
        body,
        count,
        error=(
            f"This request has {count} input tokens, more than the cap of {rule.max_input_tokens} "
            f"(tier {rule.tier}, feature {rule.feature}, tenant {rule.tenant}, counted by the "
            f"{'upstream tokenizer' if exact else 'byte estimate'}). Shorten the context."
        ),
    )
