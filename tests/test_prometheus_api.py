"""query_range against a loopback server answering in Prometheus' exact JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import polars as pl
import pytest

import finops
from collectors import prometheus_api
from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector
from collectors.prometheus_api import (
    FIRST_CHUNK_SERIES,
    MAX_POINTS,
    MAX_SAMPLES,
    PrometheusAPIError,
    ServerTimeout,
    TooManySamples,
    grid_bounds,
    iter_range,
    parse_response,
    points_per_series,
    result_to_rows,
)


class FakePrometheus:
    """Evaluates a few canned queries the way Prometheus' query_range answers them."""

    def __init__(
        self,
        delay: float = 0.0,
        hang_at: int | None = None,
        gpus: int = 2,
        max_samples: int | None = None,
        hang_from: int | None = None,
        timeout_over: int | None = None,
    ) -> None:
        self.requests: list[dict[str, float | str]] = []
        self.delay = delay  # seconds before each answer
        self.hang_at = hang_at  # this request (1-based) hangs until `release`
        self.release = threading.Event()
        self.gpus = gpus  # series of a DCGM_ query
        self.hang_from = hang_from  # every request from this one (1-based) on hangs
        self.timeout_over = timeout_over  # steps past which --query.timeout gives up (503)
        self.max_samples = max_samples  # Prometheus' --query.max-samples (series x steps)
        self.refused: list[dict[str, float | str]] = []  # requests over max_samples
        self.prefix_reset: float | None = None  # vllm-b restarts at this time (epoch s)

    def answer(self, params: dict[str, str]) -> tuple[int, dict]:
        q = params["query"]
        start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
        self.requests.append({"query": q, "start": start, "end": end, "step": step})
        time.sleep(self.delay)
        if len(self.requests) == self.hang_at or (
            self.hang_from is not None and len(self.requests) >= self.hang_from
        ):
            self.release.wait(10)
        if q == "bad(":
            return 400, {
                "status": "error",
                "errorType": "bad_data",
                "error": "1:5: parse error: unclosed left parenthesis",
            }
        points = int((end - start) // step) + 1
        if self.timeout_over is not None and points > self.timeout_over:
            return 503, {
                "status": "error",
                "errorType": "timeout",
                "error": "query timed out in expression evaluation",
            }
        if points > MAX_POINTS:
            return 400, {
                "status": "error",
                "errorType": "bad_data",
                "error": "exceeded maximum resolution of 11,000 points per timeseries. "
                "Try decreasing the query resolution (?step=XX)",
            }
        series = self.gpus if q.startswith("DCGM_") else 4 if "prefix_cache" in q else 1
        if self.max_samples is not None and series * points > self.max_samples:
            self.refused.append(self.requests[-1])
            return 422, {
                "status": "error",
                "errorType": "execution",
                "error": "query processing would load too many samples into memory in "
                "query execution",
            }
        stamps = [start + i * step for i in range(points)]
        result = []
        if q.startswith("DCGM_FI_DEV_GPU_UTIL"):
            for g in range(self.gpus):
                values = [
                    [round(t, 3), str((int(t) // 15 + g) % 101)]
                    for t in stamps
                    if int(t // step) % 7 != 3  # a gap every 7th step
                ]
                result.append(
                    {
                        "metric": {
                            "__name__": "DCGM_FI_DEV_GPU_UTIL",
                            "UUID": f"GPU-{g}",
                            "gpu": str(g),
                            "Hostname": "node-a",
                            "modelName": "NVIDIA L4",
                            "instance": "node-a:9400",
                            "job": "dcgm",
                        },
                        "values": values,
                    }
                )
        elif q.startswith("vllm:gpu_cache_usage_perc"):
            result.append(
                {
                    "metric": {
                        "__name__": "vllm:gpu_cache_usage_perc",
                        "model_name": "mid",
                        "instance": "vllm-mid-0:8000",
                    },
                    "values": [[t, "NaN" if i == 0 else "0.25"] for i, t in enumerate(stamps)],
                }
            )
        elif "prefix_cache" in q:
            result += self._prefix_cache(stamps, step)
        body = {"status": "success", "data": {"resultType": "matrix", "result": result}}
        if "warn" in q:
            body["warnings"] = ["PromQL info: partial response: store 10.0.0.9:10901 unavailable"]
        return 200, body

    PREFIX_RATES: ClassVar[dict[str, tuple[int, int]]] = {
        "vllm-a:8000": (3, 5),
        "vllm-b:8000": (2, 7),
    }
    """Prefix-cache tokens (hits, queries) each instance counts per step."""

    def _prefix_cache(self, stamps: list[float], step: float) -> list[dict]:
        """vLLM's prefix-cache counters of two instances (V0 names for vllm-b).

        Counter values are a function of the grid step `k` alone, so a range
        fetched again answers the same; vllm-b restarts at `prefix_reset`:
        from there it counts `(k - k_reset + 1)` steps' worth again.
        """
        reset = None if self.prefix_reset is None else int(self.prefix_reset // step)
        out = []
        for instance, rates in self.PREFIX_RATES.items():
            old = instance == "vllm-b:8000"
            for metric, rate in zip(("hits", "queries"), rates, strict=True):
                values = []
                for t in stamps:
                    k = round(t / step)
                    if old and reset is not None and k >= reset:
                        k = k - reset + 1
                    values.append([t, str(rate * k)])
                name = f"vllm:{'gpu_' if old else ''}prefix_cache_{metric}_total"
                labels = {"model_name": "mid", "instance": instance, "job": "vllm"}
                out.append({"metric": {"__name__": name, **labels}, "values": values})
        return out


@contextlib.contextmanager
def serve_prometheus(fake: FakePrometheus, html: bool = False) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if html or parts.path != "/api/v1/query_range":
                body = b"<!doctype html><html><body>Grafana login</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
            else:
                params = {k: v[0] for k, v in parse_qs(parts.query).items()}
                status, doc = fake.answer(params)
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError):  # a client that timed out
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run(lake: Path, url: str, query: str, **opts: object) -> list:
    cfg = CollectConfig(lake=lake, checkpoint_dir=lake / "_state")
    raw = {"kind": "prometheus", "url": url, "query": query, "timeout": "30s", **opts}
    cfg.targets.append(make_target(raw, "t"))
    return asyncio.run(Collector(cfg, status=None).run_once())


def test_the_step_grid_is_aligned_to_the_epoch() -> None:
    """Every run and restart uses the same grid: the first point is the next multiple of
    `step` since the epoch, the last the last multiple in the range."""
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=3)
    first, last, step_ms = grid_bounds(start, end, 15.0)
    assert (first, last, step_ms) == (start.timestamp() * 1000, end.timestamp() * 1000, 15_000)
    off = grid_bounds(start + dt.timedelta(seconds=4.5), end - dt.timedelta(seconds=1), 15.0)
    assert off[0] == (start + dt.timedelta(seconds=15)).timestamp() * 1000
    assert off[1] == (end - dt.timedelta(seconds=15)).timestamp() * 1000
    empty = grid_bounds(start + dt.timedelta(seconds=1), start + dt.timedelta(seconds=2), 15.0)
    assert empty[0] > empty[1]
    with pytest.raises(ValueError, match="step"):
        grid_bounds(start, end, 0)


def test_long_range_is_split_loaded_with_gaps_and_resumed(tmp_path: Path) -> None:
    fake = FakePrometheus()
    with serve_prometheus(fake) as url:
        outs = run(
            tmp_path / "lake", url, "DCGM_FI_DEV_GPU_UTIL", step="15s", lookback="3d", lag="0s"
        )
        assert outs[0].up, outs[0].error
        # a first chunk sized for FIRST_CHUNK_SERIES series; its answer says 2, so
        # the rest goes in chunks of MAX_POINTS steps (2 x 11,000 is far under MAX_SAMPLES)
        assert len(fake.requests) == 3
        steps = [int((r["end"] - r["start"]) // 15) + 1 for r in fake.requests]
        assert steps[:2] == [MAX_SAMPLES // FIRST_CHUNK_SERIES, MAX_POINTS]
        for prev, r in itertools.pairwise(fake.requests):
            assert r["start"] == prev["end"] + 15  # no gap, no overlap
        db = finops.connect(tmp_path / "lake")
        gpu = db.sql("SELECT * FROM clean.gpu_samples").pl()
        stamps = int((fake.requests[-1]["end"] - fake.requests[0]["start"]) // 15) + 1
        gaps = sum(
            1
            for r in fake.requests
            for i in range(int((r["end"] - r["start"]) // 15) + 1)
            if int((r["start"] + i * 15) // 15) % 7 == 3
        )
        assert gpu.height == 2 * (stamps - gaps)  # gaps stay gaps: nothing filled in
        assert set(gpu["source"]) == {"prometheus"} and set(gpu["host"]) == {"node-a"}
        assert set(gpu["gpu_uuid"]) == {"GPU-0", "GPU-1"}
        assert gpu["labels"][0] == '{"instance":"node-a:9400","job":"dcgm"}'
        last = fake.requests[-1]["end"]
        (ckpt,) = (tmp_path / "lake" / "_state").glob("prometheus-*.json")
        doc = json.loads(ckpt.read_text())
        assert dt.datetime.fromisoformat(doc["loaded_until"]).timestamp() == pytest.approx(last)
        # resume: the next run starts one step after what reached the lake (here:
        # pretend the last load was 10 minutes earlier, as after a daemon restart)
        fake.requests.clear()
        resumed = last - 600
        doc["loaded_until"] = dt.datetime.fromtimestamp(resumed, dt.UTC).isoformat()
        ckpt.write_text(json.dumps(doc))
        run(tmp_path / "lake", url, "DCGM_FI_DEV_GPU_UTIL", step="15s", lookback="3d", lag="0s")
        assert len(fake.requests) == 1
        assert fake.requests[0]["start"] == pytest.approx(resumed + 15, abs=0.002)
        # the re-fetched overlap adds nothing to the clean view; only points newer
        # than `last` (a few seconds' worth) are new
        after = db.execute("SELECT count(*) FROM clean.gpu_samples").fetchall()[0][0]
        assert gpu.height <= after <= gpu.height + 2 * 2


def test_string_values_renames_and_warnings(tmp_path: Path) -> None:
    fake = FakePrometheus()
    with serve_prometheus(fake) as url:
        outs = run(tmp_path / "lake", url, "vllm:gpu_cache_usage_perc # warn", lookback="5m")
    assert outs[0].up
    assert outs[0].error.startswith("warnings: PromQL info: partial response")
    db = finops.connect(tmp_path / "lake")
    s = db.sql("SELECT * FROM clean.serving_samples ORDER BY ts").pl()
    assert set(s["metric"]) == {"vllm:kv_cache_usage_perc"}  # renamed
    assert set(s["target"]) == {"vllm-mid-0:8000"} and set(s["model_name"]) == {"mid"}
    assert s["value"].is_nan()[0] and s["value"][1] == 0.25
    health = db.sql("SELECT up, error FROM scrape_health").pl().row(0)
    assert health[0] is True and "partial response" in health[1]


def test_errors_are_reported_and_leave_the_checkpoint_alone(tmp_path: Path) -> None:
    fake = FakePrometheus()
    with serve_prometheus(fake) as url:
        outs = run(tmp_path / "lake", url, "bad(")
    assert not outs[0].up
    assert "Prometheus error bad_data: 1:5: parse error" in outs[0].error
    assert not list((tmp_path / "lake" / "_state").glob("prometheus-*.json"))
    with serve_prometheus(fake, html=True) as url:
        outs = run(tmp_path / "lake", url, "up")
    assert not outs[0].up and "not Prometheus API JSON" in outs[0].error
    db = finops.connect(tmp_path / "lake")
    assert db.execute("SELECT count(*) FROM scrape_health WHERE NOT up").fetchall()[0][0] == 2


def test_parse_response_envelopes() -> None:
    with pytest.raises(PrometheusAPIError, match="without a 'status'"):
        parse_response(b'{"data": {}}', url="u")
    with pytest.raises(PrometheusAPIError, match="resultType matrix"):
        parse_response(
            b'{"status":"success","data":{"resultType":"string","result":[1,"x"]}}', url="u"
        )
    result, warnings = parse_response(
        b'{"status":"success","data":{"resultType":"matrix","result":[]},"warnings":["w"]}', url="u"
    )
    assert result == [] and warnings == ["w"]


def test_prometheus_cli_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finops.cli import app

    fake = FakePrometheus()
    with serve_prometheus(fake) as url:
        res = CliRunner().invoke(
            app,
            [
                "collect", "--once", "--lake", str(tmp_path / "lake"),
                "--prometheus", url, "--query", "DCGM_FI_DEV_GPU_UTIL", "--query", "bad(",
                "--since", "10m", "--step", "30s",
            ],
        )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1/2 targets up" in res.output and "bad_data" in res.output
    gpu = pl.read_parquet(list((tmp_path / "lake" / "gpu_samples").rglob("*.parquet")))
    assert gpu.height > 0


def test_each_request_has_the_timeout_not_the_whole_catch_up(tmp_path: Path) -> None:
    """Six 0.3 s requests under a 0.5 s timeout: all load (1.8 s is past the attempt bound)."""
    fake = FakePrometheus(delay=0.3)
    with serve_prometheus(fake) as url:
        outs = run(
            tmp_path / "lake", url, "vllm:gpu_cache_usage_perc", timeout="0.5s",
            step="15s", lookback="30m", lag="0s", max_points=21,
        )  # fmt: skip
    assert outs[0].up, outs[0].error
    # 30 minutes hold 120 or 121 points of the 15 s grid (121 when `now` is on it)
    points = sum(int((r["end"] - r["start"]) // 15) + 1 for r in fake.requests)
    assert len(fake.requests) == 6 and outs[0].samples == points and points in (120, 121)
    (ckpt,) = (tmp_path / "lake" / "_state").glob("prometheus-*.json")
    until = dt.datetime.fromisoformat(json.loads(ckpt.read_text())["loaded_until"])
    assert until.timestamp() == pytest.approx(fake.requests[-1]["end"])


def test_a_timed_out_request_is_asked_again_for_half_its_span(tmp_path: Path) -> None:
    """A request past the timeout (a heavy range) gets the same start with half the steps,
    and later chunks keep the smaller span. Was: the attempt failed, and every retry asked
    for the same heavy chunk."""
    fake = FakePrometheus(hang_at=3)
    lake = tmp_path / "lake"
    opts = {"step": "15s", "lookback": "59m", "lag": "0s", "max_points": 60}
    with serve_prometheus(fake) as url:
        try:
            outs = run(lake, url, "vllm:gpu_cache_usage_perc", **opts, timeout="0.3s")
        finally:
            fake.release.set()
    assert outs[0].up, outs[0].error
    hung, again = fake.requests[2], fake.requests[3]
    assert again["start"] == hung["start"] and _steps(again) == _steps(hung) // 2 == 30
    loaded = [r for i, r in enumerate(fake.requests) if i != 2]
    assert all(_steps(r) <= 30 for r in loaded[2:])
    for prev, r in itertools.pairwise(loaded):
        assert r["start"] == prev["end"] + 15  # every step once
    points = sum(_steps(r) for r in loaded)
    assert points in (236, 237)
    db = finops.connect(lake)
    assert db.execute("SELECT count(*) FROM serving_samples").fetchall()[0][0] == points


def test_a_catch_up_keeps_the_chunks_before_a_failed_request(tmp_path: Path) -> None:
    """Lake, then checkpoint, chunk by chunk: a server hanging from request 3 on loses
    only what was not loaded yet, after the span was halved twice (three timeouts)."""
    fake = FakePrometheus(hang_from=3)
    lake = tmp_path / "lake"
    # 59 minutes: 236 or 237 points of the 15 s grid, 4 chunks of up to 60 either way
    opts = {"step": "15s", "lookback": "59m", "lag": "0s", "max_points": 60}
    with serve_prometheus(fake) as url:
        try:
            outs = run(lake, url, "vllm:gpu_cache_usage_perc", **opts, timeout="0.3s")
        finally:
            fake.release.set()
        out = outs[0]
        assert not out.up
        assert out.error.startswith("timed out after 0.3s (request 5 of ")
        assert "3 times in a row, the span halved each time" in out.error
        assert [_steps(r) for r in fake.requests] == [60, 60, 60, 30, 15]
        assert "2 earlier chunk(s) (120 points) are in the lake" in out.error
        (ckpt,) = (lake / "_state").glob("prometheus-*.json")
        until = dt.datetime.fromisoformat(json.loads(ckpt.read_text())["loaded_until"])
        assert until.timestamp() == pytest.approx(fake.requests[1]["end"])
        db = finops.connect(lake)
        assert db.execute("SELECT count(*) FROM serving_samples").fetchall()[0][0] == 120
        health = db.sql("SELECT up, samples FROM scrape_health").fetchall()
        assert health == [(False, 120)]
        # the next attempt starts where the lake ends
        fake.requests.clear()
        fake.hang_from = None
        outs = run(lake, url, "vllm:gpu_cache_usage_perc", **opts, timeout="5s")
    assert outs[0].up, outs[0].error
    assert fake.requests[0]["start"] == pytest.approx(until.timestamp() + 15, abs=0.002)


def fetch(url: str, query: str, start: dt.datetime, end: dt.datetime, step: float, **kw: object):
    """All of `iter_range`'s chunks, as the daemon reads them."""

    async def go() -> list:
        async with httpx.AsyncClient() as client:
            return [r async for r in iter_range(client, url, query, start, end, step, **kw)]

    return asyncio.run(go())


def _steps(r: dict) -> int:
    return round((r["end"] - r["start"]) / r["step"]) + 1


def test_resumed_ranges_stay_on_the_step_grid_and_lose_no_point() -> None:
    """Each run asks up to `now - lag` (anywhere between two steps) and resumes one step
    after what the previous run reported as loaded. Was: the requested end was reported,
    so runs drifted off the grid and lost a point each (gaps 5000, 7434, 7348 ms at 5 s)."""
    fake = FakePrometheus()
    t0 = dt.datetime(2026, 11, 1, 12, 0, 0, 123_000, tzinfo=dt.UTC)
    stamps: list[dt.datetime] = []
    loaded = None
    with serve_prometheus(fake) as url:
        for k in range(1, 7):
            end = t0 + dt.timedelta(seconds=7.3 * k)  # this run's now - lag
            start = loaded + dt.timedelta(seconds=5) if loaded else t0 - dt.timedelta(seconds=20)
            if end < start:
                continue  # as PrometheusTarget.attempt does
            for res in fetch(url, "vllm:gpu_cache_usage_perc", start, end, 5.0):
                assert start <= res.end <= end
                stamps += res.serving["ts"].to_list()
                loaded = res.end  # what the daemon checkpoints
    ms = [round(t.timestamp() * 1000) for t in stamps]
    assert all(m % 5000 == 0 for m in ms)  # every run on the one epoch-aligned grid
    assert ms == list(range(ms[0], ms[-1] + 1, 5000))  # each grid point exactly once
    assert loaded == stamps[-1]  # loaded-until is the last point Prometheus evaluated


def test_daemon_runs_resume_on_the_grid(tmp_path: Path) -> None:
    """Through the daemon and its checkpoint: two runs, a second and a bit apart."""
    fake = FakePrometheus()
    lake = tmp_path / "lake"
    with serve_prometheus(fake) as url:
        for k in range(2):
            if k:
                time.sleep(1.3)
            outs = run(lake, url, "vllm:gpu_cache_usage_perc", step="1s", lookback="5s", lag="0s")
            assert outs[0].up, outs[0].error
    assert len(fake.requests) == 2
    ts = pl.read_parquet(list((lake / "serving_samples").rglob("*.parquet")))["ts"].sort()
    ms = [round(t.timestamp() * 1000) for t in ts]
    assert all(m % 1000 == 0 for m in ms) and ms == list(range(ms[0], ms[-1] + 1, 1000))
    (ckpt,) = (lake / "_state").glob("prometheus-*.json")
    until = dt.datetime.fromisoformat(json.loads(ckpt.read_text())["loaded_until"])
    assert until == ts[-1] and fake.requests[1]["start"] == fake.requests[0]["end"] + 1


def test_chunk_spans_shrink_with_the_series_count() -> None:
    """A request asks at most `max_samples` samples: steps x the series count the previous
    answer had. Was: only the 11,000 points per series bounded a request, so a fleet query
    (12,800 series) asked ~141M samples at once."""
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    end = start + dt.timedelta(hours=6)  # 1,441 steps of 15 s
    budget = 2_000
    widest = {}
    for gpus in (2, 40):
        fake = FakePrometheus(gpus=gpus)
        with serve_prometheus(fake) as url:
            results = fetch(url, "DCGM_FI_DEV_GPU_UTIL", start, end, 15.0, max_samples=budget)
        steps = [_steps(r) for r in fake.requests]
        assert steps[0] == max(1, budget // FIRST_CHUNK_SERIES)  # before any answer
        assert all(gpus * n <= budget for n in steps[1:])  # after: by the series count
        assert sum(steps) == 1441 and [r.series for r in results] == [gpus] * len(steps)
        for prev, r in itertools.pairwise(fake.requests):
            assert r["start"] == prev["end"] + 15
        assert results[-1].end == end
        widest[gpus] = max(steps)
    assert widest == {2: budget // 2, 40: budget // 40}


def test_too_many_samples_halves_the_span_then_loads_everything(tmp_path: Path) -> None:
    """A server refusing a chunk (`--query.max-samples`) gets the same start with half the
    steps, until it answers; later chunks keep the span that worked. Was: the error failed
    the attempt, and every retry asked for the same first chunk (the target never moved)."""
    fake = FakePrometheus(gpus=2, max_samples=1_000)  # 2 series: 500 steps a request at most
    lake = tmp_path / "lake"
    with serve_prometheus(fake) as url:
        outs = run(lake, url, "DCGM_FI_DEV_GPU_UTIL", step="15s", lookback="1d", lag="0s")
    assert outs[0].up, outs[0].error
    assert fake.refused
    refused = [any(r is x for x in fake.refused) for r in fake.requests]
    for i, r in enumerate(fake.requests[:-1]):
        if refused[i]:
            again = fake.requests[i + 1]
            assert again["start"] == r["start"] and _steps(again) == _steps(r) // 2
    loaded = [r for r, no in zip(fake.requests, refused, strict=True) if not no]
    assert all(2 * _steps(r) <= 1_000 for r in loaded)
    for prev, r in itertools.pairwise(loaded):
        assert r["start"] == prev["end"] + 15  # every step once
    gaps = sum(  # the fake leaves every 7th step empty
        1 for r in loaded for i in range(_steps(r)) if int((r["start"] + i * 15) // 15) % 7 == 3
    )
    grid = int((loaded[-1]["end"] - loaded[0]["start"]) // 15) + 1
    assert grid in (5760, 5761)
    db = finops.connect(lake)
    assert db.execute("SELECT count(*) FROM raw.gpu_samples").fetchone()[0] == 2 * (grid - gaps)


def test_too_many_samples_for_one_step_fails_naming_the_query(tmp_path: Path) -> None:
    fake = FakePrometheus(gpus=2, max_samples=1)
    lake = tmp_path / "lake"
    with serve_prometheus(fake) as url:
        outs = run(lake, url, "DCGM_FI_DEV_GPU_UTIL", step="15s", lookback="1h", lag="0s")
    assert not outs[0].up
    err = outs[0].error
    assert "query 'DCGM_FI_DEV_GPU_UTIL' is refused as too large even for a single step" in err
    assert "--query.max-samples" in err and "too many samples" in err
    steps = [_steps(r) for r in fake.requests]
    assert steps == [200, 100, 50, 25, 12, 6, 3, 1]  # halved down to one step
    assert len({r["start"] for r in fake.requests}) == 1
    assert not list((lake / "_state").glob("prometheus-*.json"))


def test_a_server_query_timeout_halves_the_span_then_loads_everything(tmp_path: Path) -> None:
    """Prometheus' `--query.timeout` (503, errorType timeout) on a heavy range: half the span,
    twice at most in a row; a query that times out even then fails naming it."""
    fake = FakePrometheus(timeout_over=70)
    lake = tmp_path / "lake"
    opts = {"step": "15s", "lookback": "1h", "lag": "0s"}
    with serve_prometheus(fake) as url:
        outs = run(lake, url, "vllm:gpu_cache_usage_perc", **opts)
        assert outs[0].up, outs[0].error
        steps = [_steps(r) for r in fake.requests]
        first = points_per_series(FIRST_CHUNK_SERIES, MAX_POINTS, MAX_SAMPLES)
        assert steps[:3] == [first, first // 2, first // 4] and first // 4 <= 70 < first // 2
        loaded = fake.requests[2:]
        assert all(_steps(r) <= first // 4 for r in loaded)  # later chunks keep the span
        for prev, r in itertools.pairwise(loaded):
            assert r["start"] == prev["end"] + 15
        db = finops.connect(lake)
        rows = db.execute("SELECT count(*) FROM serving_samples").fetchall()[0][0]
        assert rows == sum(_steps(r) for r in loaded)

        fake.requests.clear()
        fake.timeout_over = 10
        outs = run(tmp_path / "lake2", url, "vllm:gpu_cache_usage_perc", **opts)
    assert not outs[0].up
    err = outs[0].error
    assert "query 'vllm:gpu_cache_usage_perc' timed out on the server" in err
    assert "3 times in a row, the span halved each time" in err
    assert "query timed out in expression evaluation" in err and "--query.timeout" in err
    assert len(fake.requests) == 3 and len({r["start"] for r in fake.requests}) == 1


def test_parse_response_names_a_timeout() -> None:
    body = json.dumps(
        {"status": "error", "errorType": "timeout", "error": "query timed out in query execution"}
    ).encode()
    with pytest.raises(ServerTimeout, match="timed out"):
        parse_response(body, url="u")
    assert issubclass(ServerTimeout, PrometheusAPIError)


def test_parse_response_names_a_refusal_for_size() -> None:
    body = json.dumps(
        {
            "status": "error",
            "errorType": "execution",
            "error": "query processing would load too many samples into memory in query execution",
        }
    ).encode()
    with pytest.raises(TooManySamples, match="too many samples"):
        parse_response(body, url="u")
    assert issubclass(TooManySamples, PrometheusAPIError)


def _rows_point_by_point(
    result: list[dict], *, url: str, query: str, name: str | None = None
) -> tuple[pl.DataFrame | None, pl.DataFrame | None, int]:
    """result_to_rows as it was: Python lists with one entry per point (the reference)."""
    from collectors import dcgm as dcgm_mod
    from collectors.exposition import ParseResult
    from collectors.vllm import normalize_names

    names, labels, ts, values = [], [], [], []
    for series in result:
        metric = dict(series.get("metric") or {})
        mname = metric.pop("__name__", None) or name or query
        lab = json.dumps(metric, sort_keys=True, separators=(",", ":"))
        points = series.get("values")
        if points is None and "value" in series:
            points = [series["value"]]
        for t, v in points or []:
            if v == "not a number":  # left out and reported (see the test below)
                continue
            names.append(mname)
            labels.append(lab)
            ts.append(float(t))
            values.append(prometheus_api._num(v))
    if not names:
        return None, None, 0
    df = pl.DataFrame(
        {"name": names, "labels": labels, "ts_s": ts, "value": values},
        schema={"name": pl.String, "labels": pl.String, "ts_s": pl.Float64, "value": pl.Float64},
    ).with_columns(
        timestamp_ms=(pl.col("ts_s") * 1000).round(0).cast(pl.Int64),
        line=pl.int_range(1, pl.len() + 1, dtype=pl.Int64),
    )
    is_dcgm = pl.col("name").str.starts_with("DCGM_")
    gpu_part, serving_part = df.filter(is_dcgm), df.filter(~is_dcgm)
    gpu = serving = None
    if gpu_part.height:
        parsed = ParseResult(
            samples=gpu_part.select(
                "name", "labels", "value", "timestamp_ms", type=pl.lit("gauge"), line="line"
            ),
            rejects=pl.DataFrame(),
        )
        now = dt.datetime.now(dt.UTC)
        gpu = dcgm_mod.gpu_rows(parsed, ts=now, target=url, source="prometheus").rows
        gpu = gpu.with_columns(pl.lit(f"{url} query {query!r}").alias("_location"))
    if serving_part.height:
        metric = normalize_names(pl.col("name"))
        serving = serving_part.select(
            ts=pl.from_epoch("timestamp_ms", time_unit="ms")
            .dt.cast_time_unit("us")
            .dt.replace_time_zone("UTC"),
            source=pl.lit("prometheus"),
            target=pl.coalesce(pl.col("labels").str.json_path_match("$.instance"), pl.lit(url)),
            metric=metric,
            type=metric.map_elements(prometheus_api._infer_type, return_dtype=pl.String),
            labels="labels",
            model_name=pl.col("labels").str.json_path_match("$.model_name"),
            value="value",
            _location=pl.lit(f"{url} query {query!r}"),
        )
    return gpu, serving, len(names)


def _mixed_result() -> list[dict]:
    t0 = 1_790_000_000.125
    gpu = {"Hostname": "node-a", "modelName": "NVIDIA L4", "instance": "node-a:9400"}
    return [
        {
            "metric": {"__name__": "DCGM_FI_DEV_GPU_UTIL", "UUID": "GPU-0", "gpu": "0", **gpu},
            "values": [[t0, "87"], [t0 + 15, "NaN"], [t0 + 30, "9223372036854775794"]],
        },
        {
            "metric": {"__name__": "vllm:prompt_tokens_total", "model_name": "mid"},
            "values": [[t0, "10"], [t0 + 15, "+Inf"], [t0 + 30, "-Inf"]],
        },
        {
            "metric": {
                "__name__": "DCGM_FI_DEV_FB_USED",
                "UUID": "GPU-1",
                "gpu": "1",
                "namespace": "serving",
                "pod": "vllm-mid-0",
                **gpu,
            },
            "values": [[t0 + 15, "4096"]],
        },
        {"metric": {"__name__": "vllm:gpu_cache_usage_perc", "instance": "v:8000"}, "values": []},
        {
            "metric": {"__name__": "vllm:e2e_request_latency_seconds_bucket", "le": "0.5"},
            "values": [[t0, "3"], [t0 + 15, "not a number"]],
        },
        {"metric": {"instance": "v:8000"}, "values": [[int(t0), "1.5"]]},  # no __name__
        {"metric": {"__name__": "vllm:num_requests_running"}, "value": [t0 + 45, "2"]},
    ]


def test_rows_built_column_wise_match_the_point_by_point_build() -> None:
    """Same frames as the per-point lists made, from float arrays and one row per series;
    the Python heap holds under half of what it did per point. Was: ~600 bytes of RSS a
    point (200 series x 10,000 points: 1.2 GB), one Python float and list slot per value."""
    from polars.testing import assert_frame_equal

    query = "sum by (instance) (rate(x[5m]))"
    expect = _rows_point_by_point(_mixed_result(), url="http://prom:9090", query=query)
    rejects: dict[str, list[dict[str, str]]] = {}
    got = result_to_rows(_mixed_result(), url="http://prom:9090", query=query, rejects=rejects)
    assert got[2] == expect[2] == 10
    # the point whose value is no number is left out, and said why
    assert [r["reason"] for r in rejects["serving_samples"]] == [
        'result[4] (vllm:e2e_request_latency_seconds_bucket{"le":"0.5"}): point 1: '
        'value "not a number" is not a number'
    ]
    assert_frame_equal(got[0], expect[0])
    assert_frame_equal(got[1], expect[1])
    # consume: the same rows, the parsed answer released series by series
    owned = _mixed_result()
    consumed = result_to_rows(owned, url="http://prom:9090", query=query, consume=True)
    assert owned == [None] * 7
    assert_frame_equal(consumed[0], expect[0])
    assert_frame_equal(consumed[1], expect[1])
    assert result_to_rows([], url="u", query="q") == (None, None, 0)

    import tracemalloc

    n_series, n_points = 20, 5_000
    big = [
        {
            "metric": {"__name__": nm, "UUID": f"GPU-{s}", "Hostname": "n"},
            "values": [[1.79e9 + 15 * i, str(i % 100)] for i in range(n_points)],
        }
        for s in range(n_series)
        for nm in ("DCGM_FI_DEV_GPU_UTIL", "vllm:num_requests_running")
    ]
    peaks = {}
    for build in (_rows_point_by_point, result_to_rows):
        build(big[:2], url="u", query="q")  # first-call imports are not the build's
        tracemalloc.start()
        try:
            build(big, url="u", query="q")
            peaks[build] = tracemalloc.get_traced_memory()[1] / (2 * n_series * n_points)
        finally:
            tracemalloc.stop()
    assert peaks[result_to_rows] < peaks[_rows_point_by_point] / 2
    assert peaks[result_to_rows] < 32  # less than one boxed float + list slot a point


PREFIX_QUERY = '{__name__=~"vllm:(gpu_)?prefix_cache_(hits|queries)_total"}'


def _increases(lake: Path) -> dict[tuple[str, str], float]:
    """(instance, metric) -> the counter's increase over the lake's points (resets from zero)."""
    s = (
        finops.connect(lake)
        .sql("SELECT target, metric, ts, value FROM clean.serving_samples ORDER BY ts")
        .pl()
    )
    out: dict[tuple[str, str], float] = {}
    for (target, metric), part in s.group_by("target", "metric"):
        v = part["value"].to_list()
        out[(target, metric)] = sum(b - a if b >= a else b for a, b in itertools.pairwise(v))
    return out


def _event_tokens(events: pl.DataFrame) -> dict[tuple[str, str], int]:
    """(instance, hit|miss) -> tokens."""
    inst = events["event_id"].str.extract(r"^vllm_prefix:(vllm-[ab]:8000):")
    per = events.with_columns(instance=inst).group_by("instance", "event").agg(pl.sum("tokens"))
    return {(i, e): t for i, e, t in per.iter_rows()}


def test_prefix_cache_counters_become_cache_events_per_instance(tmp_path: Path) -> None:
    """vLLM's prefix-cache counters pulled through query_range: each instance's hit/miss
    tokens equal its counters' increases, a reset counts from zero, and a re-fetched
    overlap (after a restart) writes the same events again, never more. Was: the
    counters were stored in serving_samples and no cache_events were made at all."""
    fake = FakePrometheus()
    lake = tmp_path / "lake"
    fake.prefix_reset = time.time() - 420  # vllm-b restarts 7 minutes ago
    opts = {"step": "15s", "lookback": "30m", "lag": "0s", "max_points": 21}
    with serve_prometheus(fake) as url:
        outs = run(lake, url, PREFIX_QUERY, **opts)
        assert outs[0].up, outs[0].error
        assert len(fake.requests) == 6  # the points cross five chunk boundaries
        db = finops.connect(lake)
        first = db.sql("SELECT * FROM clean.cache_events ORDER BY ts").pl()
        inc = _increases(lake)
        hits, queries = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
        tokens = _event_tokens(first)
        n = db.sql("SELECT count(DISTINCT ts) FROM clean.serving_samples").fetchall()[0][0]
        assert n in (120, 121)
        for inst, (h, q) in FakePrometheus.PREFIX_RATES.items():
            assert tokens[(inst, "hit")] == inc[(inst, hits)] == h * (n - 1)
            assert tokens[(inst, "miss")] == inc[(inst, queries)] - inc[(inst, hits)]
            assert tokens[(inst, "miss")] == (q - h) * (n - 1)
        # 2 instances x (hit, miss) x every point after each series' first
        assert first.height == 4 * (n - 1)
        assert set(first["source"]) == {"prometheus"} and set(first["layer"]) == {"vllm_prefix"}
        assert set(first["model"]) == {"mid"}
        # the restart: vllm-b's counters drop to one step's worth, counted from zero
        at = dt.datetime.fromtimestamp(fake.prefix_reset // 15 * 15, dt.UTC)
        b = first.filter(pl.col("event_id").str.contains("vllm-b:8000") & (pl.col("ts") == at))
        assert dict(b.select("event", "tokens").iter_rows()) == {"hit": 2, "miss": 5}
        # restart the daemon with its checkpoint 10 minutes back: the overlap is fetched
        # again, the trackers start from the lake's readings at the checkpoint
        (ckpt,) = (lake / "_state").glob("prometheus-*.json")
        doc = json.loads(ckpt.read_text())
        last = dt.datetime.fromisoformat(doc["loaded_until"])
        resumed = last - dt.timedelta(seconds=600)
        doc["loaded_until"] = resumed.isoformat()
        ckpt.write_text(json.dumps(doc))
        fake.requests.clear()
        outs = run(lake, url, PREFIX_QUERY, **opts)
        assert outs[0].up, outs[0].error
    assert fake.requests[0]["start"] == pytest.approx(resumed.timestamp() + 15, abs=0.002)
    after = db.sql("SELECT * FROM clean.cache_events ORDER BY ts").pl()
    raw = db.sql("SELECT event_id, ts, tokens FROM raw.cache_events").pl()
    # every event of the overlap was written again, from its first point on (the
    # restored state, not a baseline), with the same id and tokens
    again = (
        raw.filter(pl.col("ts") > resumed)
        .group_by("event_id")
        .agg(pl.len(), pl.col("tokens").n_unique().alias("values"))
    )
    old = first.filter(pl.col("ts") > resumed)
    assert old.height == 4 * 40 and set(old["event_id"]) <= set(again["event_id"])
    assert (
        again.filter(pl.col("event_id").is_in(old["event_id"].implode()))["len"].to_list()
        == [2] * old.height
    )
    assert set(again["values"]) == {1}
    # so the clean view holds the first run's events unchanged, plus only the points
    # newer than the first run's last (a second's worth at most)
    assert first.join(after, on="event_id", how="anti").height == 0
    same = first.join(after, on="event_id").filter(pl.col("tokens") != pl.col("tokens_right"))
    assert same.height == 0
    new_points = after.filter(pl.col("ts") > last)["ts"].n_unique()
    assert new_points <= 1 and after.height == first.height + 4 * new_points
    tokens, inc = _event_tokens(after), _increases(lake)
    for inst in FakePrometheus.PREFIX_RATES:
        assert tokens[(inst, "hit")] == inc[(inst, hits)]
        assert tokens[(inst, "miss")] == inc[(inst, queries)] - inc[(inst, hits)]
