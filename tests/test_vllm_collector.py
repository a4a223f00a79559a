"""vLLM /metrics: renamed metrics, histograms as exported, prefix-cache events, real server."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import httpx
import polars as pl
import pytest

import finops
from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector
from collectors.exposition import parse
from collectors.vllm import HITS, QUERIES, PrefixCacheTracker, serving_rows
from finops.lake import Lake

DATA = Path(__file__).parent / "data" / "exposition"
T0 = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)

OLD_VLLM = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mid"} 0.42
# HELP vllm:gpu_prefix_cache_queries_total GPU prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{model_name="mid"} 1000.0
# HELP vllm:gpu_prefix_cache_hits_total GPU prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{model_name="mid"} 250.0
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="mid"} 3.0
vllm:time_per_output_token_seconds_bucket{le="0.037",model_name="mid"} 9.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="mid"} 10.0
vllm:time_per_output_token_seconds_count{model_name="mid"} 10.0
vllm:time_per_output_token_seconds_sum{model_name="mid"} 0.31
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 32.0
"""


def test_old_names_are_renamed_and_buckets_kept_as_exported() -> None:
    rows = serving_rows(parse(OLD_VLLM), ts=T0, target="http://old:8000/metrics")
    metrics = set(rows["metric"])
    assert metrics == {
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:inter_token_latency_seconds_count",
        "vllm:inter_token_latency_seconds_sum",
    }  # process_* is the exporter's, not serving's
    buckets = rows.filter(pl.col("metric").str.ends_with("_bucket"))
    les = [lab for lab in buckets["labels"]]
    assert les == [
        '{"le":"0.01","model_name":"mid"}',
        '{"le":"0.037","model_name":"mid"}',
        '{"le":"+Inf","model_name":"mid"}',
    ]  # an unusual bound (0.037) survives: nothing assumes the bucket layout
    assert set(rows["model_name"]) == {"mid"}
    assert set(rows["type"]) == {"gauge", "counter", "histogram"}


def test_when_both_names_are_exported_the_current_one_wins() -> None:
    both = OLD_VLLM + (
        '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="mid"} 0.5\n'
    )
    rows = serving_rows(parse(both), ts=T0, target="t")
    kv = rows.filter(pl.col("metric") == "vllm:kv_cache_usage_perc")
    assert kv["value"].to_list() == [0.5]


def test_real_payload_recorded_from_the_dev_server() -> None:
    rows = serving_rows(parse((DATA / "vllm_real.txt").read_text()), ts=T0, target="t")
    assert rows["metric"].str.starts_with("vllm:").all()
    assert {"vllm:prompt_tokens_total", "vllm:generation_tokens_total", HITS, QUERIES} <= set(
        rows["metric"]
    )
    assert set(rows["model_name"].drop_nulls()) == {"small"}  # info metrics carry none
    assert rows.filter(pl.col("metric") == "vllm:prompt_tokens_total")["labels"][0] == (
        '{"engine":"0","model_name":"small"}'
    )


def _counters(hits: float, queries: float, ts: dt.datetime) -> pl.DataFrame:
    text = (
        f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}\n'
        f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}\n'
    )
    return serving_rows(parse(text), ts=ts, target="r1")


def test_prefix_cache_events_with_a_restart_in_between() -> None:
    tr = PrefixCacheTracker(target="r1")
    assert tr.update(_counters(100, 400, T0)) == []  # first scrape: only a baseline
    ev = tr.update(_counters(160, 500, T0 + dt.timedelta(seconds=10)))
    assert [(e["event"], e["tokens"]) for e in ev] == [("hit", 60), ("miss", 40)]
    assert ev[0]["layer"] == "vllm_prefix" and ev[0]["model"] == "m"
    # vLLM restarted: counters start over; the increase is the new value itself
    ev = tr.update(_counters(30, 50, T0 + dt.timedelta(seconds=20)))
    assert [(e["event"], e["tokens"]) for e in ev] == [("hit", 30), ("miss", 20)]
    # event ids are deterministic: the same interval gives the same ids
    again = PrefixCacheTracker(target="r1")
    again.update(_counters(160, 500, T0 + dt.timedelta(seconds=10)))
    assert [
        e["event_id"] for e in again.update(_counters(30, 50, T0 + dt.timedelta(seconds=20)))
    ] == [e["event_id"] for e in ev]


def test_restore_from_the_lake_neither_loses_nor_doubles(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    tr = PrefixCacheTracker(target="r1")
    for i, (h, q) in enumerate([(0, 0), (10, 30), (25, 70)]):
        rows = _counters(h, q, T0 + dt.timedelta(seconds=10 * i))
        lake.append("serving_samples", rows, source="vllm")
        ev = tr.update(rows)
        if i < 2:  # the crash: the last interval's events never reached the lake
            lake.append("cache_events", ev, source="vllm")
    restarted = PrefixCacheTracker(target="r1")
    repaired = restarted.restore(str(lake.path))
    lake.append("cache_events", repaired, source="vllm")
    ev = restarted.update(_counters(40, 100, T0 + dt.timedelta(seconds=30)))
    lake.append("cache_events", ev, source="vllm")
    db = finops.connect(lake.path)
    tot = dict(
        db.sql("SELECT event, sum(tokens) FROM cache_events GROUP BY event").pl().iter_rows()
    )
    assert tot == {"hit": 40, "miss": 60}  # = final counters: nothing lost, nothing doubled


# --------------------------------------------------------------------------- real vLLM


def _chat(server, model: str, text: str, max_tokens: int) -> dict:
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]


@pytest.mark.vllm
@pytest.mark.slow
def test_token_counters_in_the_lake_match_the_usage_of_real_requests(vllm_server, tmp_path):
    """Scrape, send real requests, scrape: the lake's increase equals the usage returned.

    The dev servers are shared with other sessions: if someone else's request
    lands between the two scrapes, the increase is larger than ours and the
    round is retried (a smaller increase would be a bug and fails at once).
    """
    lake_path = tmp_path / "lake"
    cfg = CollectConfig(lake=lake_path, checkpoint_dir=lake_path / "_state")
    cfg.targets.append(make_target({"kind": "vllm", "url": vllm_server.base_url}, "t"))
    prompt = "the quarterly gpu bill grew faster than traffic; list three reasons " * 3
    for _attempt in range(4):
        asyncio.run(Collector(cfg, status=None).run_once())
        usages = [_chat(vllm_server, "small", prompt, 6), _chat(vllm_server, "mid", prompt, 4)]
        time.sleep(0.5)
        asyncio.run(Collector(cfg, status=None).run_once())
        db = finops.connect(lake_path)
        inc = dict(
            db.sql(
                "WITH last AS (SELECT max(ts) AS ts FROM clean.serving_increase) "
                "SELECT metric, sum(increase) FROM clean.serving_increase, last "
                "WHERE clean.serving_increase.ts = last.ts AND metric IN "
                "('vllm:prompt_tokens_total', 'vllm:generation_tokens_total') GROUP BY metric"
            )
            .pl()
            .iter_rows()
        )
        want_prompt = sum(u["prompt_tokens"] for u in usages)
        want_gen = sum(u["completion_tokens"] for u in usages)
        got_prompt = inc.get("vllm:prompt_tokens_total", 0)
        got_gen = inc.get("vllm:generation_tokens_total", 0)
        assert got_prompt >= want_prompt and got_gen >= want_gen, (inc, usages)
        if (got_prompt, got_gen) == (want_prompt, want_gen):
            break
    else:
        pytest.fail(f"other traffic on the shared server in every round: {inc} vs {usages}")
    # the same prompt twice: vLLM's prefix cache served part of the second one
    hits = db.execute(
        "SELECT coalesce(sum(tokens), 0) FROM cache_events WHERE layer = 'vllm_prefix' AND event = 'hit'"
    ).fetchall()[0][0]
    assert hits > 0
    health = db.sql("SELECT up, samples FROM scrape_health").pl()
    assert health["up"].all() and (health["samples"] > 50).all()


# --------------------------------------------------------------------------- one URL, several processes


def _replica(
    hits: float, queries: float, gen: float, created: float, ts: dt.datetime
) -> pl.DataFrame:
    """One scrape of a replica whose counters were created at `created` (epoch seconds)."""
    lab = '{engine="0",model_name="m"}'
    text = (
        f"vllm:prefix_cache_hits_total{lab} {hits}\n"
        f"vllm:prefix_cache_queries_total{lab} {queries}\n"
        f"vllm:prefix_cache_queries_created{lab} {created}\n"
        f"vllm:generation_tokens_total{lab} {gen}\n"
    )
    return serving_rows(parse(text), ts=ts, target="http://vllm-mid.llm.svc:8000/metrics")


OLD_START = (T0 - dt.timedelta(days=30)).timestamp()
YOUNG_START = (T0 - dt.timedelta(hours=1)).timestamp()


def _alternating(n: int = 6) -> list[pl.DataFrame]:
    """A Service's round robin: the old replica (huge counters), then the young one, +100 each."""
    out = []
    for i in range(n):
        k, ts = i // 2, T0 + dt.timedelta(seconds=10 * i)
        if i % 2 == 0:
            out.append(_replica(1e6 + 100 * k, 2e6 + 200 * k, 5e6 + 100 * k, OLD_START, ts))
        else:
            out.append(_replica(10 + 100 * k, 20 + 200 * k, 50 + 100 * k, YOUNG_START, ts))
    return out


def test_a_url_reaching_two_replicas_gives_no_increase_across_them(tmp_path: Path) -> None:
    """Each switch of process looked like a reset: 2,000,510 hit tokens out of ~400."""
    tr = PrefixCacheTracker(target="http://vllm-mid.llm.svc:8000/metrics")
    lake = Lake(tmp_path / "lake")
    hits = 0
    flagged = []
    for rows in _alternating():
        lake.append("serving_samples", rows, source="vllm")
        events, state = tr.step(rows)
        flagged.append(bool(tr.several_processes(state)))
        tr.commit(state)
        hits += sum(e["tokens"] for e in events if e["event"] == "hit")
    assert hits == 400, f"per process: 2 x (+100, +100) hit tokens, got {hits:,}"
    assert flagged == [False, False, True, True, True, True], (
        "A -> B is a restart; A -> B -> A is not"
    )
    db = finops.connect(lake.path)
    got = dict(
        db.sql("SELECT metric, sum(increase) FROM clean.serving_increase GROUP BY 1").fetchall()
    )
    assert got == {
        HITS: 400.0,
        QUERIES: 800.0,
        "vllm:generation_tokens_total": 400.0,
    }, f"increases are taken per process, never across: {got}"
    assert db.sql("SELECT count(*) FROM clean.serving_increase WHERE reset").fetchall() == [(0,)]
    # a fresh tracker restored from the lake knows the URL flips, and its events match
    again = PrefixCacheTracker(target="http://vllm-mid.llm.svc:8000/metrics")
    last = again.restore(str(lake.path))
    assert again.several_processes()
    assert sum(e["tokens"] for e in last if e["event"] == "hit") == 100


def test_a_single_restart_with_created_samples_counts_from_zero(tmp_path: Path) -> None:
    """A -> B once (a restart): B's counters began after the last scrape, all of them count."""
    ts = [T0 + dt.timedelta(seconds=10 * i) for i in range(4)]
    restarted = (T0 + dt.timedelta(seconds=15)).timestamp()
    scrapes = [
        _replica(100, 400, 1000, OLD_START, ts[0]),
        _replica(160, 500, 1100, OLD_START, ts[1]),
        _replica(30, 50, 70, restarted, ts[2]),  # smaller: a restart, read as before
        _replica(130, 250, 170, restarted, ts[3]),
    ]
    tr = PrefixCacheTracker(target="r")
    lake = Lake(tmp_path / "lake")
    hits = []
    for rows in scrapes:
        lake.append("serving_samples", rows, source="vllm")
        hits.append(sum(e["tokens"] for e in tr.update(rows) if e["event"] == "hit"))
        assert not tr.several_processes()
    assert hits == [0, 60, 30, 100]
    inc = (
        finops.connect(lake.path)
        .sql(
            "SELECT increase, reset FROM clean.serving_increase "
            "WHERE metric = 'vllm:generation_tokens_total' ORDER BY ts"
        )
        .fetchall()
    )
    assert inc == [(100.0, False), (70.0, True), (100.0, False)]


def test_the_collector_marks_a_load_balanced_url_down(tmp_path: Path) -> None:
    """scrape_health says why, stderr warns, and the cache events are per process."""
    import io

    from test_daemon import TEXT, reply, serve

    payloads = iter(_alternating_text())

    def route(h) -> None:  # type: ignore[no-untyped-def]
        reply(200, TEXT, next(payloads).encode())(h)

    err = io.StringIO()
    with serve({"/metrics": route}) as base:
        cfg = CollectConfig(lake=tmp_path / "lake", checkpoint_dir=tmp_path / "lake" / "_state")
        cfg.targets.append(make_target({"kind": "vllm", "url": base, "name": "mid"}, "t"))
        outs = []
        for _ in range(4):
            c = Collector(cfg, status=err)
            outs += asyncio.run(c.run_once())
            time.sleep(0.01)
    assert [o.up for o in outs] == [True, True, False, False]
    assert outs[-1].error is not None and outs[-1].error.startswith(
        "URL reaches more than one vLLM process (process start times "
    ), outs[-1].error
    assert "scrape each pod (headless Service or pod IPs)" in outs[-1].error
    assert "warning: mid: URL reaches more than one vLLM process" in err.getvalue()
    db = finops.connect(tmp_path / "lake")
    assert db.sql(
        "SELECT count(*) FILTER (NOT up), count(*) FROM clean.scrape_health"
    ).fetchall() == [(2, 4)]
    hits = db.sql("SELECT sum(tokens) FROM clean.cache_events WHERE event = 'hit'").fetchall()
    # A's and B's second readings, +100 each against their own first: never B - A
    assert hits == [(200,)], hits


def _alternating_text() -> list[str]:
    out = []
    for i in range(4):
        k = i // 2
        old = i % 2 == 0
        h, q, c = (
            (1e6 + 100 * k, 2e6 + 200 * k, OLD_START)
            if old
            else (10 + 100 * k, 20 + 200 * k, YOUNG_START)
        )
        out.append(
            "# TYPE vllm:prefix_cache_hits counter\n"
            f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {h}\n'
            f'vllm:prefix_cache_hits_created{{engine="0",model_name="m"}} {c}\n'
            "# TYPE vllm:prefix_cache_queries counter\n"
            f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {q}\n'
            f'vllm:prefix_cache_queries_created{{engine="0",model_name="m"}} {c}\n'
        )
    return out
