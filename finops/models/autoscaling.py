"""Queue-depth autoscaling advice: a target for `vllm:num_requests_waiting`.

Why queue depth and not CPU or GPU utilization: a vLLM replica shows ~100%
GPU utilization at any batch size, while the requests waiting for a batch slot
are exactly what turns into time-to-first-token. The target comes from the
fitted service model: at the SLO-limited operating point (simulated), a
queue of q requests per replica drains at the replica's completion rate r, so
the extra wait is about q / r (Little's law). The TTFT headroom left after
prefill at that operating point, times r, is the queue a replica may hold
before it needs help. KEDA and HPA both divide the summed metric by the
current replicas (AverageValue), so the target is per replica.

maxReplicas is the busiest hour's replica need at `growth` times the observed traffic
(default 2x; `finops recommend autoscaling --growth`), never below the observed fleet;
a cap (`max_replicas`) below that need is kept and named in a note.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import yaml

from finops.costs import Period
from finops.models.queueing import simulate
from finops.models.simulate import Levers, Plan, Simulator

PROMETHEUS_DEFAULT = "http://prometheus-operated.monitoring.svc:9090"
DEFAULT_GROWTH = 2.0  # the traffic growth maxReplicas absorbs, unless told otherwise
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def object_name(tier: str) -> str:
    """`vllm-<tier>` as a valid Kubernetes object name (DNS-1123 label, <= 63 chars).

    Deterministic: lowercase, every character outside [a-z0-9-] becomes '-', runs of
    '-' collapse and the ends are trimmed ('Small_Tier.v2' -> 'vllm-small-tier-v2')."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", tier.lower())).strip("-")
    name = f"vllm-{slug}"[:63].rstrip("-")
    if not slug or not _DNS_LABEL.match(name):
        raise ValueError(f"tier {tier!r} gives no valid Kubernetes object name")
    return name


def check_namespace(namespace: str) -> None:
    """A Kubernetes namespace is a DNS-1123 label: refuse anything else up front."""
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise ValueError(
            f"--namespace {namespace!r}: expected a Kubernetes namespace (lowercase letters,"
            " digits and '-', starting and ending with a letter or digit, at most 63 chars)"
        )


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal (backslash and quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass
class TierAdvice:
    tier: str
    target_waiting: float  # per replica, as emitted (>= 0.5)
    raw_target_waiting: float  # what the headroom arithmetic gave
    min_replicas: int
    max_replicas: int
    drain_rps: float  # completions/s per replica at the operating point
    ttft_p95_no_queue_ms: float
    slo_ttft_p95_ms: float
    peak_need_replicas: int = 0  # the busiest hour's need at the advice's growth
    queue_wait_ms: float = 0.0  # how long a queue of target_waiting requests waits
    # why target_waiting cannot promise the SLO (it is a floor, not the headroom's
    # queue), also in the tier's notes; None where it can
    queue_note: str | None = None


@dataclass
class AutoscalingAdvice:
    tiers: list[TierAdvice]
    namespace: str
    prometheus: str
    fixed: Plan  # the observed week on a fixed, peak-sized fleet
    autoscaled: Plan  # the same week, replicas following the hourly need
    observed_cost_usd: float | None  # what the lake's GPUs cost (finops.costs), if available
    # per tier, what the targets cannot promise (floored targets, a raised minimum,
    # a maxReplicas below the need at `growth`)
    notes: dict[str, list[str]] = field(default_factory=dict)
    growth: float = DEFAULT_GROWTH  # the traffic growth maxReplicas is sized for
    max_replicas_cap: int | None = None  # the cap asked for (None: none)
    # what the period's data and prices leave out (Simulator.data_notes): days without
    # data, tiers whose cost is unknown (the cost comparison is then the priced tiers')
    data_notes: list[str] = field(default_factory=list)

    def table(self) -> pl.DataFrame:
        return pl.DataFrame([t.__dict__ for t in self.tiers])

    def cost_comparison(self) -> dict[str, float | None]:
        """Fixed fleet vs autoscaled over the period; an unknown amount is None (no price
        for any simulated tier's GPUs), and with some tiers unpriced the dollars are the
        priced tiers' (see `data_notes`)."""
        f, a = self.fixed.totals, self.autoscaled.totals
        fc_, ac = _known(f["cost_usd"]), _known(a["cost_usd"])
        return {
            "fixed_fleet_usd": fc_,
            "autoscaled_usd": ac,
            "saving_usd": fc_ - ac if fc_ is not None and ac is not None else None,
            "saving_pct": 100 * (1 - ac / fc_) if fc_ and ac is not None else None,
            "fixed_gpu_hours": f["gpu_hours"],
            "autoscaled_gpu_hours": a["gpu_hours"],
            "observed_cost_usd": self.observed_cost_usd,
        }

    def manifests(self) -> list[dict]:
        """One KEDA ScaledObject and one HPA (external metric) per tier.

        Object names are `object_name(tier)`; two tiers that map to one name, or a tier
        that is no valid label value (the HPA selects on `tier`), are refused by name."""
        check_namespace(self.namespace)
        seen: dict[str, str] = {}
        for t in self.tiers:
            name = object_name(t.tier)
            if name in seen:
                raise ValueError(
                    f"tiers {seen[name]!r} and {t.tier!r} both map to Kubernetes name {name!r};"
                    " rename one tier"
                )
            seen[name] = t.tier
            if len(t.tier) > 63 or not _LABEL_VALUE.match(t.tier):
                raise ValueError(
                    f"tier {t.tier!r} is not a valid Kubernetes label value (letters, digits,"
                    " '-', '_', '.', starting and ending alphanumeric, at most 63 chars); the"
                    " HPA selects on tier=<value>: relabel the tier"
                )
        docs: list[dict] = []
        for t in self.tiers:
            docs.append(keda_scaled_object(t, self.namespace, self.prometheus))
            docs.append(hpa_external(t, self.namespace))
        return docs

    def to_yaml(self) -> str:
        cap = self.max_replicas_cap
        head = (
            "# finops recommend autoscaling: scale vLLM on queue depth (vllm:num_requests_waiting)\n"
            "# Apply EITHER the KEDA ScaledObject OR the HPA of a tier, not both.\n"
            f"# maxReplicas: the busiest hour's need at {self.growth:g}x the observed traffic"
            " (--growth)"
            + (f", capped at {cap} (--max-replicas)" if cap is not None else "")
            + "\n"
        )
        return head + yaml.safe_dump_all(self.manifests(), sort_keys=False)


def _known(x: float | None) -> float | None:
    """A dollar amount, or None where it is unknown (NaN: no priced tier)."""
    return None if x is None or not math.isfinite(x) else x


def _qty(x: float) -> str:
    """Kubernetes quantity string (milli-units for fractions)."""
    return str(int(x)) if float(x).is_integer() else f"{round(x * 1000)}m"


def keda_scaled_object(t: TierAdvice, namespace: str, prometheus: str) -> dict:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": object_name(t.tier), "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"name": object_name(t.tier)},
            "minReplicaCount": t.min_replicas,
            "maxReplicaCount": t.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": prometheus,
                        "query": (
                            f"sum(vllm:num_requests_waiting{{namespace={promql_string(namespace)},"
                            f"tier={promql_string(t.tier)}}})"
                        ),
                        "threshold": f"{t.target_waiting:g}",
                    },
                }
            ],
        },
    }


def hpa_external(t: TierAdvice, namespace: str) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": object_name(t.tier),
            "namespace": namespace,
            "annotations": {
                "finops.dev/metric-source": "prometheus-adapter rule exposing "
                "vllm:num_requests_waiting as external metric vllm_num_requests_waiting"
            },
        },
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": object_name(t.tier),
            },
            "minReplicas": t.min_replicas,
            "maxReplicas": t.max_replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": "vllm_num_requests_waiting",
                            "selector": {"matchLabels": {"tier": t.tier}},
                        },
                        "target": {"type": "AverageValue", "averageValue": _qty(t.target_waiting)},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": 300},
            },
        },
    }


def validate_manifests(text: str) -> list[dict]:
    """Load YAML and check each document is a ScaledObject or HPA with the needed fields."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if not docs:
        raise ValueError("no YAML documents")
    for i, d in enumerate(docs):
        kind = d.get("kind")
        where = f"document {i + 1} ({kind})"
        if kind == "ScaledObject":
            if d.get("apiVersion") != "keda.sh/v1alpha1":
                raise ValueError(f"{where}: apiVersion must be keda.sh/v1alpha1")
            spec = d["spec"]
            trig = spec["triggers"][0]
            if trig["type"] != "prometheus" or not trig["metadata"].get("query"):
                raise ValueError(f"{where}: needs a prometheus trigger with a query")
            float(trig["metadata"]["threshold"])
            if spec["minReplicaCount"] > spec["maxReplicaCount"]:
                raise ValueError(f"{where}: minReplicaCount > maxReplicaCount")
        elif kind == "HorizontalPodAutoscaler":
            if d.get("apiVersion") != "autoscaling/v2":
                raise ValueError(f"{where}: apiVersion must be autoscaling/v2")
            spec = d["spec"]
            m = spec["metrics"][0]
            if m["type"] != "External" or m["external"]["target"]["type"] != "AverageValue":
                raise ValueError(f"{where}: needs an External metric with an AverageValue target")
            if spec["minReplicas"] > spec["maxReplicas"]:
                raise ValueError(f"{where}: minReplicas > maxReplicas")
        else:
            raise ValueError(f"{where}: unexpected kind")
        meta = d.get("metadata", {})
        if not meta.get("name"):
            raise ValueError(f"{where}: metadata.name missing")
        names = [("metadata.name", meta["name"]), ("metadata.namespace", meta.get("namespace"))]
        names.append(("spec.scaleTargetRef.name", spec.get("scaleTargetRef", {}).get("name")))
        for field_, value in names:
            if value is not None and (len(str(value)) > 63 or not _DNS_LABEL.match(str(value))):
                raise ValueError(
                    f"{where}: {field_} {value!r} is not a valid Kubernetes name (DNS-1123 label)"
                )
    return docs


def recommend(
    sim: Simulator,
    *,
    namespace: str = "llm-serving",
    prometheus: str = PROMETHEUS_DEFAULT,
    growth: float = DEFAULT_GROWTH,
    max_replicas: int | None = None,
    observed_cost_usd: float | None = None,
    max_growth: float | None = None,
) -> AutoscalingAdvice:
    """Per-tier queue-depth targets and the period's cost with vs without autoscaling.

    `growth`: the traffic growth the manifests must absorb: maxReplicas is at least the
    busiest hour's replica need at `growth` times the period's traffic (what `finops
    simulate --growth G --autoscale` plans as its peak), and never below the observed
    fleet. `max_replicas`: a cap on maxReplicas; where it is below that need, the tier's
    notes say so. `max_growth`: the former name of `growth`.
    """
    check_namespace(namespace)
    if max_growth is not None:
        growth = max_growth
    if not (growth > 0 and math.isfinite(growth)):
        raise ValueError(f"growth must be a positive factor (e.g. 5 for 5x), got {growth}")
    if max_replicas is not None and max_replicas < 1:
        raise ValueError(f"max_replicas must be at least 1, got {max_replicas}")
    fixed = sim.plan(1.0, Levers(autoscale=False))
    auto = sim.plan(1.0, Levers(autoscale=True))
    peak = sim.plan(growth, Levers(autoscale=False)) if growth > 1 else fixed
    advice = []
    notes: dict[str, list[str]] = {}
    for tier, p in sim.trace.profiles.items():
        lv = Levers()
        said: list[str] = []  # this tier's advice notes
        curve = sim.curve(tier, lv)
        prompt, output = sim._sizes(p, lv)
        svc = p.service(lv, prompt, output)
        # the fewest replicas that meet the SLO at some load, at their SLO-limited rate: a
        # count whose capacity is 0 (p95 TTFT over the SLO even idle) is never a rate
        c0 = curve.min_feasible()
        rate = sim.capacity(tier, lv, c0)  # checked by simulating c0 directly
        while rate <= 0 and c0 < int(curve.c[-1]):
            c0 += 1
            rate = sim.capacity(tier, lv, c0)
        if rate <= 0:
            raise ValueError(
                f"tier {tier!r}: no replica count up to {c0} meets p95 TTFT <= "
                f"{sim.slo_for(tier):g} ms at any simulated load"
            )
        if c0 > 1:
            said.append(
                f"p95 TTFT <= {sim.slo_for(tier):g} ms is met only with {c0} or more replicas "
                "behind one queue (fewer miss it even unloaded): minimum replicas raised to "
                f"{c0}",
            )
        # the operating point is simulated on the draws its capacity was checked on
        # (several pooled runs: one short run's p95 near the SLO is noise)
        waits, prefill, done, span = [], [], 0, 0.0
        for base, p_tok, o_tok in sim._probe(tier, lv, c0).draws:
            res = simulate(base / rate, o_tok, svc, replicas=c0, prompt_tokens=p_tok)
            k = len(base) // 5  # warm-up
            waits.append(res.wait_s[k:])
            prefill.append((res.ttft_s - res.wait_s)[k:])
            done += len(base) - k
            span += max(res.arrival_s[-1] - res.arrival_s[k], 1e-9)
        wait, pre = np.concatenate(waits), np.concatenate(prefill)
        no_queue = wait <= 1e-12
        prefill_p95 = float(np.quantile(pre[no_queue] if no_queue.any() else pre, 0.95))
        drain = done / span / c0  # completions/s per replica
        slo_ms = sim.slo_for(tier)
        raw = max(slo_ms / 1000.0 - prefill_p95, 0.0) * drain
        target = max(round(raw * 2) / 2, 0.5)
        wait_ms = 1000 * target / drain
        queue_note = None  # why the target cannot promise the SLO, if it cannot
        if raw <= 0:
            queue_note = (
                f"at its SLO-limited operating point ({rate:.3g} req/s on {c0} replica"
                f"{'s' if c0 > 1 else ''}) the p95 TTFT of requests that never queued is "
                f"{1000 * prefill_p95:.0f} ms, over the {slo_ms:.0f} ms SLO: the operating "
                "point misses the SLO even with no queue (prefill in a busy batch, not "
                "queueing, sets TTFT), so no queue depth is derived; target_waiting "
                f"{target:g} is the floor, and replicas must be added before a queue forms"
            )
        elif target > raw and round(raw * 2) == 0:
            # floored, not rounded: the SLO leaves room for far less than the target's
            # queue, so scale-out comes after the SLO is already missed
            budget_ms = 1000 * raw / drain
            queue_note = (
                f"the SLO leaves {budget_ms:.0f} ms of queueing after the p95 prefill "
                f"({1000 * prefill_p95:.0f} of {slo_ms:.0f} ms), a queue of {raw:.2g} "
                f"waiting requests per replica; target_waiting is floored at {target:g}, "
                f"whose queue waits about {wait_ms:.0f} ms, so p95 TTFT "
                "can exceed the SLO before the autoscaler adds a replica: scale ahead of "
                "demand (min_replicas for the busy hours) or relax the SLO"
            )
        if queue_note is not None:
            said.append(queue_note)
        for text in said:  # on the trace too, with the simulation's own notes
            _note(p.notes, text)
        if said:
            notes[tier] = said
        hourly = auto.hourly.filter(pl.col("tier") == tier)
        at_peak = peak.hourly.filter(pl.col("tier") == tier)
        min_reps = max(c0, int(hourly["replicas"].min()))
        # the busiest hour's need at `growth` (at 1x where growth < 1); the fixed plan's
        # replicas add the observed fleet, which the autoscaler may always return to
        need = max(int(at_peak["needed"].max()), int(hourly["replicas"].max()), 1)
        max_reps = max(int(at_peak["replicas"].max()), need, min_reps)
        if max_replicas is not None and max_replicas < max_reps:
            max_reps = max(max_replicas, min_reps)
        if max_replicas is not None and max_replicas < min_reps:
            said.append(
                f"--max-replicas {max_replicas} is below the minimum of {min_reps} replicas"
                " (the fewest that meet the SLO, or the quietest hour's need): maxReplicas is"
                f" {min_reps}"
            )
            notes[tier] = said
        if max_reps < need:
            capped = (
                f" (capped by --max-replicas {max_replicas}"
                + (f", raised to the minimum of {min_reps}" if max_replicas < min_reps else "")
                + ")"
                if max_replicas is not None
                else ""
            )
            said.append(
                f"maxReplicas {max_reps}{capped} is below the {need} replicas the busiest hour"
                f" needs at {max(growth, 1.0):g}x the observed traffic"
                f" ({float(at_peak['rate_rps'].max()):.3g} req/s) within p95 TTFT <="
                f" {slo_ms:.0f} ms: {max_reps} replica{'s serve' if max_reps > 1 else ' serves'}"
                f" {sim.capacity(tier, lv, max_reps):.3g} req/s, so in such hours the"
                " autoscaler stops short of the need and p95 TTFT exceeds the SLO",
            )
            notes[tier] = said  # on the advice only: it depends on growth and the cap
        advice.append(
            TierAdvice(
                tier=tier,
                target_waiting=target,
                raw_target_waiting=raw,
                min_replicas=min_reps,
                max_replicas=max_reps,
                drain_rps=drain,
                ttft_p95_no_queue_ms=1000 * prefill_p95,
                slo_ttft_p95_ms=slo_ms,
                peak_need_replicas=need,
                queue_wait_ms=wait_ms,
                queue_note=queue_note,
            )
        )
    return AutoscalingAdvice(
        advice, namespace, prometheus, fixed, auto, observed_cost_usd, notes=notes,
        growth=growth, max_replicas_cap=max_replicas, data_notes=sim.data_notes(),
    )  # fmt: skip


def _note(notes: list[str], text: str) -> None:
    """Add a note to a tier's notes once: `recommend` may run again on the same trace
    (a notebook cell re-run, the CLI after a plan), and the notes live on the trace."""
    if text not in notes:
        notes.append(text)


def observed_week_cost(db, per: Period | None = None) -> float | None:
    """The GPU bill of `per` (the simulated period; None: all data) via finops.costs when
    that module can answer, else None."""
    try:
        import finops.costs as fc

        tot = fc.totals(db, per=per)
        return float(tot["gpu_cost"]) if tot.get("gpu_cost") is not None else None
    except Exception:  # costs marts missing or no prices for a GPU: report without it
        return None


def is_finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
