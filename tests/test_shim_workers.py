"""`finops shim serve --workers N`: several shim processes on one port, as users run it.

The real CLI in a subprocess, a fake upstream on loopback, plain HTTP clients: the
workers share the traffic, /metrics adds them up, SIGHUP reloads each, a killed
worker is replaced (and its request log closed out), SIGTERM drains them all with
every request logged, and a worker that cannot start stops the supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from finops.loopback import free_port, wait_http
from finops.shim.config import from_flags
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.server import run_app_in_thread
from finops.shim.workers import Supervisor

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FINOPS = str(Path(sys.executable).parent / "finops")


@pytest.fixture
def upstream():
    f = FakeUpstream()
    f.keep_bodies = False
    h = run_app_in_thread(f)
    yield h.url
    h.stop(2)


def serve_on_a_busy_port(workers: str, upstream: str) -> tuple[subprocess.CompletedProcess, int]:
    """`finops shim serve` on a port another socket listens on: its run, and the port."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [
                *(FINOPS, "shim", "serve", "--workers", workers, "--port", str(port)),
                *("--upstream", f"small={upstream}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return r, port


def _workers(master: int) -> set[int]:
    """Pids of the supervisor's worker processes (multiprocessing spawn children)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == master and b"spawn_main" in cmd:
            out.add(int(d.name))
    return out


def _metric(text: str, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name) and all(w in line for w in want)
    )


def _burst(url: str, n: int) -> list[int]:
    """n requests from 16 threads, each on a new connection (so the kernel spreads them)."""

    def one(_: int) -> int:
        return httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=20).status_code

    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, range(n)))


def _wait(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_workers_share_the_port_reload_restart_and_drain(tmp_path, upstream):
    port = free_port()
    log_dir = tmp_path / "log"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [
            *(FINOPS, "shim", "serve", "--port", str(port), "--workers", "2"),
            *("--log", str(log_dir), "--upstream", f"small={upstream}", "--upstream"),
            f"mid={upstream}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=60)
        _wait(lambda: len(_workers(proc.pid)) == 2, what="two workers")
        first = _workers(proc.pid)
        _wait(lambda: all(_burst(url, 8)), what="both workers answering")  # warm-up
        sent = 8
        codes = _burst(url, 200)
        sent += len(codes)
        assert codes == [200] * 200
        # any worker's /metrics reports all of them
        m = httpx.get(url + "/metrics").text
        assert {httpx.get(url + "/healthz").json()["pid"] for _ in range(20)} <= first
        assert _metric(m, "finops_shim_requests_total", status="200") == sent
        assert _metric(m, "finops_shim_router_info", router_version="rules-v1") == 1

        proc.send_signal(signal.SIGHUP)  # reload: every worker, once
        _wait(
            lambda: _metric(httpx.get(url + "/metrics").text, "finops_shim_reloads_total") == 2,
            what="two reloads",
        )

        victim = min(first)
        os.kill(victim, signal.SIGKILL)  # a worker dies hard: it is replaced
        _wait(
            lambda: len(_workers(proc.pid)) == 2 and victim not in _workers(proc.pid),
            what="a replacement worker",
        )
        # the supervisor closes it out once it has reaped the dead worker, which may come
        # a moment after the process list already shows two workers
        _wait(
            lambda: not list(log_dir.glob(f"requests-*-{victim}-*.jsonl.open")),
            what="the dead worker's open log file closed out",
        )
        (new,) = _workers(proc.pid) - first
        _wait(
            lambda: httpx.get(url + "/healthz").json()["pid"] == new,
            what="the replacement answering",
        )
        _wait(lambda: all(c == 200 for c in _burst(url, 16)), what="service after the restart")
        sent += 16
        codes = _burst(url, 100)
        sent += len(codes)
        assert codes == [200] * 100
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert f"(pid {victim}) exited with -9" in out, out
    files = sorted(log_dir.glob("requests-*"))
    assert files and all(f.suffix == ".jsonl" for f in files), files
    pids = {f.name.split("-")[2] for f in files}
    assert len(pids) >= 3, "two first workers and the replacement each wrote a log"
    recs = [orjson.loads(line) for f in files for line in f.read_bytes().splitlines()]
    assert len({r["request_id"] for r in recs}) == len(recs)
    assert [f for f in files if f.name.split("-")[2] == str(victim)], "closed out, kept"
    # The log writer flushes every 50 ms and the kill came well after the burst, so even
    # the killed worker's records are on disk; a few are allowed for a slow writer thread.
    assert sent - 8 <= len(recs) <= sent
    assert not any(tmp.iterdir()), "the metrics folder is removed at exit"


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path, upstream):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cfg = from_flags([f"small={upstream}"], log_dir=not_a_dir / "log", port=free_port())
    t0 = time.monotonic()
    status = Supervisor(cfg, 2, log_level="error").run()
    assert status == 1
    assert time.monotonic() - t0 < 120


def test_workers_flag_and_config_are_validated(tmp_path):
    r = subprocess.run(
        [FINOPS, "shim", "serve", "--workers", "0", "--upstream", "small=http://127.0.0.1:9"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "workers" in r.stderr and "got 0" in r.stderr
    cfg = tmp_path / "shim.toml"
    cfg.write_text('[server]\nworkers = "two"\n[tiers.small]\nupstreams = ["http://127.0.0.1:9"]\n')
    r = subprocess.run([FINOPS, "shim", "check", str(cfg)], capture_output=True, text=True)
    assert r.returncode != 0 and "[server]" in r.stderr and "workers" in r.stderr
    # a log folder that cannot exist is said before any worker starts
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = subprocess.run(
        [
            *(FINOPS, "shim", "serve", "--workers", "2", "--upstream", "small=http://127.0.0.1:9"),
            *("--log", str(not_a_dir / "log")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "request log folder" in r.stderr and "worker" not in r.stdout
    # a port already taken is named, with the reason
    for workers in ("2", "1"):  # a single process binds its port the same way
        r, port = serve_on_a_busy_port(workers, "http://127.0.0.1:9")
        assert r.returncode == 2, (workers, r.stderr)
        assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "in use" in r.stderr


def test_workers_exit_when_the_supervisor_is_killed(tmp_path, upstream):
    port = free_port()
    up = f"small={upstream}"
    proc = subprocess.Popen(
        [*(FINOPS, "shim", "serve", "--port", str(port)), "--workers", "2", "--upstream", up],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
    _wait(lambda: len(_workers(proc.pid)) == 2, what="two workers")
    pids = _workers(proc.pid)
    proc.kill()
    proc.wait(10)

    def gone() -> bool:
        return not any(Path(f"/proc/{p}").exists() for p in pids)

    _wait(gone, timeout=40, what="orphaned workers to exit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_single_shim_drains_and_exits_0_on_sigterm_or_ctrl_c(tmp_path, sig):
    """Without --workers the shim is one uvicorn process: SIGTERM or Ctrl-C (SIGINT)
    finishes the request in flight, closes the log and exits 0, as `--workers N` does
    (uvicorn alone re-raises the signal: status 143, or 130 with a KeyboardInterrupt)."""
    f = FakeUpstream(tokens=4, delay_s=0.3)  # 1.2 s to answer
    h = run_app_in_thread(f)
    port = free_port()
    log_dir = tmp_path / "log"
    proc = subprocess.Popen(
        [
            *(FINOPS, "shim", "serve", "--port", str(port), "--log", str(log_dir)),
            *("--upstream", f"small={h.url}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=60)
        with ThreadPoolExecutor(1) as ex:
            pending = ex.submit(httpx.post, url + "/v1/chat/completions", json=CHAT, timeout=20)
            _wait(lambda: f.calls > 0, what="the request upstream")
            proc.send_signal(sig)
            assert pending.result().status_code == 200, "in flight when stopped, answered"
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        h.stop(2)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    files = list(log_dir.glob("requests-*"))
    assert files and all(p.suffix == ".jsonl" for p in files), files
    recs = [orjson.loads(line) for p in files for line in p.read_bytes().splitlines()]
    assert [r["status_code"] for r in recs] == [200]


class _Output:
    """A subprocess's stdout+stderr in a file, readable while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = path.open("wb")

    def text(self) -> str:
        return self.path.read_text(errors="replace")


def _serve_cli(args: list[str], out: _Output) -> subprocess.Popen:
    return subprocess.Popen(
        [FINOPS, "shim", "serve", *args], stdout=out.fh, stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen, out: _Output) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out.fh.close()
    return out.text()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from finops.shim.testing import train_demo_router

    return train_demo_router(tmp_path_factory.mktemp("router") / "r1", n=400, seed=1)


@pytest.fixture(scope="module")
def artifact2(tmp_path_factory):
    """A second router (another version) for a deploy."""
    from finops.shim.testing import train_demo_router

    return train_demo_router(tmp_path_factory.mktemp("router") / "r2", n=400, seed=2)


def test_a_replacement_worker_serves_what_its_siblings_serve_not_a_staged_deploy(
    tmp_path, artifact, artifact2
):
    """A restarted worker (a crash, the OOM killer) read the config and router files as
    they were on disk: a deploy staged for the next SIGHUP (a new artifact in place, a
    key revoked in the config) reached it alone, so two routers served at once and the
    revoked key still worked on the other worker. It serves what its siblings serve now
    (the supervisor's verified copy); after a SIGHUP, the files reloaded, never the config
    the shim started with, and with the command line's keys."""
    import shutil

    from finops.shim.config import hash_key

    f = FakeUpstream()
    f.keep_bodies = False
    h = run_app_in_thread(f)
    live = tmp_path / "router"
    shutil.copytree(artifact, live)
    port = free_port()
    conf = tmp_path / "shim.toml"
    tiers = "".join(f'[tiers.{t}]\nupstreams = ["{h.url}"]\n' for t in ("small", "mid", "large"))
    head = f'[server]\nport = {port}\nworkers = 2\n{tiers}[router]\npath = "{live}"\n'

    def keys(*tenants: str) -> str:
        entries = ", ".join(
            f'{{ sha256 = "{hash_key("sk-" + t)}", tenant = "{t}" }}' for t in tenants
        )
        return f"[auth]\nkeys = [{entries}]\n"

    conf.write_text(head + keys("acme", "bravo"))
    out = _Output(tmp_path / "out.txt")
    proc = _serve_cli(["--config", str(conf), "--api-key", "sk-cli=cli"], out)
    url = f"http://127.0.0.1:{port}"

    def answers() -> dict[int, tuple[str, int, int]]:
        """Each worker's pid -> (router version, /v1/models status with sk-bravo, with
        sk-cli), from new connections until every worker answered (the kernel spreads them)."""
        seen: dict[int, tuple[str, int, int]] = {}
        deadline = time.monotonic() + 60
        while not _workers(proc.pid) <= set(seen) and time.monotonic() < deadline:
            with httpx.Client(base_url=url, timeout=20) as c:
                health = c.get("/healthz").json()
                codes = [
                    c.get("/v1/models", headers={"authorization": f"Bearer sk-{t}"}).status_code
                    for t in ("bravo", "cli")
                ]
                seen[health["pid"]] = (health["router_version"], *codes)
        return seen

    def replace_a_worker() -> None:
        before = _workers(proc.pid)
        os.kill(min(before), signal.SIGKILL)
        _wait(lambda: len(_workers(proc.pid) - before) == 1, what="a replacement worker")
        (new,) = _workers(proc.pid) - before
        _wait(
            lambda: httpx.get(url + "/healthz").json()["pid"] == new,
            timeout=90,
            what="the replacement answering",
        )

    def versions() -> set[str]:
        return {a[0] for a in answers().values()}

    try:
        wait_http(url + "/healthz", timeout=90)
        _wait(lambda: len(_workers(proc.pid)) == 2, what="two workers")
        (v1,) = versions()
        # the next deploy, staged: a new artifact swapped in, a key revoked; no SIGHUP yet
        conf.write_text(head + keys("acme"))
        shutil.copytree(artifact2, tmp_path / "stage")
        live.rename(tmp_path / "old")
        (tmp_path / "stage").rename(live)
        replace_a_worker()
        seen = answers()
        assert set(seen) == _workers(proc.pid), seen
        assert set(seen.values()) == {(v1, 200, 200)}, seen
        # the deploy: every worker takes it, and so does a worker restarted after it
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: v1 not in versions(), timeout=90, what="both workers reloaded")
        replace_a_worker()
        seen = answers()
        assert set(seen) == _workers(proc.pid), seen
        (v2,) = versions()
        assert v2 != v1 and set(seen.values()) == {(v2, 401, 200)}, seen
    finally:
        text = _stop(proc, out)
        h.stop(2)
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]


def test_a_replacement_worker_serves_the_last_good_router_when_the_artifact_is_bad(
    tmp_path, artifact
):
    """A tampered manifest, a refused SIGHUP, then a worker killed: its replacement must
    serve the router the others serve (the supervisor's verified copy; one warning line),
    not die in a loop with a traceback."""
    import json
    import shutil

    f = FakeUpstream()
    f.keep_bodies = False
    h = run_app_in_thread(f)
    live = tmp_path / "router"
    shutil.copytree(artifact, live)
    port = free_port()
    out = _Output(tmp_path / "out.txt")
    ups = [a for t in ("small", "mid", "large") for a in ("--upstream", f"{t}={h.url}")]
    proc = _serve_cli(["--port", str(port), "--workers", "2", "--router", str(live), *ups], out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=90)
        _wait(lambda: len(_workers(proc.pid)) == 2, what="two workers")
        version = httpx.get(url + "/healthz").json()["router_version"]
        man = json.loads((live / "manifest.json").read_text())
        man["decision"]["thresholds"]["small"] = 0.01  # edited after export: refused
        (live / "manifest.json").write_text(json.dumps(man))
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: out.text().count("reload refused") >= 1, what="the reload refused")
        first = _workers(proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(_workers(proc.pid) - first) == 1, what="a replacement worker")
        (new,) = _workers(proc.pid) - first
        _wait(
            lambda: httpx.get(url + "/healthz").json()["pid"] == new,
            timeout=90,
            what="the replacement serving",
        )
        answers = [httpx.get(url + "/healthz").json() for _ in range(20)]
        assert {a["router_version"] for a in answers} == {version}, answers
        codes = _burst(url, 16)
        assert codes == [200] * 16
        assert new in _workers(proc.pid) and proc.poll() is None
    finally:
        text = _stop(proc, out)
        h.stop(2)
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    # one warning line (the supervisor's, at the refused SIGHUP): which file, why
    lines = [ln for ln in text.splitlines() if "serves the last good copy" in ln]
    assert len(lines) == 1, text[-4000:]
    assert "manifest.json" in lines[0] and "modified after export" in lines[0], text[-4000:]
    assert "exited with 1" not in text and "exited with 3" not in text, text[-4000:]


def test_a_replacement_that_cannot_start_never_takes_down_a_serving_worker(tmp_path, upstream):
    """A replacement that keeps failing at start while another worker serves: restarted
    with backoff (said in the log), the healthy worker keeps serving, and once the cause is
    gone (and SIGHUP asks for a retry) the replacement starts."""
    port = free_port()
    log_dir = tmp_path / "log"
    out = _Output(tmp_path / "out.txt")
    args = ["--port", str(port), "--workers", "2", "--log", str(log_dir)]
    proc = _serve_cli([*args, "--upstream", f"small={upstream}"], out)
    url = f"http://127.0.0.1:{port}"
    moved = tmp_path / "log-moved"
    try:
        wait_http(url + "/healthz", timeout=60)
        _wait(lambda: len(_workers(proc.pid)) == 2, what="two workers")
        first = _workers(proc.pid)
        victim = min(first)
        (survivor,) = first - {victim}
        # the survivor must be serving, not just started: on a loaded machine its startup
        # can outlast the replacement's quick crashes, and with none serving the
        # supervisor rightly stops
        answered: set[int] = set()
        _wait(
            lambda: answered.add(httpx.get(url + "/healthz").json()["pid"]) or survivor in answered,
            timeout=60,
            what="the survivor serving",
        )
        os.rename(log_dir, moved)  # a new worker cannot create its log folder now
        log_dir.write_text("not a folder")
        os.kill(victim, signal.SIGKILL)
        _wait(
            lambda: "still serving" in out.text() or proc.poll() is not None,
            timeout=90,
            what="the supervisor backing off",
        )
        assert proc.poll() is None, "the supervisor stopped (and drained the healthy worker)"
        assert {httpx.get(url + "/healthz").json()["pid"] for _ in range(5)} == {survivor}
        log_dir.unlink()
        os.rename(moved, log_dir)
        proc.send_signal(signal.SIGHUP)  # restarts the waiting worker at once
        _wait(lambda: len(_workers(proc.pid) - first) == 1, timeout=60, what="a replacement")
        (new,) = _workers(proc.pid) - first
        _wait(
            lambda: httpx.get(url + "/healthz").json()["pid"] == new,
            timeout=60,
            what="the replacement serving",
        )
    finally:
        text = _stop(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    failed = [ln for ln in text.splitlines() if "cannot start:" in ln]
    assert failed and str(log_dir) in failed[0], text[-4000:]
    assert "backoff" in text


def test_a_restarted_shim_closes_out_the_log_a_killed_one_left_open(tmp_path, upstream):
    """One shim process killed hard leaves its `.jsonl.open`; the next start publishes its
    whole records (and drops a half-written one), never touching a live process's file."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    live = log_dir / f"requests-20240101T000000Z-{os.getpid()}-0001-0badcafe.jsonl.open"
    live.write_bytes(b'{"request_id": "someone else\'s"}\n')  # a live writer: left alone

    def start(port: int, name: str) -> tuple[subprocess.Popen, _Output]:
        out = _Output(tmp_path / name)
        args = ["--port", str(port), "--log", str(log_dir), "--upstream", f"small={upstream}"]
        proc = _serve_cli(args, out)
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        return proc, out

    port = free_port()
    proc, out = start(port, "out1.txt")
    try:
        for _ in range(3):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
        # the background writer opens its file with its first record, maybe after the
        # response went out (it never holds one back)
        mine = f"requests-*-{proc.pid}-*.jsonl.open"
        _wait(lambda: len(list(log_dir.glob(mine))) == 1, what="the shim's open log file")
        (left,) = log_dir.glob(mine)
        _wait(lambda: left.read_bytes().count(b"\n") == 3, what="three records on disk")
    finally:
        proc.kill()
        proc.wait(10)
        out.fh.close()
    with left.open("ab") as fh:
        fh.write(b'{"request_id": "half')  # the kill came mid-write
    dead = proc.pid

    port = free_port()
    proc, out = start(port, "out2.txt")
    try:
        assert not left.exists(), "the dead shim's file is closed out at start"
        (published,) = log_dir.glob(f"requests-*-{dead}-*.jsonl")
        assert published.name == left.name.removesuffix(".open")
        recs = [orjson.loads(line) for line in published.read_bytes().splitlines()]
        assert len(recs) == 3 and all(r["status_code"] == 200 for r in recs)
        assert live.exists() and live.read_bytes().count(b"\n") == 1
        for _ in range(2):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
    finally:
        text = _stop(proc, out)
    assert proc.returncode == 0, text[-4000:]
    warned = [ln for ln in text.splitlines() if "closed out" in ln]
    assert len(warned) == 1 and published.name in warned[0] and "WARNING" in warned[0], text
    assert sorted(p.name for p in log_dir.glob("*.open")) == [live.name], "SIGTERM: none left"
    files = sorted(log_dir.glob("requests-*.jsonl"))
    recs = [orjson.loads(line) for p in files for line in p.read_bytes().splitlines()]
    assert len(recs) == 5 and len({r["request_id"] for r in recs}) == 5


def test_closing_out_dead_writers_spares_live_ones_and_finishes_claims(tmp_path):
    """The start-up close-out: dead pids' files only, a claim whose claimer died is finished,
    a file its writer already published (hard link, then killed) is not published twice."""
    from finops.shim.requestlog import recover_dead_writers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me, d = os.getpid(), dead.pid
    own = tmp_path / f"requests-20240101T000000Z-{me}-0001-aaaa.jsonl.open"
    own.write_bytes(b"{}\n")
    parent = tmp_path / f"requests-20240101T000000Z-{os.getppid()}-0001-bbbb.jsonl.open"
    parent.write_bytes(b"{}\n")
    left = tmp_path / f"requests-20240101T000000Z-{d}-0001-cccc.jsonl.open"
    left.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a"')
    empty = tmp_path / f"requests-20240101T000000Z-{d}-0002-dddd.jsonl.open"
    empty.write_bytes(b'{"half')
    claimed = tmp_path / f"requests-20240101T000000Z-{d}-0003-eeee.jsonl.open.{d}-ffff.claim"
    claimed.write_bytes(b'{"a": 3}\n')
    done = tmp_path / f"requests-20240101T000000Z-{d}-0004-gggg.jsonl"
    done.write_bytes(b'{"a": 4}\n')
    os.link(done, tmp_path / f"{done.name}.open")  # published, then killed before the unlink

    out = recover_dead_writers(tmp_path)
    assert sorted(p.name for p in out) == sorted(
        [left.name.removesuffix(".open"), claimed.name.split(".jsonl")[0] + ".jsonl"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [own.name, parent.name, done.name, *(p.name for p in out)]
    )
    assert (tmp_path / left.name.removesuffix(".open")).read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    # a process that has not opened a log yet: a file with its pid is an earlier process's
    assert [p.name for p in recover_dead_writers(tmp_path, own_pid_is_stale=True)] == [
        own.name.removesuffix(".open")
    ]
    assert parent.exists()


def test_a_sighup_while_the_shim_starts_does_not_kill_it(upstream):
    """SIGHUP's default action is to terminate; a reload asked for while the router loads
    (seconds with a trained artifact) killed the process (status 129)."""
    port = free_port()
    proc = subprocess.Popen(
        [FINOPS, "shim", "serve", "--port", str(port), "--upstream", f"small={upstream}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # the banner comes after the config and router are checked, before serving
        for line in proc.stderr:
            if b"finops shim on" in line:
                break
        proc.send_signal(signal.SIGHUP)
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_workers_find_each_others_stored_responses_without_redis(tmp_path):
    """`--workers 2` with auth and no Redis: follow-ups and retrievals on fresh
    connections (any worker) all find the stored response; the supervisor's shared
    folder is gone after it exits."""
    f = FakeUpstream(store_responses=True)
    h = run_app_in_thread(f)
    port = free_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [
            *(FINOPS, "shim", "serve", "--port", str(port), "--workers", "2"),
            *("--upstream", f"small={h.url}", "--api-key", "k-acme-123=acme"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    url = f"http://127.0.0.1:{port}"
    auth = {"authorization": "Bearer k-acme-123"}
    try:
        wait_http(url + "/healthz", timeout=60)
        body = {"model": "small", "input": "hi", "max_output_tokens": 2}
        rid = httpx.post(url + "/v1/responses", json=body, headers=auth).json()["id"]

        def follow(i: int) -> tuple[int, int]:
            r = httpx.post(
                url + "/v1/responses", json={**body, "previous_response_id": rid}, headers=auth
            )
            g = httpx.get(f"{url}/v1/responses/{rid}", headers=auth)
            return r.status_code, g.status_code

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(follow, range(24)))
            pids = set(pool.map(lambda _: httpx.get(url + "/healthz").json()["pid"], range(24)))
        assert got == [(200, 200)] * 24
        assert len(pids) == 2  # both workers answered requests
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        h.stop(2)
    assert not [p for p in tmp.iterdir() if p.name.startswith("finops-shim-state-")]
