"""The collect daemon: bad endpoints, isolation, backoff, config, SIGTERM and kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from collectors.config import CollectConfig, ConfigError, load, make_target
from collectors.daemon import Collector
from collectors.dcgm import render_payload
from finops.cli import app

ROOT = Path(__file__).resolve().parent.parent
TEXT = "text/plain; version=0.0.4; charset=utf-8"
Route = Callable[[BaseHTTPRequestHandler], None]


def reply(status: int, ctype: str, body: bytes) -> Route:
    def send(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return send


def hang(h: BaseHTTPRequestHandler) -> None:
    time.sleep(30)


def drip(h: BaseHTTPRequestHandler) -> None:
    """Headers at once, then one byte a second: per-read timeouts never fire."""
    h.send_response(200)
    h.send_header("Content-Type", TEXT)
    h.end_headers()
    with contextlib.suppress(OSError):
        for _ in range(30):
            h.wfile.write(b"#")
            h.wfile.flush()
            time.sleep(1)


@contextlib.contextmanager
def serve(routes: dict[str, Route | Callable[[], Route]]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path)
            if route is None:
                reply(404, "text/plain", b"no such path")(self)
            else:
                route(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def config(lake: Path, targets: list[dict], **kw: object) -> CollectConfig:
    cfg = CollectConfig(lake=lake, checkpoint_dir=lake / "_state", **kw)  # type: ignore[arg-type]
    for i, t in enumerate(targets):
        cfg.targets.append(make_target(t, f"target #{i}"))
    return cfg


GOOD = render_payload(4, variant="v3", hostname="good", seed=1).encode()


def test_bad_endpoints_each_get_a_clear_error_and_nothing_valid_is_lost(tmp_path: Path) -> None:
    huge = (
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-big",Hostname="big"} 42\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-big1",Hostname="big",note="'
        + "x"
        * 10_000_000
        + "\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="2",UUID="GPU-big2",Hostname="big"} 43\n'
    ).encode()
    routes = {
        "/good": reply(200, TEXT, GOOD),
        "/hang": hang,
        "/drip": drip,
        "/500": reply(500, "text/plain", b"exporter crashed: DCGM not initialized"),
        "/html": reply(200, "text/html", b"<!DOCTYPE html><html><body>Login</body></html>"),
        "/huge": reply(200, TEXT, huge),
        "/malformed": reply(
            200,
            TEXT,
            b'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-m",Hostname="m"} 1\nthis is not a metric line\n',
        ),
    }
    with serve(routes) as base:
        targets = [
            {"kind": "dcgm", "url": f"{base}/{p}", "timeout": "1.5s", "name": p}
            for p in ("good", "hang", "drip", "500", "html", "malformed")
        ]
        # 10 MB through loopback and the parser: give it room on a busy 2-core box
        targets.append(
            {
                "kind": "dcgm",
                "url": f"{base}/huge",
                "timeout": "20s",
                "interval": "30s",
                "name": "huge",
            }
        )
        targets.append({"kind": "dcgm", "url": "http://127.0.0.1:9/metrics", "name": "refused"})
        t0 = time.monotonic()
        outs = asyncio.run(Collector(config(tmp_path / "lake", targets), status=None).run_once())
        elapsed = time.monotonic() - t0
    by = {o.target: o for o in outs}
    # attempts run side by side: the run lasts as long as the slowest, not the sum
    assert elapsed < max(o.duration_ms for o in outs) / 1000 + 3
    assert by["hang"].duration_ms < 3000 and by["drip"].duration_ms < 3000
    assert by["good"].up and by["good"].samples == 4 * 26
    assert not by["hang"].up and by["hang"].error == "timed out after 1.5s"
    assert not by["drip"].up and "timed out" in by["drip"].error
    assert not by["500"].up
    assert by["500"].error.startswith("HTTP 500 Internal Server Error: 'exporter crashed")
    assert not by["html"].up and "answered HTML, not Prometheus exposition text" in by["html"].error
    assert not by["refused"].up and by["refused"].error.startswith("cannot connect")
    assert by["huge"].up and by["huge"].samples == 2 and by["huge"].rejected == 1, by["huge"].error
    assert by["malformed"].up and by["malformed"].samples == 1 and by["malformed"].rejected == 1

    db = finops.connect(tmp_path / "lake")
    health = db.sql("SELECT target, up, samples, rejected, error FROM scrape_health").pl()
    assert health.height == 8
    assert dict(health.select("target", "up").iter_rows()) == {t: by[t].up for t in by}
    rej = db.sql(
        "SELECT table_name, source, location, reason, raw FROM rejects ORDER BY location"
    ).pl()
    assert rej.height == 2
    huge_rej = rej.filter(pl.col("location").str.ends_with("/huge:3")).row(0, named=True)
    assert huge_rej["table_name"] == "gpu_samples" and "missing closing" in huge_rej["reason"]
    assert len(huge_rej["raw"]) == 500
    bad = rej.filter(pl.col("location").str.ends_with("/malformed:2")).row(0, named=True)
    assert bad["raw"] == "this is not a metric line"
    gpus = set(db.sql("SELECT DISTINCT gpu_uuid FROM gpu_samples").pl()["gpu_uuid"])
    assert {"GPU-big", "GPU-big2", "GPU-m"} <= gpus and len(gpus) == 4 + 3


def test_a_dead_target_never_stalls_the_others(tmp_path: Path) -> None:
    with serve({"/good": reply(200, TEXT, GOOD), "/hang": hang}) as base:
        cfg = config(
            tmp_path / "lake",
            [
                {
                    "kind": "dcgm",
                    "url": f"{base}/good",
                    "interval": "0.5s",
                    "timeout": "0.4s",
                    "name": "good",
                },
                {
                    "kind": "dcgm",
                    "url": f"{base}/hang",
                    "interval": "1s",
                    "timeout": "1s",
                    "name": "hang",
                },
            ],
            flush_interval=0.5,
            jitter=0.0,
            backoff_initial=1.0,
            backoff_max=2.0,
        )
        c = Collector(cfg, status=None)

        async def main() -> None:
            task = asyncio.create_task(c.run_forever(install_signals=False))
            await asyncio.sleep(4.5)
            c.stop()
            await task

        asyncio.run(main())
    good, dead = c.targets
    assert good.attempts >= 7, good.attempts  # ~ every 0.5 s while 'hang' kept timing out
    assert 1 <= dead.attempts <= 3 and dead.failures == dead.attempts  # backing off
    db = finops.connect(tmp_path / "lake")
    n = db.sql("SELECT target, count(*) AS n FROM scrape_health GROUP BY target").pl()
    assert dict(n.iter_rows()) == {"good": good.attempts, "hang": dead.attempts}


def test_backoff_doubles_to_the_cap_with_bounded_jitter(tmp_path: Path) -> None:
    cfg = config(
        tmp_path / "lake",
        [{"kind": "dcgm", "url": "h", "interval": "10s"}],
        backoff_initial=5.0,
        backoff_max=60.0,
        jitter=0.0,
    )
    c = Collector(cfg, status=None)
    t = c.targets[0]
    delays = []
    for failures in range(8):
        t.failures = failures
        delays.append(c._delay(t))
    assert delays == [10.0, 10.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    c.cfg.jitter = 0.2
    c.rng = random.Random(1)
    t.failures = 0
    js = [c._delay(t) for _ in range(200)]
    assert 8.0 <= min(js) < 9.0 and 11.0 < max(js) <= 12.0


def test_example_config_is_valid_and_errors_name_the_option(tmp_path: Path) -> None:
    cfg = load(ROOT / "examples" / "collectors.toml", lake=tmp_path / "lake")
    assert {t.kind for t in cfg.targets} == {"dcgm", "vllm", "nvml", "prometheus", "log"}
    assert cfg.lake == tmp_path / "lake"
    # the example shows every option with its default: the limits reach the settings
    assert cfg.max_buffered_rows == 2_000_000
    prom = next(t for t in cfg.targets if t.kind == "prometheus")
    assert prom.max_samples == 2_000_000
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[collect]\nmax_buffered_rows = 750\n[[target]]\nkind = "prometheus"\n'
        'url = "http://p"\nquery = "up"\nmax_samples = 5000\n'
    )
    set_ = load(bad)
    assert (set_.max_buffered_rows, set_.targets[0].max_samples) == (750, 5000)
    cases = {
        '[[target]]\nkind = "dcgm"\nurl = "h"\nintervall = "10s"\n': "unknown option(s) ['intervall']",
        '[[target]]\nkind = "dcgm"\nurl = "h"\ninterval = "ten"\n': "target #1.interval: expected a duration",
        '[[target]]\nkind = "vllm"\n': "a vllm target needs url",
        '[[target]]\nkind = "prometheus"\nurl = "http://p"\n': "needs query",
        '[[target]]\nkind = "redis"\n': "kind must be one of",
        '[[target]]\nkind = "dcgm"\nurl = "h"\n[[target]]\nkind = "dcgm"\nurl = "h"\n': "target names must be unique",
        '[collect]\njitter = 2\n[[target]]\nkind = "nvml"\n': "jitter: expected a fraction",
        "[collect]\n": "no [[target]] entries",
        '[collect]\nmax_buffered_rows = 0\n[[target]]\nkind = "nvml"\n': "max_buffered_rows: expected an integer >= 1",
        '[[target]]\nkind = "prometheus"\nurl = "http://p"\nquery = "up"\nmax_samples = 1\n': "max_samples: expected an integer >= 2",
        "not toml ==": "not valid TOML",
        '[[target]]\nkind = "dcgm"\nurl = "h"\ninterval = "2s"\ntimeout = "5s"\n': "must not exceed interval",
    }
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError) as err:
            load(bad)
        assert message in str(err.value), (text, str(err.value))
        assert str(bad) in str(err.value)


def test_the_example_collector_tails_the_example_shims_request_log(tmp_path: Path) -> None:
    """examples/collectors.toml's log target reads what examples/shim.toml's log writes.

    Both copied side by side (relative paths resolve against their folder), with the
    shim's `[log] dir` switched on; the file names come from the shim's own RequestLog.
    """
    import shutil

    from finops.shim.config import load_config
    from finops.shim.requestlog import RequestLog

    ex = tmp_path / "examples"
    ex.mkdir()
    shim_text = (ROOT / "examples" / "shim.toml").read_text()
    assert '# dir = "logs/shim"' in shim_text
    (ex / "shim.toml").write_text(shim_text.replace('# dir = "logs/shim"', 'dir = "logs/shim"'))
    shutil.copy(ROOT / "examples" / "collectors.toml", ex / "collectors.toml")
    log_dir = load_config(ex / "shim.toml").log_dir
    assert log_dir is not None
    cfg = load(ex / "collectors.toml", lake=tmp_path / "lake")
    cfg.targets = [t for t in cfg.targets if t.kind == "log"]
    pattern = cfg.targets[0].path
    assert pattern is not None

    rlog = RequestLog(log_dir, fsync=False, interval=0.01)
    for i in range(3):
        rlog.write({"request_id": f"req-{i}", "ts": f"2026-11-28T10:00:0{i}Z", "tenant": "acme"})
    assert rlog.flush()
    (open_file,) = log_dir.iterdir()
    assert open_file.name.endswith(".jsonl.open")
    assert [Path(p) for p in glob.glob(pattern)] == [open_file]  # followed while open
    outs = asyncio.run(Collector(cfg, status=None).run_once())
    assert [(o.up, o.samples) for o in outs] == [(True, 3)]
    rlog.close()
    (closed,) = log_dir.iterdir()
    assert closed.suffix == ".jsonl" and [Path(p) for p in glob.glob(pattern)] == [closed]
    outs = asyncio.run(Collector(cfg, status=None).run_once())
    assert [(o.up, o.samples) for o in outs] == [(True, 0)]  # the same file, renamed
    assert _requests_in(tmp_path / "lake") == ["req-0", "req-1", "req-2"]


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["collect", "--once", "--lake", str(tmp_path)])
    assert res.exit_code == 2 and "nothing to collect" in res.output
    res = runner.invoke(app, ["collect", "--once", "--query", "up"])
    assert res.exit_code == 2 and "--query needs --prometheus" in res.output
    res = runner.invoke(app, ["collect", "--config", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "no such config file" in res.output
    assert "Traceback" not in res.output


def test_once_with_flags_exit_0_even_when_targets_are_down(tmp_path: Path) -> None:
    with serve({"/metrics": reply(200, TEXT, GOOD)}) as base:
        res = CliRunner().invoke(
            app,
            ["collect", "--once", "--lake", str(tmp_path / "lake"), "--dcgm", f"{base}/metrics",
             "--dcgm", "127.0.0.1:9", "--timeout", "2s"],
        )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1/2 targets up" in res.output and "DOWN dcgm" in res.output


# --------------------------------------------------------------------------- processes


class FakeVllm:
    """/metrics whose prefix-cache counters grow by a known amount per scrape."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.lock = threading.Lock()

    def route(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.scrapes += 1
            k = self.scrapes
        body = (
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {30 * k}.0\n'
            "# TYPE vllm:prefix_cache_hits_total counter\n"
            f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {10 * k}.0\n'
        ).encode()
        reply(200, TEXT, body)(h)


def _daemon(cfg_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from finops.cli import main; main()",
            "collect",
            "--config",
            str(cfg_path),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_started(proc: subprocess.Popen, timeout: float = 60) -> list[str]:
    """Read the daemon's output until it says it runs (imports take a while on CI)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if " targets -> " in line:
            return seen
    raise AssertionError(f"daemon did not start: {''.join(seen)}")


def _write_requests(path: Path, start: int, n: int) -> None:
    with open(path, "a") as fh:
        for i in range(start, start + n):
            rec = {
                "request_id": f"req-{i:05d}",
                "ts": f"2026-11-28T10:{i // 60 % 60:02d}:{i % 60:02d}Z",
                "tenant": "acme",
                "input_tokens": 100 + i,
                "output_tokens": 10,
            }
            fh.write(json.dumps(rec) + "\n")


@pytest.mark.slow
def test_sigterm_flushes_and_exits_0(tmp_path: Path) -> None:
    with serve({"/metrics": reply(200, TEXT, GOOD)}) as base:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[collect]\nlake = "lake"\nflush_interval = "1h"\nstatus_interval = "0.5s"\n'
            f'[[target]]\nkind = "dcgm"\nurl = "{base}/metrics"\ninterval = "0.5s"\ntimeout = "0.5s"\n'
        )
        proc = _daemon(cfg)
        head = _wait_started(proc)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        out = "".join(head) + out
    assert proc.returncode == 0, out
    assert "collect: 1 targets, 1 up, 0 down" in out and "stopped" in out
    db = finops.connect(tmp_path / "lake")
    n_health = db.execute("SELECT count(*) FROM scrape_health").fetchall()[0][0]
    assert n_health >= 2  # flush_interval is an hour: only the shutdown flush wrote these
    n = db.execute("SELECT count(*) FROM gpu_samples").fetchall()[0][0]
    assert n == n_health * 4 * 26


@pytest.mark.slow
def test_kill_9_and_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    fake = FakeVllm()
    log = tmp_path / "requests.jsonl"
    _write_requests(log, 0, 500)
    with serve({"/metrics": fake.route}) as base:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            '[collect]\nlake = "lake"\nflush_interval = "0.3s"\n'
            f'[[target]]\nkind = "vllm"\nurl = "{base}/metrics"\ninterval = "0.3s"\ntimeout = "0.3s"\n'
            f'[[target]]\nkind = "log"\npath = "{log}"\ninterval = "0.2s"\ntimeout = "0.2s"\n'
        )
        proc = _daemon(cfg)
        _wait_started(proc)
        writer_stop = threading.Event()

        def keep_writing() -> None:
            i = 500
            while not writer_stop.is_set():
                _write_requests(log, i, 37)
                i += 37
                time.sleep(0.05)
            keep_writing.total = i  # type: ignore[attr-defined]

        w = threading.Thread(target=keep_writing)
        w.start()
        time.sleep(4)
        proc.kill()  # SIGKILL mid-run: no flush, no goodbye
        proc.wait(timeout=10)
        writer_stop.set()
        w.join()
        total = keep_writing.total  # type: ignore[attr-defined]
        proc = _daemon(cfg, "--once")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    db = finops.connect(tmp_path / "lake")
    ids = db.sql("SELECT request_id FROM requests").pl()["request_id"]
    assert ids.len() == total and ids.n_unique() == total  # every line once
    assert set(ids) == {f"req-{i:05d}" for i in range(total)}
    # prefix-cache tokens reconcile with the counters the lake saw: nothing lost or doubled
    hits = (
        db.sql(
            "SELECT min(value) AS lo, max(value) AS hi FROM serving_samples "
            "WHERE metric = 'vllm:prefix_cache_hits_total'"
        )
        .pl()
        .row(0)
    )
    ev = dict(db.sql("SELECT event, sum(tokens) FROM cache_events GROUP BY event").pl().iter_rows())
    assert ev["hit"] == hits[1] - hits[0]
    assert ev["miss"] == 2 * (hits[1] - hits[0])
    dup_keys = db.execute(
        "SELECT count(*) - count(DISTINCT (target, metric, labels, ts)) FROM raw.serving_samples"
    ).fetchall()[0][0]
    assert dup_keys == 0


def test_status_line_names_the_failing_target(tmp_path: Path) -> None:
    buf = io.StringIO()
    cfg = config(tmp_path / "lake", [{"kind": "dcgm", "url": "127.0.0.1:9", "name": "gpu-7"}])
    c = Collector(cfg, status=buf)
    asyncio.run(c.run_once())
    line = c.status_line()
    assert line.startswith("collect: 1 targets, 0 up, 1 down")
    assert "gpu-7: cannot connect" in line


def test_log_flag_tails_a_request_log_once_and_resumes(tmp_path: Path) -> None:
    log = tmp_path / "shim.jsonl"
    _write_requests(log, 0, 20)
    with open(log, "a") as fh:
        fh.write('{"request_id": "broken", "ts": \n')  # a truncated line: rejected, not fatal
    runner = CliRunner()
    args = ["collect", "--once", "--lake", str(tmp_path / "lake"), "--log", str(log)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "up   log" in res.output and "20 samples, 1 rejected" in res.output
    _write_requests(log, 20, 5)
    res = runner.invoke(app, args)
    assert "5 samples" in res.output  # only the new lines: the checkpoint held
    db = finops.connect(tmp_path / "lake")
    assert db.execute("SELECT count(*) FROM requests").fetchall()[0][0] == 25
    health = db.sql("SELECT kind, up, samples, rejected FROM scrape_health ORDER BY ts").pl()
    assert health.rows() == [("log", True, 20, 1), ("log", True, 5, 0)]


def _requests_in(lake: Path) -> list[str]:
    ids = finops.connect(lake).sql("SELECT request_id FROM requests ORDER BY 1").pl()
    return ids["request_id"].to_list()


def _settle(path: Path) -> None:
    """Age the file past the log source's settle time (no writer touched it lately)."""
    old = time.time() - 3600
    os.utime(path, (old, old))


def test_once_takes_a_settled_last_line_without_newline_once(tmp_path: Path) -> None:
    """As `finops ingest` does; a later append loads only what follows it."""
    log = tmp_path / "requests.jsonl"
    _write_requests(log, 0, 3)
    log.write_bytes(log.read_bytes().rstrip(b"\n"))  # the last line has no newline
    lake_dir = tmp_path / "lake"
    args = ["collect", "--once", "--lake", str(lake_dir), "--log", str(log)]
    runner = CliRunner()
    res = runner.invoke(app, args)  # just written: its writer may be mid-line, it waits
    assert res.exit_code == 0 and "2 samples" in res.output, res.output
    _settle(log)
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "1 samples" in res.output, res.output
    assert "0 samples" in runner.invoke(app, args).output  # taken once, not again
    with open(log, "a") as fh:
        fh.write("\n")  # the writer ends that line after all, then goes on
    _write_requests(log, 3, 2)
    res = runner.invoke(app, args)
    assert "2 samples" in res.output and "rejected" not in res.output, res.output
    assert _requests_in(lake_dir) == [f"req-{i:05d}" for i in range(5)]
    assert finops.connect(lake_dir).execute("SELECT count(*) FROM rejects").fetchall()[0][0] == 0


def test_shutdown_takes_a_settled_last_line_without_newline(tmp_path: Path) -> None:
    """The running daemon leaves it to its writer; the last poll at stop takes it."""
    log = tmp_path / "requests.jsonl"
    _write_requests(log, 0, 3)
    log.write_bytes(log.read_bytes().rstrip(b"\n"))
    _settle(log)
    lake_dir = tmp_path / "lake"
    cfg = config(
        lake_dir, [{"kind": "log", "path": str(log), "interval": "0.2s", "timeout": "0.2s"}]
    )
    c = Collector(cfg, status=None)
    seen: list[list[str]] = []

    async def main() -> None:
        run = asyncio.create_task(c.run_forever(install_signals=False))
        await asyncio.sleep(1.0)  # a few polls
        seen.append(_requests_in(lake_dir))
        c.stop()
        await run

    asyncio.run(main())
    assert seen == [["req-00000", "req-00001"]]
    assert _requests_in(lake_dir) == ["req-00000", "req-00001", "req-00002"]
    c2 = Collector(cfg, status=None)  # a restart does not load it again
    asyncio.run(c2.run_once())
    assert len(_requests_in(lake_dir)) == 3


def test_a_failed_write_keeps_the_rows_for_the_next_flush(tmp_path: Path) -> None:
    with serve({"/metrics": reply(200, TEXT, GOOD)}) as base:
        blocker = tmp_path / "lake"
        blocker.write_text("a file where the lake folder should be")
        c = Collector(
            config(blocker, [{"kind": "dcgm", "url": f"{base}/metrics"}]), status=io.StringIO()
        )

        async def main() -> None:
            await c._open()
            await c.run_attempt(c.targets[0])
            await c.flush()  # fails: the lake path is a file
            assert c.stats.write_errors == 1 and len(c.buffer) == 1
            blocker.unlink()
            await c.flush()  # the same rows, written now
            assert c.buffer == []
            await c.http.aclose()

        asyncio.run(main())
    db = finops.connect(blocker)
    assert db.execute("SELECT count(*) FROM gpu_samples").fetchall()[0][0] == 4 * 26
    assert "failed, will retry" in c.status_out.getvalue()  # type: ignore[union-attr]


def test_log_target_with_a_wrong_mapping_is_down_not_fatal(tmp_path: Path) -> None:
    """A mapping naming a missing column takes that target down, with the reason, and exit 0."""
    from finops.cli import app

    data = tmp_path / "gateway.csv"
    data.write_text("a,b\n1,2\n")
    mapping = tmp_path / "bad.toml"
    mapping.write_text('[mapping]\nname = "x"\n[columns]\nts = "nope"\nrequest_id = "a"\n')
    lake_dir = tmp_path / "lake"
    args = ["collect", "--once", "--lake", str(lake_dir), "--log", str(data)]
    result = CliRunner().invoke(app, [*args, "--mapping", str(mapping)])
    assert result.exit_code == 0, result.output
    health = finops.connect(lake_dir).sql("SELECT up, error FROM scrape_health").fetchall()
    assert len(health) == 1
    up, error = health[0]
    assert up is False
    assert "column 'nope' not found" in error and "available columns: a, b" in error


def test_a_config_names_a_shipped_mapping_from_anywhere(tmp_path: Path) -> None:
    """`mapping = "azure-llm-2023"` in a config outside the working directory was joined
    to the config's folder and ended in a MappingError traceback."""
    from finops.cli import app

    conf = tmp_path / "conf"
    conf.mkdir()
    data = conf / "trace.csv"
    data.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.1,10,2\n")  # fmt: skip
    cfg = conf / "collect.toml"
    body = '[[target]]\nkind = "log"\npath = "trace.csv"\nmapping = "{}"\n'
    cfg.write_text(body.format("azure-llm-2023"))
    lake_dir = tmp_path / "lake"
    args = ["collect", "--once", "--config", str(cfg), "--lake", str(lake_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert finops.connect(lake_dir).sql("SELECT count(*) FROM requests").fetchall() == [(2,)]
    # a name that is neither a file next to the config nor shipped: one error line
    cfg.write_text(body.format("azure-llm-2032"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'azure-llm-2032' is no file in" in result.stderr
    assert "not a shipped mapping" in result.stderr and "azure-llm-2023" in result.stderr


# --------------------------------------------------------------------------- stuck calls


class HungNvml:
    """A pynvml whose nvmlInit never returns (as NVML does when a GPU falls off the bus)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        self.release.wait(30)
        raise RuntimeError("released by the test")

    def nvmlShutdown(self) -> None:
        raise AssertionError("close() must not run while a call is stuck")


def test_a_hung_nvml_call_starves_nothing_and_stop_does_not_wait_for_it(tmp_path: Path) -> None:
    """One stuck thread, not one per attempt; the others keep writing; stop flushes at once."""
    nvml = HungNvml()
    threading.Timer(10, nvml.release.set).start()  # never hang the test run itself
    with serve({"/good": reply(200, TEXT, GOOD)}) as base:
        cfg = config(
            tmp_path / "lake",
            [
                {"kind": "dcgm", "url": f"{base}/good", "interval": "0.2s", "timeout": "0.2s"},
                {"kind": "nvml", "name": "nvml", "interval": "0.2s", "timeout": "0.2s"},
            ],
            flush_interval=0.2,
            jitter=0.0,
            backoff_initial=0.2,
            backoff_max=0.2,
        )
        c = Collector(cfg, status=None, nvml_module=nvml)

        async def main() -> None:
            task = asyncio.create_task(c.run_forever(install_signals=False))
            await asyncio.sleep(2.5)
            c.stop()
            await task

        t0 = time.monotonic()
        asyncio.run(main())  # asyncio.run also joins its default pool: a stuck call there hangs it
        elapsed = time.monotonic() - t0
    try:
        assert elapsed < 5, elapsed
        assert nvml.inits == 1  # later attempts did not start another stuck thread
        good, hung = c.targets
        assert good.attempts >= 6 and good.failures == 0
        assert hung.busy_for() is not None  # still stuck: stop did not wait for it
    finally:
        nvml.release.set()
    db = finops.connect(tmp_path / "lake")
    errors = db.sql("SELECT error FROM scrape_health WHERE target = 'nvml' ORDER BY ts").pl()
    assert errors["error"][0] == "timed out after 0.2s"
    assert errors.height >= 2
    assert all(e.startswith("previous attempt still running after ") for e in errors["error"][1:])
    n = db.sql("SELECT count(*) FROM scrape_health WHERE target != 'nvml'").fetchall()[0][0]
    assert n == good.attempts  # every attempt's health row, the final flush's included


def test_a_parse_that_outlives_its_attempt_adds_nothing_to_it(tmp_path: Path) -> None:
    """Rows of a parse finished after the timeout never land under a 'timed out' health row."""
    from collectors.daemon import DcgmTarget

    gate = threading.Event()
    slow_map = DcgmTarget._map

    def map_late(self: DcgmTarget, parsed: object, out: object) -> None:
        gate.wait(10)
        slow_map(self, parsed, out)

    with serve({"/good": reply(200, TEXT, GOOD)}) as base:
        cfg = config(
            tmp_path / "lake", [{"kind": "dcgm", "url": f"{base}/good", "timeout": "0.1s"}]
        )
        c = Collector(cfg, status=None)
        t = c.targets[0]

        async def main() -> tuple:
            await c._open()
            t._map = map_late.__get__(t)  # type: ignore[method-assign]
            first = await c.run_attempt(t)
            second = await c.run_attempt(t)  # the parse is still going
            gate.set()
            await asyncio.sleep(0.5)  # the late parse ends
            await c.http.aclose()
            return first, second

        first, second = asyncio.run(main())
    assert not first.up and first.error == "timed out after 0.1s"
    assert first.frames == {} and first.samples == 0  # the late parse went elsewhere
    assert not second.up and second.error.startswith("previous attempt still running after")


@pytest.mark.slow
def test_sigterm_exits_0_while_an_nvml_call_hangs(tmp_path: Path) -> None:
    """The daemon as a process: a stuck driver call keeps neither it alive nor the rows out."""
    fake = tmp_path / "fakenvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(
        "import time\ndef nvmlInit():\n    time.sleep(3600)\ndef nvmlShutdown():\n    pass\n"
    )
    with serve({"/metrics": reply(200, TEXT, GOOD)}) as base:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            '[collect]\nlake = "lake"\nflush_interval = "1h"\njitter = 0.0\n'
            'backoff_initial = "0.3s"\nbackoff_max = "0.3s"\n'
            f'[[target]]\nkind = "dcgm"\nurl = "{base}/metrics"\ninterval = "0.3s"\ntimeout = "0.3s"\n'
            '[[target]]\nkind = "nvml"\nname = "nvml"\ninterval = "0.3s"\ntimeout = "0.3s"\n'
        )
        env_path = os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-c", "from finops.cli import main; main()", "collect", "--config",
             str(cfg)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": env_path},
        )  # fmt: skip
        try:
            head = _wait_started(proc)
            time.sleep(2.5)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out = "".join(head) + out
    assert proc.returncode == 0, out
    assert "not waiting for nvml" in out and "stopped" in out
    db = finops.connect(tmp_path / "lake")
    health = dict(db.sql("SELECT kind, count(*) FROM scrape_health GROUP BY kind").fetchall())
    assert health["dcgm"] >= 4 and health["nvml"] >= 2  # only the shutdown flush wrote these


def test_a_log_backlog_loads_in_slices_that_report_their_rows(tmp_path: Path) -> None:
    """A long poll stops at a batch after its timeout, up with what it loaded.

    It holds the write lock per batch, so other targets' flushes are not held up.
    """
    log = tmp_path / "requests.jsonl"
    _write_requests(log, 0, 1200)
    cfg = config(tmp_path / "lake", [{"kind": "log", "path": str(log), "timeout": "0.3s"}])
    c = Collector(cfg, status=None)
    t = c.targets[0]
    t.source.chunk_bytes = 8192  # ~60 lines a batch: many batches
    real_append = c.lake.append

    def slow_append(table: str, data: object, **kw: object) -> object:
        time.sleep(0.08)
        return real_append(table, data, **kw)

    c.lake.append = slow_append  # type: ignore[method-assign]
    waits: list[float] = []
    done = threading.Event()

    def other_writer() -> None:  # what a flush of another target does meanwhile
        while not done.is_set():
            t0 = time.monotonic()
            with c.write_lock:
                waits.append(time.monotonic() - t0)
            time.sleep(0.01)

    def loaded() -> int:
        return sum(pl.read_parquet(f).height for f in c.lake.files("requests"))

    async def main() -> list:
        await c._open()
        outs = [await c.run_attempt(t)]
        in_lake = loaded()
        await asyncio.sleep(0.3)
        assert loaded() == in_lake  # the attempt is over: its poll stopped too
        while outs[-1].error:
            outs.append(await c.run_attempt(t))
        await c.http.aclose()
        return outs

    w = threading.Thread(target=other_writer)
    w.start()
    try:
        outs = asyncio.run(main())
    finally:
        done.set()
        w.join()
    first = outs[0]
    assert first.up and first.error.startswith("backlog: ") and 0 < first.samples < 1200
    assert first.duration_ms < 1000
    assert all(o.up for o in outs) and len(outs) >= 3
    assert sum(o.samples for o in outs) == loaded() == 1200  # health says what loaded
    assert max(waits) < 0.5  # one batch write at most, not a whole poll


VLLM_REAL = (ROOT / "tests" / "data" / "exposition" / "vllm_real.txt").read_bytes()


def test_an_unreadable_serving_file_stops_no_target(tmp_path: Path) -> None:
    """A corrupt file under serving_samples: the vLLM target starts without its baseline,
    saying which file; the other targets run; nothing is called a write failure."""
    lake = tmp_path / "lake"
    with serve({"/metrics": reply(200, TEXT, VLLM_REAL), "/dcgm": reply(200, TEXT, GOOD)}) as base:
        flags = ["--vllm", f"mid={base}", "--dcgm", f"{base}/dcgm", "--lake", str(lake)]
        first = CliRunner().invoke(app, ["collect", "--once", *flags])
        assert first.exit_code == 0, first.output
        (part,) = (lake / "serving_samples").glob("date=*")
        bad = part / "zz.parquet"
        bad.write_text("garbage\n")
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                "from finops.cli import main; main()",
                "collect",
                "--once",
                *flags,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 0, res.stderr
    assert "writing to" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert f"started without its state from the lake: cannot read {bad}" in res.stderr
    assert "2/2 targets up" in res.stdout, res.stdout
    vllm_line = next(line for line in res.stdout.splitlines() if " vllm " in line)
    assert f"cannot read {bad}" in vllm_line, vllm_line
    bad.unlink()
    db = finops.connect(lake)
    n = db.sql("SELECT count(*) FROM scrape_health WHERE up").fetchall()[0][0]
    assert n == 4  # both runs, both targets


def test_a_full_buffer_drops_the_oldest_and_retries_only_on_the_flush_timer(
    tmp_path: Path,
) -> None:
    """Lake unwritable: the buffer stays under max_buffered_rows (the drop counted and said),
    a failed flush is retried after flush_interval with backoff, not by every attempt."""
    with serve({"/metrics": reply(200, TEXT, GOOD)}) as base:
        cfg = config(
            tmp_path / "lake", [{"kind": "dcgm", "url": f"{base}/metrics"}], flush_rows=200
        )
        cfg.max_buffered_rows = 500
        err = io.StringIO()
        c = Collector(cfg, status=err)
        real = c.lake.append_validated
        calls = []

        def boom(*a: object, **k: object) -> object:
            calls.append(1)
            raise OSError(28, "No space left on device")

        async def main() -> None:
            await c._open()
            c.lake.append_validated = boom  # type: ignore[method-assign]
            for _ in range(30):  # 105 rows each: 3,150 rows, a flush due every 2 attempts
                await c.run_attempt(c.targets[0])
                assert c.buffered_rows <= 500
            assert len(calls) == 1, f"{len(calls)} inline retries of the whole buffer"
            assert c.stats.dropped_rows > 2000 and c.targets[0].dropped == c.stats.dropped_rows
            c.lake.append_validated = real  # type: ignore[method-assign]
            c._retry_at = 0.0  # the flush timer's turn
            await c.run_attempt(c.targets[0])
            assert c.buffer == []
            await c.http.aclose()

        asyncio.run(main())
    out = err.getvalue()
    assert "will retry: [Errno 28] No space left on device (next try in 10s" in out, out
    assert "collect: DROPPED " in out and "max_buffered_rows=500" in out, out
    assert "rows DROPPED (lake unwritable)" in c.status_line()
    db = finops.connect(tmp_path / "lake")
    ((err_msg,),) = db.sql("SELECT error FROM scrape_health WHERE error IS NOT NULL").fetchall()
    assert err_msg.startswith(f"{c.stats.dropped_rows:,} buffered rows of this target dropped")
