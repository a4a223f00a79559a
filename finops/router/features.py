"""Turn a request (an OpenAI request body, or a labeled training row) into router features.

One function, `extract`, serves both training and the live shim, so the model sees the
same features in production that it was trained on. It is deliberately cheap (no
tokenizer, no regex over the whole prompt): the router sits on the request path and
must answer in well under a millisecond.

Text is clipped before the n-gram analyzers see it: the head of a prompt carries the
instruction and the tail the question, while the middle of a long paste (a document, a
code file) mostly adds cost. Lengths are measured on the full text.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

WORD_HEAD_CHARS = 1200
WORD_TAIL_CHARS = 400
CHAR_HEAD_CHARS = 240
CHARS_PER_TOKEN = 4.0  # the usual English estimate when a request carries no token count

TEXT_COLUMNS = ("text", "text_head")
NUMERIC_COLUMNS = ("log_prompt_tokens", "turn_count", "has_tools")
CATEGORICAL_COLUMNS = ("feature", "tenant")
# The value `extract` gives a categorical feature a row does not carry (a labeled set
# without `feature`/`tenant` columns). The one-hot encoder learns it as a category like
# any other; `unknown_as_missing` makes a value the model never saw score the same way.
MISSING = ""

FEATURE_DOCS: dict[str, tuple[str, str]] = {
    "text": ("text", "prompt text (all message contents), head+tail clipped; word n-grams"),
    "text_head": ("text", "first characters of the prompt text; char n-grams"),
    "log_prompt_tokens": ("numeric", "log1p(prompt tokens); estimated as chars/4 when absent"),
    "turn_count": ("numeric", "user turns in the conversation (1 for a completion prompt)"),
    "has_tools": ("numeric", "1 when the request offers tools/functions, else 0"),
    "feature": (
        "categorical",
        "the product feature the request came from (the shim's feature header, X-Feature)",
    ),
    "tenant": ("categorical", "the tenant the request came from"),
}


def feature_schema(uses_text: bool) -> list[dict[str, str]]:
    """The input features a model uses, as stored in the artifact's manifest."""
    cols = (*(TEXT_COLUMNS if uses_text else ()), *NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS)
    return [{"name": c, "kind": FEATURE_DOCS[c][0], "doc": FEATURE_DOCS[c][1]} for c in cols]


def _content_text(content: Any) -> str:
    """Message content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def messages_text(messages: Any) -> tuple[str, int]:
    """All message contents joined, and the number of user turns."""
    if not isinstance(messages, list):
        return "", 0
    texts = []
    turns = 0
    for m in messages:
        if not isinstance(m, Mapping):
            continue
        if m.get("role") == "user":
            turns += 1
        t = _content_text(m.get("content"))
        if t:
            texts.append(t)
    return "\n".join(texts), turns


def body_text(body: Mapping[str, Any]) -> tuple[str | None, int]:
    """(prompt text or None, user turns) of a chat or completions request body."""
    if "messages" in body:
        text, turns = messages_text(body.get("messages"))
        return text, max(turns, 1)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, 1
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt), 1
    return None, 1


def clip_words(text: str) -> str:
    if len(text) <= WORD_HEAD_CHARS + WORD_TAIL_CHARS:
        return text
    return f"{text[:WORD_HEAD_CHARS]}\n{text[-WORD_TAIL_CHARS:]}"


def extract(
    *,
    text: str | None,
    prompt_tokens: float | None = None,
    turn_count: int | None = None,
    has_tools: bool | None = None,
    feature: str | None = None,
    tenant: str | None = None,
    count_from_text: bool = True,
) -> dict[str, Any]:
    """One feature row.

    When text is present the token count is estimated from it (chars/4), because that is
    what the shim can compute on the request path; a given count is used only when the
    text is absent (prompt capture off), or with `count_from_text=False`: the count is
    then the serving-time estimate itself (the shim logs it as `prompt_tokens_est`; a
    logged prompt text may be cut, and its length would not match).
    """
    if text and (count_from_text or prompt_tokens is None):
        prompt_tokens = len(text) / CHARS_PER_TOKEN
    elif prompt_tokens is None or prompt_tokens < 0:
        prompt_tokens = 0.0
    t = text or ""
    words = clip_words(t)
    head = t[:CHAR_HEAD_CHARS]  # a prefix of `words`: checking `words` covers both
    try:
        words.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): hashing would raise
        words, head = _utf8_safe(words), _utf8_safe(head)
    return {
        "text": words,
        "text_head": head,
        "log_prompt_tokens": math.log1p(float(prompt_tokens)),
        "turn_count": float(turn_count if turn_count is not None else 1),
        "has_tools": 1.0 if has_tools else 0.0,
        "feature": feature or MISSING,
        "tenant": tenant or MISSING,
    }


def unknown_as_missing(
    row: Mapping[str, Any], missing_known: Mapping[str, Collection[str]]
) -> Mapping[str, Any]:
    """`row` with a categorical value the model never saw replaced by `MISSING`.

    `missing_known` maps each categorical column whose trained categories include
    `MISSING` to those categories. A model trained on rows without `feature`/`tenant`
    learned a weight for the missing value; the shim always sends a name (its
    `default_feature`/`default_tenant`, or the X-Feature header), which the encoder would
    score as all zeros, dropping that weight: the served router would not be the one
    that was evaluated. Missing at training and unknown at serving mean the same thing
    (no name the model knows), so they get the same encoding. Columns whose categories
    lack `MISSING` are left alone: there an unknown value scores as all zeros, as in
    scikit-learn.
    """
    swap = [c for c, known in missing_known.items() if row[c] not in known]
    if not swap:
        return row
    return {**row, **dict.fromkeys(swap, MISSING)}


def _utf8_safe(s: str) -> str:
    """`s` with characters UTF-8 cannot encode (lone surrogates) replaced by '?'.

    Python's json accepts "\\ud800" in a request body; the n-gram hashing encodes text to
    UTF-8 and would raise, so the router would fail the request instead of routing it.
    """
    return s.encode("utf-8", "replace").decode("utf-8")


def from_body(
    body: Mapping[str, Any], *, feature: str | None = None, tenant: str | None = None
) -> dict[str, Any]:
    """Features of an OpenAI /v1/chat/completions or /v1/completions request body."""
    text, turns = body_text(body)
    has_tools = bool(body.get("tools") or body.get("functions"))
    return extract(
        text=text,
        prompt_tokens=None if text is not None else token_id_count(body.get("prompt")),
        turn_count=turns,
        has_tools=has_tools,
        feature=feature,
        tenant=tenant,
    )


def estimate_prompt_tokens(body: Mapping[str, Any]) -> float:
    """The prompt-token count `from_body` gives the router for this request body.

    The shim logs it with every request (`prompt_tokens_est`), so a router trained from
    the log sees the count it will see when serving, not vLLM's (which includes the chat
    template and is only known after the answer).
    """
    text, _ = body_text(body)
    if text:
        return len(text) / CHARS_PER_TOKEN
    return float(token_id_count(body.get("prompt")) or 0) if text is None else 0.0


def token_id_count(prompt: Any) -> int | None:
    """Tokens in a pre-tokenized /v1/completions prompt ([ids] or [[ids], ...]), else None.

    Such a prompt has no text to estimate from, but its size is exact; without this it
    would look like an empty prompt and be routed as the smallest request there is.
    """
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        return sum(len(p) for p in prompt)
    return None
