"""Impossible metric values become rejects, bad query_range points are reported, config and
URL errors are one clear line (QA findings on `finops collect`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeAlias
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest
from typer.testing import CliRunner

from collectors.config import CollectConfig, ConfigError, load, make_target
from collectors.daemon import Collector
from collectors.exposition import parse
from finops.cli import app
from finops.schemas import GPU_SAMPLES, SERVING_SAMPLES, impossible_values

DCGM = b"""# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",modelName="NVIDIA L4",Hostname="h1"} 50
DCGM_FI_DEV_GPU_UTIL{gpu="4",UUID="GPU-e",modelName="NVIDIA L4",Hostname="h1"} -5
DCGM_FI_DEV_GPU_UTIL{gpu="5",UUID="GPU-f",modelName="NVIDIA L4",Hostname="h1"} 101
DCGM_FI_DEV_GPU_UTIL{gpu="6",UUID="GPU-g",modelName="NVIDIA L4",Hostname="h1"} 100
DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-a",modelName="NVIDIA L4",Hostname="h1"} 1.2
DCGM_FI_PROF_SM_ACTIVE{gpu="6",UUID="GPU-g",modelName="NVIDIA L4",Hostname="h1"} 1.000000
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",modelName="NVIDIA L4",Hostname="h1"} 1024
DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-a",modelName="NVIDIA L4",Hostname="h1"} -3
"""

VLLM = b"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3
vllm:num_requests_waiting{engine="0",model_name="m"} -2
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} -100
vllm:generation_tokens_total{engine="0",model_name="m"} 7
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="0.1"} 5
vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="abc"} 6
vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="1.0"} 7
vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="+Inf"} 4
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 1.7
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 200
"""


Page: TypeAlias = tuple[str, bytes] | Callable[[dict[str, str]], tuple[str, bytes]]


@contextlib.contextmanager
def serve(pages: dict[str, Page]) -> Iterator[str]:
    """A loopback server answering each path with (content type, body), or with what a
    function of the query's parameters gives."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            page = pages.get(parts.path, ("text/plain", b""))
            if callable(page):
                page = page({k: v[0] for k, v in parse_qs(parts.query).items()})
            ctype, body = page
            self.send_response(200 if parts.path in pages else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
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


def _collect(lake: Path, targets: list[dict]) -> list:
    cfg = CollectConfig(lake=lake, checkpoint_dir=lake / "_state")
    cfg.targets = [make_target(t, f"t{i}") for i, t in enumerate(targets)]
    return asyncio.run(Collector(cfg, status=None).run_once())


def _table(lake: Path, table: str) -> pl.DataFrame:
    files = list((lake / table).rglob("*.parquet"))
    return pl.read_parquet(files) if files else pl.DataFrame()


def test_impossible_scraped_values_are_rejected_and_the_rest_loads(tmp_path: Path) -> None:
    """Was: a GPU_UTIL of -5 loaded (marts showed util -0.05), and so did a counter of
    -100, le="abc", a +Inf bucket below a smaller one, a queue of -2, hits > queries."""
    lake = tmp_path / "lake"
    text = "text/plain; version=0.0.4"
    with serve({"/dcgm": (text, DCGM), "/metrics": (text, VLLM)}) as url:
        outs = _collect(
            lake,
            [{"kind": "dcgm", "url": f"{url}/dcgm"}, {"kind": "vllm", "url": f"{url}/metrics"}],
        )
    by_kind = {o.kind: o for o in outs}
    assert (by_kind["dcgm"].samples, by_kind["dcgm"].rejected) == (5, 3)
    assert (by_kind["vllm"].samples, by_kind["vllm"].rejected) == (5, 7)

    rejects = _table(lake, "rejects")
    reasons = dict(
        zip(
            rejects["location"].str.replace(r"^http://[^/]+", ""),
            rejects["reason"],
            strict=True,
        )
    )
    assert reasons == {
        "/dcgm:3": "field 'value': DCGM_FI_DEV_GPU_UTIL is a utilization percent, "
        "between 0 and 100; got -5.0",
        "/dcgm:4": "field 'value': DCGM_FI_DEV_GPU_UTIL is a utilization percent, "
        "between 0 and 100; got 101.0",
        "/dcgm:6": "field 'value': DCGM_FI_PROF_SM_ACTIVE is a ratio of time or cycles, "
        "between 0 and 1; got 1.2",
        "/metrics:3": "field 'value': vllm:num_requests_waiting is a number of requests, "
        ">= 0; got -2.0",
        "/metrics:5": "field 'value': vllm:prompt_tokens_total is a counter, >= 0; got -100.0",
        "/metrics:9": "label 'le': a histogram bucket's upper bound must be a number, got 'abc'",
        "/metrics:11": "field 'value': bucket le=+Inf counts 4.0, fewer than a smaller bucket "
        "of the same histogram (7.0); buckets are cumulative",
        "/metrics:13": "field 'value': vllm:kv_cache_usage_perc is a fraction of the cache "
        "(0-1), between 0 and 1; got 1.7",
        "/metrics:14": "field 'value': vllm:prefix_cache_hits_total 200.0 exceeds "
        "vllm:prefix_cache_queries_total 100.0 of the same series and time; hits are a "
        "subset of the queried tokens",
        "/metrics:15": "field 'value': vllm:prefix_cache_hits_total 200.0 exceeds "
        "vllm:prefix_cache_queries_total 100.0 of the same series and time; hits are a "
        "subset of the queried tokens",
    }
    assert set(rejects["table_name"]) == {"gpu_samples", "serving_samples"}
    assert (
        rejects.filter(pl.col("location").str.ends_with("/dcgm:3"))["raw"].item().endswith(" -5.0")
    )
    # the valid samples around them are in the lake: 100 % and a ratio of exactly 1 are
    # possible, a temperature below 0 C is not ruled out
    gpu = _table(lake, "gpu_samples")
    assert sorted(gpu.select("field", "value").rows()) == [
        ("DCGM_FI_DEV_FB_USED", 1024.0),
        ("DCGM_FI_DEV_GPU_TEMP", -3.0),
        ("DCGM_FI_DEV_GPU_UTIL", 50.0),
        ("DCGM_FI_DEV_GPU_UTIL", 100.0),
        ("DCGM_FI_PROF_SM_ACTIVE", 1.0),
    ]
    serving = _table(lake, "serving_samples")
    assert sorted(serving["metric"].str.replace("vllm:", "")) == [
        "generation_tokens_total",
        "num_requests_running",
        "time_to_first_token_seconds_bucket",
        "time_to_first_token_seconds_bucket",
        "time_to_first_token_seconds_count",
    ]
    # no prefix-cache events from a pair that cannot be true
    assert _table(lake, "cache_events").height == 0


def test_possible_values_pass_untouched() -> None:
    """Bounds are inclusive; NaN and blanks (null) are "no reading", not impossible; a
    gauge not bounded by definition (a temperature) and a histogram _sum may be negative."""
    ts = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    gpu = pl.DataFrame(
        {
            "field": ["DCGM_FI_DEV_GPU_UTIL"] * 4 + ["DCGM_FI_DEV_GPU_TEMP"],
            "value": [0.0, 100.0, float("nan"), None, -40.0],
        }
    )
    assert impossible_values(gpu, GPU_SAMPLES) is None
    serving = pl.DataFrame(
        {
            "ts": [ts] * 5,
            "target": ["t"] * 5,
            "metric": [
                "vllm:kv_cache_usage_perc",
                "vllm:e2e_request_latency_seconds_sum",
                "vllm:e2e_request_latency_seconds_bucket",
                "vllm:e2e_request_latency_seconds_bucket",
                "vllm:e2e_request_latency_seconds_bucket",
            ],
            "type": ["gauge", "histogram", "histogram", "histogram", "histogram"],
            "labels": ["{}", "{}", '{"le":"0.5"}', '{"le":"+Inf"}', '{"le":"1e1"}'],
            "value": [1.0, -2.0, 3.0, 3.0, 3.0],
        }
    )
    assert impossible_values(serving, SERVING_SAMPLES) is None


def _range_answer(params: dict[str, str]) -> dict:
    t = float(params["start"])
    return {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {
                    "metric": {
                        "__name__": "DCGM_FI_DEV_GPU_UTIL",
                        "UUID": "GPU-a",
                        "gpu": "0",
                        "Hostname": "h1",
                    },
                    "values": [[t, "40"], ["x", "41"], [t + 30, "-5"], [t + 45, "abc"]],
                },
                {"metric": {"__name__": "vllm:num_requests_running"}, "values": 5},
                {
                    "metric": {"__name__": "vllm:num_requests_running", "instance": "v:8000"},
                    "values": [[t, "2"], [t + 15, "NaN"], [t + 30, 3]],
                },
            ],
        },
    }


def _range_page(params: dict[str, str]) -> tuple[str, bytes]:
    return "application/json", json.dumps(_range_answer(params)).encode()


def test_bad_query_range_points_are_reported_and_the_rest_loads(tmp_path: Path) -> None:
    """Was: one timestamp "x" dropped the whole answer ("could not convert string to
    float: 'x'"), "abc" loaded as a null value unreported, and `"values": 5` raised a bare
    ValueError. Now each bad point or series is a reject naming it; the rest loads."""
    lake = tmp_path / "lake"
    with serve({"/api/v1/query_range": _range_page}) as url:
        outs = _collect(
            lake,
            [
                {
                    "kind": "prometheus",
                    "url": url,
                    "query": "q",
                    "step": "15s",
                    "lookback": "40s",
                    "lag": 0,
                }
            ],
        )
    (out,) = outs
    assert out.up and out.error is None
    rejects = _table(lake, "rejects")
    reasons = sorted(rejects["reason"].str.replace(r"\{.*\}", "{...}"))
    assert reasons == [
        "field 'value': DCGM_FI_DEV_GPU_UTIL is a utilization percent, between 0 and 100; got -5.0",
        'result[0] (DCGM_FI_DEV_GPU_UTIL{...}): point 1: timestamp "x" is not a number of seconds',
        'result[0] (DCGM_FI_DEV_GPU_UTIL{...}): point 3: value "abc" is not a number',
        "result[1] (vllm:num_requests_running): 'values' must be a list of "
        '[timestamp, "value"] pairs, got 5',
    ]
    assert out.rejected == 4
    gpu = _table(lake, "gpu_samples")
    assert gpu["value"].to_list() == [40.0]
    serving = _table(lake, "serving_samples").sort("ts")
    assert serving["value"].to_list()[0] == 2.0 and serving["value"].to_list()[2] == 3.0
    # the impossible value's reject says when
    util = rejects.filter(pl.col("reason").str.contains("utilization"))
    assert util["location"].item().endswith("Z") and " at 20" in util["location"].item()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[collect]\nlake = 5\n[[target]]\nkind = "dcgm"\nurl = "h"\n',
            "[collect].lake: expected a path (a non-empty string), got 5",
        ),
        (
            'target = ["a"]\n',
            "target #1: expected a table ([[target]] with kind = ..., url = ...), got 'a'",
        ),
        (
            '[[target]]\nkind = "dcgm"\nurl = "h"\ninterval = nan\n',
            "target #1.interval: expected a finite duration like '10s' or a number of "
            "seconds, got nan",
        ),
        (
            '[[target]]\nkind = "dcgm"\nurl = "h"\ninterval = inf\n',
            "target #1.interval: expected a finite duration like '10s' or a number of "
            "seconds, got inf",
        ),
        (
            '[collect]\nflush_interval = inf\n[[target]]\nkind = "dcgm"\nurl = "h"\n',
            "[collect].flush_interval: expected a finite duration",
        ),
    ],
)
def test_config_type_errors_name_the_file_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    """Was: TypeError tracebacks (lake = 5, target = ["a"]); nan/inf intervals accepted."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load(cfg)
    assert str(exc.value).startswith(f"{cfg} ")
    assert expected in str(exc.value)
    res = CliRunner().invoke(app, ["collect", "--once", "--config", str(cfg)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert expected in res.output


def test_a_leading_bom_is_not_part_of_line_one() -> None:
    """Was: a UTF-8 BOM made line 1 a reject (its metric name began with U+FEFF)."""
    body = b'vllm:num_requests_running{engine="0"} 3\r\nvllm:x 1\r\n'
    for payload in (b"\xef\xbb\xbf" + body, "\ufeff" + body.decode()):
        p = parse(payload)
        assert p.rejects.height == 0
        assert p.samples["name"].to_list() == ["vllm:num_requests_running", "vllm:x"]
    # a body that is not all UTF-8 goes line by line: the BOM is dropped there too
    p = parse(b"\xef\xbb\xbf" + body + b"bad\xff 1\n")
    assert p.samples["name"].to_list() == ["vllm:num_requests_running", "vllm:x"]
    assert p.rejects["line"].to_list() == [3]


@pytest.mark.parametrize("url", ["not a url", "ftp://prom:9090", "http://", "http://h:99999"])
def test_recommend_autoscaling_refuses_a_prometheus_that_is_no_url(
    tmp_path: Path, url: str
) -> None:
    """Was: `--prometheus 'not a url'` went verbatim into KEDA's serverAddress."""
    res = CliRunner().invoke(
        app,
        ["recommend", "autoscaling", "--lake", str(tmp_path), "--prometheus", url],
    )
    assert res.exit_code != 0
    assert "--prometheus must be an http(s) URL with a host" in res.output
    assert repr(url) in res.output
