"""Validate the capacity model on a real vLLM server (CPU build, tiny model).

1. Load the server open-loop (Poisson arrivals) at a few low request rates,
   scraping /metrics every second into a temporary lake (the collectors'
   parser, `Lake.append`), exactly as production data arrives.
2. Fit the per-replica service model from that lake only (finops.models:
   Little's-law concurrency vs generation tokens/s, prefill speed from the
   prefill-time histogram).
3. Predict (a) throughput at saturation (64 concurrent requests) and (b) the
   p95 end-to-end latency at a higher, unseen request rate, via the
   continuous-batching simulation; then measure both.
4. Print predicted vs measured, the error (goal: within 15%), and the error of
   a naive baseline measured in the same run (latency as at the highest fitted
   rate; throughput extrapolated linearly from light load, i.e. no saturation).

By default a short closed-loop probe first sets the fit rates to 30/55/80% and
the unseen rate to 90% of this machine's capacity (a fit that never sees the
curve bend cannot place the ceiling); `--fixed-rates` uses --rates/--high-rate.

    uv run python bench/bench_vllm_capacity_validation.py [--quick] [--url URL]

Without --url (or $FINOPS_VLLM_URL) it starts its own server (clean numbers,
~2 minutes to start); a shared server gives noisier figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finops
from collectors.exposition import parse
from collectors.vllm import serving_rows
from finops.lake import Lake
from finops.models.data import serving_intervals
from finops.models.queueing import ServiceModel, simulate
from finops.models.regressors import SaturatingRegressor
from finops.models.simulate import _prefill_speed

FAILURES: list[str] = []
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
]


class Scraper:
    """Scrape /metrics every `period` seconds into serving_samples rows."""

    def __init__(self, client: httpx.AsyncClient, url: str, period: float = 1.0) -> None:
        self.client, self.url, self.period = client, url, period
        self.frames: list[pl.DataFrame] = []
        self._task: asyncio.Task | None = None

    async def scrape_once(self) -> None:
        r = await self.client.get(self.url)
        ts = dt.datetime.now(dt.UTC)
        self.frames.append(serving_rows(parse(r.content), ts=ts, target="bench-vllm"))

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self.period - (time.monotonic() - t0)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.scrape_once()


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt_words: int, max_tokens: int
) -> float:
    prompt = f"{random.getrandbits(64):x} " + " ".join(random.choices(WORDS, k=prompt_words))
    t0 = time.perf_counter()
    try:
        r = await client.post(
            url,
            json={
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0,
            },
        )
        r.raise_for_status()
    except httpx.HTTPError as exc:  # counted and reported, never silently dropped
        FAILURES.append(repr(exc))
        return float("nan")
    return time.perf_counter() - t0


async def open_loop(client, url, model, rate, seconds, prompt_words, max_tokens, rng) -> list:
    """Poisson arrivals at `rate` for `seconds`; returns client-side latencies (s)."""
    tasks = []
    t_start = time.perf_counter()
    t_next = rng.exponential(1 / rate)
    while t_next < seconds:
        delay = t_start + t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(client, url, model, prompt_words, max_tokens)))
        t_next += rng.exponential(1 / rate)
    lats = np.array(await asyncio.gather(*tasks))
    return list(lats[~np.isnan(lats)])


async def closed_loop(client, url, model, conc, seconds, prompt_words, max_tokens) -> int:
    """`conc` clients back to back for `seconds`; returns completed requests."""
    stop = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            lat = await one_request(client, url, model, prompt_words, max_tokens)
            done += lat == lat  # NaN (failed) does not count

    await asyncio.gather(*[worker() for _ in range(conc)])
    return done


def gen_tokens(frames: list[pl.DataFrame], model: str) -> float:
    f = frames[-1].filter(
        (pl.col("metric") == "vllm:generation_tokens_total") & (pl.col("model_name") == model)
    )
    return float(f["value"].sum())


async def run(args: argparse.Namespace, base: str) -> dict:
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    comp = f"{base}/v1/completions"
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=200)) as c:
        await one_request(c, comp, args.model, args.prompt_words, args.max_tokens)  # warm
        if args.auto_rates:
            # A short closed-loop probe sets the rates as fractions of this machine's capacity
            # (it is not used by the fit; saturation is measured again at the end).
            t0 = time.perf_counter()
            n = await closed_loop(
                c,
                comp,
                args.model,
                args.sat_concurrency,
                args.probe_s,
                args.prompt_words,
                args.max_tokens,
            )
            cap = n / (time.perf_counter() - t0)
            args.probe_tps = cap * args.max_tokens
            args.rates = [round(f * cap, 2) for f in (0.3, 0.55, 0.8)]
            args.high_rate = round(0.9 * cap, 2)
            print(
                f"probe: ~{cap:.1f} req/s at saturation -> fit rates {args.rates}, "
                f"unseen rate {args.high_rate}"
            )
            await asyncio.sleep(2)
        scraper = Scraper(c, f"{base}/metrics", period=1.0)
        await scraper.scrape_once()
        scraper.start()
        low_lat = {}
        for rate in args.rates:
            low_lat[rate] = await open_loop(
                c, comp, args.model, rate, args.phase_s, args.prompt_words, args.max_tokens, rng
            )
            await asyncio.sleep(1.5)
        await scraper.stop()
        fit_frames = list(scraper.frames)
        # --- unseen: higher open-loop rate, then saturation (closed loop)
        high_lat = await open_loop(
            c,
            comp,
            args.model,
            args.high_rate,
            args.phase_s,
            args.prompt_words,
            args.max_tokens,
            rng,
        )
        s0 = Scraper(c, f"{base}/metrics")
        await s0.scrape_once()
        t0 = time.perf_counter()
        await closed_loop(
            c,
            comp,
            args.model,
            args.sat_concurrency,
            args.sat_s,
            args.prompt_words,
            args.max_tokens,
        )
        sat_secs = time.perf_counter() - t0
        await s0.scrape_once()
        sat_tps = (
            gen_tokens(s0.frames[-1:], args.model) - gen_tokens(s0.frames[:1], args.model)
        ) / sat_secs
    return {"fit_frames": fit_frames, "low_lat": low_lat, "high_lat": high_lat, "sat_tps": sat_tps}


def fit_and_predict(args: argparse.Namespace, res: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(Path(tmp) / "lake")
        rows = pl.concat(res["fit_frames"], how="vertical_relaxed")
        lake.append("serving_samples", rows, source="vllm")
        db = finops.connect(lake.path)
        df = serving_intervals(db, interval_s=args.window_s, tier=args.model)
    df = df.filter((pl.col("requests") > 0) & pl.col("concurrency").is_not_null())
    if os.environ.get("BENCH_DEBUG"):
        with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200):
            print(
                df.select(
                    "t",
                    "seconds",
                    "requests",
                    "gen_tps",
                    "concurrency",
                    "running",
                    "waiting",
                    "mean_output",
                    "prefill_s_per_request",
                )
            )
    X = df.select("concurrency").to_numpy()
    y = df["gen_tps"].to_numpy()
    model = SaturatingRegressor(hill_exponent=False).fit(X, y)
    prefill = _prefill_speed(df)
    mean_prompt = float(df["mean_prompt"].mean())
    mean_out = float(df["mean_output"].mean())
    svc = ServiceModel.from_curve(
        model.vmax_, model.k_, model.hill_, max_num_seqs=256, prefill_tokens_per_s=prefill
    )
    pred_sat = float(model.predict(np.array([[args.sat_concurrency]]))[0])

    # The DES replays the measured experiment: Poisson arrivals for phase_s seconds into an
    # idle server, every request counted (a finite phase, like the measurement).
    def phase_e2e(rate: float, seeds: int = 8) -> np.ndarray:
        out = []
        for seed in range(seeds):
            r = np.random.default_rng(100 + seed)
            arr = np.cumsum(r.exponential(1 / rate, int(rate * args.phase_s * 3) + 50))
            arr = arr[arr < args.phase_s]
            sim = simulate(
                arr,
                np.full(arr.size, float(args.max_tokens)),
                svc,
                replicas=1,
                prompt_tokens=np.full(arr.size, mean_prompt),
            )
            out.append(sim.e2e_s)
        return np.concatenate(out)

    # client-side latency = server e2e + HTTP overhead, measured at the lowest rate
    low_rate = min(args.rates)
    overhead = max(
        float(np.median(res["low_lat"][low_rate])) - float(np.median(phase_e2e(low_rate))), 0.0
    )
    pred_p95 = float(np.quantile(phase_e2e(args.high_rate), 0.95)) + overhead
    # naive baselines measured in the same run
    top = max(args.rates)
    naive_p95 = float(np.quantile(res["low_lat"][top], 0.95))
    light = df.filter(pl.col("concurrency") > 0)
    per_seq = float((light["gen_tps"] / light["concurrency"]).median())
    naive_sat = per_seq * args.sat_concurrency
    return {
        "vmax": model.vmax_,
        "k": model.k_,
        "hill": model.hill_,
        "prefill_tps": prefill,
        "intervals": df.height,
        "mean_prompt": mean_prompt,
        "mean_output": mean_out,
        "pred_sat_tps": pred_sat,
        "pred_p95_s": pred_p95,
        "overhead_s": overhead,
        "naive_p95_s": naive_p95,
        "naive_sat_tps": naive_sat,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases")
    ap.add_argument("--url", default=os.environ.get("FINOPS_VLLM_URL"))
    ap.add_argument("--model", default="small")
    ap.add_argument("--rates", default="3,6,9", help="fit rates (req/s) with --fixed-rates")
    ap.add_argument(
        "--fixed-rates",
        dest="auto_rates",
        action="store_false",
        help="use --rates/--high-rate as given instead of fractions of a capacity probe",
    )
    ap.add_argument("--probe-s", type=float, default=8.0)
    ap.add_argument("--high-rate", type=float, default=12.0)
    ap.add_argument("--phase-s", type=float, default=25.0)
    ap.add_argument("--sat-concurrency", type=int, default=32)
    ap.add_argument("--sat-s", type=float, default=20.0)
    ap.add_argument("--window-s", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.quick:
        args.phase_s, args.sat_s, args.probe_s = 15.0, 10.0, 5.0
    server = None
    t_all = time.perf_counter()
    if args.url:
        base = args.url.rstrip("/").removesuffix("/v1")
        print(f"server: attached to {base} (shared: figures are noisier)")
    else:
        from finops.vllm_local import start

        t0 = time.perf_counter()
        server = start((args.model,))
        base = server.root_url
        print(f"server: started own vLLM at {base} in {time.perf_counter() - t0:.0f}s")
    try:
        t0 = time.perf_counter()
        res = asyncio.run(run(args, base))
        load_s = time.perf_counter() - t0
    finally:
        if server is not None:
            server.stop()
    p = fit_and_predict(args, res)
    meas_p95 = float(np.quantile(res["high_lat"], 0.95))
    meas_sat = res["sat_tps"]

    def err(pred: float, meas: float) -> float:
        return 100.0 * (pred - meas) / meas

    print(
        f"fit: {p['intervals']} windows of {args.window_s}s at {args.rates} req/s -> "
        f"vmax={p['vmax']:.0f} tok/s k={p['k']:.2f} h={p['hill']:.2f}, "
        f"prefill {p['prefill_tps']:.0f} tok/s, prompt {p['mean_prompt']:.0f} / "
        f"output {p['mean_output']:.0f} tokens"
    )
    print(
        f"throughput at saturation ({args.sat_concurrency} concurrent): predicted "
        f"{p['pred_sat_tps']:.0f} tok/s, measured {meas_sat:.0f} tok/s, error "
        f"{err(p['pred_sat_tps'], meas_sat):+.1f}% (naive linear baseline "
        f"{p['naive_sat_tps']:.0f} tok/s, error {err(p['naive_sat_tps'], meas_sat):+.1f}%)"
    )
    print(
        f"p95 latency at {args.high_rate:g} req/s (unseen): predicted "
        f"{1000 * p['pred_p95_s']:.0f} ms, measured {1000 * meas_p95:.0f} ms, error "
        f"{err(p['pred_p95_s'], meas_p95):+.1f}% (baseline: p95 at {max(args.rates):g} req/s = "
        f"{1000 * p['naive_p95_s']:.0f} ms, error {err(p['naive_p95_s'], meas_p95):+.1f}%)"
    )
    if getattr(args, "probe_tps", None):
        drift = 100.0 * (meas_sat - args.probe_tps) / args.probe_tps
        print(
            f"capacity drift between the probe and the final saturation run: {drift:+.0f}% "
            "(beyond ~10% the machine's load changed during the run; the errors then measure "
            "that, not the model)"
        )
    if FAILURES:
        print(f"failed requests: {len(FAILURES)} (first: {FAILURES[0]})")
    ratio = abs(err(p["naive_p95_s"], meas_p95)) / max(abs(err(p["pred_p95_s"], meas_p95)), 1e-9)
    print(
        f"model vs baseline: latency error {ratio:.1f}x smaller; load phases {load_s:.0f}s, "
        f"total {time.perf_counter() - t_all:.0f}s"
    )


if __name__ == "__main__":
    main()
