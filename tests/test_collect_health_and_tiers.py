"""Collectors: a scraped vLLM feeds the prefill/decode split, health counts
what the lake loaded, a 200 with nothing of ours is an error, a log target's table is
checked at load, a repeated series is rejected, an idle GPU is no exporter's workload."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from test_dcgm import TEXT, serve
from typer.testing import CliRunner

import finops
from collectors.config import CollectConfig, ConfigError, load, make_target
from collectors.daemon import Collector
from collectors.prometheus_api import result_to_rows
from finops.cli import app
from finops.lake import Lake

HOUR = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
MS = int(HOUR.timestamp() * 1000)
UUID = "GPU-4c226d4d-8129-a7cf-fecd-daa9018b4b48"


def _vllm(prefill: float, decode: float, ts_ms: int) -> bytes:
    return (
        "# TYPE vllm:request_prefill_time_seconds histogram\n"
        f'vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} {prefill} {ts_ms}\n'
        f'vllm:request_prefill_time_seconds_count{{engine="0",model_name="m"}} 5 {ts_ms}\n'
        "# TYPE vllm:request_decode_time_seconds histogram\n"
        f'vllm:request_decode_time_seconds_sum{{engine="0",model_name="m"}} {decode} {ts_ms}\n'
        f'vllm:request_decode_time_seconds_count{{engine="0",model_name="m"}} 5 {ts_ms}\n'
    ).encode()


def _dcgm(pod: str, ts_ms: int) -> bytes:
    return (
        "# TYPE DCGM_FI_PROF_SM_ACTIVE gauge\n"
        f'DCGM_FI_PROF_SM_ACTIVE{{gpu="0",UUID="{UUID}",modelName="NVIDIA H100 80GB HBM3",'
        f'Hostname="node-a",namespace="llm",pod="{pod}",container="vllm",tier="mid"}} '
        f"0.6 {ts_ms}\n"
    ).encode()


def _collect(lake: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["collect", "--once", "--lake", str(lake), *args])
    assert res.exit_code == 0, res.output
    return res.output


def _collect_twice(lake: Path, dcgm_pod: str | None, *vllm_flag: str, host: str = "") -> None:
    """Two scrapes 30 minutes apart (sample timestamps): prefill +10 s, decode +90 s."""
    state = {"step": 0}
    bodies = [(100.0, 1000.0), (110.0, 1090.0)]

    def vllm() -> tuple[int, str, bytes]:
        p, d = bodies[state["step"]]
        return 200, TEXT, _vllm(p, d, MS + (10 + 30 * state["step"]) * 60_000)

    def dcgm() -> tuple[int, str, bytes]:
        return 200, TEXT, _dcgm(dcgm_pod or "", MS + (10 + 30 * state["step"]) * 60_000)

    with serve({"/metrics": vllm, "/dcgm": dcgm}) as base:
        url = base.replace("127.0.0.1", host) if host else base
        for step in (0, 1):
            state["step"] = step
            args = [a.replace("{url}", f"{url}/metrics") for a in vllm_flag]
            if dcgm_pod is not None:
                args += ["--dcgm", f"{base}/dcgm"]
            _collect(lake, *args)


def _phases(lake: Path) -> list[tuple]:
    db = finops.connect(lake)
    return db.sql("SELECT tier, prefill_s, decode_s FROM marts.tier_phase_hourly").fetchall()


# --------------------------------------------------------------------------- finding 1


def test_a_vllm_targets_tier_from_the_cli_feeds_the_phase_split(tmp_path: Path) -> None:
    """`--vllm mid=URL`: every serving sample carries labels.tier, which the view reads."""
    lake = tmp_path / "lake"
    _collect_twice(lake, None, "--vllm", "mid={url}")
    assert _phases(lake) == [("mid", 10.0, 90.0)]
    db = finops.connect(lake)
    labels = {
        json.loads(r[0])["tier"]
        for r in db.sql("SELECT labels FROM raw.serving_samples").fetchall()
    }
    assert labels == {"mid"}


def test_a_vllm_targets_pod_from_the_config_finds_the_gpu_pods_tier(tmp_path: Path) -> None:
    """`pod = "vllm-mid-0"` on a vllm target: the tier is that GPU pod's (labels.tier on DCGM)."""
    lake = tmp_path / "lake"
    state = {"step": 0}

    def vllm() -> tuple[int, str, bytes]:
        p, d = ((100.0, 1000.0), (110.0, 1090.0))[state["step"]]
        return 200, TEXT, _vllm(p, d, MS + (10 + 30 * state["step"]) * 60_000)

    def dcgm() -> tuple[int, str, bytes]:
        return 200, TEXT, _dcgm("vllm-mid-0", MS + (10 + 30 * state["step"]) * 60_000)

    with serve({"/vllm-mid-0/metrics": vllm, "/dcgm": dcgm}) as base:
        cfg = tmp_path / "collectors.toml"
        cfg.write_text(
            f'[collect]\nlake = "{lake}"\n'
            f'[[target]]\nkind = "vllm"\nurl = "{base}/vllm-mid-0/metrics"\npod = "vllm-mid-0"\n'
            f'[[target]]\nkind = "dcgm"\nurl = "{base}/dcgm"\n'
        )
        for step in (0, 1):
            state["step"] = step
            res = CliRunner().invoke(app, ["collect", "--once", "--config", str(cfg)])
            assert res.exit_code == 0, res.output
    assert _phases(lake) == [("mid", 10.0, 90.0)]


def test_a_vllm_targets_host_names_the_gpu_pod(tmp_path: Path) -> None:
    """No tier or pod configured: the URL's first DNS label is the pod (here `localhost`)."""
    lake = tmp_path / "lake"
    _collect_twice(lake, "localhost", "--vllm", "{url}", host="localhost")
    assert _phases(lake) == [("mid", 10.0, 90.0)]


def test_the_phase_view_reads_a_pods_dns_name_and_never_an_ip(tmp_path: Path) -> None:
    lake = Lake(tmp_path, fsync=False)
    gpu = [
        {
            "ts": HOUR + dt.timedelta(minutes=m),
            "source": "dcgm",
            "host": "node-a",
            "gpu_uuid": UUID,
            "gpu_index": 0,
            "namespace": "llm",
            "pod": pod,
            "field": "DCGM_FI_PROF_SM_ACTIVE",
            "labels": json.dumps({"tier": tier}),
            "value": 0.5,
        }
        for m in (10, 40)
        for pod, tier in (("vllm-mid-0", "mid"), ("10", "ip"))
    ]
    assert lake.append("gpu_samples", gpu, source="dcgm").rejected == 0
    serving = [
        {
            "ts": HOUR + dt.timedelta(minutes=m),
            "source": "vllm",
            "target": target,
            "metric": "vllm:request_prefill_time_seconds_sum",
            "type": "histogram",
            "labels": '{"model_name":"m"}',
            "model_name": "m",
            "value": v,
        }
        for m, v in ((10, 1.0), (40, 4.0))
        for target in (
            "http://vllm-mid-0.vllm.llm.svc.cluster.local:8000/metrics",
            "http://10.0.0.7:8000/metrics",
        )
    ]
    assert lake.append("serving_samples", serving, source="vllm").rejected == 0
    assert _phases(tmp_path) == [("mid", 3.0, None)]


def test_vllm_tier_and_pod_options_are_checked() -> None:
    t = make_target({"kind": "vllm", "url": "mid=http://h:8000", "pod": "vllm-mid-0"}, "t")
    assert (t.tier, t.pod, t.url, t.name) == ("mid", "vllm-mid-0", "http://h:8000/metrics", t.url)
    assert make_target({"kind": "vllm", "url": "http://h:8000/metrics?a=b"}, "t").tier is None
    with pytest.raises(ConfigError, match=r"t\.tier: only a vllm target takes tier"):
        make_target({"kind": "dcgm", "url": "h", "tier": "mid"}, "t")
    with pytest.raises(ConfigError, match="url names tier 'mid' but tier = 'large'"):
        make_target({"kind": "vllm", "url": "mid=http://h:8000", "tier": "large"}, "t")
    with pytest.raises(ConfigError, match=r"t\.pod: expected a non-empty string"):
        make_target({"kind": "vllm", "url": "http://h:8000", "pod": ""}, "t")


# --------------------------------------------------------------------------- finding 2


def _once(lake: Path, targets: list[dict]) -> dict:
    cfg = CollectConfig(lake=lake, checkpoint_dir=lake / "_state")
    for i, t in enumerate(targets):
        cfg.targets.append(make_target(t, f"target #{i}"))
    outs = asyncio.run(Collector(cfg, status=None).run_once())
    return {o.target: o for o in outs}


def test_health_counts_the_rows_the_lake_loads_not_the_rows_offered(tmp_path: Path) -> None:
    body = (
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",Hostname="n1"} 50\n'  # no UUID
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="1",UUID="{UUID}",Hostname="n1"}} 60 1000\n'  # 1970
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="2",UUID="{UUID}-2",Hostname="n1"}} 70\n'
    ).encode()
    lake = tmp_path / "lake"
    with serve({"/metrics": lambda: (200, TEXT, body)}) as base:
        out = _once(lake, [{"kind": "dcgm", "url": f"{base}/metrics", "name": "d"}])["d"]
    assert (out.up, out.samples, out.rejected, out.error) == (True, 1, 2, None)
    db = finops.connect(lake)
    assert db.sql("SELECT samples, rejected FROM raw.scrape_health").fetchall() == [(1, 2)]
    assert db.sql("SELECT count(*) FROM raw.gpu_samples").fetchall() == [(1,)]
    reasons = sorted(r[0] for r in db.sql("SELECT reason FROM raw.rejects").fetchall())
    assert reasons[0] == "field 'gpu_uuid': required, missing or null"
    assert "before 2000" in reasons[1]
    locations = {r[0] for r in db.sql("SELECT location FROM raw.rejects").fetchall()}
    assert locations == {f"{base}/metrics:2", f"{base}/metrics:3"}


def test_prometheus_health_counts_what_the_lake_loaded(tmp_path: Path) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    doc = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {
                    "metric": {"__name__": "DCGM_FI_PROF_SM_ACTIVE", "gpu": "0", "job": "dcgm"},
                    "values": [[now - 120, "0.5"], [now - 105, "0.5"]],
                },
                {
                    "metric": {"__name__": "DCGM_FI_PROF_SM_ACTIVE", "UUID": UUID, "gpu": "1"},
                    "values": [[now - 120, "0.5"]],
                },
            ],
        },
    }
    body = json.dumps(doc).encode()
    lake = tmp_path / "lake"
    with serve({"/api/v1/query_range": lambda: (200, "application/json", body)}) as base:
        target = {"kind": "prometheus", "url": base, "query": "q", "name": "p", "lookback": "5m"}
        out = _once(lake, [target])["p"]
    assert (out.up, out.samples, out.rejected) == (True, 1, 2), out.error
    db = finops.connect(lake)
    assert db.sql("SELECT samples, rejected FROM raw.scrape_health").fetchall() == [(1, 2)]


@pytest.mark.parametrize(
    ("kind", "body", "ctype", "error"),
    [
        (
            "dcgm",
            b"",
            TEXT,
            "no DCGM_* metrics in the payload (the body is empty): is this a dcgm-exporter?",
        ),
        (
            "dcgm",
            b'{"status":"error"}',
            "application/json",
            "no DCGM_* metrics in the payload (no sample parsed; it starts "
            '\'{"status":"error"}\'): is this a dcgm-exporter?',
        ),
        (
            "dcgm",
            b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1\n",
            TEXT,
            "no DCGM_* metrics in the payload (1 sample of other metrics): "
            "is this a dcgm-exporter?",
        ),
        (
            "vllm",
            b"",
            TEXT,
            "no metrics starting with ['vllm:'] (the body is empty): is this vLLM?",
        ),
        (
            "vllm",
            b'{"detail":"Not Found"}',
            "application/json",
            "no metrics starting with ['vllm:'] (no sample parsed; it starts "
            '\'{"detail":"Not Found"}\'): is this vLLM?',
        ),
    ],
)
def test_a_200_with_nothing_of_ours_is_down_with_a_reason(
    tmp_path: Path, kind: str, body: bytes, ctype: str, error: str
) -> None:
    with serve({"/metrics": lambda: (200, ctype, body)}) as base:
        out = _once(tmp_path / "lake", [{"kind": kind, "url": f"{base}/metrics", "name": "t"}])
    o = out["t"]
    assert (o.up, o.samples, o.error) == (False, 0, error)


def test_families_listed_without_samples_are_up(tmp_path: Path) -> None:
    """An exporter that lists its families but has no sample yet is alive, not misnamed."""
    body = (
        b"# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
    )
    with serve({"/metrics": lambda: (200, TEXT, body)}) as base:
        out = _once(tmp_path / "lake", [{"kind": "dcgm", "url": f"{base}/metrics", "name": "t"}])
    assert (out["t"].up, out["t"].samples, out["t"].error) == (True, 0, None)


# --------------------------------------------------------------------------- finding 3


def test_a_log_targets_table_is_checked_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "collectors.toml"
    cfg.write_text('[[target]]\nkind = "log"\npath = "x.jsonl"\ntable = "request"\n')
    with pytest.raises(ConfigError) as exc:
        load(cfg, lake=tmp_path / "lake")
    assert str(exc.value) == (
        f"{cfg} target #1.table: a log target loads one of ['requests', 'cache_events'], "
        "got 'request'"
    )
    cfg.write_text('[[target]]\nkind = "log"\npath = "x.jsonl"\ntable = "cache_events"\n')
    assert load(cfg, lake=tmp_path / "lake").targets[0].table == "cache_events"


# --------------------------------------------------------------------------- finding 4


def test_a_repeated_series_keeps_the_first_and_rejects_the_repeat(tmp_path: Path) -> None:
    lab = f'gpu="0",UUID="{UUID}",Hostname="n1"'
    body = (
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
        f"DCGM_FI_DEV_POWER_USAGE{{{lab}}} 300\n"
        f"DCGM_FI_DEV_POWER_USAGE{{{lab}}} 500\n"
    ).encode()
    lake = tmp_path / "lake"
    with serve({"/metrics": lambda: (200, TEXT, body)}) as base:
        out = _once(lake, [{"kind": "dcgm", "url": f"{base}/metrics", "name": "d"}])["d"]
    assert (out.up, out.samples, out.rejected) == (True, 1, 1)
    db = finops.connect(lake)
    assert db.sql("SELECT value FROM raw.gpu_samples").fetchall() == [(300.0,)]
    rej = db.sql("SELECT location, raw, reason FROM raw.rejects").fetchall()
    assert rej == [
        (
            f"{base}/metrics:3",
            f"DCGM_FI_DEV_POWER_USAGE{{{lab}}} 500",
            "duplicate sample: the same metric, labels and timestamp as line 2 "
            "(kept; Prometheus refuses the repeat too)",
        )
    ]


# --------------------------------------------------------------------------- finding 5


def _via_prometheus(*series: dict[str, str]) -> list[tuple]:
    base = {
        "__name__": "DCGM_FI_PROF_SM_ACTIVE",
        "Hostname": "nvidia-dcgm-exporter-abcde",
        "modelName": "NVIDIA H100 80GB HBM3",
        "instance": "10.0.0.5:9400",
        "job": "dcgm",
    }
    result = [
        {
            "metric": {**base, "UUID": f"GPU-{i}", "gpu": str(i), **s},
            "values": [[1_790_000_000, "0.5"]],
        }
        for i, s in enumerate(series)
    ]
    gpu, _, _ = result_to_rows(result, url="http://prom:9090", query="q")
    assert gpu is not None
    return [
        (
            r["gpu_uuid"],
            r["namespace"],
            r["pod"],
            r["container"],
            json.loads(r["labels"]).get("pod"),
        )
        for r in gpu.sort("gpu_uuid").to_dicts()
    ]


EXPORTER = {"namespace": "gpu-operator", "pod": "nvidia-dcgm-exporter-abcde"}


def test_an_idle_gpu_through_prometheus_is_not_the_exporters_workload() -> None:
    busy = {**EXPORTER, "exported_namespace": "llm", "exported_pod": "vllm-mid-0"}
    # honor_labels false: the busy GPU's target labels show which pod is the exporter
    assert _via_prometheus(busy, EXPORTER) == [
        ("GPU-0", "llm", "vllm-mid-0", None, "nvidia-dcgm-exporter-abcde"),
        ("GPU-1", None, None, None, "nvidia-dcgm-exporter-abcde"),
    ]
    # only idle GPUs: the exporter DaemonSet's pod name says it
    assert [r[1:4] for r in _via_prometheus(EXPORTER)] == [(None, None, None)]
    # a sidecar exporter in the vLLM pod (a PodMonitor): the target's pod is the workload,
    # though its Hostname is the pod's name and its container is called dcgm-exporter
    sidecar = {"namespace": "llm", "pod": "vllm-mid-0", "container": "dcgm-exporter",
               "Hostname": "vllm-mid-0"}  # fmt: skip
    assert _via_prometheus(sidecar)[0][1:4] == ("llm", "vllm-mid-0", "dcgm-exporter")
    # honor_labels true: a workload's own labels stay its own
    workload = {"namespace": "llm", "pod": "vllm-small-0", "container": "vllm"}
    assert _via_prometheus(workload, EXPORTER)[0][1:4] == ("llm", "vllm-small-0", "vllm")


def test_a_direct_scrape_keeps_the_exporters_pod_labels() -> None:
    """No job/instance: the exporter printed pod/namespace itself, for the GPU's workload."""
    import polars as pl

    from collectors.dcgm import label_table

    lab = json.dumps(
        {"UUID": UUID, "Hostname": "vllm-mid-0", "namespace": "llm", "pod": "vllm-mid-0"},
        sort_keys=True,
    )
    row = label_table(pl.Series([lab])).row(0, named=True)
    assert (row["namespace"], row["pod"]) == ("llm", "vllm-mid-0")


@pytest.mark.parametrize(
    ("kind", "given", "url"),
    [
        ("vllm", "localhost", "http://localhost:8000/metrics"),
        ("vllm", "vllm-mid-0:9000/v1", "http://vllm-mid-0:9000/metrics"),
        ("vllm", "https://h/vllm/metrics", "https://h/vllm/metrics"),
        ("prometheus", "prom", "http://prom:9090"),
        ("prometheus", "prom:80", "http://prom:80"),
        ("dcgm", "node-a", "http://node-a:9400/metrics"),
    ],
)
def test_a_url_without_scheme_gets_the_servers_default(kind: str, given: str, url: str) -> None:
    """`--vllm localhost:8000` and `--prometheus prom:9090` failed every scrape with httpx's
    'missing an http:// protocol' while `--dcgm node-a:9400` worked."""
    extra = {"query": "up"} if kind == "prometheus" else {}
    assert make_target({"kind": kind, "url": given, **extra}, "t").url == url


@pytest.mark.parametrize(
    ("flag", "given", "says"),
    [
        ("--vllm", "mid=", "--vllm: 'mid=' names tier 'mid' but no URL"),
        ("--vllm", "ftp://h/metrics", "--vllm: expected http(s)://host[:port][/path], got 'ftp"),
        ("--dcgm", "http://", "--dcgm: expected http(s)://host[:port][/path], got 'http://'"),
        ("--vllm", "http://h:99999", "--vllm: bad port in 'http://h:99999'"),
    ],
)
def test_a_url_that_cannot_be_scraped_is_refused_naming_the_flag(
    tmp_path: Path, flag: str, given: str, says: str
) -> None:
    """Was: started, and every attempt was DOWN with a transport error (`mid=` was a URL)."""
    res = CliRunner().invoke(app, ["collect", "--once", "--lake", str(tmp_path), flag, given])
    assert res.exit_code != 0
    assert says in res.output, res.output
    assert "Traceback" not in res.output
