"""The simulated fleet: tiers, vLLM replicas, the GPUs under them, and hosts.

The demo names everything the way a real cluster would report it (DCGM's
`modelName`, Kubernetes pod names `vllm-<tier>-<n>`, vLLM's served model
names), so every view and notebook written against the demo works unchanged
against real collectors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class TierSpec:
    """One serving tier: what it serves, on which GPU, and how fast.

    Speeds are per replica and rough public figures for vLLM on that
    hardware; they only shape load and latency, they are not benchmarks.
    """

    name: str
    model: str
    gpu_model: str
    tensor_parallel: int
    max_model_len: int
    prefill_tok_s: float  # prompt tokens per second of GPU busy time
    decode_tok_s: float  # generated tokens per second at a full batch
    itl_s: float  # inter-token latency of one sequence, lightly loaded
    fb_total_mib: float
    idle_w: float
    tdp_w: float


TIERS: dict[str, TierSpec] = {
    "small": TierSpec(
        "small",
        "llama-3.2-1b-instruct",
        "NVIDIA L4",
        1,
        32768,
        22000.0,
        2600.0,
        0.009,
        23034.0,
        16.0,
        72.0,
    ),
    "mid": TierSpec(
        "mid",
        "llama-3.1-8b-instruct",
        "NVIDIA L4",
        1,
        32768,
        4200.0,
        700.0,
        0.032,
        23034.0,
        16.0,
        72.0,
    ),
    "large": TierSpec(
        "large",
        "llama-3.1-70b-instruct",
        "NVIDIA H100 80GB HBM3",
        4,
        131072,
        16000.0,
        2200.0,
        0.028,
        81559.0,
        70.0,
        700.0,
    ),
}
TIER_ORDER = ("small", "mid", "large")
NAMESPACE = "llm-serving"
GPUS_PER_HOST = 8


@dataclass(frozen=True)
class Gpu:
    uuid: str
    index: int  # index on its host
    host: str
    replica: int  # position in Fleet.replicas


@dataclass(frozen=True)
class Replica:
    tier: str
    number: int
    spec: TierSpec

    @property
    def pod(self) -> str:
        return f"vllm-{self.tier}-{self.number}"

    @property
    def upstream(self) -> str:
        """The shim's upstream for this replica (its in-cluster service URL)."""
        return f"http://{self.pod}.{NAMESPACE}.svc:8000/v1"


@dataclass(frozen=True)
class Fleet:
    replicas: tuple[Replica, ...]
    gpus: tuple[Gpu, ...]

    def replicas_of(self, tier: str) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.tier == tier]

    def gpu_labels(self, gpu: Gpu) -> str:
        r = self.replicas[gpu.replica]
        return orjson.dumps(
            {"app": f"vllm-{r.tier}", "model": r.spec.model, "tier": r.tier},
            option=orjson.OPT_SORT_KEYS,
        ).decode()

    def serving_labels(self, replica: Replica) -> dict[str, str]:
        return {
            "engine": "0",
            "model_name": replica.spec.model,
            "namespace": NAMESPACE,
            "pod": replica.pod,
            "tier": replica.tier,
        }


def build_fleet(gpus: int = 16, *, seed: int = 42) -> Fleet:
    """Split `gpus` into tiers: half (in 4-GPU replicas) large, the rest mid/small.

    16 GPUs give the documented default: large 2 x 4 H100, mid 4 x L4, small 4 x L4.
    """
    if gpus < 6:
        raise ValueError(
            f"--gpus must be at least 6 (one 4-GPU large replica, one mid, one small), got {gpus}"
        )
    n_large = max(1, gpus // 8)
    rest = gpus - 4 * n_large
    n_mid = math.ceil(rest / 2)
    n_small = rest - n_mid
    counts = {"small": n_small, "mid": n_mid, "large": n_large}
    replicas: list[Replica] = []
    for tier in TIER_ORDER:
        replicas += [Replica(tier, k, TIERS[tier]) for k in range(counts[tier])]
    out: list[Gpu] = []
    host_fill: dict[str, int] = {}
    for ri, r in enumerate(replicas):
        family = "h100" if "H100" in r.spec.gpu_model else "l4"
        for _ in range(r.spec.tensor_parallel):
            n = host_fill.get(family, 0)
            host_fill[family] = n + 1
            host = f"gpu-{family}-{n // GPUS_PER_HOST + 1:02d}"
            digest = hashlib.sha256(f"{seed}:{host}:{n % GPUS_PER_HOST}".encode()).hexdigest()
            uuid = (
                f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
            )
            out.append(Gpu(uuid=uuid, index=n % GPUS_PER_HOST, host=host, replica=ri))
    return Fleet(tuple(replicas), tuple(out))
