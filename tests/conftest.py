"""Shared fixtures: temporary lakes and the real vLLM CPU server.

The vLLM fixtures start `python -m vllm.entrypoints.openai.api_server` from
`.venv-vllm` (installed by `make vllm-env` on first use) with a tiny random
model. Where vLLM cannot be installed they skip with the reason, except under
CI=true, where they fail: CI must run them. Set FINOPS_VLLM_URL (and
FINOPS_VLLM_URL_2) to reuse servers you already started
(`python -m finops.vllm_local 18000`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from finops.lake import Lake
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.server import run_app_in_thread
from finops.vllm_local import VLLMServer, VLLMUnavailable, attach, start

ARTIFACTS = Path(__file__).parent / "artifacts"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _vllm(tmp_path_factory: pytest.TempPathFactory, env_var: str) -> Iterator[VLLMServer]:
    url = os.environ.get(env_var)
    if url:
        yield attach(url)
        return
    try:
        server = start(log_dir=tmp_path_factory.mktemp("vllm-logs"))
    except VLLMUnavailable as exc:
        if _in_ci():
            pytest.fail(f"CI=true: the real vLLM server must run here, but: {exc}")
        pytest.skip(f"vLLM CPU server unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A real vLLM server serving the tiny model as `small`, `mid` and `large`."""
    yield from _vllm(tmp_path_factory, "FINOPS_VLLM_URL")


@pytest.fixture(scope="session")
def vllm_server_2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A second, independent vLLM server (for fallback and failover tests)."""
    yield from _vllm(tmp_path_factory, "FINOPS_VLLM_URL_2")


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    """An empty lake in a temporary folder (real Parquet files on disk).

    The folder exists, as after `finops collect` or `ingest` started: `finops.connect` on
    a folder that does not exist is an error, not an empty lake."""
    (tmp_path / "lake").mkdir()
    return Lake(tmp_path / "lake")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep what a person may want to look at (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def demo_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated demo lake (2 days from 2026-11-16, 16 GPUs, 5% of the request volume).

    Shared by the whole session: treat it as read-only (copy it to change it).
    Full-rate GPU and vLLM telemetry, one vLLM restart on day 2, one incident.
    """
    from finops.demo import generate

    path = tmp_path_factory.mktemp("demo") / "lake"
    generate(path, days=2, seed=42, gpus=16, scale=0.05)
    return path


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """A fake OpenAI-compatible upstream on a loopback port: (the fake, its root URL)."""
    f = FakeUpstream()
    h = run_app_in_thread(f)
    yield f, h.url
    h.stop(2)


@pytest.fixture
def fakes():
    """A factory of fake upstreams on loopback: `f, url = fakes(mode, **kw)`; all stopped after."""
    made = []

    def make(mode: str = "ok", **kw):
        f = FakeUpstream(mode, **kw)
        h = run_app_in_thread(f)
        made.append(h)
        return f, h.url

    yield make
    for h in made:
        h.stop(2)
