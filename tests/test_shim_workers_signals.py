"""`finops shim serve` and its signals, as a service manager and a terminal send them.

The real CLI in a subprocess, a fake upstream on loopback: a SIGHUP while the shim or
its workers start (a reload right after a restart) kills nothing and still reloads;
SIGTERM refuses new connections at once while the workers drain; Ctrl-C drains quietly;
the supervisor warns once per bad save; a busy port is one error line, never after the
banner.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from finops.loopback import free_port, wait_http
from finops.shim.config import load_config
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.server import run_app_in_thread
from tests.test_shim_workers import CHAT, FINOPS, serve_on_a_busy_port

TIERS = ("small", "mid", "large")


@pytest.fixture
def upstream():
    """A fast fake upstream's URL (overrides conftest's (fake, url) one, as in test_shim_workers)."""
    f = FakeUpstream()
    f.keep_bodies = False
    h = run_app_in_thread(f)
    yield h.url
    h.stop(2)


def _wait(cond, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Shim:
    """`finops shim serve ARGS`, its stdout+stderr in a file readable while it runs."""

    def __init__(self, tmp: Path, args: list[str], **popen) -> None:
        self.path = tmp / f"out-{time.monotonic_ns()}.txt"
        self.fh = self.path.open("wb")
        self.proc = subprocess.Popen(
            [FINOPS, "shim", "serve", *args], stdout=self.fh, stderr=subprocess.STDOUT, **popen
        )

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def reloaded(self, worker: int) -> bool:
        """The worker's app took a SIGHUP (its own log line, not the supervisor's)."""
        tag = f" worker-{worker} finops.shim: SIGHUP: reloading"
        return any(tag in ln for ln in self.text().splitlines())

    def stop(self, sig: int = signal.SIGTERM) -> str:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.fh.close()
        return self.text()


def test_a_sighup_while_the_workers_start_is_a_reload_once_they_serve(tmp_path, upstream):
    """The supervisor forwarded SIGHUP to workers still importing, whose default action
    killed them (exit -1, counted as crashes at start: the supervisor stopped with 1).
    Now the reload waits until each serves, and then reaches it."""
    port = free_port()
    shim = _Shim(
        tmp_path, ["--port", str(port), "--workers", "2", "--upstream", f"small={upstream}"]
    )
    try:
        _wait(lambda: "worker 1 started" in shim.text(), what="the workers spawned")
        shim.proc.send_signal(signal.SIGHUP)  # both are still importing (a second or more)
        _wait(
            lambda: (shim.reloaded(0) and shim.reloaded(1)) or shim.proc.poll() is not None,
            what="both workers reloading",
        )
        assert shim.proc.poll() is None, shim.text()[-4000:]
        _chat_ok(port)
    finally:
        text = shim.stop()
    _stopped_cleanly(shim, text)


def test_a_sighup_to_the_whole_group_while_workers_start_kills_none(tmp_path, upstream):
    """A SIGHUP to the process group (`kill -HUP -PGID`, a closing terminal) reaches the
    workers directly: blocked from their exec until they ignore it, none dies."""
    port = free_port()
    args = ["--port", str(port), "--workers", "2", "--upstream", f"small={upstream}"]
    shim = _Shim(tmp_path, args, start_new_session=True)
    try:
        _wait(lambda: "worker 0 started" in shim.text(), what="a worker spawned")
        deadline = time.monotonic() + 60
        while not (shim.reloaded(0) and shim.reloaded(1)):  # SIGHUPs until both serve
            assert time.monotonic() < deadline, "timed out: " + shim.text()[-4000:]
            assert shim.proc.poll() is None, shim.text()[-4000:]
            os.killpg(shim.proc.pid, signal.SIGHUP)
            time.sleep(0.1)
        _chat_ok(port)
    finally:
        text = shim.stop()
    _stopped_cleanly(shim, text)
    # nor multiprocessing's resource tracker (relaunched, it printed a traceback per
    # semaphore it did not know at exit)
    assert "Traceback" not in text and "resource_tracker" not in text, text[-4000:]


def _chat_ok(port: int) -> None:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=20)
    assert r.status_code == 200


def _stopped_cleanly(shim: _Shim, text: str) -> None:
    """Exit 0 after SIGTERM, and no worker died on the way."""
    assert shim.proc.returncode == 0, text[-4000:]
    assert "exited with" not in text, text[-4000:]


def _self_sighup_on_import(
    tmp_path: Path, module: str, edit: tuple[Path, str] | None = None
) -> dict:
    """An environment in which a Python process sends itself SIGHUP as it first imports
    `module` (a sitecustomize with an audit hook): a SIGHUP at a known point of start.
    It starts with SIGHUP's default action, as from a shell (an ignored signal stays
    ignored across exec, and this test process may ignore it: `shim serve` in-process).
    `edit` (file, text): first append text to file (a deploy, then its reload), once for
    all processes (a worker imports `module` too)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    once = "True"
    if edit is not None:
        once = f"os.open({str(site / 'fired')!r}, os.O_CREAT | os.O_EXCL) >= 0"
        once = f"{once} and open({str(edit[0])!r}, 'a').write({edit[1]!r}) >= 0"
    (site / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        "sent = []\n"
        "def once():\n"
        "    try:\n"
        f"        return {once}\n"
        "    except FileExistsError:\n"
        "        return False\n"
        "def hook(event, args):\n"
        f"    if event == 'import' and args[0] == {module!r} and not sent:\n"
        "        sent.append(1)\n"
        "        if once():\n"
        "            os.kill(os.getpid(), signal.SIGHUP)\n"
        "sys.addaudithook(hook)\n"
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_shim_serve_ignores_sighup_before_the_cli_loads(tmp_path, upstream):
    """`finops shim serve` ignored SIGHUP only once its command ran, after typer and every
    command module were imported: a reload sent meanwhile killed it (status -1)."""
    env = _self_sighup_on_import(tmp_path, "typer")
    port = free_port()
    shim = _Shim(tmp_path, ["--port", str(port), "--upstream", f"small={upstream}"], env=env)
    try:
        _wait(
            lambda: shim.proc.poll() is not None or b"finops shim on" in shim.path.read_bytes(),
            what="the banner",
        )
        assert shim.proc.poll() is None, (shim.proc.returncode, shim.text()[-4000:])
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
    finally:
        text = shim.stop()
    assert shim.proc.returncode == 0, text[-4000:]
    # other commands keep SIGHUP's default action
    r = subprocess.run([FINOPS, "shim", "hash-key", "x"], env=env, capture_output=True)
    assert r.returncode == -signal.SIGHUP, r


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sighup_while_the_shim_loads_its_router_is_a_reload_once_it_serves(
    tmp_path, upstream, artifact, workers
):
    """`shim serve` ignored SIGHUP until the app (or the supervisor) took it over: a reload
    asked for while it loaded the router (seconds) was lost, and it served the config it
    had read before the deploy. Now it is recorded, and run once the shim serves."""
    conf = tmp_path / "shim.toml"
    port = free_port()
    tiers = "".join(f'[tiers.{t}]\nupstreams = ["{upstream}"]\n' for t in TIERS)
    conf.write_text(f'[server]\nport = {port}\n{tiers}[router]\npath = "{artifact}"\n')
    # the deploy and its SIGHUP as the command loads the router: after it read the config
    deploy = (conf, '[routing]\nalias = "cheapest-good"\n')
    env = _self_sighup_on_import(tmp_path, "finops.router.artifact", edit=deploy)
    shim = _Shim(tmp_path, ["--config", str(conf), "--workers", workers], env=env)
    url = f"http://127.0.0.1:{port}"

    def aliases() -> set[str]:
        return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}

    try:
        wait_http(url + "/healthz", timeout=90)
        assert (tmp_path / "site" / "fired").exists()
        _wait(
            lambda: (
                shim.proc.poll() is not None
                or shim.text().count("reloaded: router") >= int(workers)
            ),
            what="the reload (in each worker)",
        )
        for _ in range(10):  # new connections: with 2 workers, each took the reload
            assert "cheapest-good" in aliases(), shim.text()[-4000:]
    finally:
        text = shim.stop()
    _stopped_cleanly(shim, text)


def test_new_connections_are_refused_while_the_workers_drain(tmp_path):
    """After SIGTERM the supervisor kept its copy of the listening socket until the drain
    ended: the kernel queued new connections no worker would accept; they hung, then were
    reset. One process refuses them at once (a load balancer retries elsewhere)."""
    f = FakeUpstream(tokens=2000, delay_s=0.02)  # a 40 s stream keeps the drain going
    f.keep_bodies = False
    h = run_app_in_thread(f)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shim = _Shim(tmp_path, ["--port", str(port), "--workers", "2", "--upstream", f"small={h.url}"])
    streaming, stop, ended = threading.Event(), threading.Event(), threading.Event()

    def stream() -> None:
        body = {**CHAT, "stream": True, "max_tokens": 2000}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for _ in r.iter_bytes():
                    streaming.set()
                    if stop.is_set():
                        break
        finally:
            ended.set()

    t = threading.Thread(target=stream)
    try:
        wait_http(url + "/healthz", timeout=60)
        t.start()
        _wait(streaming.is_set, what="the stream flowing")
        shim.proc.send_signal(signal.SIGTERM)
        refused, deadline = False, time.monotonic() + 20
        while not refused and shim.proc.poll() is None and not ended.is_set():
            assert time.monotonic() < deadline, "new connections accepted during the drain"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                refused = True
            time.sleep(0.05)
        draining = shim.proc.poll() is None and not ended.is_set()
        assert refused and draining, "the drain ended before a new connection was refused"
    finally:
        stop.set()  # the client leaves: the drain ends
        if t.is_alive():
            t.join(60)
        text = shim.stop()
        h.stop(2)
    assert shim.proc.returncode == 0, text[-4000:]


def test_ctrl_c_drains_the_workers_without_tracebacks(tmp_path):
    """Ctrl-C sends SIGINT to the whole process group: each worker drained, then died of
    a KeyboardInterrupt (a traceback per worker, exit 1). A request in flight is answered."""
    f = FakeUpstream(tokens=4, delay_s=0.3)  # 1.2 s to answer
    h = run_app_in_thread(f)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--port", str(port), "--workers", "2", "--upstream", f"small={h.url}"]
    shim = _Shim(tmp_path, args, start_new_session=True)
    answer: list[int] = []
    try:
        wait_http(url + "/healthz", timeout=60)
        _wait(lambda: "worker-0" in shim.text() and "worker-1" in shim.text(), what="two workers")
        t = threading.Thread(
            target=lambda: answer.append(
                httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30).status_code
            )
        )
        t.start()
        _wait(lambda: f.calls > 0, what="the request upstream")
        os.killpg(shim.proc.pid, signal.SIGINT)
        t.join(60)
        shim.proc.wait(60)
    finally:
        text = shim.stop()
        h.stop(2)
    assert answer == [200]
    assert shim.proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from finops.shim.testing import train_demo_router

    return train_demo_router(tmp_path_factory.mktemp("router") / "r1", n=400, seed=1)


def test_one_bad_save_is_warned_once_after_the_router_path_changed(
    tmp_path, artifact, monkeypatch, caplog
):
    """With [server] watch, after a reload that changed [router] path, a refused file was
    re-verified and warned about at every poll: the supervisor compared the files with a
    signature taken of another config's router. Now once per save."""
    from finops.shim import workers

    monkeypatch.setattr(workers, "WATCH_POLL_S", 0.05)
    polls = []
    signature = workers.Supervisor._files_signature
    monkeypatch.setattr(
        workers.Supervisor,
        "_files_signature",
        staticmethod(lambda cfg: polls.append(1) or signature(cfg)),
    )
    bad_router = tmp_path / "bad-router"
    shutil.copytree(artifact, bad_router)
    man = json.loads((bad_router / "manifest.json").read_text())
    man["decision"]["thresholds"]["small"] = 0.01  # edited after export: refused
    (bad_router / "manifest.json").write_text(json.dumps(man))
    conf = tmp_path / "shim.toml"
    tiers = "".join(f'[tiers.{t}]\nupstreams = ["http://127.0.0.1:9"]\n' for t in TIERS)
    head = f"[server]\nport = {free_port()}\nworkers = 1\nwatch = true\n{tiers}"
    conf.write_text(f'{head}[router]\npath = "{artifact}"\n')
    sup = workers.Supervisor(load_config(conf), 1, log_level="warning")
    failure: list[BaseException] = []

    def refused() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "finops.shim.workers" and "file change" in r.getMessage()
        ]

    def polls_after(n: int) -> None:
        start = len(polls)
        _wait(lambda: len(polls) >= start + n, what=f"{n} polls")

    def drive() -> None:
        try:
            _wait(lambda: sup._procs, what="the worker")
            conf.write_text(head)  # the rule policy: a reload that changes the router path
            _wait(lambda: sup.last_good.cfg.router_path is None, what="the new config verified")
            conf.write_text(head + "this is = = broken\n")
            _wait(lambda: refused(), what="the bad save refused")
            polls_after(10)
            conf.write_text(f'{head}[router]\npath = "{bad_router}"\n')  # a bad artifact now
            _wait(lambda: len(refused()) >= 2, what="the bad router refused")
            polls_after(10)
        except BaseException as exc:
            failure.append(exc)
        finally:
            sup._stop_signal = signal.SIGTERM  # as its SIGTERM handler does: drain, return

    caplog.set_level("WARNING", logger="finops.shim.workers")
    t = threading.Thread(target=drive)
    t.start()
    status = sup.run()
    t.join(10)
    if failure:
        raise failure[0]
    assert status == 0
    warned = refused()
    assert len(warned) == 2, warned
    assert "config file" in warned[0] and "not valid TOML" in warned[0], warned
    assert "router" in warned[1] and "modified after export" in warned[1], warned


def test_a_busy_port_is_one_error_line_and_no_banner(upstream):
    """The banner came before the port was bound: `finops shim on http://...` and then
    `error: [Errno 98] ...`. Now the error alone, naming the address."""
    for workers in ("1", "2"):
        r, port = serve_on_a_busy_port(workers, upstream)
        assert r.returncode == 2, (workers, r.stderr)
        assert "finops shim on" not in r.stderr and "[Errno" not in r.stderr, r.stderr
        assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_banner_names_an_ipv6_address_in_brackets_once_it_listens(tmp_path, upstream):
    port = free_port()  # an IPv4 port number; free on ::1 too unless a rare clash
    shim = _Shim(
        tmp_path,
        ["--host", "::1", "--port", str(port), "--workers", "2", "--upstream", f"small={upstream}"],
    )
    try:
        _wait(lambda: "finops shim on" in shim.text(), what="the banner")
        assert f"finops shim on http://[::1]:{port}/v1 " in shim.text(), shim.text()
        socket.create_connection(("::1", port), timeout=10).close()  # listening already
        wait_http(f"http://[::1]:{port}/healthz", timeout=60)
    finally:
        text = shim.stop()
    assert shim.proc.returncode == 0, text[-4000:]
