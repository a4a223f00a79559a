"""`make demo-live`: real vLLM servers, the shim with a trained router, the collectors,
and a replayed production trace; then the economics from what was collected.

Steps (everything real, on this machine unless --vllm points elsewhere):
1. vLLM: two CPU servers with the tiny model (`finops.vllm_local`), or the
   servers you name with `--vllm URL` (repeat; e.g. your GPU replicas);
2. router: trained on the demo labeled set with `finops.router.train`;
3. shim: `finops shim serve --config <run>/shim.toml` (tiers small/mid on
   server 1, large on server 2, three tenants' API keys, a context cap, the
   response cache, 5% exploration);
4. collectors: `finops collect` scraping each vLLM's /metrics and following
   the shim's request log into the lake;
5. load: the Azure LLM conversation trace (2023, CC-BY 4.0) replayed through
   the official `openai` client: its arrival times compressed to --minutes,
   its prompt and output sizes scaled down to what the tiny model accepts;
   prompts come from the demo labeled set's families so routing has real work;
6. economics: per tier / tenant from the lake (`requests`, `serving_samples`),
   priced as if each tier ran on the GPUs of the demo fleet (data/prices.csv),
   next to the all-`large` counterfactual; `finops costs` when GPU samples exist.

Point it at real GPU servers: `python scripts/demo_live.py --vllm http://gpu-a:8000
--vllm http://gpu-b:8000 --served small=llama-3.2-1b-instruct ...` (see README).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from finops.loopback import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
TRACES = Path(os.environ.get("FINOPS_TRACES", ROOT.parent / "shared" / "data" / "traces"))
TENANTS = {"key-acme-demo": "acme", "key-globex-demo": "globex", "key-initech-demo": "initech"}
# what each tier would run on in production (the demo fleet): GPU model, GPUs per replica
TIER_GPUS = {"small": ("NVIDIA L4", 1), "mid": ("NVIDIA L4", 1), "large": ("H100 80GB HBM3", 4)}


def log(msg: str) -> None:
    print(f"[demo-live {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def finops_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from finops.cli import main; main()", *args]


def load_trace(path: Path, minutes: float, rate: float, seed: int) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, output tokens) scaled to `minutes` at about `rate` req/s."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append((r["TIMESTAMP"], int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    want = int(minutes * 60 * rate)
    start = random.Random(seed).randrange(0, max(1, len(rows) - want))
    sel = rows[start : start + want]
    import datetime as dt

    def ts(s: str) -> float:
        return dt.datetime.fromisoformat(s[:26]).timestamp()

    t0 = ts(sel[0][0])
    span = max(1e-6, ts(sel[-1][0]) - t0)
    scale = minutes * 60 / span  # compress (or stretch) the real arrival pattern to the window
    return [((ts(s) - t0) * scale, c, g) for s, c, g in sel]


def build_requests(
    trace: list[tuple[float, int, int]], seed: int, max_chars: int = 900, max_out: int = 64
) -> list[dict]:
    from finops.router.data import demo_labeled_rows

    rng = random.Random(seed)
    pool = demo_labeled_rows(2000, seed + 7)
    out = []
    seen: list[dict] = []
    for i, (at, ctx, gen) in enumerate(trace):
        row = pool[i % len(pool)]
        # sizes scaled to the tiny model (max_model_len 1024): prompt ~ctx/8 tokens, output ~gen/4
        target_chars = min(max_chars, max(40, ctx // 2))  # tiny model: ~2 chars/token, 1024 max
        if "messages" in row:
            msgs = [dict(m) for m in row["messages"]]
        else:
            msgs = [{"role": "user", "content": row["prompt"]}]
        text = msgs[-1]["content"]
        if len(text) < target_chars:
            text = (
                text
                + " Context: "
                + " ".join(
                    rng.choice(
                        [
                            "invoice",
                            "ticket",
                            "order",
                            "shipment",
                            "refund",
                            "contract",
                            "ledger",
                            "account",
                        ]
                    )
                    for _ in range((target_chars - len(text)) // 8)
                )
            )[:target_chars]
        msgs[-1]["content"] = text[:target_chars]
        req = {
            "at": at,
            "tenant_key": rng.choice(list(TENANTS)),
            "feature": row["feature"],
            "body": {
                "model": "auto",
                "messages": msgs,
                "max_tokens": max(4, min(max_out, gen // 4)),
                "stream": rng.random() < 0.5,
            },
            "idem": None,
        }
        k = rng.random()
        if k < 0.12 and seen:  # an exact duplicate of an earlier deterministic request (cache)
            prev = rng.choice(seen)
            req = {**prev, "at": at, "body": {**prev["body"]}, "idem": None}
        elif k < 0.3:
            req["body"]["temperature"] = 0
            seen.append(req)
        elif k < 0.34:
            req["idem"] = f"demo-{i}"  # the client retries this one with the same Idempotency-Key
        out.append(req)
    return out


async def replay(base_url: str, reqs: list[dict]) -> dict[str, int]:
    import openai

    clients = {
        k: openai.AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0, timeout=120)
        for k in TENANTS
    }
    stats: dict[str, int] = {}
    t0 = time.monotonic()

    def bump(k: str) -> None:
        stats[k] = stats.get(k, 0) + 1

    async def one(r: dict) -> None:
        await asyncio.sleep(max(0.0, r["at"] - (time.monotonic() - t0)))
        c = clients[r["tenant_key"]]
        headers = {"X-Feature": r["feature"]}
        if r["idem"]:
            headers["Idempotency-Key"] = r["idem"]
        body = dict(r["body"])
        stream = body.pop("stream")
        for attempt in range(2 if r["idem"] else 1):
            try:
                if stream:
                    s = await c.chat.completions.create(**body, stream=True, extra_headers=headers)
                    async for _ in s:
                        pass
                else:
                    await c.chat.completions.create(**body, extra_headers=headers)
                bump("ok" if attempt == 0 else "idempotent_retry")
            except openai.APIStatusError as exc:
                bump(f"http_{exc.status_code}")
            except openai.APIError as exc:
                bump(type(exc).__name__)

    await asyncio.gather(*(one(r) for r in reqs))
    for c in clients.values():
        await c.close()
    return stats


def judge_candidate(lake: Path, candidate: Path) -> None:
    """What the run's logs say about another router before it serves a request (IPS/SNIPS
    over the shim's logged propensities; `finops router offpolicy` does the same)."""
    import warnings

    from finops.router.offpolicy import OffPolicyError, format_table, off_policy_estimate

    print(
        "\n=== a candidate router judged offline from this run's logs (finops router offpolicy) ==="
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # format_table prints them
            result = off_policy_estimate(candidate, lake)
    except OffPolicyError as exc:
        print(f"not possible: {exc}")
        return
    print("\n".join(format_table(result)))


def economics(lake: Path, shim_metrics: str) -> None:
    import polars as pl

    import finops
    from finops.prices import load_prices, price_for

    pl.Config.set_tbl_cols(-1)
    pl.Config.set_tbl_width_chars(200)
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_tbl_hide_column_data_types(True)
    db = finops.connect(lake)
    reqs = db.sql("SELECT * FROM clean.requests").pl()
    if reqs.height == 0:
        log("no requests reached the lake: check the collector output above")
        return
    t_min, t_max = reqs["ts"].min(), reqs["ts"].max()
    hours = max(1e-9, (t_max - t_min).total_seconds() / 3600)
    print("\n=== what the lake holds (collected live) ===")
    print(
        db.sql(
            "SELECT table_name, count(*) FROM (SELECT 'requests' AS table_name FROM raw.requests UNION ALL SELECT 'serving_samples' FROM raw.serving_samples UNION ALL SELECT 'cache_events' FROM raw.cache_events UNION ALL SELECT 'scrape_health' FROM raw.scrape_health) GROUP BY 1 ORDER BY 1"
        ).pl()
    )
    by_tier = db.sql(
        """
        SELECT tier, count(*) AS requests,
               count(*) FILTER (cache_status IN ('hit', 'coalesced')) AS cache_served,
               count(*) FILTER (status_code >= 400) AS failed,
               sum(input_tokens)::BIGINT AS input_tokens, sum(output_tokens)::BIGINT AS output_tokens,
               sum(cached_input_tokens)::BIGINT AS prefix_cached_tokens,
               sum(truncated_tokens)::BIGINT AS truncated_tokens,
               round(quantile_cont(ttft_ms, 0.5), 1) AS ttft_p50_ms, round(quantile_cont(latency_ms, 0.95), 1) AS latency_p95_ms
        FROM clean.requests GROUP BY tier ORDER BY tier
        """
    ).pl()
    print("\n=== requests by tier (request log -> lake) ===")
    print(by_tier)
    prices = load_prices(ROOT / "data" / "prices.csv")
    rate = {t: price_for(prices, g, "on_demand") * n for t, (g, n) in TIER_GPUS.items()}
    tok = by_tier.with_columns(
        (pl.col("input_tokens").fill_null(0) + pl.col("output_tokens").fill_null(0)).alias("tokens")
    )
    total_tokens = max(1, int(tok["tokens"].sum()))
    # cost of serving each tier's token work at its GPU's $/h, sized by the run's wall time
    # (one replica per tier for the run's duration), allocated by token share
    rows = []
    fleet_usd = sum(rate[t] for t in TIER_GPUS) * hours
    for r in tok.iter_rows(named=True):
        t = r["tier"]
        if t not in rate:
            continue
        usd = rate[t] * hours
        rows.append(
            {
                "tier": t,
                "gpu": f"{TIER_GPUS[t][1]}x {TIER_GPUS[t][0]}",
                "usd_per_hour": rate[t],
                "usd_run": usd,
                "requests": r["requests"],
                "usd_per_1k_requests": 1000 * usd / max(1, r["requests"]),
                "token_share": round(float(r["tokens"]) / total_tokens, 3),
            }
        )
    print(
        f"\n=== economics, priced as the demo fleet (on-demand, data/prices.csv), run = {hours * 60:.1f} min ==="
    )
    print(pl.DataFrame(rows))
    # counterfactual: all traffic on `large`; capacity scales with token work
    served = int(reqs.filter(pl.col("status_code") == 200).height)
    large_rate = rate["large"]
    share_small_mid = float(tok.filter(pl.col("tier") != "large")["tokens"].sum()) / total_tokens
    routed_usd = fleet_usd
    all_large_usd = (
        large_rate * hours * (1 + share_small_mid)
    )  # large replicas needed for the extra work
    print(
        f"served {served} requests; routed fleet ${routed_usd:.4f} vs all-large ${all_large_usd:.4f} for the same work "
        f"({(1 - routed_usd / all_large_usd) * 100:+.0f}% saving, {share_small_mid * 100:.0f}% of tokens off `large`)"
    )
    by_tenant = db.sql(
        "SELECT tenant, count(*) AS requests, sum(input_tokens + output_tokens)::BIGINT AS tokens, "
        "count(*) FILTER (retry_of IS NOT NULL) AS retries, count(*) FILTER (cache_status = 'hit') AS cache_hits "
        "FROM clean.requests GROUP BY 1 ORDER BY 1"
    ).pl()
    print("\n=== by tenant ===")
    print(by_tenant)
    router = db.sql(
        "SELECT router_version, routed_tier, count(*) AS decisions, "
        "count(*) FILTER (tier <> routed_tier) AS served_by_fallback, round(avg(router_score), 3) AS mean_score, "
        "round(avg(route_propensity), 3) AS mean_propensity FROM clean.requests WHERE request_model = 'auto' GROUP BY ALL ORDER BY 2"
    ).pl()
    print("\n=== router decisions (logged with propensities for offline evaluation) ===")
    print(router)
    serving = db.sql(
        "SELECT target, metric, max(value) - min(value) AS increase FROM clean.serving_samples "
        "WHERE metric IN ('vllm:prompt_tokens_total', 'vllm:generation_tokens_total', 'vllm:prefix_cache_hits_total') "
        "GROUP BY ALL ORDER BY 1, 2"
    ).pl()
    print("\n=== vLLM counters scraped by the collector (increase over the run) ===")
    print(serving)
    gpu = db.sql("SELECT count(*) FROM raw.gpu_samples").fetchall()[0][0]
    if gpu:
        subprocess.run(finops_cmd("costs", "--lake", str(lake), "--by", "tier"), check=False)
    else:
        print(
            "\n(no GPU samples: vLLM ran on CPU here; with --dcgm URL on a GPU fleet, `finops costs` prices the real GPU-hours)"
        )
    if shim_metrics:
        m = shim_metrics
        keep = (
            "finops_shim_fallbacks_total",
            "finops_shim_cache_total",
            "finops_shim_coalesced_total",
            "finops_shim_router_decisions_total",
        )
        print("\n=== shim metrics ===")
        print("\n".join(ln for ln in m.splitlines() if ln.startswith(keep)))


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Live demo: vLLM + shim + trained router + collectors + a replayed trace."
    )
    ap.add_argument("--minutes", type=float, default=3.0, help="how long to replay the trace")
    ap.add_argument(
        "--rate", type=float, default=3.0, help="mean requests/s (the trace's shape is kept)"
    )
    ap.add_argument("--trace", type=Path, default=TRACES / "azure-llm-2023-conv.csv")
    ap.add_argument(
        "--vllm",
        action="append",
        default=[],
        help="use these vLLM root URLs (first: small+mid, last: large)",
    )
    ap.add_argument(
        "--served",
        action="append",
        default=[],
        help="TIER=MODEL the upstream serves (default: the tier name)",
    )
    ap.add_argument(
        "--dcgm",
        action="append",
        default=[],
        help="dcgm-exporter URL(s) to collect GPU metrics from",
    )
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=ROOT / "data" / "live",
        help="work folder (lake, logs, router, config)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--max-prompt-chars",
        type=int,
        default=900,
        help="prompt size cap (raise it for real models)",
    )
    ap.add_argument(
        "--max-output-tokens", type=int, default=64, help="output cap (raise it for real models)"
    )
    a = ap.parse_args()
    if not a.trace.exists():
        raise SystemExit(f"{a.trace}: trace not found (set FINOPS_TRACES or --trace)")
    run = a.run_dir
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    lake, logs = run / "lake", run / "shim-log"
    procs: list[subprocess.Popen] = []
    servers = []
    try:
        urls = list(a.vllm)
        if not urls and os.environ.get("FINOPS_VLLM_URL"):
            urls = [os.environ["FINOPS_VLLM_URL"]] + (
                [os.environ["FINOPS_VLLM_URL_2"]] if os.environ.get("FINOPS_VLLM_URL_2") else []
            )
            log(f"using the running vLLM servers {urls} (FINOPS_VLLM_URL)")
        if not urls:
            import concurrent.futures as cf

            from finops.vllm_local import start

            log("starting two real vLLM CPU servers in parallel (about 2-3 minutes)...")
            with cf.ThreadPoolExecutor(2) as ex:
                futs = [
                    ex.submit(start, port=free_port(), log_dir=run / f"vllm-logs-{i}")
                    for i in range(2)
                ]
                errors = []
                for f in futs:
                    try:
                        servers.append(f.result())
                    except Exception as exc:
                        errors.append(str(exc))
            if errors:  # the finally block stops the one that did start
                raise SystemExit(f"could not start vLLM: {errors[0]}")
            urls += [s.root_url for s in servers]
        urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        served = dict(s.split("=", 1) for s in a.served)
        tiers = {"small": [urls[0]], "mid": [urls[0]], "large": [urls[-1]]}
        log(f"tiers: {tiers}")

        log("training the router on the demo labeled set (finops.router.train)...")
        from finops.shim.testing import train_demo_router

        router = train_demo_router(
            run / "router", n=1500, upstream_models={t: served.get(t, t) for t in tiers}
        )
        # a second router, not served: judged from the served one's logs at the end
        candidate = train_demo_router(
            run / "candidate",
            n=1500,
            seed=7,
            quality_target=0.8,
            upstream_models={t: served.get(t, t) for t in tiers},
        )
        from finops.shim.config import hash_key

        port = free_port()
        keys = ",\n  ".join(
            f'{{ sha256 = "{hash_key(k)}", tenant = "{t}" }}' for k, t in TENANTS.items()
        )
        tier_toml = "\n".join(
            f'[tiers.{t}]\nupstreams = {u!r}\nmodel = "{served.get(t, t)}"'.replace("'", '"')
            for t, u in tiers.items()
        )
        (run / "shim.toml").write_text(
            f'[server]\nport = {port}\n{tier_toml}\n[router]\npath = "{router}"\nexploration_rate = 0.05\n'
            f"[auth]\nkeys = [\n  {keys}\n]\n"
            '[caps]\n[[caps.rule]]\ntier = "small"\nmax_input_tokens = 250\npolicy = "truncate"\n'
            f'[log]\ndir = "{logs}"\nrotate_s = 20.0\n'
        )
        shim = subprocess.Popen(
            finops_cmd(
                "shim", "serve", "--config", str(run / "shim.toml"), "--log-level", "warning"
            ),
            stderr=open(run / "shim.stderr", "w"),  # noqa: SIM115 (lives as long as the process)
        )
        procs.append(shim)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base + "/healthz", 60, interval=0.3)
        except TimeoutError as exc:
            raise SystemExit(str(exc)) from None
        log(f"shim on {base}/v1 with router {router.name}")

        collect_args = [
            "collect",
            "--lake",
            str(lake),
            "--interval",
            "5s",
            "--log",
            str(logs / "requests-*.jsonl*"),
        ]
        for u in urls:
            collect_args += ["--vllm", u]
        for d in a.dcgm:
            collect_args += ["--dcgm", d]
        collector = subprocess.Popen(
            finops_cmd(*collect_args),
            stderr=open(run / "collect.stderr", "w"),  # noqa: SIM115
            stdout=subprocess.DEVNULL,
        )
        procs.append(collector)
        log(f"collector: finops {' '.join(collect_args)}")

        trace = load_trace(a.trace, a.minutes, a.rate, a.seed)
        reqs = build_requests(trace, a.seed, a.max_prompt_chars, a.max_output_tokens)
        log(f"replaying {len(reqs)} requests from {a.trace.name} over {a.minutes:g} min...")
        stats = asyncio.run(replay(base + "/v1", reqs))
        log(f"load done: {stats}")
        time.sleep(2)
        shim_metrics = httpx.get(base + "/metrics", timeout=10).text
        shim.send_signal(signal.SIGTERM)  # flushes and closes the request log
        shim.wait(60)
        time.sleep(8)  # the collector's next poll picks up the closed log file
        collector.send_signal(signal.SIGTERM)
        collector.wait(60)
        log("collector stopped (flushed)")
        economics(lake, shim_metrics)
        judge_candidate(lake, candidate)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
