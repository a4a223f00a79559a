"""The response cache's key and its shared parts."""

from __future__ import annotations

from finops.shim.cache import cache_key

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
DET = {**CHAT, "temperature": 0}


# -- 4. cache key normalization --


def test_schema_key_order_is_part_of_the_cache_key():
    def key(body):
        return cache_key("t", "chat", body, "small")

    def schema(props):
        return {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "properties": props}},
        }

    ab = {**DET, "response_format": schema({"a": {"type": "string"}, "b": {"type": "integer"}})}
    ba = {**DET, "response_format": schema({"b": {"type": "integer"}, "a": {"type": "string"}})}
    assert key(ab) != key(ba)
    for field in ("guided_json", "structured_outputs"):
        assert key({**DET, field: {"a": 1, "b": 2}}) != key({**DET, field: {"b": 2, "a": 1}})

    def tool(props):
        return [{"type": "function", "function": {"name": "f", "parameters": props}}]

    assert key({**DET, "tools": tool({"x": 1, "y": 2})}) != key(
        {**DET, "tools": tool({"y": 2, "x": 1})}
    )
    # what is order-insensitive still shares: top-level fields, message objects
    m1 = {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u"}
    m2 = {"name": "u", "content": [{"text": "hi", "type": "text"}], "role": "user"}
    a = {"model": "x", "temperature": 0, "messages": [m1], "response_format": ab["response_format"]}
    b = {
        "response_format": ab["response_format"],
        "messages": [m2],
        "temperature": 0.0,
        "model": "x",
    }
    assert key(a) == key(b)
    assert key({**DET, "logit_bias": {"1": 2, "3": 4}}) == key(
        {**DET, "logit_bias": {"3": 4, "1": 2}}
    )
