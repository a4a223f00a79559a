"""Growth simulation: closed-form M/M/c check, monotonicity in load, levers, bad inputs."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import finops
from finops.cli import app
from finops.lake import Lake
from finops.models.data import NoServingData
from finops.models.queueing import (
    ServiceModel,
    erlang_c,
    mmc_mean_wait,
    poisson_arrivals,
    simulate,
)
from finops.models.simulate import Levers, Simulator, headline, load_trace
from finops.models.synthetic import busy_spec, write_synthetic_lake

SPEC = busy_spec(scrape_s=180)


@pytest.fixture(scope="module")
def syn_lake(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("sim") / "lake")
    write_synthetic_lake(lake, SPEC)
    return lake.path


@pytest.fixture(scope="module")
def sim(syn_lake) -> Simulator:
    return Simulator.from_lake(finops.connect(syn_lake), slo_ttft_p95_ms=1000)


def test_erlang_c_closed_form_values() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    # textbook value: c=2, a=1 -> C = 1/3
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert mmc_mean_wait(1, 0.5, 1.0) == pytest.approx(1.0)  # rho/(mu-lambda)
    with pytest.raises(ValueError):
        erlang_c(0, 1.0)


@pytest.mark.parametrize(("c", "rho"), [(1, 0.6), (3, 0.7), (8, 0.75)])
def test_simulation_matches_mmc_within_5_percent(c: int, rho: float) -> None:
    """Batch size 1, exponential work, Poisson arrivals, no prefill: exactly M/M/c."""
    mu = 2.0  # service rate per server: T(1) = 2 tokens/s, work ~ Exp(mean 1 token)
    lam = rho * c * mu
    service = ServiceModel((0.0, mu))
    waits, pwait = [], []
    for seed in range(2):
        rng = np.random.default_rng(100 + seed)
        n = 80_000
        res = simulate(poisson_arrivals(lam, n, rng), rng.exponential(1.0, n), service, replicas=c)
        waits.append(res.mean("wait"))
        pwait.append(float(np.mean(res.wait_s[n // 10 :] > 0)))
    assert np.mean(waits) == pytest.approx(mmc_mean_wait(c, lam, mu), rel=0.05)
    assert np.mean(pwait) == pytest.approx(erlang_c(c, lam / mu), rel=0.05)


def test_continuous_batching_is_monotone_in_load() -> None:
    """Same arrival pattern compressed in time (common random numbers): never faster."""
    svc = ServiceModel.from_curve(120, 12, 1.0, max_num_seqs=32, prefill_tokens_per_s=6000)
    rng = np.random.default_rng(5)
    n = 3000
    base = np.cumsum(rng.exponential(1.0, n))
    out = rng.geometric(1 / 150, n).astype(float)
    prompt = rng.poisson(500, n).astype(float)
    p95 = []
    e2e = []
    for rate in (0.1, 0.2, 0.35, 0.5, 0.6, 0.7):
        r = simulate(base / rate, out, svc, replicas=1, prompt_tokens=prompt)
        p95.append(r.quantile("ttft", 0.95))
        e2e.append(r.mean("e2e"))
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(p95)), p95
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(e2e)), e2e
    assert p95[-1] > 3 * p95[0]  # the knee is visible


def test_growth_never_needs_fewer_replicas(sim: Simulator) -> None:
    prev_hourly = None
    prev_gpu_h = 0.0
    for g in (0.5, 1, 2, 5, 10):
        plan = sim.plan(g, Levers(autoscale=True))
        per_hour = plan.hourly.sort("tier", "hour")["replicas"].to_numpy()
        if prev_hourly is not None:
            assert (per_hour >= prev_hourly).all()
        assert plan.totals["gpu_hours"] >= prev_gpu_h
        prev_hourly, prev_gpu_h = per_hour, plan.totals["gpu_hours"]
    # 10x the traffic needs clearly more than 1x
    assert sim.plan(10).totals["gpu_hours"] > 2 * sim.plan(1).totals["gpu_hours"]


def test_service_curve_from_the_step_time_where_vllm_reports_it(syn_lake, sim) -> None:
    for tier, p in sim.trace.profiles.items():
        truth = SPEC.tiers[tier]
        assert p.curve_source == "decode step time"
        assert p.vmax == pytest.approx(truth.vmax, rel=0.1) and p.hill == 1.0
        assert p.k == pytest.approx(truth.k, rel=0.15)
    # without the inter-token-latency histogram, the tokens/s curve is used
    db = finops.connect(syn_lake)
    db.execute(
        "CREATE TABLE no_itl AS SELECT * FROM clean.serving_increase "
        "WHERE metric NOT LIKE 'vllm:inter_token_latency_seconds%'"
    )
    db.execute("CREATE OR REPLACE VIEW clean.serving_increase AS SELECT * FROM no_itl")
    fallback = load_trace(db, tiers=["small"]).profiles["small"]
    assert fallback.curve_source == "tokens/s curve"
    assert fallback.vmax == pytest.approx(SPEC.tiers["small"].vmax, rel=0.1)


def test_plan_reports_gpus_cost_and_idle(sim: Simulator) -> None:
    plan = sim.plan(1.0)
    t = {r["tier"]: r for r in plan.tiers.to_dicts()}
    assert t["large"]["gpus_per_replica"] == 4 and t["small"]["gpus_per_replica"] == 1
    # fixed fleet: never below the observed fleet, the same every hour
    assert t["small"]["peak_replicas"] >= 2
    hours = plan.hourly["hour"].n_unique()
    assert t["large"]["gpu_hours"] == t["large"]["peak_replicas"] * 4 * hours
    # cost = GPU-hours x on-demand catalog price
    assert t["large"]["cost_usd"] == pytest.approx(t["large"]["gpu_hours"] * 3.90)
    assert t["small"]["cost_usd"] == pytest.approx(t["small"]["gpu_hours"] * 0.75)
    assert 0 <= plan.totals["idle_share"] < 1
    assert plan.totals["cost_per_1k_requests"] == pytest.approx(
        1000 * plan.totals["cost_usd"] / plan.totals["requests"]
    )


def test_levers_move_cost_the_right_way(sim: Simulator) -> None:
    base = sim.plan(5).totals
    auto = sim.plan(5, Levers(autoscale=True)).totals
    assert auto["gpu_hours"] <= base["gpu_hours"]
    cached = sim.plan(5, Levers(autoscale=True, cache_hit_rate=0.5)).totals
    assert cached["gpu_hours"] <= auto["gpu_hours"]
    reserved = sim.plan(5, Levers(autoscale=True, reserved_baseline=True, spot_share=1.0)).totals
    assert reserved["gpu_hours"] == auto["gpu_hours"]
    assert reserved["cost_usd"] < auto["cost_usd"]
    rates = sim.hourly_rates(1, Levers(route_small_share=0.5))
    plain = sim.hourly_rates(1, Levers())
    # routing moves requests between tiers but loses none
    assert rates["upstream"].sum() == pytest.approx(plain["upstream"].sum())
    small = rates.filter(rates["tier"] == "small")["upstream"].sum()
    assert small > plain.filter(plain["tier"] == "small")["upstream"].sum()
    # a context cap never raises the need
    capped = sim.plan(5, Levers(autoscale=True, token_cap=100)).totals
    assert capped["gpu_hours"] <= auto["gpu_hours"]


def test_headline_before_and_after(syn_lake, sim: Simulator) -> None:
    h = headline(finops.connect(syn_lake), 5, simulator=sim)
    assert h["after_usd_per_1k"] < h["before_usd_per_1k"]
    assert h["line"].startswith("5x growth: $") and "before levers" in h["line"]
    # what "after" assumes is said in words, from the levers it planned
    assert h["scenario"].startswith("response cache hit rate")
    assert "autoscaling on queue depth" in h["scenario"]
    assert f"input capped at {h['levers']['token_cap']:,} tokens" in h["scenario"]


@pytest.mark.parametrize("g", [0, -1, float("nan")])
def test_bad_growth(sim: Simulator, g: float) -> None:
    with pytest.raises(ValueError, match="growth must be a positive factor"):
        sim.plan(g)


def test_bad_levers_and_slo() -> None:
    with pytest.raises(ValueError, match="route_small_share"):
        Levers(route_small_share=1.5)
    with pytest.raises(ValueError, match="token_cap"):
        Levers(token_cap=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Levers(max_num_seqs=0)


def test_unreachable_slo_is_a_clear_error(syn_lake) -> None:
    s = Simulator.from_lake(finops.connect(syn_lake), slo_ttft_p95_ms=1)
    with pytest.raises(ValueError, match="no replica count meets p95 TTFT <= 1 ms"):
        s.plan(1)


def test_empty_lake_and_unknown_tier(syn_lake, lake) -> None:
    with pytest.raises(NoServingData, match="no requests"):
        load_trace(finops.connect(lake.path))
    with pytest.raises(ValueError, match="unknown tier"):
        load_trace(finops.connect(syn_lake), tiers=["nope"])


def test_simulate_cli(syn_lake, tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "simulate",
            "--lake",
            str(syn_lake),
            "--growth",
            "2",
            "--route-small-share",
            "0.2",
            "--autoscale",
            "--format",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["growth"] == 2 and out["after"]["gpu_hours"] <= out["before"]["gpu_hours"]
    r = runner.invoke(app, ["simulate", "--lake", str(syn_lake), "--growth", "-2"])
    assert r.exit_code == 2 and "growth must be a positive factor" in r.output
    r = runner.invoke(app, ["simulate", "--lake", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no lake here" in r.output
    r = runner.invoke(app, ["simulate", "--lake", str(syn_lake), "--format", "xml"])
    assert r.exit_code == 2 and "--format" in r.output


def test_an_on_demand_catalog_plans_without_reserved_or_spot_levers(sim: Simulator) -> None:
    """Reserved and spot prices are needed only by the levers that buy them."""
    import dataclasses

    od = sim.trace.prices.filter(sim.trace.prices["pricing_kind"] == "on_demand")
    s = Simulator(dataclasses.replace(sim.trace, prices=od), slo_ttft_p95_ms=1000)
    s._curves, s.tier_slo_ms = sim._curves, sim.tier_slo_ms  # reuse the fitted curves
    assert s.plan(1).totals["cost_usd"] == pytest.approx(sim.plan(1).totals["cost_usd"])
    assert s.plan(1, Levers(autoscale=True)).totals["cost_usd"] > 0
    model = next(iter(sim.trace.profiles.values())).gpu_model
    for lever, kind in (
        (Levers(reserved_baseline=True), "reserved"),
        (Levers(spot_share=0.5), "spot"),
    ):
        with pytest.raises(ValueError) as e:
            s.plan(1, lever)
        msg = str(e.value)
        assert f"no {kind} price" in msg and "on_demand prices for" in msg
        assert model in msg and ("--reserved-baseline" in msg or "--spot-share" in msg)


def test_route_small_moves_larger_tiers_to_the_smallest_model() -> None:
    """Tiers on the same GPU tie on price per replica-hour: the smaller model is the
    target whatever the dict order, and its own traffic never moves."""
    import datetime as dt

    import polars as pl

    from finops.models.simulate import TierProfile, Trace, model_size_b

    hour = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
    prices = pl.DataFrame(
        {"gpu_model": ["NVIDIA L4", "H100 80GB HBM3"], "pricing_kind": ["on_demand"] * 2,
         "usd_per_gpu_hour": [0.75, 3.90]}
    )  # fmt: skip

    def tier(name: str, gpu: str, g: int, model: str, upstream: int) -> TierProfile:
        return TierProfile(
            name, 100.0, 1.0, 1.0, (), (), math.inf, g, gpu, 1, np.ones(3), np.ones(3),
            pl.DataFrame({"hour": [hour], "requests": [upstream], "upstream": [upstream]}),
            0.0, 1, model_name=model,
        )  # fmt: skip

    profiles = {  # sorted names put 'mid' (the 8B model) before 'small'
        "large": tier("large", "NVIDIA H100 80GB HBM3", 4, "llama-3.1-70b-instruct", 1000),
        "mid": tier("mid", "NVIDIA L4", 1, "llama-3.1-8b-instruct", 1000),
        "small": tier("small", "NVIDIA L4", 1, "llama-3.2-1b-instruct", 1000),
    }
    sim = Simulator(Trace(profiles, [hour], 3000, 0.0, prices))
    assert sim.smallest_tier() == "small"
    up = dict(sim.hourly_rates(1, Levers(route_small_share=0.2)).select("tier", "upstream").rows())
    assert up == pytest.approx({"large": 800.0, "mid": 800.0, "small": 1400.0})
    assert model_size_b("Qwen2.5-0.5B-Instruct") == 0.5 and model_size_b("gpt") == math.inf


# ----------------------------------------------------------------------------- derived lakes


def _derive(src, dst, **change) -> Lake:
    """Copy lake `src` to `dst` (real Parquet files), passing each raw table through
    change[table] (a function of the Polars frame) where given."""
    db = finops.connect(src)
    out = Lake(dst)
    for table in ("gpu_samples", "serving_samples", "requests"):
        df = db.sql(f"SELECT * FROM raw.{table}").pl()
        df = df.select([c for c in df.columns if c != "date"])
        out.append(table, change.get(table, lambda d: d)(df), source="copy")
    return out


def _relabel(df, fn):
    import polars as pl

    return df.with_columns(
        labels=pl.col("labels").map_elements(
            lambda s: json.dumps(fn(json.loads(s)), sort_keys=True), return_dtype=pl.String
        )
    )


def test_a_tier_without_serving_metrics_is_named_and_carried_as_observed(
    syn_lake, tmp_path
) -> None:
    """Its observed requests and GPU cost stay in the totals; it is never silently dropped."""
    import polars as pl

    import finops.costs as fc

    d = _derive(
        syn_lake,
        tmp_path / "lake",
        serving_samples=lambda df: df.filter(pl.col("model_name") != "large"),
    )
    db = finops.connect(d.path)
    tr = load_trace(db)
    assert list(tr.profiles) == ["small"]
    un = tr.unsimulated.to_dicts()
    assert [r["tier"] for r in un] == ["large"]
    bill = fc.by(db, "tier").filter(pl.col("tier") == "large").row(0, named=True)
    assert un[0]["requests"] == bill["requests"] and un[0]["cost_usd"] == pytest.approx(
        bill["cost"]
    )
    assert any("'large'" in n and "NOT simulated" in n for n in tr.notes)
    plan = Simulator(tr, slo_ttft_p95_ms=1000).plan(2.0)
    small = plan.tiers.filter(pl.col("tier") == "small").row(0, named=True)
    assert plan.totals["cost_usd"] == pytest.approx(small["cost_usd"] + un[0]["cost_usd"])
    assert plan.totals["requests"] == pytest.approx(small["requests"] + un[0]["requests"])
    r = CliRunner().invoke(app, ["simulate", "--lake", str(d.path), "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "'large'" in r.stderr and "NOT simulated" in r.stderr
    assert out["before"]["unsimulated_cost_usd"] == pytest.approx(un[0]["cost_usd"])


def test_an_unsimulated_tier_on_a_shared_mig_gpu_keeps_its_cost(syn_lake, tmp_path) -> None:
    """'large' runs on a MIG instance of a GPU whose other instance serves 'small': its
    GPU-hours there are carried as observed, not dropped with the simulated tier's GPU."""
    import polars as pl

    import finops.costs as fc

    tier = pl.col("labels").str.json_path_match("$.tier")
    g = finops.connect(syn_lake).sql("SELECT * FROM raw.gpu_samples").pl()
    small = sorted(g.filter(tier == "small")["gpu_uuid"].unique().to_list())[0]
    large = sorted(g.filter(tier == "large")["gpu_uuid"].unique().to_list())[0]

    def share(df: pl.DataFrame) -> pl.DataFrame:
        df = df.drop("_file")
        mine = pl.col("gpu_uuid").is_in([small, large])
        return df.with_columns(
            mig_instance=pl.when(pl.col("gpu_uuid") == small).then(pl.lit("1"))
            .when(pl.col("gpu_uuid") == large).then(pl.lit("2"))
            .otherwise(pl.col("mig_instance")),
            mig_profile=pl.when(mine).then(pl.lit("3g.40gb")).otherwise(pl.col("mig_profile")),
            gpu_uuid=pl.when(mine).then(pl.lit(small)).otherwise(pl.col("gpu_uuid")),
        )  # fmt: skip

    d = _derive(
        syn_lake,
        tmp_path / "lake",
        gpu_samples=share,
        serving_samples=lambda df: df.filter(pl.col("model_name") != "large"),
    )
    db = finops.connect(d.path)
    tr = load_trace(db)
    bill = fc.by(db, "tier", per=tr.period).filter(pl.col("tier") == "large").row(0, named=True)
    (carried,) = tr.unsimulated.filter(pl.col("tier") == "large").to_dicts()
    assert carried["cost_usd"] == pytest.approx(bill["cost"])  # was 3/4 of it


def test_data_parallel_engines_are_one_replica(syn_lake, tmp_path) -> None:
    """The same work split over two vLLM engines (label engine, --data-parallel-size 2)
    gives the same per-replica intervals, fit and plan as one engine."""
    import polars as pl

    from finops.models.data import serving_intervals
    from finops.models.throughput import fit_frame

    def split(df):
        # each engine does half the work; KV usage is a share of each engine's own cache
        half = pl.when(pl.col("metric") == "vllm:kv_cache_usage_perc").then(1.0).otherwise(0.5)
        halves = [
            _relabel(df, lambda x, e=e: {**x, "engine": e}).with_columns(
                value=pl.col("value") * half
            )
            for e in ("0", "1")
        ]
        return pl.concat(halves)

    d = _derive(syn_lake, tmp_path / "lake", serving_samples=split)
    one, two = finops.connect(syn_lake), finops.connect(d.path)
    a, b = serving_intervals(one, tier="small"), serving_intervals(two, tier="small")
    for col in ("seconds", "gen_tps", "concurrency", "running", "waiting", "kv_usage"):
        assert b[col].to_list() == pytest.approx(a[col].to_list(), rel=1e-6), col
    fa, fb = fit_frame(a, tier="small").model, fit_frame(b, tier="small").model
    assert fb.vmax_ == pytest.approx(fa.vmax_, rel=1e-6) and fb.k_ == pytest.approx(fa.k_, rel=1e-6)
    pa = load_trace(one, tiers=["small"]).profiles["small"]
    pb = load_trace(two, tiers=["small"]).profiles["small"]
    assert (pb.vmax, pb.k, pb.observed_batch) == pytest.approx((pa.vmax, pa.k, pa.observed_batch))


def test_the_period_is_the_latest_week_and_empty_hours_are_not_billed(
    syn_lake, sim, tmp_path
) -> None:
    """Requests from an older log do not stretch the fleet's period; hours without GPU
    samples are never billed, whatever period is asked for."""
    import datetime as dt

    import polars as pl

    import finops.costs as fc

    def early(df):
        old = df.sort("request_id").head(20)
        old = old.with_columns(
            request_id=pl.col("request_id") + "-old", ts=pl.col("ts") - pl.duration(days=7)
        )
        return pl.concat([df, old])

    d = _derive(syn_lake, tmp_path / "lake", requests=early)
    db = finops.connect(d.path)
    tr = load_trace(db)
    assert tr.period.label == "2026-W47"
    start = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
    assert min(tr.hours) >= start and len(tr.hours) == 48
    assert tr.total_requests == sim.trace.total_requests
    both = load_trace(db, per=fc.period(None, "2026-11-09", "2026-11-22"))
    assert both.hours == tr.hours  # the older week has requests but no GPUs: no fleet
    assert any("20 requests fell in hours with no GPU samples" in n
               for p in both.profiles.values() for n in p.notes)  # fmt: skip
    gpu_h = fc.totals(db, per=both.period)["gpu_hours"]
    fixed = Simulator(both, slo_ttft_p95_ms=1000)
    fixed._curves, fixed.tier_slo_ms = sim._curves, sim.tier_slo_ms
    plan = fixed.plan(1.0)
    assert plan.hourly["hour"].n_unique() == 48  # no phantom fleet in the GPU-less week
    assert plan.totals["gpu_hours"] <= gpu_h * 1.5
    r = CliRunner().invoke(
        app, ["recommend", "autoscaling", "--lake", str(d.path), "--format", "json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["period"] == "2026-W47"
    assert out["cost"]["observed_cost_usd"] == pytest.approx(
        fc.totals(db, week="2026-W47")["gpu_cost"]
    )
    r = CliRunner().invoke(
        app, ["recommend", "autoscaling", "--lake", str(d.path), "--week", "2026-W46"]
    )
    assert r.exit_code == 2 and "no vLLM token counters" in r.output and "2026-W46" in r.output
    r = CliRunner().invoke(app, ["simulate", "--lake", str(d.path), "--week", "nope"])
    assert r.exit_code == 2 and "expected an ISO week" in r.output


def test_deployments_map_gpus_to_tiers_and_price_kinds(syn_lake, tmp_path) -> None:
    """GPU samples without a tier label: --deployments (as in `finops costs`) names the
    tiers, and a deployment bought as reserved prices its fixed fleet as reserved."""
    d = _derive(
        syn_lake,
        tmp_path / "lake",
        gpu_samples=lambda df: _relabel(df, lambda x: {k: v for k, v in x.items() if k != "tier"}),
    )
    toml = tmp_path / "deployments.toml"
    toml.write_text(
        '[[deployment]]\nname = "chat-small"\ntier = "small"\npricing_kind = "reserved"\n'
        'match = { pod = "vllm-small-*" }\n\n'
        '[[deployment]]\nname = "chat-large"\ntier = "large"\nmatch = { pod = "vllm-large-*" }\n'
    )
    args = ["simulate", "--lake", str(d.path), "--growth", "1", "--format", "json"]
    r = CliRunner().invoke(app, [*args, "--deployments", str(toml)])
    assert r.exit_code == 0, r.output
    tiers = {t["tier"]: t for t in json.loads(r.stdout)["before"]["tiers"]}
    prices = finops.connect(d.path).sql("SELECT * FROM ref.prices").pl()
    from finops.prices import price_for

    reserved = price_for(prices, "NVIDIA L4", "reserved")
    assert reserved != price_for(prices, "NVIDIA L4", "on_demand")
    assert tiers["small"]["cost_usd"] == pytest.approx(tiers["small"]["gpu_hours"] * reserved)
    assert tiers["large"]["cost_usd"] == pytest.approx(tiers["large"]["gpu_hours"] * 3.90)
    r = CliRunner().invoke(
        app, ["recommend", "autoscaling", "--lake", str(d.path), "--deployments", str(toml)]
    )
    assert r.exit_code == 0, r.output


def test_direct_vllm_scrape_matches_requests_by_served_model(syn_lake, tmp_path) -> None:
    """`finops collect --vllm URL`: series carry vLLM's model_name and no tier label, the
    shim log names its own tier: requests join on the model that answered them."""
    import polars as pl

    model = "llama-3.1-8b-instruct"

    def serving(df):
        df = df.filter(pl.col("model_name") == "small").with_columns(model_name=pl.lit(model))
        return _relabel(df, lambda x: {**{k: v for k, v in x.items() if k != "tier"},
                                       "model_name": model})  # fmt: skip

    def requests(df):
        return df.with_columns(
            response_model=pl.when(pl.col("tier") == "small").then(pl.lit(model))
            .otherwise(pl.col("response_model"))
        )  # fmt: skip

    d = _derive(syn_lake, tmp_path / "lake", serving_samples=serving, requests=requests)
    db = finops.connect(d.path)
    tr = load_trace(db)
    assert list(tr.profiles) == [model]
    n_small = db.sql("SELECT count(*) FROM clean.requests WHERE tier = 'small'").fetchall()[0][0]
    assert tr.profiles[model].hourly["requests"].sum() == n_small
    assert tr.profiles[model].gpus_per_replica == 1  # its GPUs found by pod


def test_default_period_is_not_a_week_of_minutes(syn_lake, tmp_path) -> None:
    """One request minutes into the next week does not make `simulate` default to that
    week (which has no vLLM counters): it reads the latest whole (or fullest) week."""
    import datetime as dt

    import polars as pl

    import finops.costs as fc

    def stray(df):
        one = df.sort("request_id").head(1)
        one = one.with_columns(
            request_id=pl.lit("stray"), ts=pl.lit(dt.datetime(2026, 11, 23, 0, 5, tzinfo=dt.UTC))
        )
        return pl.concat([df, one])

    d = _derive(syn_lake, tmp_path / "lake", requests=stray)
    db = finops.connect(d.path)
    assert fc.latest_week(db) == "2026-W48"
    assert fc.latest_whole_week(db) == "2026-W47"
    r = CliRunner().invoke(app, ["simulate", "--lake", str(d.path), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["period"] == "2026-W47"
    # the library's default too (notebook 02 and the demo's growth line), not only the CLI's
    assert load_trace(db).period.label == "2026-W47"
    # a Period built by hand must fall on whole hours, as the cost functions require
    half = fc.Period(
        dt.datetime(2026, 11, 16, 10, 30, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 18, tzinfo=dt.UTC),
        "half an hour in",
    )
    with pytest.raises(fc.CostError, match=r"per.start: costs are counted per clock hour"):
        load_trace(db, per=half)
