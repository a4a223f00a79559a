"""NVML: the real no-driver path on this machine, the reading path via a fake pynvml.

`FakePynvmlModule` implements exactly the pynvml functions the collector
calls, with NVML's units (bytes, mW, mJ) and its exception class names, so
the unit conversions, MIG handling and NotSupported handling are exercised.
On a machine with an NVIDIA driver, `test_real_nvml_reads_devices` reads the
real devices instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest
from typer.testing import CliRunner

import finops
from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector
from collectors.nvml import MIB, NvmlCollector, NvmlUnavailable, explain
from finops.cli import app


def _driver_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


HAS_DRIVER = _driver_present()


class NVMLError_NotSupported(Exception):  # NVML's own class name
    pass


class NVMLError_NotFound(Exception):
    pass


class FakePynvmlModule:
    """A stand-in for `pynvml` with two GPUs; GPU 1 is an A100 in MIG mode."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    def __init__(self) -> None:
        self.inited = 0
        self.gpus = [
            {
                "uuid": b"GPU-11111111-aaaa",
                "name": b"NVIDIA L4",
                "util": SimpleNamespace(gpu=87, memory=41),
                "mem": SimpleNamespace(used=12 * 1024 * MIB, total=24 * 1024 * MIB, free=0),
                "power": 65_432,  # mW
                "energy": 123_456_789,  # mJ
                "temp": 61,
                "clocks": {1: 2040, 2: 6251},
                "procs": [SimpleNamespace(pid=4242, usedGpuMemory=11 * 1024 * MIB)],
                "mig": None,
            },
            {
                "uuid": "GPU-22222222-bbbb",
                "name": "NVIDIA A100-SXM4-80GB",
                "util": None,  # NotSupported with MIG on
                "mem": SimpleNamespace(used=30 * 1024 * MIB, total=80 * 1024 * MIB, free=0),
                "power": 250_000,
                "energy": None,  # NotSupported on this board
                "temp": 45,
                "clocks": {1: 1410, 2: 1593},
                "procs": [],
                "mig": [
                    {
                        "uuid": "MIG-aaaa",
                        "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                        "gi": 1,
                        "mem": SimpleNamespace(used=10 * 1024 * MIB, total=40 * 1024 * MIB),
                        "procs": [SimpleNamespace(pid=7, usedGpuMemory=9 * 1024 * MIB)],
                    },
                    None,  # an empty MIG slot
                    {
                        "uuid": "MIG-bbbb",
                        "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                        "gi": 2,
                        "mem": SimpleNamespace(used=0, total=40 * 1024 * MIB),
                        "procs": [],
                    },
                ],
            },
        ]

    # lifecycle
    def nvmlInit(self) -> None:
        self.inited += 1

    def nvmlShutdown(self) -> None:
        self.inited -= 1

    # devices: a handle is ("gpu", i) or ("mig", i, j)
    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> tuple:
        return ("gpu", i)

    def _dev(self, h: tuple) -> dict:
        return self.gpus[h[1]] if h[0] == "gpu" else self.gpus[h[1]]["mig"][h[2]]

    def nvmlDeviceGetUUID(self, h: tuple) -> str | bytes:
        return self._dev(h)["uuid"]

    def nvmlDeviceGetName(self, h: tuple) -> str | bytes:
        return self._dev(h)["name"]

    def _need(self, value: object) -> object:
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return value

    def nvmlDeviceGetUtilizationRates(self, h: tuple) -> object:
        if h[0] == "mig":
            raise NVMLError_NotSupported("Not Supported")
        return self._need(self._dev(h)["util"])

    def nvmlDeviceGetMemoryInfo(self, h: tuple) -> object:
        return self._dev(h)["mem"]

    def nvmlDeviceGetPowerUsage(self, h: tuple) -> int:
        return self._need(self._dev(h)["power"])  # type: ignore[return-value]

    def nvmlDeviceGetTotalEnergyConsumption(self, h: tuple) -> int:
        return self._need(self._dev(h)["energy"])  # type: ignore[return-value]

    def nvmlDeviceGetTemperature(self, h: tuple, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._dev(h)["temp"]

    def nvmlDeviceGetClockInfo(self, h: tuple, clock: int) -> int:
        return self._dev(h)["clocks"][clock]

    def nvmlDeviceGetComputeRunningProcesses(self, h: tuple) -> list:
        return self._dev(h)["procs"]

    def nvmlDeviceGetMigMode(self, h: tuple) -> list[int]:
        on = int(h[0] == "gpu" and self._dev(h)["mig"] is not None)
        return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: tuple) -> int:
        return len(self._dev(h)["mig"])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: tuple, j: int) -> tuple:
        if self._dev(h)["mig"][j] is None:
            raise NVMLError_NotFound("Not Found")
        return ("mig", h[1], j)

    def nvmlDeviceGetGpuInstanceId(self, h: tuple) -> int:
        return self._dev(h)["gi"]


def test_reading_path_converts_units_and_handles_mig() -> None:
    fake = FakePynvmlModule()
    c = NvmlCollector(nvml=fake, host="node-x")
    ts = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    rows = c.read(ts)
    by = {(r["gpu_uuid"], r["mig_instance"], r["field"]): r for r in rows}
    l4 = "GPU-11111111-aaaa"
    assert by[(l4, None, "nvml_gpu_util_percent")]["value"] == 87.0
    assert by[(l4, None, "nvml_memory_used_mib")]["value"] == 12 * 1024.0
    assert by[(l4, None, "nvml_power_w")]["value"] == pytest.approx(65.432)  # mW -> W
    assert by[(l4, None, "nvml_total_energy_consumption_mj")]["value"] == 123_456_789.0
    assert by[(l4, None, "nvml_temperature_c")]["value"] == 61.0
    assert by[(l4, None, "nvml_sm_clock_mhz")]["value"] == 2040.0
    proc = by[(l4, None, "nvml_process_memory_used_mib")]
    assert proc["value"] == 11 * 1024.0
    assert proc["labels"] == "{}"  # the device's identity only: no changing process list
    (pid,) = [r for r in rows if r["gpu_uuid"] == l4 and r["field"] == "nvml_process_used_mib"]
    assert pid["labels"] == '{"pid":"4242"}' and pid["value"] == 11 * 1024.0
    assert by[(l4, None, "nvml_gpu_util_percent")]["gpu_model"] == "NVIDIA L4"
    a100 = "GPU-22222222-bbbb"
    # NotSupported fields are skipped, not zero
    assert (a100, None, "nvml_gpu_util_percent") not in by
    assert (a100, None, "nvml_total_energy_consumption_mj") not in by
    assert by[(a100, None, "nvml_power_w")]["value"] == 250.0
    mig1 = by[(a100, "1", "nvml_memory_used_mib")]
    assert mig1["mig_profile"] == "3g.40gb" and mig1["value"] == 10 * 1024.0
    assert '"mig_uuid":"MIG-aaaa"' in mig1["labels"]
    assert by[(a100, "2", "nvml_memory_used_mib")]["value"] == 0.0
    assert {r["mig_instance"] for r in rows if r["gpu_uuid"] == a100} == {None, "1", "2"}
    assert all(r["ts"] == ts and r["host"] == "node-x" and r["source"] == "nvml" for r in rows)
    c.close()
    assert fake.inited == 0


def test_process_memory_is_a_value_never_a_label() -> None:
    """`labels` is part of gpu_samples' series key: a process' memory, which changes every
    read, in it made every read a new series. Was: labels["processes"] = [{pid, used_mib}]
    on every row of the device."""
    fake = FakePynvmlModule()
    c = NvmlCollector(nvml=fake, host="node-x")
    t0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    reads = []
    for k in range(3):
        fake.gpus[0]["procs"][0].usedGpuMemory = (10 + k) * 1024 * MIB
        fake.gpus[1]["mig"][0]["procs"][0].usedGpuMemory = (5 + k) * 1024 * MIB
        reads.append(c.read(t0 + dt.timedelta(seconds=10 * k)))

    def series(rows: list[dict]) -> set[tuple]:
        return {(r["gpu_uuid"], r["mig_instance"], r["field"], r["labels"]) for r in rows}

    assert series(reads[0]) == series(reads[1]) == series(reads[2])  # same series each read
    assert all("used_mib" not in r["labels"] for rows in reads for r in rows)
    # per-process memory is still there, as values of a row per pid
    l4, a100 = "GPU-11111111-aaaa", "GPU-22222222-bbbb"
    per_pid = [
        [(r["gpu_uuid"], r["mig_instance"], r["labels"], r["value"]) for r in rows
         if r["field"] == "nvml_process_used_mib"]
        for rows in reads
    ]  # fmt: skip
    assert per_pid[2] == [
        (l4, None, '{"pid":"4242"}', 12 * 1024.0),
        (a100, "1", '{"mig_uuid":"MIG-aaaa","pid":"7"}', 7 * 1024.0),
    ]
    totals = [r["value"] for r in reads[1] if r["field"] == "nvml_process_memory_used_mib"]
    assert totals == [11 * 1024.0, 0.0, 6 * 1024.0, 0.0]  # L4, A100, MIG 1, MIG 2
    c.close()


def test_fake_nvml_through_the_daemon_feeds_the_marts(tmp_path: Path) -> None:
    cfg = CollectConfig(lake=tmp_path / "lake", checkpoint_dir=tmp_path / "state")
    cfg.targets.append(make_target({"kind": "nvml", "host": "node-x"}, "t"))
    fake = FakePynvmlModule()
    for _ in range(2):
        outs = asyncio.run(Collector(cfg, status=None, nvml_module=fake).run_once())
        assert outs[0].up, outs[0].error
        fake.gpus[0]["energy"] += 3_600_000  # 1 Wh between reads
    db = finops.connect(tmp_path / "lake")
    hourly = db.sql(
        "SELECT util_signal, util, fb_used_mib, power_w FROM marts.gpu_hourly "
        "WHERE gpu_uuid = 'GPU-11111111-aaaa' AND mig_instance = ''"
    ).pl()
    assert hourly.row(0) == ("DCGM_FI_DEV_GPU_UTIL", 0.87, 12 * 1024.0, pytest.approx(65.432))
    inc = db.execute(
        "SELECT sum(increase) FROM clean.gpu_counter_increase "
        "WHERE field = 'nvml_total_energy_consumption_mj'"
    ).fetchall()[0][0]
    assert inc == 3_600_000


@pytest.mark.skipif(HAS_DRIVER, reason="an NVIDIA driver is present: the no-driver path cannot run")
def test_no_driver_gives_one_clear_line() -> None:
    with pytest.raises(NvmlUnavailable) as err:
        NvmlCollector().read()
    msg = str(err.value)
    assert "\n" not in msg
    assert "NVMLError_LibraryNotFound" in msg or "NVMLError_DriverNotLoaded" in msg
    assert "use a dcgm target" in msg


@pytest.mark.skipif(HAS_DRIVER, reason="an NVIDIA driver is present: the no-driver path cannot run")
def test_no_driver_cli_is_one_line_and_exit_0(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["collect", "--once", "--nvml", "--lake", str(tmp_path / "lake")])
    assert res.exit_code == 0
    assert "Traceback" not in res.output
    assert "DOWN nvml" in res.output and "NVML unavailable (NVMLError_" in res.output
    db = finops.connect(tmp_path / "lake")
    up, err = db.execute("SELECT up, error FROM scrape_health").fetchall()[0]
    assert up is False
    assert "libnvidia-ml.so" in err or "driver" in err


def test_explain_names_each_error() -> None:
    cls = type("NVMLError_DriverNotLoaded", (Exception,), {})
    assert "kernel driver is not loaded" in explain(cls())
    other = type("NVMLError_Unknown", (Exception,), {})
    assert explain(other("boom")) == "NVML unavailable (NVMLError_Unknown): boom"


@pytest.mark.skipif(not HAS_DRIVER, reason="no NVIDIA driver on this machine")
def test_real_nvml_reads_devices() -> None:
    rows = NvmlCollector().read()
    fields = {r["field"] for r in rows}
    assert {"nvml_memory_used_mib", "nvml_memory_total_mib"} <= fields
    assert all(r["gpu_uuid"].startswith(("GPU-", "MIG-")) for r in rows)
    power = [r["value"] for r in rows if r["field"] == "nvml_power_w"]
    assert all(0 < p < 2000 for p in power)  # watts, not milliwatts


def test_nvml_rows_the_lake_refuses_are_not_counted_as_samples(tmp_path: Path) -> None:
    """scrape_health counts what the lake holds: an NVML row without a GPU UUID goes to
    rejects with the lake's reason, and is not in `samples`. Was: counted before the lake
    validated it (samples 23 over 22 loaded rows)."""
    cfg = CollectConfig(lake=tmp_path / "lake", checkpoint_dir=tmp_path / "state")
    cfg.targets.append(make_target({"kind": "nvml", "host": "node-x"}, "t"))
    c = Collector(cfg, status=None, nvml_module=FakePynvmlModule())
    target = c.targets[0]
    read = target.collector.read

    def one_row_without_uuid(ts: dt.datetime | None = None) -> list[dict]:
        rows = read(ts)
        rows[0]["gpu_uuid"] = None
        return rows

    target.collector.read = one_row_without_uuid
    out = asyncio.run(c.run_once())[0]
    assert out.up and out.rejected == 1
    db = finops.connect(tmp_path / "lake")
    loaded = db.execute("SELECT count(*) FROM raw.gpu_samples").fetchone()[0]
    assert db.execute("SELECT samples, rejected FROM scrape_health").fetchall() == [(loaded, 1)]
    reason = db.execute("SELECT reason FROM rejects").fetchone()[0]
    assert "gpu_uuid" in reason
