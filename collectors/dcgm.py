"""NVIDIA dcgm-exporter (`http://host:9400/metrics`) -> `gpu_samples`.

Field names stay the exporter's own (`DCGM_FI_DEV_GPU_UTIL`, ...), and so do
its units, which the `gpu_samples` contract documents: `*_UTIL` percent 0-100,
`DCGM_FI_PROF_*` ratios 0-1, `FB_*` MiB, `POWER_USAGE` W,
`TOTAL_ENERGY_CONSUMPTION` mJ (a counter), temperatures C, clocks MHz.

Labels differ between exporter releases and deployment modes; all of these
read the same:

| lake column   | exporter labels (first present wins)            |
|---------------|-------------------------------------------------|
| host          | `Hostname` (releases), `hostname` (newer), else the target's host |
| gpu_uuid      | `UUID`, `uuid` (old-namespace flag)             |
| gpu_index     | `gpu`                                           |
| gpu_model     | `modelName`                                     |
| mig_profile   | `GPU_I_PROFILE`                                 |
| mig_instance  | `GPU_I_ID`                                      |
| namespace     | `exported_namespace`, `namespace`, `pod_namespace` |
| pod           | `exported_pod`, `pod`, `pod_name`               |
| container     | `exported_container`, `container`, `container_name` |

Empty Kubernetes labels (the exporter prints `pod=""` for GPUs no pod holds)
become null. `exported_*` come through Prometheus: scraped by a ServiceMonitor
without `honorLabels`, the exporter's pod/namespace/container are renamed
`exported_*` and `pod`/`namespace`/`container` name the exporter's own pod, so
the `exported_*` one wins the column and the target's label stays in `labels`.
A GPU no pod holds has no `exported_*` (Prometheus drops empty labels), only
the exporter's own pod/namespace/container: those are recognized (see
`_exporters_own`) and stay in `labels` too, so an idle GPU is no one's.
Every other label (`device`, `pci_bus_id`, `DCGM_FI_DRIVER_VERSION`,
`err_code`, custom pod labels...) goes to the `labels` JSON column.

Blank values: DCGM reports "no data" as sentinels: at or above
9223372036854775792 (`DCGM_INT64_BLANK` and its siblings), and, for 32-bit and
floating-point fields, 2147483632-2147483635 (`DCGM_INT32_BLANK`, not found, not
supported, not permissioned) and 140737488355328-140737488355331 (`DCGM_FP64_BLANK`
and siblings: a power reading of 1.4e14 W). They are not measurements, so they are stored with a null `value` (the raw table shows the
field exists but was blank; `clean.gpu_samples` drops them) and counted as
`blank` in the collection result, never as a huge number.
"""

from __future__ import annotations

import datetime as dt
import random
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import polars as pl

from collectors.exposition import ParseResult
from finops.lake import canonical_json
from finops.schemas import GPU_SAMPLES

DCGM_BLANK_MIN = 9223372036854775792.0
"""Values at or above this are DCGM 'blank' sentinels (no data), not numbers."""
DCGM_BLANKS = tuple(float(b + i) for b in (2147483632, 140737488355328) for i in range(4))
"""The 32-bit and FP64 fields' blank, not-found, not-supported and not-permissioned
sentinels (dcgm_structs.h): exact values no such field measures."""

_COLUMN_LABELS: dict[str, tuple[str, ...]] = {
    "host": ("Hostname", "hostname"),
    "gpu_uuid": ("UUID", "uuid"),
    "gpu_index": ("gpu",),
    "gpu_model": ("modelName",),
    "mig_profile": ("GPU_I_PROFILE",),
    "mig_instance": ("GPU_I_ID",),
    "namespace": ("exported_namespace", "namespace", "pod_namespace"),
    "pod": ("exported_pod", "pod", "pod_name"),
    "container": ("exported_container", "container", "container_name"),
}
_KNOWN = {lab for labs in _COLUMN_LABELS.values() for lab in labs}

GPU_SAMPLE_COLUMNS = tuple(GPU_SAMPLES.columns)
"""The `gpu_samples` columns, in the lake's order (the rows carry them all)."""


@dataclass
class GpuRows:
    """`gpu_samples` rows made from one payload, plus what was left out and why."""

    rows: pl.DataFrame  # gpu_samples columns + _location, _raw
    skipped: int  # samples that are not DCGM fields (exporter/process metrics)
    blank: int  # DCGM blank sentinels, stored with a null value


def gpu_rows(
    parsed: ParseResult,
    *,
    ts: dt.datetime,
    target: str,
    source: str = "dcgm",
    prefix: str = "DCGM_",
) -> GpuRows:
    """Map parsed exporter samples to `gpu_samples` rows (vectorized).

    `ts` is the scrape time, used when a sample carries no timestamp. Rows
    without a GPU UUID label are kept with a null `gpu_uuid`, so the lake
    rejects them with a reason that names the line.
    """
    s = parsed.samples.filter(pl.col("name").str.starts_with(prefix))
    skipped = parsed.samples.height - s.height
    host_default = urlsplit(target if "://" in target else f"http://{target}").hostname or target
    if s.height == 0:
        return GpuRows(pl.DataFrame(schema=_rows_schema()), skipped, 0)
    lab = label_table(s["labels"].unique())
    scrape_ms = int(ts.timestamp() * 1000)
    blank = (pl.col("value") >= DCGM_BLANK_MIN) | pl.col("value").is_in(DCGM_BLANKS)
    rows = (
        s.lazy()
        .join(lab.lazy(), on="labels", how="left", maintain_order="left")
        .select(
            ts=pl.from_epoch(pl.col("timestamp_ms").fill_null(scrape_ms), time_unit="ms")
            .dt.cast_time_unit("us")
            .dt.replace_time_zone("UTC"),
            source=pl.lit(source),
            host=pl.col("host").fill_null(pl.lit(host_default)),
            gpu_uuid="gpu_uuid",
            gpu_index=pl.col("gpu_index").cast(pl.Int32, strict=False),
            gpu_model="gpu_model",
            mig_profile="mig_profile",
            mig_instance="mig_instance",
            namespace="namespace",
            pod="pod",
            container="container",
            labels="extra",
            field=pl.col("name"),
            value=pl.when(blank).then(None).otherwise(pl.col("value")),
            _location=pl.format("{}:{}", pl.lit(target), pl.col("line")),
            _raw=pl.format("{}{} {}", pl.col("name"), pl.col("labels"), pl.col("value")),
        )
        .collect()
    )
    n_blank = int(s.select(blank.sum()).item() or 0)
    return GpuRows(rows, skipped, n_blank)


def label_table(labels: pl.Series) -> pl.DataFrame:
    """Lake columns for each distinct label set (an exporter repeats a few per GPU).

    Empty strings (`pod=""`) become null; labels without a column go to
    `extra` as canonical JSON. Prometheus' labels for the exporter's own pod are
    no GPU's workload (see `_exporters_own`).
    """
    dicts = [orjson.loads(lab) if lab else {} for lab in labels.to_list()]
    exporters = {
        (d.get("namespace"), d.get("pod")) for d in dicts if any(d.get(n) for n in _EXPORTED)
    }
    rows = []
    for lab, d in zip(labels.to_list(), dicts, strict=True):
        cols: dict[str, str | None] = {}
        shadowed: set[str] = set()  # Prometheus' target labels under an exported_* one
        if _exporters_own(d, exporters):
            shadowed.update(_TARGET_LABELS)
        for col, names in _COLUMN_LABELS.items():
            cols[col] = next((d[n] for n in names if d.get(n) and n not in shadowed), None)
            if d.get(names[0]) and names[0].startswith("exported_"):
                shadowed.update(names[1:])
        extra = {k: v for k, v in d.items() if k not in _KNOWN or (k in shadowed and v)}
        rows.append({"labels": lab, **cols, "extra": canonical_json(extra)})
    return pl.DataFrame(
        rows,
        schema={
            "labels": pl.String,
            **dict.fromkeys(_COLUMN_LABELS, pl.String),
            "extra": pl.String,
        },
    )


_EXPORTED = ("exported_namespace", "exported_pod", "exported_container")
_TARGET_LABELS = ("namespace", "pod", "container")
"""The labels Prometheus' Kubernetes discovery attaches for the scraped pod."""


def _exporters_own(d: dict[str, str], exporters: set[tuple[str | None, str | None]]) -> bool:
    """Whether a series' `pod`/`namespace`/`container` name the dcgm-exporter, not a workload.

    Through Prometheus (the series has `job`/`instance`), `pod`, `namespace`
    and `container` may be the scrape target's: the exporter's own pod. With
    `honor_labels: false` (the default) the exporter's own labels for the GPU's
    workload are renamed `exported_*` (handled in `label_table`); with `true` they
    are kept as `pod`/... . Either way, a GPU no pod holds is printed with
    `pod=""`, which Prometheus drops, so the target's labels are all that is
    left and would bill an idle GPU to the exporter. They are the exporter's
    when, with no `exported_*` on the series:
    - another series of the payload carries `exported_*` under the same
      namespace/pod (the target's labels, seen shadowed there);
    - `pod` names a dcgm-exporter (`nvidia-dcgm-exporter-x7k2p`, the GPU
      operator's and the Helm chart's DaemonSet pods).
    Not the container name, nor `pod` equal to `Hostname`: a dcgm-exporter run as
    a sidecar in the vLLM pod (scraped by a PodMonitor) has both, and there the
    target's pod *is* the GPU's workload. So an exporter DaemonSet under a custom
    pod name whose payload holds only idle GPUs still bills them to its own pod.
    A direct scrape (no `job`/`instance`) carries only the exporter's labels.
    """
    if not ("job" in d or "instance" in d) or any(d.get(n) for n in _EXPORTED):
        return False
    ns, pod, container = (d.get(n) or "" for n in _TARGET_LABELS)
    if not (ns or pod or container):
        return False
    seen_shadowed = (d.get("namespace"), d.get("pod")) in exporters
    return seen_shadowed or "dcgm-exporter" in pod


def _rows_schema() -> dict[str, pl.DataType]:
    from finops.schemas import GPU_SAMPLES

    schema = dict(GPU_SAMPLES.columns)
    schema["_location"] = pl.String
    schema["_raw"] = pl.String
    return schema


# --------------------------------------------------------------------------- recorded formats

# (field, type, help, kind): kind picks a plausible value generator and formatting
FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", "clock"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", "memclock"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", "temp"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", "temp"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", "power"),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        "energy",
    ),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.", "zero"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", "pct"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", "pct"),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", "zero"),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", "zero"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", "zero"),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", "fbfree"),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", "fbused"),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).", "fbres"),
    (
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "counter",
        "Total number of NVLink bandwidth counters for all lanes.",
        "zero",
    ),
    ("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status", "zero"),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
        "zero",
    ),
    (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for correctable errors",
        "zero",
    ),
    ("DCGM_FI_DEV_ROW_REMAP_FAILED", "gauge", "Whether remapping of rows has failed", "zero"),
    (
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "gauge",
        "Ratio of time the graphics engine is active.",
        "ratio",
    ),
    (
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        "ratio",
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        "ratio",
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "counter",
        "The number of bytes of active pcie tx data including both header and payload.",
        "bytes",
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "counter",
        "The number of bytes of active pcie rx data including both header and payload.",
        "bytes",
    ),
)
SM_ACTIVE = (
    "DCGM_FI_PROF_SM_ACTIVE",
    "gauge",
    "The ratio of cycles an SM has at least 1 warp assigned.",
    "ratio",
)

VARIANTS = ("v2", "v3", "v4", "mig", "old", "k8s")
"""Label layouts of exporter releases (see `render_payload`)."""


def _value(kind: str, rng: random.Random, step: int) -> str:
    if kind == "clock":
        return str(rng.choice((210, 1410, 1755, 1980)))
    if kind == "memclock":
        return str(rng.choice((1215, 1593, 2619)))
    if kind == "temp":
        return str(rng.randint(28, 78))
    if kind == "power":
        return f"{rng.uniform(55, 690):f}"  # Go's %f: six decimals
    if kind == "energy":
        return str(10_000_000_000 + step * 4_000_000 + rng.randint(0, 3_000_000))
    if kind == "pct":
        return str(rng.randint(0, 100))
    if kind == "fbfree":
        return str(rng.randint(1000, 40000))
    if kind == "fbused":
        return str(rng.randint(400, 80000))
    if kind == "fbres":
        return str(rng.choice((329, 523, 613)))
    if kind == "ratio":
        return f"{rng.random():f}"
    if kind == "bytes":
        return str(step * 1_000_000 + rng.randint(0, 999_999))
    return "0"


def render_payload(
    gpus: int = 8,
    *,
    variant: str = "v3",
    hostname: str = "gpu-node-1",
    model: str = "NVIDIA H100 80GB HBM3",
    sm_active: bool = True,
    seed: int = 0,
    step: int = 0,
    blank_fields: tuple[str, ...] = (),
    pods: dict[int, tuple[str, str, str]] | None = None,
) -> str:
    """Exposition text in dcgm-exporter's exact layout, for tests, benchmarks and demos.

    Variants (label order as each release prints it):
    - `v2`: gpu, UUID, device, modelName, Hostname (2.x releases, no pci_bus_id);
    - `v3`: gpu, UUID, pci_bus_id, device, modelName, Hostname, DCGM_FI_DRIVER_VERSION;
    - `v4`: as v3 but `hostname` lower-case (newer releases);
    - `mig`: v3 + GPU_I_PROFILE, GPU_I_ID (two 3g instances per GPU);
    - `old`: `uuid` and pod_name/pod_namespace/container_name (old-namespace flag);
    - `k8s`: v3 + container, namespace, pod (empty for GPUs no pod holds).
    `pods` maps a GPU index to (namespace, pod, container). `step` advances
    counters so consecutive payloads read as consecutive scrapes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rng = random.Random(f"{seed}:{step}:{variant}:{hostname}")
    fields = (*FIELDS, SM_ACTIVE) if sm_active else FIELDS
    pods = pods or {}
    out: list[str] = []
    instances = [(g, None) for g in range(gpus)]
    if variant == "mig":
        instances = [(g, i) for g in range(gpus) for i in (1, 2)]
    for name, typ, help_, kind in fields:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {typ}")
        for g, mig in instances:
            uuid = f"GPU-{seed:08x}-{zlib.crc32(hostname.encode()) % 0xFFFF:04x}-4{g:03x}-8000-{g:012x}"
            ns, pod, ctr = pods.get(g, ("", "", ""))
            if variant == "v2":
                lab = (
                    f'gpu="{g}",UUID="{uuid}",device="nvidia{g}",modelName="{model}",'
                    f'Hostname="{hostname}"'
                )
            elif variant == "old":
                lab = (
                    f'gpu="{g}",uuid="{uuid}",device="nvidia{g}",modelName="{model}",'
                    f'Hostname="{hostname}",container_name="{ctr}",pod_name="{pod}",'
                    f'pod_namespace="{ns}"'
                )
            else:
                host_label = "hostname" if variant == "v4" else "Hostname"
                lab = (
                    f'gpu="{g}",UUID="{uuid}",pci_bus_id="00000000:{0x18 + g:02X}:00.0",'
                    f'device="nvidia{g}",modelName="{model}",'
                )
                if variant == "mig":
                    lab += f'GPU_I_PROFILE="3g.40gb",GPU_I_ID="{mig}",'
                lab += f'{host_label}="{hostname}",DCGM_FI_DRIVER_VERSION="550.54.15"'
                if variant == "k8s":
                    lab += f',container="{ctr}",namespace="{ns}",pod="{pod}"'
            value = "9223372036854775794" if name in blank_fields else _value(kind, rng, step)
            out.append(f"{name}{{{lab}}} {value}")
    return "\n".join(out) + "\n"
