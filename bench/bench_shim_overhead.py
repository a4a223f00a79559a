"""Added latency of the finops shim vs calling the upstream directly (same run, same client).

Setup (all loopback, separate processes so they do not share a GIL):
- upstream: `finops.shim.fakeupstream --fast`, a raw asyncio server answering
  canned OpenAI responses (8 tokens; SSE when streaming), so its own cost is tiny;
- shim: `finops shim serve` with the three tiers on that upstream, the request
  log on, and the trained router (classifier included) when finops.router can
  train one, else the rule policy (said in the output);
- client: an asyncio raw-socket HTTP/1.1 keep-alive load generator (no client
  library overhead), `c` connections each sending requests back to back.

For each concurrency (1, 32, 128) and stream/non-stream it prints the direct
and the shim's p50/p99 latency to the full response, the added p50/p99 (shim
minus direct) and the throughput ratio (shim / direct). Both sides are warmed
with an untimed burst before a table's first case, and a case shorter than
0.5 s is run 3 times, sides interleaved, each figure the best (`reps`). Goals:
added p50 <= 1 ms, p99 <= 5 ms, throughput >= 0.8x. Note the machine: every process here
shares its cores, so at high concurrency the shim competes with the load
generator and the upstream for CPU. `--vllm URL` (or FINOPS_VLLM_URL) adds the
same comparison against a real vLLM server for the record. `--quick` is small.

A second table does the same against a *paced* upstream (`--paced-ms`, default
50 ms per response: a short completion's latency on a GPU replica, held by a
timer so it costs no CPU). The fast upstream measures the shim's CPU cost per
request (its throughput ratio is CPU-bound: on shared cores it is shim cost vs
a raw-socket server's); the paced one measures whether the shim limits
throughput in front of a server that takes a model's time to answer.

Both tables are printed for each `--workers` count (default: 1 and the number
of cores, at most 4): `finops shim serve --workers N` runs N shim processes on
one port, which is how a host past one core's worth of requests deploys it.

A reference table puts the fast-upstream ratios in context: nginx (C, keep-alive
upstream pool, no routing, no log) as a plain pass-through proxy with the same
worker count, in front of the same upstream, measured the same way. It is the
ceiling for any proxy on this machine: a proxy parses and answers like the
upstream does and also makes the upstream call, so on shared cores it keeps
0.3-0.9x of a server that does no work (0.8x only at some concurrencies). Printed when `nginx` is on PATH
(Debian: `apt-get install nginx-light`); `--no-reference` skips it.

A second reference is the LiteLLM proxy, the issue's anchor (its docs give 2-12 ms
median added latency): `auto` served from the same upstream, one worker per shim
worker, no database, cache or callbacks (so no spend log, which the shim writes).
Printed when `--litellm`, $FINOPS_LITELLM or `litellm` on PATH names its command
(`uv tool install 'litellm[proxy]'`); it answers ~100 requests/s here, so its cases
send fewer requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from finops.loopback import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
# (concurrency, requests) per case; the paced upstream takes 50 ms a request, so fewer
FAST_SIZES = ((1, 600), (32, 4000), (128, 6000))
PACED_SIZES = ((1, 80), (32, 2000), (128, 5000))
# LiteLLM answers about 100 requests/s here: fewer, or a case takes minutes
LITELLM_SIZES = ((1, 100), (32, 600), (128, 1200))
# before a grid's first case: an untimed burst per side and stream mode, so no case's side
# is measured cold (first connections, the upstream's and shim's first code paths)
WARM_REQUESTS, WARM_CONCURRENCY = 300, 32
# a case whose timed part (its slower side's) is shorter than this is repeated, sides
# interleaved, SHORT_REPEAT times in all; each printed figure is the best of the repetitions
SHORT_CASE_S, SHORT_REPEAT = 0.5, 3


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    low = head.lower()
    # at a line's start: LiteLLM also sends `llm_provider-content-length` (the upstream's)
    i = low.find(b"\r\ncontent-length:")
    if i >= 0:
        n = int(low[i + 17 : low.find(b"\r\n", i + 2)])
        return await reader.readexactly(n)
    # chunked
    out = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(out)
        out.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def load(
    host: str, port: int, path: str, body: bytes, concurrency: int, total: int
) -> tuple[np.ndarray, float]:
    req = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    lat: list[float] = []
    per = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(n):
                t = time.perf_counter()
                writer.write(req)
                data = await _read_response(reader)
                lat.append(time.perf_counter() - t)
                if not data:
                    raise RuntimeError("empty response")
        finally:
            writer.close()

    # warm-up: open connections, JIT the paths
    await asyncio.gather(*(worker(2) for _ in range(min(concurrency, 8))))
    lat.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in per if n))
    wall = time.perf_counter() - t0
    return np.asarray(lat) * 1000.0, len(lat) / wall


def body_for(model: str, stream: bool, max_tokens: int = 8) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [
                {"role": "user", "content": "Translate to French: the meeting moved to Tuesday."}
            ],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "stream": stream,
        }
    )


def warm(
    direct: tuple[str, int], shim: tuple[str, int], direct_model: str, max_tokens: int = 8
) -> None:
    """Untimed bursts to both sides, both stream modes, so the first case is not measured cold."""
    path = "/v1/chat/completions"
    for stream in (False, True):
        for addr, model in ((direct, direct_model), (shim, "auto")):
            asyncio.run(
                load(
                    *addr,
                    path,
                    body_for(model, stream, max_tokens),
                    WARM_CONCURRENCY,
                    WARM_REQUESTS,
                )
            )


def run_case(
    label: str,
    direct: tuple[str, int],
    shim: tuple[str, int],
    direct_model: str,
    concurrency: int,
    total: int,
    stream: bool,
    max_tokens: int = 8,
) -> dict:
    """One case, both sides; a short one is repeated, sides interleaved, best figure of each."""
    path = "/v1/chat/completions"
    sides = (
        (direct, body_for(direct_model, stream, max_tokens)),
        (shim, body_for("auto", stream, max_tokens)),
    )
    runs: tuple[list, list] = ([], [])  # (p50, p99, rps) per repetition, direct then shim
    reps = 1
    while len(runs[0]) < reps:
        for (addr, body), acc in zip(sides, runs, strict=True):
            lat, rps = asyncio.run(load(*addr, path, body, concurrency, total))
            acc.append((float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), rps))
        if len(runs[0]) == 1 and total / min(runs[0][0][2], runs[1][0][2]) < SHORT_CASE_S:
            reps = SHORT_REPEAT  # decided on the first run: a short case is noisy
    (d, s) = (
        (min(x[0] for x in acc), min(x[1] for x in acc), max(x[2] for x in acc)) for acc in runs
    )
    r = {
        "case": label,
        "c": concurrency,
        "stream": stream,
        "n": total,
        "reps": len(runs[0]),
        "direct_p50": d[0],
        "direct_p99": d[1],
        "shim_p50": s[0],
        "shim_p99": s[1],
        "direct_rps": d[2],
        "shim_rps": s[2],
    }
    r["added_p50"] = r["shim_p50"] - r["direct_p50"]
    r["added_p99"] = r["shim_p99"] - r["direct_p99"]
    r["ratio"] = r["shim_rps"] / r["direct_rps"]
    return r


def grid(
    label: str, up_port: int, shim_port: int, sizes: tuple[tuple[int, int], ...], scale: float
) -> list[dict]:
    """Every (concurrency, requests) in `sizes`, non-streaming then streaming, after a warm-up."""
    direct, shim = ("127.0.0.1", up_port), ("127.0.0.1", shim_port)
    warm(direct, shim, "small")
    return [
        run_case(label, direct, shim, "small", c, max(c * 4, int(n * scale)), stream)
        for stream in (False, True)
        for c, n in sizes
    ]


def print_rows(rows: list[dict]) -> None:
    print(
        f"{'case':<10}{'conc':>5}{'stream':>7}{'n':>6}{'reps':>5} | {'direct p50/p99 ms':>18} | {'shim p50/p99 ms':>16} | {'added p50/p99 ms':>17} | {'rps direct/shim':>16} | ratio"
    )
    for r in rows:
        print(
            f"{r['case']:<10}{r['c']:>5}{('yes' if r['stream'] else 'no'):>7}{r['n']:>6}{r['reps']:>5} | "
            f"{r['direct_p50']:>8.2f} / {r['direct_p99']:>7.2f} | {r['shim_p50']:>7.2f} / {r['shim_p99']:>6.2f} | "
            f"{r['added_p50']:>+8.2f} / {r['added_p99']:>+6.2f} | {r['direct_rps']:>7.0f} / {r['shim_rps']:>6.0f} | {r['ratio']:.{2 if r['ratio'] >= 0.1 else 3}f}x"
        )


def hist_quantiles(
    text: str, name: str, labels: dict[str, str], qs: tuple[float, ...]
) -> list[float]:
    """Upper bucket bounds holding the quantiles qs, from Prometheus exposition text."""
    buckets = []
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and all(w in line for w in want):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out = []
    for q in qs:
        out.append(next((le for le, c in buckets if total and c >= q * total), float("nan")))
    return out


def launch(
    cmd: list[str], ready_url: str, procs: list[subprocess.Popen], errlog: Path, **popen: Any
) -> subprocess.Popen:
    """Start a server process, registered in `procs` (so the caller's cleanup stops it whatever
    happens), and wait until `ready_url` answers. Its stderr goes to `errlog`, a file, not a
    pipe nobody reads (a chatty child would block on a full pipe); its tail is printed if the
    server never comes up."""
    if "stderr" not in popen:
        with errlog.open("ab") as err:
            p = subprocess.Popen(cmd, stderr=err, **popen)
    else:
        p = subprocess.Popen(cmd, **popen)
    procs.append(p)
    name = " ".join(Path(c).name for c in cmd[:3])
    deadline = time.monotonic() + 60
    try:
        while True:  # in 1 s polls, so a child that dies at start fails fast
            try:
                wait_http(ready_url, timeout=1)
                break
            except TimeoutError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise
    except KeyboardInterrupt:
        stop(p, timeout=5)
        raise
    except Exception:
        code = p.poll()
        stop(p, timeout=5)
        why = f"exited with code {code}" if code is not None else "did not answer in 60 s"
        tail = errlog.read_bytes()[-4000:].decode(errors="replace") if errlog.exists() else ""
        print(
            f"`{name}` {why}; the end of {errlog}:\n{tail or '(empty)'}",
            file=sys.stderr,
        )
        raise
    return p


def start_upstream(
    procs: list[subprocess.Popen], folder: Path, delay_ms: float = 0.0
) -> tuple[subprocess.Popen, int]:
    """The raw-socket fake upstream; `delay_ms` > 0 holds each answer that long."""
    port = free_port()
    cmd = [sys.executable, "-m", "finops.shim.fakeupstream", "--fast", "--port", str(port)]
    p = launch(
        [*cmd, "--delay-ms", str(delay_ms)],
        f"http://127.0.0.1:{port}/health",
        procs,
        folder / f"upstream-{port}.stderr.log",
    )
    return p, port


def start_shim(
    procs: list[subprocess.Popen],
    upstream: str,
    log_dir: Path,
    router: Path | None,
    workers: int = 1,
) -> tuple[subprocess.Popen, int]:
    """`finops shim serve` on the three tiers; its stderr goes to `<log_dir>.stderr.log`."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "finops"),
        "shim",
        "serve",
        "--port",
        str(port),
        "--log",
        str(log_dir),
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]
    for t in ("small", "mid", "large"):
        cmd += ["--upstream", f"{t}={upstream}"]
    if router is not None:
        cmd += ["--router", str(router)]
    p = launch(
        cmd,
        f"http://127.0.0.1:{port}/healthz",
        procs,
        log_dir.with_name(log_dir.name + ".stderr.log"),
        stdout=subprocess.DEVNULL,
    )
    return p, port


NGINX_CONF = """
daemon off; master_process on; worker_processes {workers};
pid {dir}/nginx.pid; error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream up {{ server 127.0.0.1:{up_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def start_nginx(
    procs: list[subprocess.Popen], nginx: str, up_port: int, workers: int, folder: Path
) -> tuple[subprocess.Popen, int]:
    """nginx as a plain keep-alive reverse proxy to the upstream (the reference proxy)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, dir=folder, up_port=up_port, port=port))
    p = launch(
        [nginx, "-c", str(conf), "-p", str(folder)],
        f"http://127.0.0.1:{port}/health",
        procs,
        folder / "stderr.log",
        stdout=subprocess.DEVNULL,
    )
    return p, port


LITELLM_CONF = """
model_list:
  - model_name: auto
    litellm_params:
      model: openai/small
      api_base: http://127.0.0.1:{up_port}/v1
      api_key: none
"""


def start_litellm(
    procs: list[subprocess.Popen], litellm: str, up_port: int, workers: int, folder: Path
) -> tuple[subprocess.Popen, int]:
    """The LiteLLM proxy (the issue's anchor) serving `auto` from the upstream: no database,
    no cache, no callbacks, so no spend log either; its output goes to a file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = folder / "litellm.yaml"
    conf.write_text(LITELLM_CONF.format(up_port=up_port))
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
        "LITELLM_LOG": "ERROR",
        # loopback only, no master key: LiteLLM refuses to start without saying so
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    log = folder / "litellm.log"
    cmd = [litellm, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        p = launch(
            [*cmd, "--num_workers", str(workers)],
            f"http://127.0.0.1:{port}/health/liveliness",
            procs,
            log,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return p, port


def reference(
    label: str,
    started: tuple[subprocess.Popen, int],
    up_port: int,
    sizes: tuple[tuple[int, int], ...],
    scale: float,
    title: str,
) -> list[dict]:
    """The fast-upstream grid through a reference proxy (stopped after), printed."""
    proc, port = started
    try:
        rows = grid(label, up_port, port, sizes, scale)
    finally:
        stop(proc)
    print(f"\n== reference: {title}")
    print_rows(rows)
    return rows


def stop(p: subprocess.Popen, timeout: float = 40) -> None:
    """Terminate `p` (a shim stops its workers on SIGTERM), killed if it lingers; idempotent."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (about 30 s)")
    ap.add_argument(
        "--vllm",
        default=os.environ.get("FINOPS_VLLM_URL"),
        help="also measure against this vLLM root URL",
    )
    ap.add_argument(
        "--no-router", action="store_true", help="use the rule policy instead of training a router"
    )
    ap.add_argument(
        "--paced-ms", type=float, default=50.0, help="the paced upstream's response time"
    )
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the nginx and LiteLLM reference tables",
    )
    ap.add_argument(
        "--litellm",
        default=os.environ.get("FINOPS_LITELLM") or shutil.which("litellm"),
        help="the LiteLLM proxy's `litellm` command, for its reference table (default: "
        "$FINOPS_LITELLM, else `litellm` on PATH; `uv tool install 'litellm[proxy]'`)",
    )
    ap.add_argument(
        "--workers",
        default=f"1,{min(os.cpu_count() or 1, 4)}",
        help="comma-separated shim worker counts to measure (default: 1 and the cores, <= 4)",
    )
    a = ap.parse_args()
    worker_counts = sorted({max(1, int(w)) for w in a.workers.split(",") if w.strip()})
    tmp = Path(tempfile.mkdtemp(prefix="bench-shim-"))
    procs: list[subprocess.Popen] = []
    try:
        router = None
        if not a.no_router:
            try:
                from finops.shim.testing import train_demo_router

                router = train_demo_router(tmp / "router", n=400)
                print(
                    f"classifier: trained router artifact {router} (finops.router, 400 demo rows)"
                )
            except (
                Exception
            ) as exc:  # finops.router missing or broken: say so, measure the rule policy
                print(f"classifier: rule policy rules-v1 (could not train a router: {exc})")
        else:
            print("classifier: rule policy rules-v1")
        _, up_port = start_upstream(procs, tmp)
        _, paced_port = start_upstream(procs, tmp, a.paced_ms)
        print(f"cpus: {os.cpu_count()} (shared by load generator, shim and upstream)")
        scale = 0.25 if a.quick else 1.0
        metrics = ""  # the last fast-upstream shim's /metrics, read before it stops
        nginx = None if a.no_reference else shutil.which("nginx")
        for w in worker_counts:
            # one shim at a time: idle shims would still share the cores' caches
            shim, shim_port = start_shim(
                procs, f"http://127.0.0.1:{up_port}", tmp / f"log-{w}", router, workers=w
            )
            rows = grid(f"fast w={w}", up_port, shim_port, FAST_SIZES, scale)
            print(
                f"\n== shim ({w} worker{'s' if w > 1 else ''}) vs the fast loopback upstream "
                "(goal: added p50 <= 1 ms, p99 <= 5 ms, throughput >= 0.8x)"
            )
            print_rows(rows)
            metrics = httpx.get(f"http://127.0.0.1:{shim_port}/metrics").text
            stop(shim)
            workers = f"{w} worker{'s' if w > 1 else ''}"
            if nginx:
                reference(
                    f"nginx w={w}",
                    start_nginx(procs, nginx, up_port, w, tmp / f"nginx-{w}"),
                    up_port,
                    FAST_SIZES,
                    scale,
                    f"nginx pass-through ({workers}; C, no routing, no log) vs the same fast "
                    "upstream: the ceiling for any proxy here",
                )
            elif not a.no_reference:
                print(
                    "\n(reference proxy skipped: nginx is not on PATH; apt-get install nginx-light)"
                )
            if a.litellm and not a.no_reference:
                lrows = reference(
                    f"litellm w={w}",
                    start_litellm(procs, a.litellm, up_port, w, tmp / f"litellm-{w}"),
                    up_port,
                    LITELLM_SIZES,
                    scale,
                    f"LiteLLM proxy ({workers}; Python, no database, cache or callbacks) vs "
                    "the same fast upstream: the issue's anchor",
                )
                for r, lr in zip(rows, lrows, strict=True):
                    print(
                        f"shim vs LiteLLM at {r['c']:>3} concurrent, stream={'yes' if r['stream'] else 'no':<3}: "
                        f"{r['shim_rps'] / lr['shim_rps']:>5.1f}x the requests/s, added p50 "
                        f"{r['added_p50']:.2f} ms vs {lr['added_p50']:.2f} ms"
                    )
            elif not a.no_reference:
                print(
                    "\n(LiteLLM reference skipped: no `litellm` on PATH or in $FINOPS_LITELLM; "
                    "uv tool install 'litellm[proxy]')"
                )
            pshim, pshim_port = start_shim(
                procs, f"http://127.0.0.1:{paced_port}", tmp / f"log-paced-{w}", router, workers=w
            )
            prows = grid(f"paced w={w}", paced_port, pshim_port, PACED_SIZES, scale)
            stop(pshim)
            print(
                f"\n== shim ({w} worker{'s' if w > 1 else ''}) vs an upstream that answers in "
                f"{a.paced_ms:g} ms (a model's latency, no CPU): does the shim limit throughput?"
            )
            print_rows(prows)
        if a.vllm:
            from urllib.parse import urlparse

            u = urlparse(a.vllm)
            _, vport = start_shim(
                procs, a.vllm.rstrip("/").removesuffix("/v1"), tmp / "log-vllm", router
            )
            vrows = []
            for stream in (False, True):
                for c, n in ((1, 40), (8, 80)):
                    vrows.append(
                        run_case(
                            "vllm",
                            (u.hostname or "127.0.0.1", u.port or 80),
                            ("127.0.0.1", vport),
                            "small",
                            c,
                            max(c, int(n * scale)),
                            stream,
                            max_tokens=16,
                        )
                    )
            print(f"\n== shim vs real vLLM at {a.vllm} (16 tokens; for the record)")
            print_rows(vrows)
        m = metrics
        print(
            f"\n== the shim's own added-latency histogram (finops_shim_added_latency_seconds, "
            f"fast upstream, {worker_counts[-1]} worker(s))"
        )
        for stream in ("no", "yes"):
            q = hist_quantiles(
                m, "finops_shim_added_latency_seconds", {"stream": stream}, (0.5, 0.99)
            )
            print(
                f"stream={stream}: p50 <= {q[0] * 1000:.2f} ms, p99 <= {q[1] * 1000:.2f} ms (bucket bounds)"
            )
        from finops.shim.server import uvicorn_config

        ucfg = uvicorn_config(None, "127.0.0.1", 0)
        http = getattr(ucfg.http, "__name__", ucfg.http)
        stack = f"uvicorn loop={ucfg.loop} (uvloop when installed), http={http}, as `finops shim serve` runs"
        print(
            f"server stack: {stack}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
        )
    finally:
        for p in reversed(procs):  # every server started, stopped or not (stop is idempotent)
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
