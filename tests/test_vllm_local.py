"""pin_engine: vLLM's engine processes go to their own CPUs, everything else to the rest.

A real vLLM server takes minutes to start, so the process group here is a stand-in
with the same shape: a parent (the HTTP frontend) and a child that names itself
the way vLLM's engine does (`VLLM::EngineCore`), each with an extra thread.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finops.vllm_local import VLLMServer, _group_threads, pin_engine

CHILD = textwrap.dedent(
    """
    import threading, time
    with open("/proc/self/comm", "w") as f:
        f.write("VLLM::EngineCore")
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    print("ready", flush=True)
    time.sleep(60)
    """
)
PARENT = textwrap.dedent(
    f"""
    import subprocess, sys, threading, time
    child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def fake_server(tmp_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child_pid = int(proc.stdout.readline())
    time.sleep(0.2)  # let the parent's extra thread start
    server = VLLMServer(port=1, names=("small",), process=proc, log_path=tmp_path / "log")
    yield server, child_pid
    server.kill()


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def test_group_threads_finds_every_thread_of_the_group_and_no_other(fake_server):
    server, child = fake_server
    found = _group_threads(server.process.pid)
    by_tid = dict(found)
    assert set(_threads(server.process.pid)) | set(_threads(child)) == set(by_tid)
    assert len(_threads(child)) == 2 and len(_threads(server.process.pid)) >= 2
    # the kernel keeps 15 characters of a process name, as it does for vLLM's own
    assert {by_tid[t] for t in _threads(child)} == {"VLLM::EngineCor"}
    assert os.getpid() not in by_tid  # the test itself is in another group


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to split")
def test_pin_engine_splits_engine_and_frontend(fake_server):
    server, child = fake_server
    cpus = sorted(os.sched_getaffinity(0))
    engine = {cpus[0]}
    frontend = pin_engine(server, engine)
    assert frontend == set(cpus[1:])
    for tid in _threads(child):
        assert os.sched_getaffinity(tid) == engine
    for tid in _threads(server.process.pid):
        assert os.sched_getaffinity(tid) == frontend
    assert os.sched_getaffinity(0) == set(cpus)  # the caller is left alone


def test_pin_engine_refuses_a_layout_with_no_cpu_left_for_the_frontend(fake_server):
    server, _ = fake_server
    allowed = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="strict subset"):
        pin_engine(server, set(allowed))
    with pytest.raises(ValueError, match="strict subset"):
        pin_engine(server, {max(allowed) + 1000})


def test_pin_engine_needs_a_server_it_started(tmp_path):
    attached = VLLMServer(port=1, names=("small",), process=None, log_path=tmp_path / "log")
    with pytest.raises(ValueError, match="only a server this process started"):
        pin_engine(attached, {0})
