"""Queue-depth autoscaling advice: targets, manifests that load, last week's cost."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import finops
from finops.cli import app
from finops.lake import Lake
from finops.models.autoscaling import recommend, validate_manifests
from finops.models.simulate import Simulator
from finops.models.synthetic import SyntheticSpec, write_synthetic_lake


@pytest.fixture(scope="module")
def syn_lake(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("auto") / "lake")
    write_synthetic_lake(lake, SyntheticSpec(days=2, scrape_s=180))
    return lake.path


@pytest.fixture(scope="module")
def advice(syn_lake):
    return recommend(Simulator.from_lake(finops.connect(syn_lake)))


def test_targets_per_tier(advice) -> None:
    t = {a.tier: a for a in advice.tiers}
    assert set(t) == {"small", "large"}
    for a in t.values():
        assert a.target_waiting >= 0.5
        assert 1 <= a.min_replicas <= a.max_replicas
        assert a.drain_rps > 0
        assert a.ttft_p95_no_queue_ms < a.slo_ttft_p95_ms or a.raw_target_waiting == 0


def test_manifests_load_and_carry_the_target(advice) -> None:
    docs = validate_manifests(advice.to_yaml())
    kinds = [(d["apiVersion"], d["kind"]) for d in docs]
    assert kinds.count(("keda.sh/v1alpha1", "ScaledObject")) == 2
    assert kinds.count(("autoscaling/v2", "HorizontalPodAutoscaler")) == 2
    so = next(
        d for d in docs if d["kind"] == "ScaledObject" and d["metadata"]["name"] == "vllm-small"
    )
    trig = so["spec"]["triggers"][0]
    assert trig["type"] == "prometheus"
    assert "vllm:num_requests_waiting" in trig["metadata"]["query"]
    target = next(a for a in advice.tiers if a.tier == "small").target_waiting
    assert float(trig["metadata"]["threshold"]) == target
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    m = hpa["spec"]["metrics"][0]["external"]
    assert m["target"]["type"] == "AverageValue"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_validate_rejects_broken_manifests() -> None:
    with pytest.raises(ValueError, match="no YAML documents"):
        validate_manifests("")
    bad = yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})
    with pytest.raises(ValueError, match="unexpected kind"):
        validate_manifests(bad)
    so = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "minReplicaCount": 3,
            "maxReplicaCount": 1,
            "triggers": [{"type": "prometheus", "metadata": {"query": "q", "threshold": "1"}}],
        },
    }
    with pytest.raises(ValueError, match="minReplicaCount > maxReplicaCount"):
        validate_manifests(yaml.safe_dump(so))


def test_autoscaling_costs_no_more_than_fixed(advice) -> None:
    c = advice.cost_comparison()
    assert c["autoscaled_usd"] <= c["fixed_fleet_usd"]
    assert c["autoscaled_gpu_hours"] <= c["fixed_gpu_hours"]
    assert c["saving_usd"] == pytest.approx(c["fixed_fleet_usd"] - c["autoscaled_usd"])


def test_recommend_cli(syn_lake, tmp_path) -> None:
    r = CliRunner().invoke(
        app, ["recommend", "autoscaling", "--lake", str(syn_lake), "--format", "yaml"]
    )
    assert r.exit_code == 0, r.output
    docs = validate_manifests(r.stdout)  # notes go to stderr: stdout is the YAML alone
    assert len(docs) == 4
    r = CliRunner().invoke(app, ["recommend", "autoscaling", "--lake", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no lake here" in r.output


def test_tier_names_become_valid_kubernetes_names(advice) -> None:
    """Object names are DNS-1123 (sanitized deterministically), PromQL label values are
    escaped, and what Kubernetes cannot take is refused naming the tier."""
    import dataclasses

    from finops.models.autoscaling import object_name, promql_string

    assert object_name("Small_Tier.v2") == "vllm-small-tier-v2"
    assert promql_string('a"b\\c') == '"a\\"b\\\\c"'
    odd = [dataclasses.replace(advice.tiers[0], tier="Small_Tier.v2")]
    docs = validate_manifests(dataclasses.replace(advice, tiers=odd).to_yaml())
    assert {d["metadata"]["name"] for d in docs} == {"vllm-small-tier-v2"}
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    assert 'tier="Small_Tier.v2"' in so["spec"]["triggers"][0]["metadata"]["query"]
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"] == {
        "tier": "Small_Tier.v2"
    }
    quoted = [dataclasses.replace(advice.tiers[0], tier='large "x"')]
    with pytest.raises(ValueError, match="tier 'large \"x\"' is not a valid Kubernetes label"):
        dataclasses.replace(advice, tiers=quoted).to_yaml()
    clash = [dataclasses.replace(advice.tiers[0], tier=t) for t in ("a_b", "a.b")]
    with pytest.raises(ValueError, match=r"tiers 'a_b' and 'a\.b' both map to .*'vllm-a-b'"):
        dataclasses.replace(advice, tiers=clash).to_yaml()
    with pytest.raises(ValueError, match="--namespace 'Bad_NS'"):
        dataclasses.replace(advice, namespace="Bad_NS").to_yaml()
    bad = advice.to_yaml().replace("name: vllm-small", "name: vllm-Small_x", 1)
    with pytest.raises(ValueError, match=r"metadata\.name 'vllm-Small_x' is not a valid"):
        validate_manifests(bad)


def test_recommend_cli_refuses_bad_namespace(syn_lake) -> None:
    r = CliRunner().invoke(
        app, ["recommend", "autoscaling", "--lake", str(syn_lake), "--namespace", "a b"]
    )
    assert r.exit_code == 2 and "error: --namespace 'a b'" in r.output
    assert "Traceback" not in r.output


def test_a_replica_count_that_misses_the_slo_idle_is_never_a_rate(syn_lake) -> None:
    """When one replica misses the SLO even unloaded but 4 meet it, the advice starts at 4
    replicas instead of dividing by a zero rate."""
    from finops.models.simulate import CapacityCurve, Levers

    sim = Simulator.from_lake(finops.connect(syn_lake), slo_ttft_p95_ms=1000)
    real = sim.curve("small", Levers())
    sim._curves[("small", None, None)] = CapacityCurve(
        real.c, np.concatenate([[0.0], real.per_replica[1:]])
    )
    adv = {a.tier: a for a in recommend(sim).tiers}
    assert adv["small"].min_replicas >= 4 and adv["small"].drain_rps > 0
    assert any("minimum replicas raised to 4" in n for n in sim.trace.profiles["small"].notes)
    curve = CapacityCurve(np.array([1.0, 4.0, 16.0]), np.array([0.0, 0.5, 0.6]))
    assert curve.replicas_for(0.1) == 4  # 2 replicas were never shown to meet the SLO
