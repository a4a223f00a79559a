"""The vLLM prefix-cache tracker inside `finops collect`: a timed-out attempt leaves it
where it was, a restart's re-emitted events come without a fake health row, and a vLLM
restart resets hits and queries together."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import threading
import time
from pathlib import Path

from test_daemon import FakeVllm, config, serve

import finops
from collectors.daemon import Collector, Outcome, VllmTarget
from collectors.exposition import parse
from collectors.vllm import PrefixCacheTracker, serving_rows

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _events(out: Outcome) -> dict[str, int]:
    """event -> tokens of the cache_events an Outcome carries."""
    tot: dict[str, int] = {}
    for batch in out.frames.get("cache_events", []):
        for e in batch:
            tot[e["event"]] = tot.get(e["event"], 0) + e["tokens"]
    return tot


def test_a_timed_out_attempt_does_not_move_the_prefix_tracker(tmp_path: Path) -> None:
    """The late parse of a timed-out attempt is dropped, its tracker state with it.

    Counters per scrape k are hits 10k, queries 30k. Scrape 2's attempt times
    out while its parse still runs; scrape 3's events must then cover 1 -> 3
    (hit 20, miss 40), as the samples the lake keeps (1 and 3) do.
    """
    fake = FakeVllm()
    gate = threading.Event()
    slow = {"on": False}
    real_map = VllmTarget._map

    def map_late(self: VllmTarget, parsed: object, out: Outcome) -> None:
        if slow["on"]:
            gate.wait(10)  # a parse slowed down past the attempt's timeout
        real_map(self, parsed, out)

    with serve({"/metrics": fake.route}) as base:
        cfg = config(
            tmp_path / "lake",
            [{"kind": "vllm", "url": f"{base}/metrics", "name": "v", "timeout": "0.1s"}],
        )
        c = Collector(cfg, status=None)
        t = c.targets[0]
        assert isinstance(t, VllmTarget)

        async def main() -> tuple[Outcome, Outcome, Outcome]:
            await c._open()
            t._map = map_late.__get__(t)  # type: ignore[method-assign]
            first = await c.run_attempt(t)
            slow["on"] = True
            second = await c.run_attempt(t)  # times out after 1.1 s, the parse still waits
            slow["on"] = False
            gate.set()
            deadline = time.monotonic() + 10
            while t.busy_for() is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # the late parse ends
            third = await c.run_attempt(t)
            await c._close()
            return first, second, third

        first, second, third = asyncio.run(main())
    assert first.up and _events(first) == {}, "scrape 1 is only the tracker's baseline"
    assert not second.up and second.error == "timed out after 0.1s", second.error
    assert second.frames == {}, f"timed-out attempt kept rows: {list(second.frames)}"
    assert third.up, third.error
    assert _events(third) == {"hit": 20, "miss": 40}, (
        f"scrape 3's cache_events should span scrapes 1 -> 3 (the timed-out scrape 2 "
        f"is not in the lake): expected hit=20 miss=40, got {_events(third)}"
    )
    # the tracker's committed state is scrape 3's, not the late parse's
    ((_, hits, queries),) = t.tracker.last.values()
    assert (hits, queries) == (30.0, 90.0), f"tracker state {hits=} {queries=}, expected 30/90"
    db = finops.connect(tmp_path / "lake")
    ev = dict(db.sql("SELECT event, sum(tokens) FROM clean.cache_events GROUP BY event").fetchall())
    inc = db.sql(
        "SELECT sum(increase) FROM clean.serving_increase "
        "WHERE metric = 'vllm:prefix_cache_hits_total'"
    ).fetchall()[0][0]
    assert ev == {"hit": inc, "miss": 2 * inc}, f"lake cache_events {ev} vs hit increase {inc}"


def test_a_restart_re_emits_cache_events_without_a_health_row(tmp_path: Path) -> None:
    """Each restart's restore re-emits the last interval's events, and is no attempt.

    Run 1 and 2 scrape (hits 10 then 20, queries 30 then 60); the events of run 2
    are then lost (a crash between samples and events). Run 3 finds the target
    down: its restore must still write hit=10 miss=20, and scrape_health must
    hold exactly the three attempts, the last one down.
    """
    fake = FakeVllm()
    lake = tmp_path / "lake"
    targets = [{"kind": "vllm", "url": "", "name": "vllm-a"}]
    with serve({"/metrics": fake.route}) as base:
        targets[0]["url"] = f"{base}/metrics"
        for _ in range(2):
            outs = asyncio.run(Collector(config(lake, targets), status=None).run_once())
            assert outs[0].up, outs[0].error
            time.sleep(0.01)  # distinct scrape times
    shutil.rmtree(lake / "cache_events")  # the crash: events never reached the lake
    outs = asyncio.run(Collector(config(lake, targets), status=None).run_once())
    assert not outs[0].up  # the replica is gone
    db = finops.connect(lake)
    health = db.sql("SELECT up, samples, error FROM raw.scrape_health ORDER BY ts").fetchall()
    assert [h[0] for h in health] == [True, True, False], (
        f"scrape_health should hold the 3 attempts (up, up, down), got {health}"
    )
    ev = dict(db.sql("SELECT event, sum(tokens) FROM clean.cache_events GROUP BY event").fetchall())
    assert ev == {"hit": 10, "miss": 20}, f"restored cache_events {ev}, expected hit=10 miss=20"
    raw = db.sql("SELECT count(*) FROM raw.cache_events").fetchall()[0][0]
    assert raw == 2, f"raw.cache_events has {raw} rows, expected the 2 restored once"


def _counters(hits: float, queries: float, ts: dt.datetime) -> object:
    text = (
        f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}\n'
        f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}\n'
    )
    return serving_rows(parse(text), ts=ts, target="r1")


def test_a_vllm_restart_resets_hits_and_queries_together() -> None:
    """Queries dropping means vLLM restarted: hits start over too, even if they went up."""
    tr = PrefixCacheTracker(target="r1")
    tr.update(_counters(90, 900, T0))
    ev = tr.update(_counters(100, 1000, T0 + dt.timedelta(seconds=10)))
    assert {e["event"]: e["tokens"] for e in ev} == {"hit": 10, "miss": 90}
    ev = tr.update(_counters(150, 300, T0 + dt.timedelta(seconds=20)))  # restarted
    got = {e["event"]: e["tokens"] for e in ev}
    assert got == {"hit": 150, "miss": 150}, (
        f"after a restart (queries 1000 -> 300, hits 100 -> 150) both counters start over: "
        f"expected hit=150 miss=150, got {got}"
    )
    # and the other way round: hits dropping while queries grew
    ev = tr.update(_counters(20, 400, T0 + dt.timedelta(seconds=30)))
    got = {e["event"]: e["tokens"] for e in ev}
    assert got == {"hit": 20, "miss": 380}, f"hits 150 -> 20: expected hit=20 miss=380, got {got}"


def test_a_step_changes_nothing_until_committed() -> None:
    """`step` is pure; `commit` never moves a series back in time."""
    tr = PrefixCacheTracker(target="r1")
    tr.update(_counters(10, 30, T0))
    before = dict(tr.last)
    events, state = tr.step(_counters(20, 60, T0 + dt.timedelta(seconds=10)))
    assert tr.last == before, "step() changed the tracker"
    assert {e["event"]: e["tokens"] for e in events} == {"hit": 10, "miss": 20}
    tr.commit(state)
    assert tr.last != before
    _, old = tr.step(_counters(15, 40, T0 + dt.timedelta(seconds=5)))
    tr.commit(old)  # an older scrape: ignored
    ((ts, hits, queries),) = tr.last.values()
    assert (ts, hits, queries) == (T0 + dt.timedelta(seconds=10), 20.0, 60.0)
