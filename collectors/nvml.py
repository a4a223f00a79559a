"""NVML (`pynvml`, from nvidia-ml-py) -> `gpu_samples`, for hosts without dcgm-exporter.

Fields and units (names are read by `marts.gpu_hourly` and
`clean.gpu_counter_increase`, keep them in step):

| field                               | unit    | NVML call                                   |
|-------------------------------------|---------|---------------------------------------------|
| `nvml_gpu_util_percent`             | %       | nvmlDeviceGetUtilizationRates().gpu          |
| `nvml_memory_util_percent`          | %       | nvmlDeviceGetUtilizationRates().memory       |
| `nvml_memory_used_mib`              | MiB     | nvmlDeviceGetMemoryInfo().used (bytes)       |
| `nvml_memory_total_mib`             | MiB     | nvmlDeviceGetMemoryInfo().total (bytes)      |
| `nvml_power_w`                      | W       | nvmlDeviceGetPowerUsage() (mW)               |
| `nvml_total_energy_consumption_mj`  | mJ      | nvmlDeviceGetTotalEnergyConsumption() (mJ)   |
| `nvml_temperature_c`                | C       | nvmlDeviceGetTemperature(GPU)                |
| `nvml_sm_clock_mhz`, `nvml_mem_clock_mhz` | MHz | nvmlDeviceGetClockInfo(SM / MEM)         |
| `nvml_process_memory_used_mib`      | MiB     | sum over nvmlDeviceGetComputeRunningProcesses |
| `nvml_process_used_mib`             | MiB     | one row per process, `labels.pid` = its pid (null value: NVML does not say) |

MIG: with MIG mode on, each MIG device gets its own rows (`mig_instance` =
GPU instance id, `mig_profile` from the device name, e.g. `3g.40gb`,
`gpu_uuid` = the parent GPU's, the MIG UUID in `labels`): memory and
processes per instance (NVML has no utilization per MIG device; DCGM has).

`labels` holds only what identifies the device (and, on per-process rows,
the process): it is part of the series key, so a value that changes from one
read to the next (a process' memory) is a row's value, never a label.

A call the device does not support (`NVMLError_NotSupported`) skips that field
only. No driver: `NvmlUnavailable` with one line saying why, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import orjson

MIB = 1024 * 1024


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this host; the message says why in one line."""


_EXPLAIN = {
    "NVMLError_LibraryNotFound": (
        "libnvidia-ml.so (the NVIDIA driver's management library) was not found: "
        "this host has no NVIDIA driver, or the library is not on the loader path "
        "(containers need the NVIDIA container toolkit)"
    ),
    "NVMLError_DriverNotLoaded": (
        "the NVIDIA kernel driver is not loaded (no GPU, or the driver is not "
        "installed/started: check `nvidia-smi`)"
    ),
    "NVMLError_NoPermission": "no permission to talk to the NVIDIA driver (/dev/nvidia*)",
    "NVMLError_LibRmVersionMismatch": (
        "the NVIDIA driver and libnvidia-ml.so versions differ (reboot after a driver upgrade)"
    ),
}


def explain(exc: BaseException) -> str:
    """One line for an NVML failure, naming the NVML error and what it means."""
    name = type(exc).__name__
    why = _EXPLAIN.get(name)
    if why:
        return f"NVML unavailable ({name}): {why}; use a dcgm target or run on a GPU host"
    return f"NVML unavailable ({name}): {exc}"


def _load() -> ModuleType:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NvmlUnavailable(f"NVML unavailable: cannot import pynvml ({exc})") from None
    return pynvml


@dataclass
class NvmlCollector:
    """Reads every GPU (and MIG device) of this host through NVML.

    `nvml` is the `pynvml` module; tests pass a fake module implementing the
    same functions. `open()` initializes NVML once; `read()` returns
    `gpu_samples` rows for one instant.
    """

    nvml: Any = None
    host: str | None = None
    source: str = "nvml"
    _opened: bool = False

    def open(self) -> None:
        if self._opened:
            return
        if self.nvml is None:
            self.nvml = _load()
        try:
            self.nvml.nvmlInit()
        except Exception as exc:
            raise NvmlUnavailable(explain(exc)) from None
        self._opened = True

    def close(self) -> None:
        if self._opened:
            try:
                self.nvml.nvmlShutdown()
            finally:
                self._opened = False

    def read(self, ts: dt.datetime | None = None) -> list[dict[str, Any]]:
        """One row per (GPU or MIG device, field) this device supports."""
        self.open()
        n = self.nvml
        ts = ts or dt.datetime.now(dt.UTC)
        host = self.host or socket.gethostname()
        rows: list[dict[str, Any]] = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            uuid = _str(n.nvmlDeviceGetUUID(h))
            model = _str(n.nvmlDeviceGetName(h))
            base = {
                "ts": ts,
                "source": self.source,
                "host": host,
                "gpu_uuid": uuid,
                "gpu_index": i,
                "gpu_model": model,
                "mig_profile": None,
                "mig_instance": None,
            }
            for name, value, extra in self._device_fields(h):
                rows.append({**base, "field": name, "value": value, "labels": _json(extra)})
            for mig in self._mig_devices(h):
                mh, gi = mig
                mname = _str(n.nvmlDeviceGetName(mh))
                profile = mname.rsplit("MIG ", 1)[1].strip() if "MIG " in mname else mname
                mlabels: dict[str, Any] = {"mig_uuid": _str(n.nvmlDeviceGetUUID(mh))}
                for name, value, extra in self._device_fields(mh, mig=True):
                    rows.append(
                        {
                            **base,
                            "mig_profile": profile,
                            "mig_instance": str(gi),
                            "field": name,
                            "value": value,
                            "labels": _json({**mlabels, **extra}),
                        }
                    )
        return rows

    def _call(self, fn: str, *args: Any) -> Any:
        """An NVML call whose NotSupported / NotFound means 'no such field here'."""
        try:
            return getattr(self.nvml, fn)(*args)
        except Exception as exc:
            if type(exc).__name__ in (
                "NVMLError_NotSupported",
                "NVMLError_NotFound",
                "NVMLError_InvalidArgument",
                "NVMLError_NoData",
            ):
                return None
            raise

    def _device_fields(
        self, h: Any, *, mig: bool = False
    ) -> list[tuple[str, float | None, dict[str, str]]]:
        """(field, value, labels beyond the device's) for each field this device has."""
        n = self.nvml
        out: dict[str, float] = {}
        if not mig:
            util = self._call("nvmlDeviceGetUtilizationRates", h)
            if util is not None:
                out["nvml_gpu_util_percent"] = float(util.gpu)
                out["nvml_memory_util_percent"] = float(util.memory)
        mem = self._call("nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            out["nvml_memory_used_mib"] = mem.used / MIB
            out["nvml_memory_total_mib"] = mem.total / MIB
        if not mig:
            power = self._call("nvmlDeviceGetPowerUsage", h)
            if power is not None:
                out["nvml_power_w"] = power / 1000.0
            energy = self._call("nvmlDeviceGetTotalEnergyConsumption", h)
            if energy is not None:
                out["nvml_total_energy_consumption_mj"] = float(energy)
            temp = self._call("nvmlDeviceGetTemperature", h, n.NVML_TEMPERATURE_GPU)
            if temp is not None:
                out["nvml_temperature_c"] = float(temp)
            sm = self._call("nvmlDeviceGetClockInfo", h, n.NVML_CLOCK_SM)
            if sm is not None:
                out["nvml_sm_clock_mhz"] = float(sm)
            memclk = self._call("nvmlDeviceGetClockInfo", h, n.NVML_CLOCK_MEM)
            if memclk is not None:
                out["nvml_mem_clock_mhz"] = float(memclk)
        rows: list[tuple[str, float | None, dict[str, str]]] = [
            (name, value, {}) for name, value in out.items()
        ]
        procs = self._call("nvmlDeviceGetComputeRunningProcesses", h)
        if procs is not None:
            # per process: its own row, the pid its identity (a label, stable for
            # the process' life); its memory is the value, which changes every read
            per_pid: dict[int, float | None] = {}
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                mib = None if used is None else used / MIB
                pid = int(p.pid)
                if pid in per_pid and per_pid[pid] is not None:  # listed twice: add up
                    mib = per_pid[pid] + (mib or 0.0)  # type: ignore[operator]
                per_pid[pid] = mib
            total = sum(v for v in per_pid.values() if v is not None)
            rows.append(("nvml_process_memory_used_mib", float(total), {}))
            for pid in sorted(per_pid):
                rows.append(("nvml_process_used_mib", per_pid[pid], {"pid": str(pid)}))
        return rows

    def _mig_devices(self, h: Any) -> list[tuple[Any, int]]:
        mode = self._call("nvmlDeviceGetMigMode", h)
        if not mode or not mode[0]:
            return []
        count = self._call("nvmlDeviceGetMaxMigDeviceCount", h) or 0
        out = []
        for j in range(count):
            mh = self._call("nvmlDeviceGetMigDeviceHandleByIndex", h, j)
            if mh is None:
                continue
            gi = self._call("nvmlDeviceGetGpuInstanceId", mh)
            out.append((mh, gi if gi is not None else j))
        return out


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _json(d: dict[str, Any]) -> str:
    return orjson.dumps(d, option=orjson.OPT_SORT_KEYS).decode()
