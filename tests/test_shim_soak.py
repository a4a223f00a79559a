"""Bounded soak: the shim (`finops shim serve`, its own process) under steady concurrency.

Loopback only: a fast canned upstream in its own process. Checks that every
request sent has exactly one request-log record (none lost, none doubled),
that no request failed, and that the shim's memory stays flat after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from finops.loopback import free_port, wait_http

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("FINOPS_SOAK_SECONDS", "45"))
CONCURRENCY = 16


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _drive(base: str, seconds: float, pid: int) -> tuple[int, dict[int, int], list[int]]:
    sent = 0
    codes: dict[int, int] = {}
    rss: list[int] = []
    stop = time.monotonic() + seconds
    rng = random.Random(3)

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < stop:
            k = rng.random()
            body = {
                "model": "auto",
                "messages": [
                    {
                        "role": "user",
                        "content": f"question {rng.randrange(50)} "
                        + "ctx " * rng.randrange(1, 300),
                    }
                ],
                "max_tokens": 8,
                "temperature": 0 if k < 0.3 else 0.8,  # some deterministic: cache hits and misses
                "stream": k > 0.5,
            }
            sent += 1
            r = await c.post(
                base + "/v1/chat/completions", json=body, headers={"x-feature": "soak"}
            )
            await r.aread()
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    async def sampler() -> None:
        while time.monotonic() < stop:
            rss.append(_rss_kib(pid))
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
        await asyncio.gather(sampler(), *(worker(c) for _ in range(CONCURRENCY)))
    return sent, codes, rss


def test_soak_no_lost_records_and_flat_memory(tmp_path):
    up_port, port = free_port(), free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "finops.shim.fakeupstream", "--fast", "--port", str(up_port)]
    )
    log_dir = tmp_path / "log"
    cmd = [
        sys.executable,
        "-c",
        "from finops.cli import main; main()",
        "shim",
        "serve",
        "--port",
        str(port),
        "--log",
        str(log_dir),
        "--log-level",
        "warning",
    ]
    for t in ("small", "mid", "large"):
        cmd += ["--upstream", f"{t}=http://127.0.0.1:{up_port}"]
    shim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health")
        wait_http(f"http://127.0.0.1:{port}/healthz")
        sent, codes, rss = asyncio.run(_drive(f"http://127.0.0.1:{port}", SOAK_SECONDS, shim.pid))
    finally:
        shim.send_signal(signal.SIGTERM)
        _, err = shim.communicate(timeout=60)
        assert b"Traceback" not in err, err.decode()[-3000:]
        up.terminate()
        up.wait(10)
    assert codes == {200: sent}, codes
    records = []
    for p in sorted(log_dir.glob("requests-*")):
        assert p.name.endswith(".jsonl"), f"{p.name}: an unfinished file after shutdown"
        records += [orjson.loads(x) for x in p.read_bytes().splitlines()]
    assert len(records) == sent, f"{sent} requests sent, {len(records)} records"
    assert len({r["request_id"] for r in records}) == sent
    assert {r["cache_status"] for r in records} >= {"hit", "miss", "bypass"}
    # memory: after the first third (caches and pools warm), growth stays small
    warm = rss[len(rss) // 3]
    growth_mib = (max(rss[len(rss) // 3 :]) - warm) / 1024
    print(
        f"soak: {sent} requests in {SOAK_SECONDS:.0f}s, rss {warm / 1024:.0f} MiB -> max {max(rss) / 1024:.0f} MiB"
    )
    assert growth_mib < 25, f"RSS grew {growth_mib:.1f} MiB after warm-up: {rss}"
