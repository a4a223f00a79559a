"""Smoke test of the real vLLM harness: usage on a completion, metrics exposed."""

import httpx
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_chat_completion_returns_usage_and_metrics(vllm_server):
    r = httpx.post(
        f"{vllm_server.base_url}/chat/completions",
        json={
            "model": "small",
            "messages": [{"role": "user", "content": "summarize the gpu cost report"}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 8
    metrics = httpx.get(vllm_server.metrics_url, timeout=10).text
    assert "vllm:prompt_tokens_total" in metrics
    models = {
        m["id"] for m in httpx.get(f"{vllm_server.base_url}/models", timeout=10).json()["data"]
    }
    assert {"small", "mid", "large"} <= models
