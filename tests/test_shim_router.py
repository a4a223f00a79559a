"""The trained router serving live in the shim, hot reload (call, file watch, SIGHUP), exploration.

The artifact is trained here through finops.router's public API (pipeline +
exporter) on the demo labeled set, so these tests use the same verification
path as production: `load_router` checks hashes, schema and probe rows.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from finops.loopback import free_port, wait_http
from finops.shim import from_flags, serve_in_thread
from finops.shim.config import RuleRouterConfig
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.policy import Router, RulePolicy
from finops.shim.server import run_app_in_thread
from finops.shim.testing import train_demo_router

TIERS = ["small", "mid", "large"]
CHAT = {
    "model": "auto",
    "messages": [{"role": "user", "content": "Translate to French: hello"}],
    "max_tokens": 3,
}


def train_tiny_router(out: Path, *, n: int = 600, seed: int = 1) -> Path:
    return train_demo_router(out, n=n, seed=seed)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("routers")
    return train_tiny_router(d / "r1", seed=1), train_tiny_router(d / "r2", seed=2)


def _records(log_dir: Path, n: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        out = []
        for p in sorted(log_dir.glob("requests-*.jsonl*")):
            out += [orjson.loads(x) for x in p.read_bytes().splitlines()]
        if len(out) >= n or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


def test_trained_router_routes_live_and_is_logged(tmp_path, artifacts, upstream):
    from finops.router.artifact import load_router

    f, url = upstream
    r1, _ = artifacts
    version = load_router(r1).version
    cfg = from_flags([f"{t}={url}" for t in TIERS], router=r1, log_dir=tmp_path / "log")
    prompts = [
        ("translate", "Translate to French: the meeting moved to Tuesday."),
        (
            "code-complete",
            "Refactor this module to remove global state, step by step:\n"
            + "def f(x):\n    global y\n    return x + y\n" * 30,
        ),
        ("summarize", "Summarize this support ticket and draft a reply. " * 40),
    ]
    expected = {}
    with serve_in_thread(cfg) as h:
        router = h.shim.router
        for feat, text in prompts:
            body = {**CHAT, "messages": [{"role": "user", "content": text}]}
            r = httpx.post(h.base_url + "/chat/completions", json=body, headers={"x-feature": feat})
            assert r.status_code == 200
            d = router.policy.route(body, feature=feat, tenant="default")
            expected[feat] = d
            assert r.headers["x-finops-tier"] == d.tier
            assert f.bodies[-1]["model"] == d.tier
        m = httpx.get(h.url + "/metrics").text
        assert f'finops_shim_router_info{{router_version="{version}"}} 1.0' in m
        assert "finops_shim_router_score_bucket" in m
        recs = _records(tmp_path / "log", 3)
    for rec in recs:
        d = expected[rec["feature"]]
        assert rec["router_version"] == version
        assert rec["tier"] == rec["routed_tier"] == d.tier
        assert rec["router_score"] == pytest.approx(d.score)
        assert rec["route_propensity"] == 1.0


def test_hot_reload_swaps_router_refuses_tampered_one(tmp_path, artifacts, upstream):
    import shutil

    from finops.router.artifact import load_router

    _, url = upstream
    r1, r2 = artifacts
    live = tmp_path / "router"
    shutil.copytree(r1, live)
    cfg = from_flags([f"{t}={url}" for t in TIERS], router=live, log_dir=tmp_path / "log")
    v1, v2 = load_router(r1).version, load_router(r2).version
    assert v1 != v2
    with serve_in_thread(cfg) as h:
        # tamper: the manifest no longer matches the model file -> refused, v1 keeps serving
        man = json.loads((live / "manifest.json").read_text())
        man["decision"]["thresholds"]["small"] = 0.01
        (live / "manifest.json").write_text(json.dumps(man))
        ok, msg = h.shim.reload()
        assert not ok and "refused" in msg
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
        assert r.status_code == 200 and h.shim.router.version == v1
        # a valid new artifact is picked up
        shutil.rmtree(live)
        shutil.copytree(r2, live)
        ok, msg = h.shim.reload()
        assert ok, msg
        assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
        m = httpx.get(h.url + "/metrics").text
        assert f'finops_shim_router_info{{router_version="{v2}"}} 1.0' in m
        assert f'router_version="{v1}"}} 1.0' not in m.split("finops_shim_router_info")[-1]
        recs = _records(tmp_path / "log", 2)
    assert [r["router_version"] for r in recs] == [v1, v2]


def test_reload_keeps_in_flight_streams(tmp_path, artifacts):
    f = FakeUpstream("slow", tokens=30, delay_s=0.03)
    uh = run_app_in_thread(f)
    r1, r2 = artifacts
    try:
        cfg = from_flags([f"{t}={uh.url}" for t in TIERS], router=r1, log_dir=tmp_path / "log")
        with (
            serve_in_thread(cfg) as h,
            httpx.stream(
                "POST",
                h.base_url + "/chat/completions",
                json={**CHAT, "stream": True, "max_tokens": 30},
            ) as r,
        ):
            it = r.iter_bytes()
            next(it)
            h.shim.cfg = dataclasses.replace(h.shim.cfg, router_path=r2)
            ok, _ = h.shim.reload()
            assert ok
            rest = b"".join(it)
            assert rest.endswith(b"data: [DONE]\n\n") and b'"error"' not in rest
    finally:
        uh.stop(2)


def test_sighup_reloads_cli_server_and_bad_artifact_is_refused(tmp_path, artifacts, upstream):
    """`finops shim serve --config` in a subprocess; SIGHUP after editing the config."""
    _, url = upstream
    r1, _ = artifacts
    port = free_port()
    conf = tmp_path / "shim.toml"
    body = "\n".join(f'[tiers.{t}]\nupstreams = ["{url}"]' for t in TIERS)
    conf.write_text(f'[server]\nport = {port}\n{body}\n[router]\npath = "{r1}"\n')
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "finops"),
            "shim",
            "serve",
            "--config",
            str(conf),
            "--log",
            str(tmp_path / "log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base)
        assert httpx.post(base + "/v1/chat/completions", json=CHAT).status_code == 200
        conf.write_text(
            f'[server]\nport = {port}\n{body}\n[routing]\nalias = "cheapest-good"\n[router]\npath = "{r1}"\n'
        )
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ids = [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]
            if "cheapest-good" in ids:
                break
            time.sleep(0.1)
        assert "cheapest-good" in ids
        # a broken artifact path: refused, the server keeps answering with the old router
        conf.write_text(
            f'[server]\nport = {port}\n{body}\n[router]\npath = "{tmp_path / "missing"}"\n'
        )
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        r = httpx.post(base + "/v1/chat/completions", json={**CHAT, "model": "cheapest-good"})
        assert r.status_code == 200
        assert "refused" in httpx.get(base + "/readyz").json()["last_reload_error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    text = out.decode()
    assert "AUTH IS OFF" in text
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM)
    assert proc.returncode in (0, -signal.SIGTERM), text[-2000:]
    assert "Application shutdown complete" in text
    recs = _records(tmp_path / "log", 2)
    assert len(recs) == 2  # the two completions (GET /v1/models is not a billable request)
    assert not list((tmp_path / "log").glob("*.open")), "shutdown closes (and fsyncs) the log file"


def test_cli_refuses_bad_router_at_startup(tmp_path):
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "finops"),
            "shim",
            "serve",
            "--upstream",
            "small=http://127.0.0.1:9",
            "--router",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"error: --router: {tmp_path}: no manifest.json" in p.stderr


def test_exploration_propensities_are_correct():
    pol = RulePolicy(TIERS, RuleRouterConfig())
    r = Router(pol, TIERS, exploration_rate=0.3, seed=7)
    counts = {t: 0 for t in TIERS}
    props = {}
    n = 6000
    for _ in range(n):
        d = r.route({"messages": [{"role": "user", "content": "hi"}]}, "f", "t")
        counts[d.tier] += 1
        props[d.tier] = d.propensity
    assert props["small"] == pytest.approx(0.7 + 0.1) and props["mid"] == pytest.approx(0.1)
    # the logged propensities match the observed frequencies
    for t in TIERS:
        assert counts[t] / n == pytest.approx(props[t], abs=0.02)


def test_rule_policy_is_a_real_policy():
    pol = RulePolicy(
        TIERS,
        RuleRouterConfig(small_max_tokens=50, mid_max_tokens=200, features={"classify": "small"}),
    )
    short = {"messages": [{"role": "user", "content": "hi"}]}
    medium = {"messages": [{"role": "user", "content": "word " * 100}]}
    long = {"messages": [{"role": "user", "content": "word " * 400}]}
    assert pol.route(short).tier == "small"
    assert pol.route(medium).tier == "mid"
    assert pol.route(long).tier == "large"
    assert pol.route(long, feature="classify").tier == "small"
    assert pol.route({**short, "tools": [{"type": "function"}]}).tier == "mid"
    assert (
        pol.route({"messages": [{"role": "user", "content": "fix ```def f(): pass```"}]}).tier
        == "mid"
    )
    assert pol.route(short).score < pol.route(long).score
    # code in list-of-parts content and in completions prompts lifts the tier too
    parts = [{"type": "text", "text": "why does"}, {"type": "text", "text": "def f(): pass"}]
    assert pol.route({"messages": [{"role": "user", "content": parts}]}).tier == "mid"
    assert pol.route({"prompt": ["fix this", "import os"]}).tier == "mid"
    assert pol.route({"prompt": "fix this: SELECT * FROM t"}).tier == "mid"
    assert pol.route({"prompt": ["hello", "there"]}).tier == "small"


def _wait_version(h, version: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while h.shim.router.version != version and time.monotonic() < deadline:
        time.sleep(0.1)
    return h.shim.router.version


def test_file_watch_follows_swapped_in_artifact_folders(tmp_path, artifacts, upstream):
    """Deploys that swap the artifact rather than edit it: a folder renamed in (twice:
    the first swap replaced the folder the watch was on), a symlink re-pointed, and a
    bad artifact swapped in (refused; the last good one keeps serving)."""
    import os
    import shutil

    from finops.router.artifact import load_router

    _, url = upstream
    r1, r2 = artifacts
    v1, v2 = load_router(r1).version, load_router(r2).version

    def swap_folder(live: Path, src: Path, name: str) -> None:
        staged = tmp_path / name
        shutil.copytree(src, staged)
        os.rename(live, tmp_path / f"{name}-old")
        os.rename(staged, live)

    def swap_link(link: Path, src: Path, name: str, tamper: bool = False) -> None:
        release = tmp_path / "releases" / name
        shutil.copytree(src, release)
        if tamper:  # the manifest edited after export: the artifact must be refused
            man = json.loads((release / "manifest.json").read_text())
            man["decision"]["thresholds"]["small"] = 0.01
            (release / "manifest.json").write_text(json.dumps(man))
        tmp = tmp_path / f"{name}.link"
        tmp.symlink_to(release)
        os.replace(tmp, link)  # atomic, as `ln -sfn` is not

    live = tmp_path / "router"
    shutil.copytree(r1, live)
    cfg = dataclasses.replace(
        from_flags([f"{t}={url}" for t in TIERS], router=live, log_dir=tmp_path / "log"),
        watch=True,
    )
    with serve_in_thread(cfg) as h:
        swap_folder(live, r2, "stage-a")
        assert _wait_version(h, v2) == v2
        swap_folder(live, r1, "stage-b")
        assert _wait_version(h, v1) == v1

    link = tmp_path / "current"
    swap_link(link, r1, "v1")
    cfg = dataclasses.replace(cfg, router_path=link)
    with serve_in_thread(cfg) as h:
        assert h.shim.router.version == v1
        swap_link(link, r2, "v2")
        assert _wait_version(h, v2) == v2
        swap_link(link, r1, "v3-bad", tamper=True)
        deadline = time.monotonic() + 15
        while h.shim.last_reload_error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "manifest" in (h.shim.last_reload_error or ""), h.shim.last_reload_error
        assert h.shim.router.version == v2
        assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200


def test_a_router_trained_for_other_model_names_is_said_at_load(tmp_path, caplog):
    """The artifact records which model each tier was trained for (`--upstream`); a shim
    serving that tier under another model name says so, naming the flag that sets it."""
    from finops.shim.app import build_router

    art = train_demo_router(
        tmp_path / "r",
        n=400,
        upstream_models={"small": "small", "mid": "mid", "large": "llama-70b"},
    )
    ups = [f"{t}=http://127.0.0.1:9" for t in TIERS]
    with caplog.at_level("WARNING", logger="finops.shim"):
        build_router(from_flags(ups, router=art, log_dir=tmp_path / "log"))
    said = [r.getMessage() for r in caplog.records if "was trained with" in r.getMessage()]
    assert len(said) == 1 and "'llama-70b'" in said[0] and "--model large=NAME" in said[0]
    caplog.clear()
    # `shim serve` checks the router before binding and the app loads it again: said once
    with caplog.at_level("WARNING", logger="finops.shim"):
        build_router(from_flags(ups, router=art, log_dir=tmp_path / "log"))
    assert not [r for r in caplog.records if "was trained with" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="finops.shim"):
        build_router(
            from_flags(ups, router=art, log_dir=tmp_path / "log", models=["large=llama-70b"])
        )
    assert not [r for r in caplog.records if "was trained with" in r.getMessage()]
