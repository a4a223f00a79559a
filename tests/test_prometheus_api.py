"""query_range against a loopback server answering in Prometheus' exact JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest

import finops
from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector
from collectors.prometheus_api import MAX_POINTS, PrometheusAPIError, chunks, parse_response


class FakePrometheus:
    """Evaluates a few canned queries the way Prometheus' query_range answers them."""

    def __init__(self, delay: float = 0.0, hang_at: int | None = None) -> None:
        self.requests: list[dict[str, float | str]] = []
        self.delay = delay  # seconds before each answer
        self.hang_at = hang_at  # this request (1-based) hangs until `release`
        self.release = threading.Event()

    def answer(self, params: dict[str, str]) -> tuple[int, dict]:
        q = params["query"]
        start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
        self.requests.append({"query": q, "start": start, "end": end, "step": step})
        time.sleep(self.delay)
        if len(self.requests) == self.hang_at:
            self.release.wait(10)
        if q == "bad(":
            return 400, {
                "status": "error",
                "errorType": "bad_data",
                "error": "1:5: parse error: unclosed left parenthesis",
            }
        points = int((end - start) // step) + 1
        if points > MAX_POINTS:
            return 400, {
                "status": "error",
                "errorType": "bad_data",
                "error": "exceeded maximum resolution of 11,000 points per timeseries. "
                "Try decreasing the query resolution (?step=XX)",
            }
        stamps = [start + i * step for i in range(points)]
        result = []
        if q.startswith("DCGM_FI_DEV_GPU_UTIL"):
            for g in range(2):
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
        body = {"status": "success", "data": {"resultType": "matrix", "result": result}}
        if "warn" in q:
            body["warnings"] = ["PromQL info: partial response: store 10.0.0.9:10901 unavailable"]
        return 200, body


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


def test_chunks_never_exceed_the_point_limit_and_never_overlap() -> None:
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=3)
    parts = chunks(start, end, 15.0)
    assert len(parts) == 2  # 17,281 points at 15 s
    for a, b in parts:
        assert (b - a).total_seconds() / 15 + 1 <= MAX_POINTS
    assert parts[0][0] == start and parts[-1][1] == end
    assert parts[1][0] == parts[0][1] + dt.timedelta(seconds=15)
    assert chunks(end, start, 15) == []
    with pytest.raises(ValueError, match="step"):
        chunks(start, end, 0)


def test_long_range_is_split_loaded_with_gaps_and_resumed(tmp_path: Path) -> None:
    fake = FakePrometheus()
    with serve_prometheus(fake) as url:
        outs = run(
            tmp_path / "lake", url, "DCGM_FI_DEV_GPU_UTIL", step="15s", lookback="3d", lag="0s"
        )
        assert outs[0].up, outs[0].error
        assert len(fake.requests) == 2
        for r in fake.requests:
            assert (r["end"] - r["start"]) / r["step"] + 1 <= MAX_POINTS
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
    assert len(fake.requests) == 6 and outs[0].samples == 121
    (ckpt,) = (tmp_path / "lake" / "_state").glob("prometheus-*.json")
    until = dt.datetime.fromisoformat(json.loads(ckpt.read_text())["loaded_until"])
    assert until.timestamp() == pytest.approx(fake.requests[-1]["end"])


def test_a_catch_up_keeps_the_chunks_before_a_failed_request(tmp_path: Path) -> None:
    """Lake, then checkpoint, chunk by chunk: request 3 of 5 hanging loses only itself."""
    fake = FakePrometheus(hang_at=3)
    lake = tmp_path / "lake"
    opts = {"step": "15s", "lookback": "1h", "lag": "0s", "max_points": 60}
    with serve_prometheus(fake) as url:
        try:
            outs = run(lake, url, "vllm:gpu_cache_usage_perc", **opts, timeout="0.3s")
        finally:
            fake.release.set()
        out = outs[0]
        assert not out.up
        assert out.error.startswith("timed out after 0.3s (request 3 of 5)")
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
        outs = run(lake, url, "vllm:gpu_cache_usage_perc", **opts, timeout="5s")
    assert outs[0].up, outs[0].error
    assert fake.requests[0]["start"] == pytest.approx(until.timestamp() + 15, abs=0.002)
