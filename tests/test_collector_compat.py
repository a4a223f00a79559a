"""Exporter and deployment variants seen in the field: each must land in the lake as the
plain layout does (Prometheus' exported_* labels, vLLM's escaped OpenMetrics mount,
an exporter pod replaced mid-hour, dcgm-exporter's sanitised pod labels)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dcgm import serve as serve_routes
from typer.testing import CliRunner

import finops
from collectors.config import make_target
from collectors.prometheus_api import result_to_rows
from finops.cli import app

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
GPU = (
    'gpu="0",UUID="GPU-4c226d4d-8129-a7cf-fecd-daa9018b4b48",pci_bus_id="00000000:18:00.0",'
    'device="nvidia0",modelName="NVIDIA H100 80GB HBM3",DCGM_FI_DRIVER_VERSION="550.54.15"'
)
# prometheus_client's make_asgi_app (vLLM's `/metrics/` mount) answering an Accept that
# offers OpenMetrics: sample names escaped, TYPE/HELP keep the family's real name
VLLM_ESCAPED = """\
# HELP python_info Python platform information
# TYPE python_info gauge
python_info{implementation="CPython",major="3",minor="12",patchlevel="3",version="3.12.3"} 1.0
# HELP vllm:prompt_tokens Number of prefill tokens processed.
# TYPE vllm:prompt_tokens counter
vllm_prompt_tokens_total{engine="0",model_name="small"} 1234.0
vllm_prompt_tokens_created{engine="0",model_name="small"} 1.7963567227509022e+09
# HELP vllm:prefix_cache_hits hits
# TYPE vllm:prefix_cache_hits counter
vllm_prefix_cache_hits_total{engine="0",model_name="small"} 40.0
# HELP vllm:prefix_cache_queries queries
# TYPE vllm:prefix_cache_queries counter
vllm_prefix_cache_queries_total{engine="0",model_name="small"} 100.0
# HELP vllm:num_requests_waiting waiting
# TYPE vllm:num_requests_waiting gauge
vllm_num_requests_waiting{engine="0",model_name="small"} 3.0
# HELP vllm:e2e_request_latency_seconds latency
# TYPE vllm:e2e_request_latency_seconds histogram
vllm_e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="small"} 2.0
vllm_e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="small"} 3.0
vllm_e2e_request_latency_seconds_count{engine="0",model_name="small"} 3.0
vllm_e2e_request_latency_seconds_sum{engine="0",model_name="small"} 4.5
# EOF
"""


@contextlib.contextmanager
def serve(routes: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    """test_dcgm's loopback server; `routes` maps a path to (Content-Type, body)."""
    answers = {path: (lambda a=answer: (200, *a)) for path, answer in routes.items()}
    with serve_routes(answers) as base:
        yield base


def collect(lake: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["collect", "--once", "--lake", str(lake), *args])
    assert res.exit_code == 0, res.output
    return res.output


# --------------------------------------------------------------------------- finding 1


def test_prometheus_exported_labels_win_over_the_scrape_targets() -> None:
    """A ServiceMonitor without honorLabels: the GPU belongs to exported_pod, not the exporter."""
    metric = {
        "__name__": "DCGM_FI_PROF_SM_ACTIVE",
        "UUID": "GPU-aaaa-0000",
        "gpu": "0",
        "Hostname": "gpu-node-1",
        "modelName": "NVIDIA H100 80GB HBM3",
        "instance": "10.0.0.5:9400",
        "job": "nvidia-dcgm-exporter",
        "namespace": "gpu-operator",
        "pod": "nvidia-dcgm-exporter-x7k2p",
        "container": "nvidia-dcgm-exporter",
        "exported_namespace": "llm-prod",
        "exported_pod": "vllm-large-0",
        "exported_container": "vllm",
    }
    plain = {k: v for k, v in metric.items() if not k.startswith("exported_")}
    plain.update(namespace="llm-prod", pod="vllm-small-0", container="vllm")
    result = [
        {"metric": metric, "values": [[1_790_000_000, "0.42"]]},
        {"metric": plain, "values": [[1_790_000_000, "0.5"]]},
    ]
    gpu, serving, n = result_to_rows(result, url="http://prom:9090", query="q")
    assert serving is None and n == 2 and gpu is not None
    rows = gpu.sort("value").to_dicts()
    assert [(r["namespace"], r["pod"], r["container"]) for r in rows] == [
        ("llm-prod", "vllm-large-0", "vllm"),
        ("llm-prod", "vllm-small-0", "vllm"),
    ]
    kept = json.loads(rows[0]["labels"])  # the target's own labels are not lost
    assert kept["pod"] == "nvidia-dcgm-exporter-x7k2p"
    assert kept["namespace"] == "gpu-operator"
    assert kept["container"] == "nvidia-dcgm-exporter"
    assert not any(k.startswith("exported_") for k in kept)
    assert "pod" not in json.loads(rows[1]["labels"])  # no exported_*: unchanged


# --------------------------------------------------------------------------- finding 2


@pytest.mark.parametrize("kind", ["vllm", "dcgm"])
def test_trailing_slash_metrics_url_is_the_metrics_route(kind: str) -> None:
    t = make_target({"kind": kind, "url": "http://10.0.0.7:8000/metrics/"}, "t")
    assert t.url == "http://10.0.0.7:8000/metrics"
    assert t.name == "http://10.0.0.7:8000/metrics"


def test_vllm_openmetrics_escaped_names_are_read(tmp_path: Path) -> None:
    """vLLM's prometheus_client mount escapes `vllm:` to `vllm_`: still read as vLLM."""
    lake = tmp_path / "lake"
    with serve({"/metrics": (OPENMETRICS, VLLM_ESCAPED.encode())}) as base:
        out = collect(lake, "--vllm", f"{base}/metrics")
    assert "is this vLLM" not in out
    db = finops.connect(lake)
    health = db.sql("SELECT up, samples, error FROM raw.scrape_health").fetchall()
    assert health == [(True, 9, None)]
    got = dict(db.sql("SELECT metric, type FROM raw.serving_samples").fetchall())
    assert got == {
        "vllm:prompt_tokens_total": "counter",
        "vllm:prompt_tokens_created": "counter",
        "vllm:prefix_cache_hits_total": "counter",
        "vllm:prefix_cache_queries_total": "counter",
        "vllm:num_requests_waiting": "gauge",
        "vllm:e2e_request_latency_seconds_bucket": "histogram",
        "vllm:e2e_request_latency_seconds_count": "histogram",
        "vllm:e2e_request_latency_seconds_sum": "histogram",
    }
    assert not db.sql("SELECT * FROM raw.serving_samples WHERE metric LIKE 'python%'").fetchall()


# --------------------------------------------------------------------------- findings 3, 4


def _dcgm(host: str, ts_ms: int, labels: str = "") -> bytes:
    return (
        "# TYPE DCGM_FI_PROF_SM_ACTIVE gauge\n"
        f'DCGM_FI_PROF_SM_ACTIVE{{{GPU},Hostname="{host}",container="vllm",'
        f'namespace="llm-prod",pod="vllm-large-0"{labels}}} 0.5 {ts_ms}\n'
    ).encode()


def test_gpu_is_billed_once_an_hour_when_its_hostname_changes(tmp_path: Path) -> None:
    """dcgm-exporter's Hostname is its pod name: a DaemonSet rollout must not bill twice."""
    lake = tmp_path / "lake"
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    hour -= dt.timedelta(hours=1)
    ms = int(hour.timestamp() * 1000)
    for host, minute in (("nvidia-dcgm-exporter-cwbcm", 10), ("nvidia-dcgm-exporter-q8z4t", 40)):
        with serve({"/metrics": (TEXT, _dcgm(host, ms + minute * 60_000))}) as base:
            collect(lake, "--dcgm", f"{base}/metrics")
    db = finops.connect(lake)
    assert db.sql("SELECT count(DISTINCT host) FROM clean.gpu_samples").fetchall() == [(2,)]
    cost = db.sql("SELECT host, gpu_hours FROM marts.gpu_cost_hourly").fetchall()
    assert cost == [("nvidia-dcgm-exporter-q8z4t", 1.0)]  # the latest host names it
    tier = db.sql("SELECT gpus, gpu_hours FROM marts.tier_cost_hourly").fetchall()
    assert tier == [(1, 1.0)]
    hourly = db.sql("SELECT host, samples FROM marts.gpu_hourly").fetchall()
    assert hourly == [("nvidia-dcgm-exporter-q8z4t", 2)]


def test_sanitised_pod_label_finops_dev_tier_is_the_tier(tmp_path: Path) -> None:
    """--kubernetes-enable-pod-labels turns `finops.dev/tier` into `finops_dev_tier`."""
    lake = tmp_path / "lake"
    ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    body = _dcgm("node-a", ms, ',finops_dev_tier="large",app_kubernetes_io_name="vllm"')
    with serve({"/metrics": (TEXT, body)}) as base:
        collect(lake, "--dcgm", f"{base}/metrics")
    db = finops.connect(lake)
    assert db.sql("SELECT tier FROM marts.gpu_cost_hourly").fetchall() == [("large",)]
    assert db.sql("SELECT tier FROM marts.gpu_hourly").fetchall() == [("large",)]
    assert db.sql("SELECT tier FROM marts.tier_cost_hourly").fetchall() == [("large",)]


def test_sanitised_tier_label_on_serving_series_names_the_phase_tier(tmp_path: Path) -> None:
    from finops.lake import Lake

    t0 = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    labels = json.dumps({"finops_dev_tier": "large", "model_name": "m"}, sort_keys=True)
    rows = [
        {
            "ts": t0 + dt.timedelta(minutes=m),
            "source": "test",
            "target": "http://10.0.0.7:8000/metrics",
            "metric": "vllm:request_prefill_time_seconds_sum",
            "type": "histogram",
            "model_name": "m",
            "labels": labels,
            "value": v,
        }
        for m, v in ((1, 10.0), (2, 25.0))
    ]
    assert Lake(tmp_path, fsync=False).append("serving_samples", rows, source="test").rejected == 0
    db = finops.connect(tmp_path)
    got = db.sql("SELECT tier, prefill_s FROM marts.tier_phase_hourly").fetchall()
    assert got == [("large", 15.0)]
