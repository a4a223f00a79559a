"""Scrape -> lake, end to end, for a simulated 256-GPU fleet scraped every 10 s.

A separate process serves 32 dcgm-exporter endpoints (8 GPUs each, values
changing every scrape) on loopback. This process runs the real collector
(`collectors.daemon.Collector`: HTTP, parse, map, validate, write Parquet)
through back-to-back cycles; each cycle is one 10-second interval's work:
scrape all 32 targets, then flush once (as `flush_interval = 10s` would).

Reported: CPU seconds this process spends per cycle (all threads) and that as
a share of one core over a 10 s interval (goal < 10 %), samples/s, and the
baseline measured in the same run: the CPU of only *parsing* the same
payloads with prometheus_client (no HTTP, no lake).

    uv run python bench/bench_scrape_to_lake.py [--quick] [--nodes 32] [--gpus-per-node 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from prometheus_client.parser import text_string_to_metric_families

from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector

INTERVAL = 10.0

SERVER = textwrap.dedent(
    """
    import sys, itertools
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    sys.path.insert(0, sys.argv[1])
    from collectors.dcgm import render_payload
    nodes, gpus = int(sys.argv[2]), int(sys.argv[3])
    steps = 3
    pages = {
        f"/node{n}/metrics": [
            render_payload(gpus, variant="k8s", hostname=f"node-{n}", seed=n, step=s,
                           pods={g: ("llm", f"vllm-{n}-{g}", "vllm") for g in range(gpus)}).encode()
            for s in range(steps)
        ]
        for n in range(nodes)
    }
    counters = {p: itertools.count() for p in pages}
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = pages[self.path][next(counters[self.path]) % steps]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    print(srv.server_address[1], flush=True)
    srv.serve_forever()
    """
)


async def run_cycles(collector: Collector, cycles: int) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, samples) over `cycles` intervals of work."""
    await collector._open()
    try:
        # one warm-up cycle: imports, connection pool, first files
        await asyncio.gather(*(collector.run_attempt(t) for t in collector.targets))
        await collector.flush()
        samples0 = collector.stats.samples
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(cycles):
            outs = await asyncio.gather(*(collector.run_attempt(t) for t in collector.targets))
            bad = [o for o in outs if not o.up]
            assert not bad, bad[0].error
            await collector.flush()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        return cpu, wall, collector.stats.samples - samples0
    finally:
        await collector._close()


def baseline_cpu(urls: list[str], cycles: int) -> float:
    """CPU seconds per cycle to parse the same payloads with prometheus_client only."""
    pages = [httpx.get(u, timeout=30).text for u in urls]
    c0 = time.process_time()
    for _ in range(cycles):
        for text in pages:
            for fam in text_string_to_metric_families(text):
                for _s in fam.samples:
                    pass
    return (time.process_time() - c0) / cycles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cycles (CI smoke)")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args()
    cycles = 3 if args.quick else 12
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(root), str(args.nodes), str(args.gpus_per_node)],
        stdout=subprocess.PIPE,
        text=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        urls = [f"http://127.0.0.1:{port}/node{n}/metrics" for n in range(args.nodes)]
        cfg = CollectConfig(lake=tmp / "lake", checkpoint_dir=tmp / "state")
        for u in urls:
            cfg.targets.append(make_target({"kind": "dcgm", "url": u, "timeout": "9s"}, u))
        collector = Collector(cfg, status=None)
        cpu, wall, samples = asyncio.run(run_cycles(collector, cycles))
        base = baseline_cpu(urls, max(2, cycles // 3))
        per_cycle = cpu / cycles
        gpus = args.nodes * args.gpus_per_node
        print(
            f"fleet: {gpus} GPUs on {args.nodes} exporters, {samples // cycles:,} samples per "
            f"{INTERVAL:g} s scrape, {cycles} cycles"
        )
        print(f"collector (HTTP + parse + lake write): {per_cycle * 1e3:8.1f} ms CPU per cycle")
        print(
            f"  = {per_cycle / INTERVAL:6.2%} of one core at a {INTERVAL:g} s interval (goal < 10%)"
        )
        print(
            f"  throughput: {samples / cpu:,.0f} samples per CPU second ({wall / cycles * 1e3:.0f} ms wall per cycle)"
        )
        print(f"baseline (prometheus_client parse only): {base * 1e3:8.1f} ms CPU per cycle")
        print(
            f"  = {base / INTERVAL:6.2%} of one core; collector/baseline CPU = {per_cycle / base:.2f}x"
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
