"""Validate the capacity model on a real vLLM server (CPU build, tiny model).

1. Load the server open-loop (Poisson arrivals) at a few low request rates,
   scraping /metrics every second into a temporary lake (the collectors'
   parser, `Lake.append`), exactly as production data arrives.
2. Fit the per-replica service model from that lake only (finops.models:
   the decode step time, vLLM's inter-token latency, as a line in the
   Little's-law concurrency, which is the Michaelis-Menten throughput curve;
   prefill speed from the prefill-time histogram).
3. Predict (a) throughput at saturation (`--sat-concurrency` clients back to
   back) and (b) the p95 end-to-end latency at a higher, unseen request rate,
   via the continuous-batching simulation replaying the run's own arrival
   times; then compare with what was measured.
4. Print predicted vs measured, the error (goal: within 15%), and the error of
   a naive baseline measured in the same run (latency as at the highest fitted
   rate; throughput extrapolated linearly from light load, i.e. no saturation).

The fit rates, the unseen rate and the saturation runs are interleaved in
`--rounds` shuffled rounds, so a slow minute on a shared machine lands on all
of them alike; the spread of the saturation runs is printed as the machine's
own drift. A warm-up at full load and a short closed-loop probe come first; by
default the probe sets the fit rates to 30/55/80% and the unseen rate to 90%
of this machine's capacity (a fit that never sees the curve bend cannot place
the ceiling); `--fixed-rates` uses --rates/--high-rate. Its own server runs
with the engine pinned to one CPU (`finops.vllm_local.pin_engine`; `--no-pin`
to leave placement to the OS). `--save DIR` keeps the measurements and
`--replay DIR` re-runs the fit and the comparison on them, without a server.

    uv run python bench/bench_vllm_capacity_validation.py [--quick] [--url URL]

Without --url (or $FINOPS_VLLM_URL) it starts its own server (clean numbers,
~2 minutes to start); a shared server gives noisier figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
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
from finops.models.throughput import fit_step_time

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


async def drain(jobs: list[tuple[int, float, asyncio.Task]]) -> None:
    await asyncio.gather(*(task for _, _, task in jobs), return_exceptions=True)


async def saturate(
    client: httpx.AsyncClient, url: str, args: argparse.Namespace, secs: float, scraper: Scraper
) -> float:
    """`sat_concurrency` clients back to back; generation tokens/s from the server's counter.

    The counter is read when the segment starts and when its time is up (the last
    requests then finish outside the measurement, as they would under endless load).
    """
    before = gen_tokens(scraper.frames[-1:], args.model)
    t0 = time.perf_counter()
    load = asyncio.create_task(
        closed_loop(
            client, url, args.model, args.sat_concurrency, secs, args.prompt_words, args.max_tokens
        )
    )
    await asyncio.sleep(secs)
    await scraper.scrape_once()
    tps = (gen_tokens(scraper.frames[-1:], args.model) - before) / (time.perf_counter() - t0)
    await load
    return tps


async def run_schedule(
    client: httpx.AsyncClient,
    url: str,
    args: argparse.Namespace,
    sched: list[tuple[str, float, float]],
    rng: np.random.Generator,
    scraper: Scraper,
) -> tuple[list[dict], list[int], list[float]]:
    """Run the segments in order: Poisson arrivals at a rate, or a saturation run.

    Returns one record per open-loop request (segment, arrival offset, client
    latency); per segment boundary, the index of the scrape taken there, so each
    segment's samples can be cut out exactly; and the saturation runs' tokens/s.
    The server is drained before and after a saturation run, so the open-loop
    timeline (which the simulation replays) starts each segment as it really did.
    """
    jobs: list[tuple[int, float, asyncio.Task]] = []
    bounds: list[int] = []
    sat: list[float] = []
    t_start = time.perf_counter()
    seg_start = 0.0
    for i, (label, rate, secs) in enumerate(sched):
        if label == "sat":
            await drain(jobs)
            await scraper.scrape_once()
            bounds.append(len(scraper.frames) - 1)
            sat.append(await saturate(client, url, args, secs, scraper))
            seg_start = time.perf_counter() - t_start  # idle again: arrivals resume from now
            continue
        await scraper.scrape_once()
        bounds.append(len(scraper.frames) - 1)
        t = seg_start + rng.exponential(1 / rate)
        while t < seg_start + secs:
            delay = t_start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(
                one_request(client, url, args.model, args.prompt_words, args.max_tokens)
            )
            jobs.append((i, t, task))
            t += rng.exponential(1 / rate)
        seg_start += secs
        delay = t_start + seg_start - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await scraper.scrape_once()
    bounds.append(len(scraper.frames) - 1)
    lats = await asyncio.gather(*(task for _, _, task in jobs))
    records = [
        {"segment": i, "arrival_s": t, "latency_s": lat}
        for (i, t, _), lat in zip(jobs, lats, strict=True)
    ]
    return records, bounds, sat


def make_schedule(
    args: argparse.Namespace, rng: np.random.Generator
) -> list[tuple[str, float, float]]:
    """`rounds` rounds of every fit rate, the unseen rate and a saturation run, shuffled.

    Interleaving matters on a shared machine: a slow minute then lands on all rates
    (and on the saturation measurement) alike instead of on whichever phase
    happened to run in it.
    """
    segs = [("fit", r) for r in args.rates] + [("unseen", args.high_rate)]
    segs.append(("sat", float(args.sat_concurrency)))
    seg_s = args.phase_s / args.rounds
    sat_s = args.sat_s / args.rounds
    out: list[tuple[str, float, float]] = []
    for _ in range(args.rounds):
        out += [
            (segs[i][0], segs[i][1], sat_s if segs[i][0] == "sat" else seg_s)
            for i in rng.permutation(len(segs))
        ]
    return out


async def run(args: argparse.Namespace, base: str) -> dict:
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    comp = f"{base}/v1/completions"
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=200)) as c:
        await one_request(c, comp, args.model, args.prompt_words, args.max_tokens)
        # warm-up at full load: a fresh server's first minute is slower (new batch shapes,
        # allocator growth); neither the probe nor the fit should see it
        await closed_loop(
            c, comp, args.model, args.sat_concurrency, args.warmup_s,
            args.prompt_words, args.max_tokens,
        )  # fmt: skip
        if args.auto_rates:
            # A short closed-loop probe sets the rates as fractions of this machine's capacity
            # (it is not used by the fit; saturation is measured inside the schedule).
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
            args.rates = [round(f * cap, 2) for f in args.fit_fractions]
            args.high_rate = round(args.unseen_fraction * cap, 2)
            print(
                f"probe: ~{cap:.1f} req/s at saturation -> fit rates {args.rates}, "
                f"unseen rate {args.high_rate}"
            )
        sched = make_schedule(args, rng)
        print(
            f"schedule: {args.rounds} rounds of "
            + " ".join(
                f"{r:g}{'*' if lab == 'unseen' else ''}" if lab != "sat" else f"sat{r:g}"
                for lab, r, _ in sched
            )
            + f" (req/s for {args.phase_s / args.rounds:g}s each; * unseen: its metrics never reach the fit; "
            "satN: N clients back to back)"
        )
        scraper = Scraper(c, f"{base}/metrics", period=1.0)
        scraper.start()
        records, bounds, sat = await run_schedule(c, comp, args, sched, rng, scraper)
        await scraper.stop()
        # the fit sees only the fit segments' samples, each segment its own series
        fit_frames = [
            f.with_columns(target=pl.lit(f"bench-seg{i:02d}"))
            for i, (label, _, _) in enumerate(sched)
            if label == "fit"
            for f in scraper.frames[bounds[i] : bounds[i + 1] + 1]
        ]
    print("saturation runs: " + ", ".join(f"{x:.0f}" for x in sat) + " tok/s")
    return {
        "fit_frames": fit_frames,
        "schedule": [list(s) for s in sched],
        "requests": records,
        "sat_tps": float(np.mean(sat)),
        "sat_runs": sat,
    }


def save_run(res: dict, args: argparse.Namespace, out: Path) -> None:
    """Keep what the load phases measured, so the fit can be re-run offline (--replay)."""
    out.mkdir(parents=True, exist_ok=True)
    pl.concat(res["fit_frames"], how="vertical_relaxed").write_parquet(out / "fit_samples.parquet")
    meta = {
        "schedule": res["schedule"],
        "requests": res["requests"],
        "sat_tps": res["sat_tps"],
        "sat_runs": res["sat_runs"],
        "args": {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | list)},
    }
    (out / "run.json").write_text(json.dumps(meta))


def load_run(src: Path, args: argparse.Namespace) -> dict:
    meta = json.loads((src / "run.json").read_text())
    for k in ("rates", "high_rate", "phase_s", "sat_concurrency", "max_tokens", "probe_tps"):
        if k in meta["args"]:
            setattr(args, k, meta["args"][k])
    return {
        "fit_frames": [pl.read_parquet(src / "fit_samples.parquet")],
        "schedule": [tuple(s) for s in meta["schedule"]],
        "requests": meta["requests"],
        "sat_tps": meta["sat_tps"],
        "sat_runs": meta.get("sat_runs", [meta["sat_tps"]]),
    }


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
                df.select("t", "target", "seconds", "requests", "gen_tps", "concurrency", "running")
            )
    # the step-time line (vLLM's inter-token latency vs running sequences) gives the curve;
    # a Michaelis-Menten fit straight through tokens/s is printed beside it for comparison
    model = fit_step_time(df)
    curve_fit = SaturatingRegressor(hill_exponent=False).fit(
        df.select("concurrency").to_numpy(), df["gen_tps"].to_numpy()
    )
    prefill = _prefill_speed(df)
    mean_prompt = float(df["mean_prompt"].mean())
    mean_out = float(df["mean_output"].mean())
    svc = ServiceModel.from_curve(
        model.vmax_, model.k_, model.hill_, max_num_seqs=256, prefill_tokens_per_s=prefill
    )
    pred_sat = float(model.throughput([args.sat_concurrency])[0])

    # The DES replays the experiment itself: the same arrival times, every segment in its
    # order (the unseen rate's requests queue behind whatever came before, as they did).
    reqs = pl.DataFrame(res["requests"]).sort("arrival_s")
    sched = res["schedule"]
    arr = reqs["arrival_s"].to_numpy()
    sim = simulate(
        arr,
        np.full(arr.size, float(args.max_tokens)),
        svc,
        replicas=1,
        prompt_tokens=np.full(arr.size, mean_prompt),
    )
    reqs = reqs.with_columns(
        sim_s=pl.Series(sim.e2e_s),
        label=pl.col("segment").map_elements(lambda i: sched[i][0], return_dtype=pl.Utf8),
        rate=pl.col("segment").map_elements(lambda i: float(sched[i][1]), return_dtype=pl.Float64),
    ).filter(pl.col("latency_s").is_not_nan())
    # client-side latency = server e2e + HTTP/frontend overhead, measured at the lowest fit rate
    low = reqs.filter((pl.col("label") == "fit") & (pl.col("rate") == min(args.rates)))
    overhead = max(float((low["latency_s"] - low["sim_s"]).median()), 0.0)
    unseen = reqs.filter(pl.col("label") == "unseen")
    pred_p95 = float(np.quantile(unseen["sim_s"].to_numpy() + overhead, 0.95))
    meas_p95 = float(np.quantile(unseen["latency_s"].to_numpy(), 0.95))
    per_rate = {
        r: (
            float(np.quantile(g["latency_s"].to_numpy(), 0.95)),
            float(np.quantile(g["sim_s"].to_numpy() + overhead, 0.95)),
        )
        for (r,), g in reqs.filter(pl.col("label") == "fit").group_by("rate")
    }
    # naive baselines measured in the same run
    top = max(args.rates)
    naive_p95 = per_rate[top][0]
    light = df.filter(pl.col("concurrency") > 0)
    per_seq = float((light["gen_tps"] / light["concurrency"]).median())
    naive_sat = per_seq * args.sat_concurrency
    return {
        "vmax": model.vmax_,
        "k": model.k_,
        "hill": model.hill_,
        "step_ms": (1000 * model.intercept_, 1000 * model.slope_),
        "curve_vmax": curve_fit.vmax_,
        "curve_k": curve_fit.k_,
        "curve_sat_tps": float(curve_fit.predict(np.array([[args.sat_concurrency]]))[0]),
        "prefill_tps": prefill,
        "intervals": df.height,
        "mean_prompt": mean_prompt,
        "mean_output": mean_out,
        "pred_sat_tps": pred_sat,
        "pred_p95_s": pred_p95,
        "meas_p95_s": meas_p95,
        "unseen_n": unseen.height,
        "per_rate": per_rate,
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
    ap.add_argument(
        "--fit-fractions",
        default="0.3,0.55,0.8",
        help="fit rates as fractions of the probed capacity",
    )
    ap.add_argument("--unseen-fraction", type=float, default=0.9, help="the unseen rate, same unit")
    ap.add_argument("--high-rate", type=float, default=12.0)
    ap.add_argument(
        "--phase-s", type=float, default=30.0, help="seconds of load per rate, over all rounds"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all rates")
    ap.add_argument("--warmup-s", type=float, default=20.0)
    ap.add_argument("--sat-concurrency", type=int, default=32)
    ap.add_argument(
        "--sat-s", type=float, default=30.0, help="seconds of saturation, over all rounds"
    )
    ap.add_argument("--window-s", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="write the measured run here (for --replay)")
    ap.add_argument(
        "--replay", type=Path, help="fit and compare a run saved with --save; no server, no load"
    )
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave CPU placement to the OS (capacity then swings up to 3x on 2 cores)",
    )
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.fit_fractions = [float(f) for f in args.fit_fractions.split(",")]
    if args.quick:
        args.phase_s, args.sat_s, args.probe_s = 15.0, 10.0, 5.0
    server = None
    t_all = time.perf_counter()
    if args.replay:
        res, load_s = load_run(args.replay, args), 0.0
        print(f"replaying the run saved in {args.replay}")
    elif args.url:
        base = args.url.rstrip("/").removesuffix("/v1")
        print(f"server: attached to {base} (shared: figures are noisier)")
    else:
        from finops.vllm_local import start

        t0 = time.perf_counter()
        allowed = os.sched_getaffinity(0)
        engine = {min(allowed)} if args.pin and len(allowed) >= 2 else None
        server = start((args.model,), engine_cpus=engine)
        base = server.root_url
        layout = "unpinned (--no-pin)"
        if engine:
            frontend = allowed - engine
            os.sched_setaffinity(0, frontend)  # the load generator beside the frontend
            layout = (
                f"engine on CPU {sorted(engine)}, frontend and load generator on {sorted(frontend)}"
            )
        print(f"server: started own vLLM at {base} in {time.perf_counter() - t0:.0f}s; {layout}")
    if not args.replay:
        try:
            t0 = time.perf_counter()
            res = asyncio.run(run(args, base))
            load_s = time.perf_counter() - t0
        finally:
            if server is not None:
                server.stop()
        if args.save:
            save_run(res, args, args.save)
    p = fit_and_predict(args, res)
    meas_p95 = p["meas_p95_s"]
    meas_sat = res["sat_tps"]

    def err(pred: float, meas: float) -> float:
        return 100.0 * (pred - meas) / meas

    print(
        f"fit: {p['intervals']} windows of {args.window_s}s at {args.rates} req/s -> step time "
        f"{p['step_ms'][0]:.2f} ms + {p['step_ms'][1]:.3f} ms per running sequence, i.e. "
        f"vmax={p['vmax']:.0f} tok/s k={p['k']:.2f}; prefill {p['prefill_tps']:.0f} tok/s, "
        f"prompt {p['mean_prompt']:.0f} / output {p['mean_output']:.0f} tokens"
    )
    print(
        f"throughput at saturation ({args.sat_concurrency} concurrent): predicted "
        f"{p['pred_sat_tps']:.0f} tok/s, measured {meas_sat:.0f} tok/s, error "
        f"{err(p['pred_sat_tps'], meas_sat):+.1f}% (naive linear baseline "
        f"{p['naive_sat_tps']:.0f} tok/s, error {err(p['naive_sat_tps'], meas_sat):+.1f}%)"
    )
    print(
        f"  (a curve fitted straight through tokens/s: vmax={p['curve_vmax']:.0f} "
        f"k={p['curve_k']:.2f}, predicts {p['curve_sat_tps']:.0f} tok/s, error "
        f"{err(p['curve_sat_tps'], meas_sat):+.1f}%)"
    )
    print(
        f"p95 latency at {args.high_rate:g} req/s (unseen): predicted "
        f"{1000 * p['pred_p95_s']:.0f} ms, measured {1000 * meas_p95:.0f} ms, error "
        f"{err(p['pred_p95_s'], meas_p95):+.1f}% over {p['unseen_n']} requests "
        f"(baseline: p95 at {max(args.rates):g} req/s = "
        f"{1000 * p['naive_p95_s']:.0f} ms, error {err(p['naive_p95_s'], meas_p95):+.1f}%)"
    )
    print(
        "in-sample (fit rates): "
        + ", ".join(
            f"{r:g} req/s p95 measured {1000 * m:.0f} / model {1000 * q:.0f} ms"
            for r, (m, q) in sorted(p["per_rate"].items())
        )
    )
    runs = res["sat_runs"]
    if len(runs) > 1:
        spread = 100.0 * (max(runs) - min(runs)) / meas_sat
        print(
            f"machine drift: the {len(runs)} saturation runs spread {spread:.0f}% around their "
            f"mean ({min(runs):.0f}-{max(runs):.0f} tok/s); errors well inside that spread are "
            "as good as this machine can show"
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
