"""dcgm-exporter payloads in each label variant, served on loopback, scraped into the lake."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

import finops
from collectors.config import CollectConfig, make_target, target_url
from collectors.daemon import Collector
from collectors.dcgm import DCGM_BLANK_MIN, gpu_rows, render_payload

DATA = Path(__file__).parent / "data" / "exposition"


@contextlib.contextmanager
def serve(routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering each path from `routes`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fn = routes.get(self.path.split("?")[0])
            status, ctype, body = fn() if fn else (404, "text/plain", b"not found")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


TEXT = "text/plain; version=0.0.4; charset=utf-8"


def collect_once(lake_path: Path, urls: list[str]) -> list:
    cfg = CollectConfig(lake=lake_path, checkpoint_dir=lake_path / "_state")
    for i, u in enumerate(urls):
        cfg.targets.append(make_target({"kind": "dcgm", "url": u}, f"t{i}"))
    return asyncio.run(Collector(cfg, status=None).run_once())


VARIANT_FILES = sorted(DATA.glob("dcgm_*.txt"))


def test_every_label_variant_lands_in_the_same_columns(tmp_path: Path) -> None:
    routes = {
        f"/{p.stem}/metrics": (lambda p=p: (200, TEXT, p.read_bytes())) for p in VARIANT_FILES
    }
    with serve(routes) as base:
        outs = collect_once(tmp_path / "lake", [f"{base}/{p.stem}/metrics" for p in VARIANT_FILES])
    assert all(o.up for o in outs), [o.error for o in outs]
    db = finops.connect(tmp_path / "lake")
    df = db.sql("SELECT * FROM raw.gpu_samples").pl()
    by_host = {h: g for (h,), g in df.group_by("host")}
    # Hostname (releases) and hostname (newer) both fill host
    assert set(by_host) == {
        "r6i3n0",
        "gpu-node-3",
        "gpu-node-4",
        "a100-mig-1",
        "legacy-1",
        "gpu-node-7",
        "gpu-node-8",
    }
    assert df["gpu_uuid"].null_count() == 0 and df["gpu_uuid"].str.starts_with("GPU-").all()
    assert df["field"].str.starts_with("DCGM_FI_").all()
    # old-namespace flag names (uuid, pod_name, pod_namespace, container_name)
    legacy = by_host["legacy-1"]
    gpu0 = legacy.filter(pl.col("gpu_index") == 0).row(0, named=True)
    assert (gpu0["namespace"], gpu0["pod"], gpu0["container"]) == ("team-a", "train-0", "trainer")
    # empty k8s labels become null, not ""
    gpu1 = legacy.filter(pl.col("gpu_index") == 1).row(0, named=True)
    assert gpu1["pod"] is None and gpu1["namespace"] is None
    k8s = by_host["gpu-node-7"]
    assert set(k8s.filter(pl.col("pod").is_not_null())["pod"]) == {"vllm-large-0"}
    assert k8s.filter(pl.col("gpu_index") == 2)["pod"].null_count() == 26
    # MIG: one row set per GPU instance, same parent UUID
    mig = by_host["a100-mig-1"]
    assert set(mig["mig_instance"]) == {"1", "2"} and set(mig["mig_profile"]) == {"3g.40gb"}
    assert mig["gpu_uuid"].n_unique() == 1
    # extra labels (device, pci_bus_id, driver version) kept as JSON, known ones lifted out
    v3 = by_host["gpu-node-3"].row(0, named=True)
    assert v3["labels"] == (
        '{"DCGM_FI_DRIVER_VERSION":"550.54.15","device":"nvidia0","pci_bus_id":"00000000:18:00.0"}'
    )
    assert by_host["r6i3n0"]["labels"][0] == '{"device":"nvidia0"}'
    assert v3["gpu_model"] == "NVIDIA H100 80GB HBM3"


def test_units_pass_through_and_blank_sentinels_are_missing(tmp_path: Path) -> None:
    text = (DATA / "dcgm_blank.txt").read_text()
    with serve({"/metrics": lambda: (200, TEXT, text.encode())}) as base:
        outs = collect_once(tmp_path / "lake", [f"{base}/metrics"])
    assert outs[0].up and outs[0].rejected == 0
    db = finops.connect(tmp_path / "lake")
    raw = db.sql("SELECT field, value FROM raw.gpu_samples").pl()
    blank = raw.filter(
        pl.col("field").is_in(["DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"])
    )
    assert blank.height == 4 and blank["value"].null_count() == 4  # never 9.2e18
    assert raw.filter(pl.col("value") >= DCGM_BLANK_MIN).height == 0
    clean = db.sql("SELECT DISTINCT field FROM clean.gpu_samples").pl()["field"].to_list()
    assert "DCGM_FI_PROF_SM_ACTIVE" not in clean and "DCGM_FI_DEV_GPU_UTIL" in clean
    vals = dict(
        db.sql("SELECT field, max(value) FROM clean.gpu_samples GROUP BY field").pl().iter_rows()
    )
    assert 50 <= vals["DCGM_FI_DEV_POWER_USAGE"] <= 700  # W
    assert 0 <= vals["DCGM_FI_PROF_GR_ENGINE_ACTIVE"] <= 1  # ratio
    assert 0 <= vals["DCGM_FI_DEV_GPU_UTIL"] <= 100  # percent
    assert vals["DCGM_FI_DEV_FB_USED"] <= 80_000  # MiB
    # SM_ACTIVE blank: utilization falls back to GR_ENGINE_ACTIVE and says so
    signal = db.sql("SELECT DISTINCT util_signal FROM marts.gpu_hourly").pl()["util_signal"]
    assert signal.to_list() == ["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]


def test_energy_counter_increase_over_two_scrapes(tmp_path: Path) -> None:
    step = {"n": 0}

    def payload() -> tuple[int, str, bytes]:
        body = render_payload(2, variant="v3", hostname="e1", seed=1, step=step["n"])
        return 200, TEXT, body.encode()

    with serve({"/metrics": payload}) as base:
        collect_once(tmp_path / "lake", [f"{base}/metrics"])
        step["n"] = 1
        collect_once(tmp_path / "lake", [f"{base}/metrics"])
    db = finops.connect(tmp_path / "lake")
    inc = db.sql(
        "SELECT gpu_uuid, increase FROM clean.gpu_counter_increase "
        "WHERE field = 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION'"
    ).pl()
    assert inc.height == 2
    # render_payload advances the counter by 4e6 mJ +/- 3e6 per step
    assert ((inc["increase"] > 1_000_000) & (inc["increase"] < 7_000_001)).all()


def test_v2_without_prof_fields_uses_gpu_util(tmp_path: Path) -> None:
    text = (DATA / "dcgm_v2.txt").read_text()
    with serve({"/metrics": lambda: (200, TEXT, text.encode())}) as base:
        collect_once(tmp_path / "lake", [f"{base}/metrics"])
    db = finops.connect(tmp_path / "lake")
    sig = db.sql("SELECT DISTINCT util_signal FROM marts.gpu_hourly").pl()["util_signal"]
    assert sig.to_list() == ["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]
    text_no_prof = "\n".join(ln for ln in text.splitlines() if "DCGM_FI_PROF_" not in ln) + "\n"
    with serve({"/metrics": lambda: (200, TEXT, text_no_prof.encode())}) as base:
        collect_once(tmp_path / "lake2", [f"{base}/metrics"])
    db2 = finops.connect(tmp_path / "lake2")
    row = db2.sql("SELECT util_signal, util FROM marts.gpu_hourly LIMIT 1").pl().row(0)
    assert row[0] == "DCGM_FI_DEV_GPU_UTIL" and 0 <= row[1] <= 1


def test_missing_uuid_is_rejected_with_the_line(tmp_path: Path) -> None:
    from collectors.exposition import parse
    from finops.lake import Lake

    text = (
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",Hostname="h"} 5\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="1",Hostname="h"} 7\n'
        "dcgm_exporter_build_info 1\n"
    )
    import datetime as dt

    res = gpu_rows(parse(text), ts=dt.datetime.now(dt.UTC), target="http://h:9400/metrics")
    assert res.skipped == 1  # not a DCGM_ field
    lake = Lake(tmp_path / "lake")
    out = lake.append("gpu_samples", res.rows, source="dcgm")
    assert (out.loaded, out.rejected) == (1, 1)
    rej = finops.connect(tmp_path / "lake").sql("SELECT location, reason FROM rejects").pl()
    assert rej.row(0) == ("http://h:9400/metrics:3", "field 'gpu_uuid': required, missing or null")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("gpu-node-1", "http://gpu-node-1:9400/metrics"),
        ("10.0.0.5:9500", "http://10.0.0.5:9500/metrics"),
        ("https://dcgm.example/metrics", "https://dcgm.example/metrics"),
        ("http://h:9400", "http://h:9400/metrics"),
        ("http://h:9400/custom", "http://h:9400/custom"),
    ],
)
def test_default_url(given: str, expected: str) -> None:
    assert target_url("dcgm", given) == expected


def test_int32_and_fp64_blank_sentinels_are_missing_too() -> None:
    """DCGM's 32-bit and FP64 fields have blanks of their own (2147483632, 1.4e14 and the
    three after each): an exporter that prints one wrote a 1.4e14 W power reading."""
    import datetime as dt

    from collectors.exposition import parse

    labels = '{gpu="0",UUID="GPU-1",modelName="NVIDIA H100 80GB HBM3",Hostname="h"}'
    text = "".join(
        f"# TYPE {name} gauge\n{name}{labels} {value}\n"
        for name, value in (
            ("DCGM_FI_DEV_POWER_USAGE", "140737488355328.000000"),
            ("DCGM_FI_DEV_MEMORY_TEMP", "140737488355330"),  # not supported
            ("DCGM_FI_DEV_SM_CLOCK", "2147483632"),
            ("DCGM_FI_DEV_MEM_CLOCK", "2147483634"),
            ("DCGM_FI_DEV_GPU_TEMP", "41"),
            ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "140737488355327"),  # a real count
        )
    )
    res = gpu_rows(parse(text), ts=dt.datetime.now(dt.UTC), target="http://h:9400/metrics")
    got = dict(zip(res.rows["field"], res.rows["value"], strict=True))
    assert res.blank == 4
    assert got["DCGM_FI_DEV_POWER_USAGE"] is None and got["DCGM_FI_DEV_SM_CLOCK"] is None
    assert got["DCGM_FI_DEV_MEMORY_TEMP"] is None and got["DCGM_FI_DEV_MEM_CLOCK"] is None
    assert got["DCGM_FI_DEV_GPU_TEMP"] == 41
    assert got["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == 140737488355327
