"""finops.costs: marts vs hand-written SQL, reconciliation to the bill, bad inputs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from finops.lake import Lake

T0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)  # Monday of 2026-W47
L4, H100 = 0.75, 3.90  # on_demand prices of data/prices.csv


def _gpu_rows() -> list[dict]:
    """3 GPUs for 4 hours: small (L4) and large (H100) tiers, plus an untiered L4."""
    rows = []
    gpus = [
        ("gpu-s0", "NVIDIA L4", "vllm-small-0", {"tier": "small", "app": "vllm-small"}),
        ("gpu-l0", "NVIDIA H100 80GB HBM3", "vllm-large-0", {"tier": "large", "app": "vllm-large"}),
        ("gpu-x0", "NVIDIA L4", "notebook-0", {"app": "jupyter"}),
    ]
    for h in range(4):
        for k, (uuid, model, pod, labels) in enumerate(gpus):
            for m in range(0, 60, 15):
                ts = T0 + dt.timedelta(hours=h, minutes=m)
                sm = 0.2 + 0.1 * k + 0.05 * h
                for field, value in (
                    ("DCGM_FI_PROF_SM_ACTIVE", sm),
                    ("DCGM_FI_DEV_GPU_UTIL", min(100.0, 100 * sm + 40)),
                ):
                    rows.append(
                        {
                            "ts": ts,
                            "source": "test",
                            "host": "node-1",
                            "gpu_uuid": uuid,
                            "gpu_index": k,
                            "gpu_model": model,
                            "namespace": "llm-serving",
                            "pod": pod,
                            "container": "vllm",
                            "labels": json.dumps(labels),
                            "field": field,
                            "value": value,
                        }
                    )
    return rows


def _request_rows() -> list[dict]:
    rows = []
    tenants = ["acme", "globex"]
    features = ["chat", "summarize", "embeddings"]
    i = 0
    for h in range(3):  # hour 3 has GPUs but no traffic: its cost stays idle
        for j in range(12):
            i += 1
            tier = "small" if j % 3 else "large"
            feat = features[j % 3]
            ts = T0 + dt.timedelta(hours=h, minutes=j * 4)
            row = {
                "request_id": f"r{i}",
                "ts": ts,
                "source": "test",
                "tenant": tenants[j % 2],
                "feature": feat,
                "operation": "embeddings" if feat == "embeddings" else "chat",
                "request_model": "auto",
                "response_model": f"model-{tier}",
                "tier": tier,
                "input_tokens": 100 + 37 * j,
                "output_tokens": 0 if feat == "embeddings" else 20 + j,
                "cached_input_tokens": 16 * (j % 4),
                "status_code": 200,
                "stream": j % 2 == 0,
                "finish_reason": "stop",
                "cache_status": "miss",
                "prompt_fingerprint": f"fp{i}",
                "attempt": 1,
            }
            rows.append(row)
        # a failed request retried, an exact duplicate, a cache hit, an aborted stream
        base = T0 + dt.timedelta(hours=h, minutes=50)
        rows += [
            {
                "request_id": f"f{h}",
                "ts": base,
                "tenant": "acme",
                "feature": "chat",
                "tier": "small",
                "response_model": "model-small",
                "input_tokens": 400,
                "output_tokens": 5,
                "status_code": 504,
                "error_type": "timeout",
                "attempt": 1,
                "prompt_fingerprint": f"fpf{h}",
                "cache_status": "miss",
            },
            {
                "request_id": f"f{h}b",
                "ts": base + dt.timedelta(seconds=5),
                "tenant": "acme",
                "feature": "chat",
                "tier": "small",
                "response_model": "model-small",
                "input_tokens": 400,
                "output_tokens": 30,
                "status_code": 200,
                "retry_of": f"f{h}",
                "attempt": 2,
                "prompt_fingerprint": f"fpf{h}",
                "cache_status": "miss",
            },
            {
                "request_id": f"d{h}",
                "ts": T0 + dt.timedelta(hours=h, minutes=5),  # 1 min after r(12h+2)
                "tenant": "globex",
                "feature": "summarize",
                "tier": "large",
                "response_model": "model-large",
                "input_tokens": 100 + 37 * 1,
                "output_tokens": 21,
                "status_code": 200,
                "prompt_fingerprint": f"fp{12 * h + 2}",
                "cache_status": "miss",
            },
            {
                "request_id": f"h{h}",
                "ts": T0 + dt.timedelta(hours=h, minutes=5, seconds=30),
                "tenant": "globex",
                "feature": "summarize",
                "tier": "large",
                "response_model": "model-large",
                "input_tokens": 137,
                "output_tokens": 21,
                "status_code": 200,
                "cache_status": "hit",
                "prompt_fingerprint": f"fp{12 * h + 2}",
            },
            {
                "request_id": f"s{h}",
                "ts": base + dt.timedelta(seconds=120),
                "tenant": "acme",
                "feature": "chat",
                "tier": "large",
                "response_model": "model-large",
                "input_tokens": 300,
                "output_tokens": 50,
                "status_code": 200,
                "stream": True,
                "finish_reason": "abort",
                "cache_status": "miss",
                "prompt_fingerprint": f"fps{h}",
            },
        ]
    return rows


def _serving_rows() -> list[dict]:
    """Prefill/decode histogram sums for the large tier only (small uses the fallback)."""
    rows = []
    for h in range(4):
        for m in (0, 30):
            ts = T0 + dt.timedelta(hours=h, minutes=m)
            n = 2 * h + (m // 30)
            for metric, rate in (
                ("vllm:request_prefill_time_seconds_sum", 10.0),
                ("vllm:request_decode_time_seconds_sum", 30.0),
            ):
                rows.append(
                    {
                        "ts": ts,
                        "source": "test",
                        "target": "vllm-large-0",
                        "metric": metric,
                        "type": "histogram",
                        "model_name": "model-large",
                        "labels": json.dumps(
                            {"model_name": "model-large", "pod": "vllm-large-0", "tier": "large"},
                            sort_keys=True,
                        ),
                        "value": rate * n,
                    }
                )
    return rows


@pytest.fixture(scope="module")
def cost_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("costs") / "lake"
    lake = Lake(path, fsync=False)
    now = T0 + dt.timedelta(days=30)
    assert lake.append("gpu_samples", _gpu_rows(), source="test", now=now).rejected == 0
    assert lake.append("requests", _request_rows(), source="test", now=now).rejected == 0
    assert lake.append("serving_samples", _serving_rows(), source="test", now=now).rejected == 0
    return path


@pytest.fixture()
def db(cost_lake: Path):
    con = finops.connect(cost_lake)
    yield con
    con.close()


def test_bill_matches_hand_sql(db) -> None:
    t = fc.totals(db, week="2026-W47")
    # hand-written: one GPU-hour per GPU per hour that reported, times the catalog price
    hand = db.execute(f"""
        SELECT sum(CASE WHEN gpu_model LIKE '%H100%' THEN {H100}::DOUBLE ELSE {L4}::DOUBLE END)
        FROM (SELECT DISTINCT gpu_uuid, gpu_model, date_trunc('hour', ts) h FROM raw.gpu_samples)
    """).fetchall()[0][0]
    assert t["gpu_cost"] == pytest.approx(hand, abs=1e-9)
    assert t["gpu_hours"] == 12 and t["gpus"] == 3
    busy = db.execute(f"""
        SELECT sum(v * CASE WHEN gpu_model LIKE '%H100%' THEN {H100}::DOUBLE ELSE {L4}::DOUBLE END) FROM (
          SELECT gpu_uuid, gpu_model, date_trunc('hour', ts) h, avg(value) v FROM raw.gpu_samples
          WHERE field = 'DCGM_FI_PROF_SM_ACTIVE' GROUP BY ALL)
    """).fetchall()[0][0]
    assert t["busy_cost"] == pytest.approx(busy, abs=1e-9)
    assert t["idle_capacity_cost"] == pytest.approx(hand - busy, abs=1e-9)


def test_request_totals_match_raw(db) -> None:
    t = fc.totals(db, week="2026-W47")
    # token columns count what a model processed: not the shim's cache hits (h0..h2 carry
    # the original's tokens here), not a cap refusal (sql/marts/31_costs_requests.sql)
    n, i, o, c = db.execute("""SELECT count(*),
                           sum(input_tokens) FILTER (coalesce(cache_status, '') <> 'hit'),
                           sum(output_tokens) FILTER (coalesce(cache_status, '') <> 'hit'),
                           sum(coalesce(cached_input_tokens, 0)) FROM raw.requests""").fetchall()[0]
    assert (t["requests"], t["input_tokens"], t["output_tokens"], t["cached_input_tokens"]) == (
        n,
        i,
        o,
        c,
    )
    by_tenant = fc.by_tenant(db, week="2026-W47")
    assert by_tenant["requests"].sum() == n
    assert by_tenant["cost"].sum() == pytest.approx(t["allocated_cost"], abs=1e-9)


@pytest.mark.parametrize("basis", ["allocation", "usage"])
def test_allocation_reconciles_to_the_cent(db, basis: str) -> None:
    t = fc.totals(db, week="2026-W47", basis=basis)
    assert abs(t["allocated_cost"] + t["idle_cost"] - t["gpu_cost"]) < 0.005
    # allocation basis: allocated = cost of tier-hours with traffic, computed by hand
    hand = db.execute(f"""
        SELECT sum(CASE WHEN gpu_model LIKE '%H100%' THEN {H100}::DOUBLE ELSE {L4}::DOUBLE END) FROM (
          SELECT DISTINCT gpu_uuid, gpu_model, date_trunc('hour', ts) h,
                 json_extract_string(labels, '$.tier') tier FROM raw.gpu_samples) g
        WHERE (h, tier) IN (SELECT DISTINCT date_trunc('hour', ts), tier FROM raw.requests
                            WHERE coalesce(cache_status, '') <> 'hit')
    """).fetchall()[0][0]
    if basis == "allocation":
        assert t["allocated_cost"] == pytest.approx(hand, abs=0.005)
        # untiered GPU (4 h) and hour 3 of both tiers stay idle
        assert t["idle_cost"] == pytest.approx(4 * L4 + L4 + H100, abs=0.005)


def test_usage_never_exceeds_allocation(db) -> None:
    rc = db.sql("SELECT cost_usage, cost_allocation FROM marts.request_costs").pl()
    assert (rc["cost_usage"] <= rc["cost_allocation"] + 1e-12).all()
    a = fc.by_feature(db, week="2026-W47")
    u = fc.by_feature(db, week="2026-W47", basis="usage")
    j = a.join(u, on="feature", suffix="_u")
    assert (j["cost_u"] <= j["cost"] + 1e-12).all()
    assert u["cost"].sum() < a["cost"].sum()


def test_input_output_split(db) -> None:
    p = db.sql("SELECT * FROM marts.tier_token_prices ORDER BY hour, tier").pl()
    large = p.filter(pl.col("tier") == "large")
    # measured: prefill 10 s per 30 s of decode at every interval -> 25% input share
    assert (large["split_method"] == "prefill_decode_time").all()
    assert large["input_share"].to_list() == pytest.approx([0.25] * large.height)
    small = p.filter(pl.col("tier") == "small")
    assert (small["split_method"] == "token_ratio").all()
    row = small.row(0, named=True)
    assert row["input_share"] == pytest.approx(row["w_in"] / (row["w_in"] + 4 * row["w_out"]))
    # changing R changes the fallback, not the measured tier
    fc.configure(db, output_token_weight=1.0)
    row2 = (
        db.sql("SELECT * FROM marts.tier_token_prices WHERE tier='small' ORDER BY hour LIMIT 1")
        .pl()
        .row(0, named=True)
    )
    assert row2["input_share"] == pytest.approx(row["w_in"] / (row["w_in"] + row["w_out"]))
    # per request: cost = pool x share x own tokens / all tokens of the tier-hour
    rc = db.sql("SELECT * FROM marts.request_costs WHERE request_id = 'r2'").pl().row(0, named=True)
    pr = (
        db.sql(
            f"SELECT * FROM marts.tier_token_prices WHERE tier = 'small' AND hour = "
            f"TIMESTAMPTZ '{T0.isoformat()}'"
        )
        .pl()
        .row(0, named=True)
    )
    assert rc["input_cost_allocation"] == pytest.approx(
        pr["pool_allocation"] * pr["input_share"] * rc["work_in"] / pr["w_in"]
    )
    assert rc["work_in"] == rc["input_tokens"] - rc["cached_input_tokens"]


def test_cache_hit_costs_nothing_and_is_valued(db) -> None:
    rc = db.sql("SELECT * FROM marts.request_costs WHERE request_id = 'h0'").pl().row(0, named=True)
    assert rc["cost_allocation"] == 0 and not rc["worked"]
    cs = fc.cache_savings(db, week="2026-W47")
    shim = cs.filter(pl.col("layer") == "shim_response").row(0, named=True)
    assert shim["requests"] == 3 and shim["usd_saved"] > 0
    prefix = cs.filter(pl.col("layer") == "vllm_prefix").row(0, named=True)
    hand = db.execute("""
        SELECT sum(w.cached_input_tokens * p.usd_per_input_token_usage)
        FROM marts.request_work w JOIN marts.tier_token_prices p USING (hour, tier)
        WHERE w.worked""").fetchall()[0][0]
    assert prefix["usd_saved"] == pytest.approx(hand)
    pot = cs.filter(pl.col("layer") == "response_cache_potential").row(0, named=True)
    assert pot["requests"] == 3  # d0, d1, d2


def test_leakage_lines(db) -> None:
    lk = fc.leakage(db, week="2026-W47")
    cat = {r["category"]: r for r in lk.iter_rows(named=True)}
    assert cat["retried_failure"]["requests"] == 3
    assert cat["duplicate"]["requests"] == 3
    dups = db.sql("SELECT request_id FROM marts.request_costs WHERE leak = 'duplicate' ORDER BY 1")
    assert [r[0] for r in dups.fetchall()] == ["d0", "d1", "d2"]  # not the cache hits h0..h2
    assert cat["stream_aborted"]["requests"] == 3
    assert cat["embeddings"]["requests"] == 12
    assert cat["retries"]["requests"] == 3
    t = fc.totals(db, week="2026-W47")
    disjoint = lk.filter(pl.col("kind").is_in(["leak", "useful", "idle"]))["cost"].sum()
    assert disjoint == pytest.approx(t["gpu_cost"], abs=0.005)
    assert t["leakage_cost"] == pytest.approx(lk.filter(pl.col("kind") == "leak")["cost"].sum())


@pytest.mark.parametrize("basis", ["allocation", "usage"])
def test_unallocated_cost_is_not_called_idle(db, basis: str) -> None:
    """The leakage line for GPU cost no request carried read 'idle: $0' next to an idle
    capacity of 83% of the bill: it is 'unallocated' (GPU-hours without requests), and
    totals name it unallocated_cost (idle_cost kept as the old name)."""
    t = fc.totals(db, week="2026-W47", basis=basis)
    assert t["unallocated_cost"] == t["idle_cost"]  # the old key, for existing callers
    assert abs(t["allocated_cost"] + t["unallocated_cost"] - t["gpu_cost"]) < 0.005
    lk = fc.leakage(db, week="2026-W47", basis=basis)
    cat = {r["category"]: r for r in lk.iter_rows(named=True)}
    assert "idle" not in cat
    line = cat["unallocated"]
    assert line["kind"] == "idle" and line["requests"] == 0
    assert line["cost"] == pytest.approx(t["unallocated_cost"], abs=1e-9)
    assert "GPU-hours without requests" in line["note"]
    if basis == "allocation":
        # untiered GPU (4 h) and hour 3 of both tiers: less than the physical idle capacity
        assert line["cost"] == pytest.approx(4 * L4 + L4 + H100, abs=0.005)
        assert line["cost"] < t["idle_capacity_cost"]
        assert "idle capacity of hours with requests" in line["note"]
        assert "idle capacity" in cat["useful"]["note"]
    else:
        assert "idle time of busy tier-hours" in line["note"]


def test_idle_by_hour_and_dow(db) -> None:
    idl = fc.idle(db, week="2026-W47")
    assert set(idl["tier"]) == {"small", "large", "jupyter"}  # app label fallback
    assert (idl["dow"] == 1).all()
    t = fc.totals(db, week="2026-W47")
    assert idl["idle_cost"].sum() == pytest.approx(t["idle_capacity_cost"])
    assert idl["idle_gpu_hours"].sum() == pytest.approx(t["gpu_hours"] - t["busy_gpu_hours"])


def test_by_dimensions_and_units(db) -> None:
    for dim in ("tenant", "feature", "tier", "model", "hour", "operation", "day"):
        df = fc.by(db, dim, week="2026-W47")
        assert df["requests"].sum() == 51
    tiers = fc.by_tier(db, week="2026-W47").filter(pl.col("tier") == "large").row(0, named=True)
    assert tiers["cost_per_request"] == pytest.approx(tiers["cost"] / tiers["requests"])
    assert tiers["usd_per_1m_output_tokens"] == pytest.approx(
        tiers["output_cost"] / tiers["output_tokens"] * 1e6
    )
    emb = fc.by_feature(db, week="2026-W47").filter(pl.col("feature") == "embeddings")
    assert emb["output_cost"][0] == 0 and emb["usd_per_1m_output_tokens"][0] is None


def test_periods() -> None:
    p = fc.period(week="2026-W47")
    assert p.start == T0 and p.end == T0 + dt.timedelta(days=7)
    q = fc.period(start="2026-11-16", end="2026-11-22")
    assert (q.start, q.end) == (p.start, p.end)
    for bad in ("2026-47", "2026-W54", "W47", ""):
        with pytest.raises(fc.CostError, match="week"):
            fc.period(week=bad)
    with pytest.raises(fc.CostError, match="from"):
        fc.period(start="16/11/2026")
    with pytest.raises(fc.CostError, match="empty"):
        fc.period(start="2026-11-20", end="2026-11-16")
    with pytest.raises(fc.CostError, match="not both"):
        fc.period(week="2026-W47", start="2026-11-16")


def test_empty_period_and_missing_gpu_data(db, tmp_path: Path) -> None:
    with pytest.raises(
        fc.CostError, match=r"no requests and no GPU samples in 2026-W40.*2026-11-16"
    ):
        fc.totals(db, week="2026-W40")
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("requests", _request_rows()[:5], source="test", now=T0 + dt.timedelta(days=30))
    con = finops.connect(lake.path)
    t = fc.totals(con, week="2026-W47")
    assert t["gpu_cost"] == 0 and t["requests"] == 5
    assert any("no GPU samples" in n for n in t["notes"])
    assert any("no GPU data" in n for n in t["notes"])
    rows = fc.by_tenant(con, week="2026-W47")
    assert rows["cost"].null_count() == rows.height


def test_cost_without_gpu_data_is_unknown_in_every_group(tmp_path: Path) -> None:
    """No GPU data: a tier whose requests include cache hits (cost 0, no work) must not
    show $0 while the others show NULL: every group's cost is unknown."""
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("requests", _request_rows(), source="test", now=T0 + dt.timedelta(days=30))
    con = finops.connect(lake.path)
    for dim in ("tier", "tenant", "feature"):
        rows = fc.by(con, dim, week="2026-W47")
        assert rows["requests"].sum() == 51
        for col in ("cost", "input_cost", "output_cost", "leakage_cost"):
            assert rows[col].null_count() == rows.height, (dim, col)


def test_cap_savings(db) -> None:
    cs = fc.cap_savings(db, "chat", 300, week="2026-W47")
    hand = db.execute("""
        SELECT count(*) FILTER (input_tokens > 300), count(*),
               sum((input_tokens - 300) * p.usd_per_input_token_allocation)
                 FILTER (input_tokens > 300)
        FROM marts.request_work w JOIN marts.tier_token_prices p USING (hour, tier)
        WHERE feature = 'chat' AND worked""").fetchall()[0]
    assert (cs.touched, cs.requests) == hand[:2]
    assert cs.usd_saved == pytest.approx(hand[2])
    assert "a cap of 300 tokens on chat would have saved $" in cs.sentence()
    with pytest.raises(fc.CostError, match="no requests of feature 'nope'"):
        fc.cap_savings(db, "nope", 10)
    with pytest.raises(fc.CostError, match="cap"):
        fc.cap_savings(db, "chat", -1)
    dist = fc.token_distribution(db, caps={"chat": 300})
    chat = dist.filter(pl.col("feature") == "chat").row(0, named=True)
    assert chat["share_over_cap"] == pytest.approx(cs.touched / cs.requests)


def test_deployment_mapping_and_pricing_kind(db, tmp_path: Path) -> None:
    before = fc.totals(db, week="2026-W47")["gpu_cost"]
    f = tmp_path / "deploy.toml"
    f.write_text("""
[[deployment]]
name = "nb"
tier = "small"
pricing_kind = "spot"
match = { pod = "notebook-*" }
""")
    fc.load_deployments(db, f)
    t = fc.totals(db, week="2026-W47")
    assert t["gpu_cost"] == pytest.approx(before - 4 * L4 + 4 * 0.30)
    bill = fc.gpu_bill(db, week="2026-W47")
    assert "nb" in bill["deployment"].to_list()
    fc.configure(db, pricing_kind="reserved")
    assert fc.totals(db, week="2026-W47")["gpu_cost"] == pytest.approx(
        4 * 0.30 + 4 * 0.47 + 4 * 2.45
    )
    for text, msg in (
        ("[[deployment]]\nname='x'\n", "match"),
        ("[[deployment]]\nname='x'\npricing_kind='free'\nmatch={pod='a'}\n", "pricing_kind"),
        ("[[deployment]]\nname='x'\nmatch={label='novalue'}\n", "key=value"),
        # was: accepted (a number never matches a pod name)
        ("[[deployment]]\nname='x'\nmatch={pod=5}\n", r"match.pod: expected a non-empty string"),
        ("nonsense = [", "not valid TOML"),
    ):
        f.write_text(text)
        with pytest.raises(fc.CostError, match=msg):
            fc.load_deployments(db, f)
    with pytest.raises(fc.CostError, match="pricing_kind"):
        fc.configure(db, pricing_kind="cheap")


def test_prefix_reuse_potential(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1024, "hash_ids": [1, 2]},
        {"timestamp": 1, "input_length": 1200, "hash_ids": [1, 2, 3]},
        {"timestamp": 2, "input_length": 600, "hash_ids": [1, 9]},
        {"timestamp": 3, "input_length": 100, "hash_ids": [7]},
    ]
    r = fc.prefix_reuse_potential(rows)
    assert r["hit_tokens"] == 1024 + 512 and r["hit_rate"] == pytest.approx(1536 / 2924)
    small = fc.prefix_reuse_potential(rows, capacity_blocks=1)
    assert small["hit_tokens"] < r["hit_tokens"]
    mooncake = Path("/work/shared/data/traces/mooncake-fast25-conversation.jsonl")
    if mooncake.exists():
        m = fc.prefix_reuse_potential(mooncake)
        assert 0 < m["hit_rate"] < 1 and m["requests"] == 12031
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(fc.CostError, match="hash_ids"):
        fc.prefix_reuse_potential(bad)


def test_headline(db) -> None:
    h = fc.headline(db, week="2026-W47")
    line = fc.format_headline(h)
    assert line.startswith("2026-W47: GPU bill $")
    assert f"{h['requests']:,} requests" in line


def test_marts_reachable_from_sql(db) -> None:
    n = db.execute("SELECT count(*) FROM marts.request_costs").fetchall()[0][0]
    assert n == 51
    s = db.execute("SELECT sum(cost_allocation) FROM request_costs").fetchall()[0][0]
    assert s == pytest.approx(fc.totals(db)["allocated_cost"])


# ----------------------------------------------------------------------------- CLI


def test_cli_costs_json(cost_lake: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "costs",
            "--lake",
            str(cost_lake),
            "--week",
            "2026-W47",
            "--by",
            "tenant",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    tot = doc["totals"]
    for k in (
        "gpu_cost",
        "allocated_cost",
        "idle_cost",
        "requests",
        "input_tokens",
        "output_tokens",
    ):
        assert k in tot
    assert abs(tot["allocated_cost"] + tot["idle_cost"] - tot["gpu_cost"]) < 0.005
    assert {r["tenant"] for r in doc["rows"]} == {"acme", "globex"}
    assert sum(r["cost"] for r in doc["rows"]) == pytest.approx(tot["allocated_cost"])


def test_cli_costs_table_and_csv(cost_lake: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "costs",
            "--lake",
            str(cost_lake),
            "--from",
            "2026-11-16",
            "--to",
            "2026-11-16",
            "--by",
            "tier",
            "--basis",
            "usage",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "large" in r.stdout and "GPU bill" in r.stdout
    # money with cents, counts with separators, unknown as n/a, nothing cut to "…"
    # (was: 4 significant digits, "504", and "309359…" in a 100-column terminal)
    rows = fc.by(
        finops.connect(cost_lake), "tier", start="2026-11-16", end="2026-11-16", basis="usage"
    )
    large = rows.filter(pl.col("tier") == "large").row(0, named=True)
    assert f"${large['cost']:,.2f}" in r.stdout and f"{large['share']:.1%}" in r.stdout
    assert "$/1k requests" in r.stdout and "…" not in r.stdout
    r = CliRunner().invoke(
        app, ["costs", "--lake", str(cost_lake), "--by", "hour", "--format", "csv"]
    )
    assert r.exit_code == 0, r.output
    assert pl.read_csv(r.stdout.encode()).height == 3


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--week", "2026-47"], "expected an ISO week"),
        (["--week", "2026-W40"], "no requests and no GPU samples in 2026-W40"),
        (["--by", "color"], "--by"),
        (["--basis", "cash"], "--basis"),
        (["--format", "xml"], "--format"),
        (["--week", "2026-W47", "--from", "2026-11-16"], "not both"),
    ],
)
def test_cli_costs_bad_input(cost_lake: Path, args: list[str], msg: str) -> None:
    r = CliRunner().invoke(app, ["costs", "--lake", str(cost_lake), *args])
    assert r.exit_code == 2
    assert msg in r.output
    assert "Traceback" not in r.output


def test_cli_costs_missing_lake_and_gpu_data(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["costs", "--lake", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no lake" in r.output
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("requests", _request_rows()[:5], source="test", now=T0 + dt.timedelta(days=30))
    r = CliRunner().invoke(app, ["costs", "--lake", str(lake.path), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert "no GPU samples" in r.stderr
    totals = json.loads(r.stdout)["totals"]
    assert totals["gpu_cost"] == 0
    # what the per-request figures divide by is in the JSON, not only in the notes
    assert totals["unpriced_requests"] == 5 and totals["priced_gpu_hours"] == 0
    r = CliRunner().invoke(app, ["costs", "--lake", str(lake.path), "--pricing-kind", "bogus"])
    assert r.exit_code == 2
    assert "error: --pricing-kind: expected one of ('on_demand'" in r.output  # the flag typed


def test_materialized_copies_equal_views_and_follow_the_lake(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake", fsync=False)
    now = T0 + dt.timedelta(days=30)
    lake.append("gpu_samples", _gpu_rows(), source="test", now=now)
    lake.append("requests", _request_rows()[:20], source="test", now=now)
    lake.append("requests", _request_rows()[10:15], source="test", now=now)  # re-loaded rows
    con = finops.connect(lake.path)
    fc.materialize(con)
    for name in fc.COST_VIEWS:
        view = con.sql(f"SELECT * FROM marts.{name}").pl()
        copy = con.sql(f"SELECT * FROM temp.main._fc_{name}").pl()
        assert view.sort(view.columns).equals(copy.sort(copy.columns)), name
    assert fc.totals(con)["requests"] == 20
    lake.append("requests", _request_rows()[20:], source="test", now=now)
    assert fc.totals(con)["requests"] == 51  # new file -> rebuilt


def test_example_deployments_file_loads(db) -> None:
    example = Path(__file__).resolve().parent.parent / "data" / "deployments.example.toml"
    rules = fc.load_deployments(db, example)
    assert rules["tier"].to_list() == ["large", "mid", "small"]
    bill = fc.gpu_bill(db, week="2026-W47")
    small = bill.filter(pl.col("tier") == "small").row(0, named=True)
    assert (small["deployment"], small["pricing_kind"], small["usd_per_gpu_hour"]) == (
        "chat-small",
        "spot",
        0.30,
    )
    large = bill.filter(pl.col("tier") == "large").row(0, named=True)
    assert large["pricing_kind"] == "reserved" and large["usd_per_gpu_hour"] == 2.45


def test_cli_costs_headline(cost_lake: Path) -> None:
    r = CliRunner().invoke(
        app, ["costs", "--lake", str(cost_lake), "--week", "2026-W47", "--headline"]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("2026-W47: GPU bill $") and r.stdout.count("\n") == 1
    r = CliRunner().invoke(
        app, ["costs", "--lake", str(cost_lake), "--headline", "--format", "json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["requests"] == 51


def test_gpu_util_hourly_agrees_with_gpu_hourly_and_ignores_reloads(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake", fsync=False)
    now = T0 + dt.timedelta(days=30)
    rows = _gpu_rows()
    lake.append("gpu_samples", rows, source="test", now=now)
    lake.append("gpu_samples", rows[: len(rows) // 3], source="test", now=now)  # overlap re-load
    con = finops.connect(lake.path)
    mine = con.sql(
        "SELECT hour, gpu_uuid, util, util_signal, sm_active, gpu_util "
        "FROM marts.gpu_util_hourly ORDER BY ALL"
    ).pl()
    ref = con.sql(
        "SELECT hour, gpu_uuid, util, util_signal, sm_active, gpu_util "
        "FROM marts.gpu_hourly ORDER BY ALL"
    ).pl()
    assert mine.height == ref.height == 12
    for c in ("util", "sm_active", "gpu_util"):
        assert mine[c].to_list() == pytest.approx(ref[c].to_list())
    assert mine["util_signal"].to_list() == ref["util_signal"].to_list()


def test_shim_response_savings_are_what_hits_avoided(tmp_path: Path) -> None:
    """The shim logs a hit (and a coalesced follower) with 0 tokens: nothing ran. The
    shim_response line values what it avoided (the original's tokens), counts served
    coalesced followers too, skips a follower whose client left, counts a hit that
    carries its own tokens (demo data) once, and agrees with cache_events."""
    from collectors.logs import ingest_file

    lake = Lake(tmp_path / "lake", fsync=False)
    assert lake.append("gpu_samples", _gpu_rows(), source="test").rejected == 0

    def rec(rid: str, minute: int, status: str, fp: str, i: int = 0, o: int = 0, **kw) -> dict:
        return {
            "request_id": rid,
            "ts": (T0 + dt.timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
            "tenant": "acme",
            "feature": "chat",
            "tier": "small",
            "response_model": "model-small",
            "input_tokens": i,
            "output_tokens": o,
            "status_code": 200,
            "cache_status": status,
            "prompt_fingerprint": fp,
            **kw,
        }

    log = tmp_path / "requests-1.jsonl"
    recs = [
        rec("origA", 10, "miss", "fpA", 300, 60),
        rec("origB", 11, "miss", "fpB", 100, 20),
        rec("hit", 20, "hit", "fpA"),
        rec("co", 21, "coalesced", "fpA"),
        rec("gone", 22, "coalesced", "fpA", status_code=499, error_type="client_disconnected"),
        rec("replay", 23, "hit", "fpB", retry_of="origB", attempt=2),
        rec("own", 24, "hit", "fpA", 300, 60),  # a producer that logs the replayed usage
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = ingest_file(log, lake)
    assert report.rejected == 0
    con = finops.connect(lake.path)
    cs = fc.cache_savings(con, week="2026-W47")
    shim = cs.filter(pl.col("layer") == "shim_response").row(0, named=True)
    assert shim["requests"] == 4  # hit, co, replay, own; not the follower that left
    assert shim["tokens"] == 360 + 360 + 120 + 360
    p = (
        con.sql(
            "SELECT usd_per_input_token_usage AS i, usd_per_output_token_usage AS o "
            f"FROM marts.tier_token_prices WHERE tier = 'small' AND hour = TIMESTAMPTZ '{T0}'"
        )
        .pl()
        .row(0, named=True)
    )
    assert p["i"] > 0 and p["o"] > 0
    hand = 3 * (300 * p["i"] + 60 * p["o"]) + (100 * p["i"] + 20 * p["o"])
    assert shim["usd_saved"] == pytest.approx(hand)
    # the same requests and tokens as the cache_events the ingest wrote
    ev = con.sql(
        "SELECT request_id, tokens FROM cache_events WHERE layer = 'shim_response'"
    ).fetchall()
    assert dict(ev) == {"hit": 360, "co": 360, "replay": 120, "own": 360}
    # none of them is GPU work or a duplicate
    rc = con.sql(
        "SELECT request_id FROM marts.request_costs WHERE worked OR is_duplicate ORDER BY 1"
    ).fetchall()
    assert [r[0] for r in rc] == ["origA", "origB"]


def test_a_streamed_responses_answer_that_completed_is_no_aborted_stream(tmp_path: Path) -> None:
    """The shim logs a Responses request's finish as its status (`completed`) or why it is
    incomplete (`max_output_tokens`): every streamed Responses request was counted as
    leakage ("stream_aborted", tokens thrown away)."""
    rows = [
        {
            "request_id": f"r{i}",
            "ts": T0 + dt.timedelta(seconds=i),
            "tenant": "a",
            "feature": "f",
            "operation": op,
            "tier": "small",
            "input_tokens": 10,
            "output_tokens": 5,
            "status_code": 200,
            "stream": True,
            "finish_reason": fr,
            "cache_status": "miss",
        }
        for i, (op, fr) in enumerate(
            [
                ("chat", "stop"),
                ("responses", "completed"),
                ("responses", "max_output_tokens"),
                ("chat", None),  # cut short: these two are aborted streams
                ("responses", None),
            ]
        )
    ]
    assert Lake(tmp_path).append("requests", rows, source="test").rejected == 0
    con = finops.connect(tmp_path)
    got = con.sql("SELECT request_id, leak FROM marts.request_costs ORDER BY 1").fetchall()
    con.close()
    assert got == [
        ("r0", None),
        ("r1", None),
        ("r2", None),
        ("r3", "stream_aborted"),
        ("r4", "stream_aborted"),
    ]


def test_price_match_is_one_rule_in_sql_and_python(tmp_path: Path) -> None:
    """Catalog names price a reported model exactly or as a word-boundary prefix, one way:
    L4 never prices L40S, A100 never A10, a blank name nothing; SQL and price_for agree."""
    from finops.prices import PriceCatalogError, load_prices, model_matches, price_for

    prices = tmp_path / "prices.csv"
    prices.write_text(
        "gpu_model,pricing_kind,usd_per_gpu_hour\n"
        "NVIDIA L4,on_demand,0.75\nA100,on_demand,2.25\nA100 80GB PCIe,on_demand,2.50\n"
        "H100,on_demand,3.90\nH200 141GB HBM3e,on_demand,5.00\n"
    )
    expect = {
        "NVIDIA L4": 0.75,
        "NVIDIA L40S": None,
        "NVIDIA L40": None,
        "NVIDIA A10": None,
        "NVIDIA A100-SXM4-40GB": 2.25,  # 'A100' then a '-': a word boundary
        "NVIDIA A100 80GB PCIe": 2.50,  # the exact name wins over the prefix
        "NVIDIA H100 80GB HBM3": 3.90,
        "NVIDIA H200": None,  # a vaguer report is not priced by a more specific row
        " ": None,
    }
    rows = [
        {"ts": T0, "source": "t", "host": "n1", "gpu_uuid": f"g{i}", "gpu_model": m,
         "pod": f"p{i}", "labels": json.dumps({"tier": "small"}),
         "field": "DCGM_FI_DEV_GPU_UTIL", "value": 50.0}
        for i, m in enumerate(expect)
    ]  # fmt: skip
    Lake(tmp_path / "lake", fsync=False).append("gpu_samples", rows, source="t")
    db = finops.connect(tmp_path / "lake", prices=prices)
    sql = dict(db.sql("SELECT gpu_model, usd_per_gpu_hour FROM marts.gpu_cost_hourly").fetchall())
    cat = load_prices(prices)
    for model, usd in expect.items():
        assert sql[model] == usd, model
        if usd is None:
            with pytest.raises(PriceCatalogError, match="no on_demand price"):
                price_for(cat, model)
        else:
            assert price_for(cat, model) == usd, model
    assert not model_matches("", "NVIDIA L4") and not model_matches("NVIDIA L4", "")
    note = next(n for n in fc.sources(db)["notes"] if "no price in the catalog" in n)
    for model, usd in expect.items():
        assert (repr(model) in note) == (usd is None), model


def test_gpu_util_hourly_reads_deduplicated_samples(tmp_path: Path) -> None:
    """A partly re-written flush duplicates some samples only: the hourly average must not
    weight them, and the cost mart must agree with marts.gpu_hourly."""
    base = {"source": "dcgm", "host": "n1", "gpu_uuid": "GPU-1", "gpu_model": "NVIDIA L4",
            "labels": json.dumps({"tier": "small"}), "field": "DCGM_FI_DEV_GPU_UTIL"}  # fmt: skip
    first = [{**base, "ts": T0, "value": 100.0}]
    second = [{**base, "ts": T0 + dt.timedelta(minutes=1), "value": 0.0}]
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("gpu_samples", first, source="dcgm")
    lake.append("gpu_samples", first + second, source="dcgm", now=T0 + dt.timedelta(minutes=2))
    con = finops.connect(lake.path)
    assert con.sql("SELECT count(*) FROM raw.gpu_samples").fetchall()[0][0] == 3
    for view in ("marts.gpu_hourly", "marts.gpu_util_hourly", "marts.gpu_cost_hourly"):
        assert con.sql(f"SELECT util FROM {view}").fetchall() == [(0.5,)], view


def test_a_mig_split_gpu_is_billed_once(tmp_path: Path) -> None:
    """One A100 with two MIG instances for an hour is one GPU-hour, not one per slice."""
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu_model,pricing_kind,usd_per_gpu_hour\nA100-SXM4-80GB,on_demand,2.00\n")
    rows = [
        {"ts": T0 + dt.timedelta(minutes=m), "source": "dcgm", "host": "n1", "gpu_uuid": "GPU-1",
         "gpu_model": "NVIDIA A100-SXM4-80GB", "mig_instance": mig, "pod": f"vllm-{mig}",
         "labels": json.dumps({"tier": "small"}), "field": "DCGM_FI_PROF_SM_ACTIVE",
         "value": 0.5}
        for m in (0, 30) for mig in ("1", "2")
    ]  # fmt: skip
    # a plain GPU next to it still bills a full hour
    rows += [
        {**r, "gpu_uuid": "GPU-2", "mig_instance": None} for r in rows if r["mig_instance"] == "1"
    ]
    Lake(tmp_path / "lake", fsync=False).append("gpu_samples", rows, source="dcgm")
    db = finops.connect(tmp_path / "lake", prices=prices)
    per = db.sql(
        "SELECT gpu_uuid, sum(gpu_hours), sum(gpu_cost), sum(busy_cost) + sum(idle_cost) "
        "FROM marts.gpu_cost_hourly GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert per == [("GPU-1", 1.0, 2.0, 2.0), ("GPU-2", 1.0, 2.0, 2.0)]
    t = fc.totals(db, week="2026-W47")
    assert t["gpu_hours"] == pytest.approx(2.0) and t["gpu_cost"] == pytest.approx(4.0)
    # the fleet is two GPUs, whatever the slices
    assert t["gpus"] == 2
    assert fc.tier_utilization(db, week="2026-W47")["gpus"].to_list() == [2]
    assert set(fc.utilization(db, week="2026-W47")["gpus"]) == {2}


def test_a_mig_gpu_hour_is_shared_by_compute_slices(tmp_path: Path) -> None:
    """A 4g and a 2g instance of one GPU carry 4/6 and 2/6 of its hour; means weigh it too."""
    prices = tmp_path / "prices.csv"
    prices.write_text("gpu_model,pricing_kind,usd_per_gpu_hour\nA100-SXM4-80GB,on_demand,3.00\n")

    def row(mig: str | None, profile: str | None, tier: str, util: float) -> dict:
        return {"ts": T0, "source": "dcgm", "host": "n1", "gpu_uuid": "GPU-1",
                "gpu_model": "NVIDIA A100-SXM4-80GB", "mig_instance": mig, "mig_profile": profile,
                "pod": f"vllm-{tier}", "labels": json.dumps({"tier": tier}),
                "field": "DCGM_FI_PROF_SM_ACTIVE", "value": util}  # fmt: skip

    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("gpu_samples", [row("1", "4g.40gb", "big", 1.0), row("2", "2g.20gb", "big", 0.1)],
                source="dcgm")  # fmt: skip
    db = finops.connect(tmp_path / "lake", prices=prices)
    got = db.sql(
        "SELECT mig_instance, mig_profile, gpu_hours, gpu_cost FROM marts.gpu_cost_hourly "
        "ORDER BY 1"
    ).fetchall()
    assert got == [
        ("1", "4g.40gb", pytest.approx(4 / 6), pytest.approx(2.0)),
        ("2", "2g.20gb", pytest.approx(2 / 6), pytest.approx(1.0)),
    ]
    tu = fc.tier_utilization(db, week="2026-W47").row(0, named=True)
    assert tu["gpus"] == 1 and tu["gpu_hours"] == pytest.approx(1.0)
    assert tu["util"] == pytest.approx((4 * 1.0 + 2 * 0.1) / 6)
    u = fc.utilization(db, week="2026-W47").row(0, named=True)
    assert u["sm_active"] == pytest.approx(u["util"])
    # a profile that does not name its slices: the hour is split evenly
    lake2 = Lake(tmp_path / "lake2", fsync=False)
    lake2.append("gpu_samples", [row("1", "4g.40gb", "big", 1.0), row("2", "odd", "big", 0.1)],
                 source="dcgm")  # fmt: skip
    db2 = finops.connect(tmp_path / "lake2", prices=prices)
    got2 = db2.sql("SELECT gpu_hours FROM marts.gpu_cost_hourly ORDER BY mig_instance").fetchall()
    assert got2 == [(0.5,), (0.5,)]


def test_finops_sql_applies_finops_deployments(
    cost_lake: Path, tmp_path: Path, monkeypatch
) -> None:
    """`finops sql` over the marts assigns GPUs as `finops costs` does ($FINOPS_DEPLOYMENTS)."""
    from typer.testing import CliRunner

    from finops.cli import app

    f = tmp_path / "deploy.toml"
    f.write_text('[[deployment]]\nname = "nb"\ntier = "small"\nmatch = { pod = "notebook-*" }\n')
    monkeypatch.setenv("FINOPS_DEPLOYMENTS", str(f))
    query = "SELECT DISTINCT deployment FROM marts.gpu_cost_hourly ORDER BY 1"
    res = CliRunner().invoke(app, ["sql", query, "--lake", str(cost_lake), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "nb" in res.stdout.split(), res.stdout
    f.write_text("nonsense = [")
    res = CliRunner().invoke(app, ["sql", query, "--lake", str(cost_lake)])
    assert res.exit_code == 2 and "not valid TOML" in res.output, res.output


def test_a_failed_request_is_listed_under_its_tiers_model(lake: Lake) -> None:
    """A request that failed before a model answered logs no response model: `--by model`
    lists it under the model its tier served, not under the name it asked for. Was: 'auto'
    and the tier aliases showed as models of their own, every request of them failed."""
    ok = {"tenant": "acme", "status_code": 200, "request_model": "auto", "tier": "large"}
    rows = [
        {**ok, "request_id": f"ok{i}", "ts": T0 + dt.timedelta(minutes=i),
         "response_model": "llama-70b", "input_tokens": 100, "output_tokens": 10}
        for i in range(3)
    ]  # fmt: skip
    rows.append({**ok, "request_id": "older", "ts": T0, "response_model": "llama-65b"})
    rows.append(
        {**ok, "request_id": "failed", "ts": T0 + dt.timedelta(minutes=5), "status_code": 503,
         "error_type": "upstream_unavailable"}
    )  # fmt: skip
    rows.append(
        {"request_id": "refused", "ts": T0 + dt.timedelta(minutes=6), "tenant": "acme",
         "request_model": "auto", "status_code": 401, "error_type": "invalid_api_key"}
    )  # fmt: skip
    assert lake.append("requests", rows, source="test").rejected == 0
    db = finops.connect(lake.path)
    work = dict(db.execute("SELECT request_id, model FROM marts.request_work").fetchall())
    assert work["failed"] == "llama-70b"  # the model the tier served most often
    assert work["refused"] == "auto"  # no tier: the name it asked for
    assert work["older"] == "llama-65b"  # an answered request keeps its own
    hourly = db.execute(
        "SELECT model, sum(requests), sum(failed) FROM marts.requests_hourly GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert hourly == [("auto", 1, 1), ("llama-65b", 1, 0), ("llama-70b", 4, 1)]


def test_a_tie_for_a_tiers_model_goes_to_the_first_name(lake: Lake) -> None:
    """Two models served a tier equally often: mode() picked one by scan order, so a failed
    request's model could change between runs. The alphabetically first name wins."""
    ok = {"tenant": "acme", "status_code": 200, "request_model": "auto", "tier": "large"}
    rows = [
        {**ok, "request_id": f"{m}{i}", "ts": T0 + dt.timedelta(minutes=i),
         "response_model": m, "input_tokens": 100, "output_tokens": 10}
        for i in range(2) for m in ("qwen-72b", "llama-70b")
    ]  # fmt: skip
    rows.append(
        {**ok, "request_id": "failed", "ts": T0 + dt.timedelta(minutes=5), "status_code": 503,
         "error_type": "upstream_unavailable"}
    )  # fmt: skip
    assert lake.append("requests", rows, source="test").rejected == 0
    db = finops.connect(lake.path)
    assert db.execute("SELECT tier, model FROM marts.tier_models").fetchall() == [
        ("large", "llama-70b")
    ]
    work = dict(db.execute("SELECT request_id, model FROM marts.request_work").fetchall())
    assert work["failed"] == "llama-70b"


@pytest.mark.parametrize("basis", ["allocation", "usage"])
def test_cli_costs_names_the_unallocated_cost_per_basis(cost_lake: Path, basis: str) -> None:
    """The summary line called idle_cost "on GPU-hours without requests" on the usage basis
    too, where it also holds the idle time of hours with requests."""
    args = ["costs", "--lake", str(cost_lake), "--basis", basis]
    tot = json.loads(CliRunner().invoke(app, [*args, "--format", "json"]).stdout)["totals"]
    assert tot["unallocated_cost"] == pytest.approx(tot["gpu_cost"] - tot["allocated_cost"])
    out = CliRunner().invoke(app, args).stdout
    idle_of_busy = "and the idle time of hours with requests" in out
    assert f"${tot['unallocated_cost']:,.2f} unallocated (GPU-hours without requests" in out
    assert idle_of_busy == (basis == "usage"), out
