"""Run the shim under uvicorn: in the foreground (CLI) or in a background thread.

`serve_in_thread` exists for tests, notebooks and the demo: the shim runs on
its own event loop in a daemon thread, on a loopback port, and `stop()`
shuts it down gracefully (in-flight requests finish, the request log is
fsynced and closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from finops.loopback import free_port
from finops.shim.app import ShimASGI, create_app
from finops.shim.config import ShimConfig
from finops.shim.protocol import GuardedHttpToolsProtocol, guarded_protocol

logger = logging.getLogger("finops.shim")


def uvicorn_config(
    app: ShimASGI | None, host: str, port: int, *, log_level: str = "warning"
) -> uvicorn.Config:
    shim = getattr(app, "shim", None)
    # the request head's size and time limits (protocol.py): the time is the one a client
    # has to send its body, read per connection so that a reload changes it
    protocol = (
        guarded_protocol(
            lambda: shim.cfg.body_timeout_s,
            lambda reason: shim.metrics.refused_connections.labels(reason).inc(),
        )
        if shim is not None
        else GuardedHttpToolsProtocol
    )
    # no access log: the request log is the access log, and printing a line per request costs latency
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=shim.cfg.drain_timeout_s if shim else 30,  # type: ignore[arg-type]
        backlog=4096,
        # httptools (C parser): 27% less shim CPU per request than h11 (502 vs 693 us at
        # 32 concurrent, non-streaming). Missed mid-stream disconnects once blamed on it
        # came from the proxy's stream loop not yielding (fixed there: it yields every
        # 5 ms); both servers report a disconnect through the same receive() path.
        # Its protocol, with the head limits h11 has and httptools lacks (protocol.py).
        http=protocol,
        # the shim never uses the client's address (tenants come from API keys), so
        # uvicorn's X-Forwarded-For middleware would be per-request work for nothing
        proxy_headers=False,
    )


# below this many open files a busy shim runs out (each request holds a client and an
# upstream socket; idle keep-alive connections hold theirs for 30 s)
FEW_OPEN_FILES = 4096


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the limit now.

    A service manager's default soft limit (1024 under systemd) is reached by about 500
    concurrent requests, and past it the shim fails clients and upstream connections
    alike. Raising the soft limit up to the hard one needs no privilege (nginx and
    uvicorn users set `worker_rlimit_nofile` / `LimitNOFILE` for the same reason).
    """
    import resource

    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # no "unlimited" for open files: the kernel's nr_open (2^20 by default) caps it
    target = hard if hard != inf else 1 << 20
    if soft != inf and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != inf and soft < FEW_OPEN_FILES:
        logger.warning(
            "open files limited to %d (hard limit): about %d concurrent requests; raise it "
            "(ulimit -n, systemd LimitNOFILE, docker --ulimit nofile) for more",
            soft,
            soft // 2,
        )
    return soft


def configure_logging(log_level: str, tag: str = "") -> None:
    """Process-wide log format for `finops shim serve` (`tag` names a worker)."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {tag + ' ' if tag else ''}%(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise


class _Server(uvicorn.Server):
    """uvicorn's server, calling `on_started` once it accepts connections."""

    on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def recover_log_folder(log_dir: Path | None, *, own_pid_is_stale: bool = False) -> list[Path]:
    """Close out the `.jsonl.open` request-log files that processes no longer running left
    in `log_dir` (a shim killed hard never renames its file), with a warning per file.

    Done when a shim starts (one process, or a supervisor before its workers start), so
    a restart publishes what the killed process wrote. Files of live processes (another
    shim sharing the folder) are left alone. Errors are logged, never raised.
    """
    if log_dir is None:
        return []
    from finops.shim.requestlog import recover_dead_writers

    try:
        done = recover_dead_writers(log_dir, own_pid_is_stale=own_pid_is_stale)
    except OSError as exc:
        logger.error("request log %s: could not close out files left open: %s", log_dir, exc)
        return []
    for path in done:
        logger.warning(
            "request log: closed out %s, left open by process %s (no longer running)",
            path,
            path.name.split("-")[2],
        )
    return done


def serve(
    cfg: ShimConfig,
    *,
    log_level: str = "info",
    sockets: list[socket.socket] | None = None,
    log_tag: str = "",
    app: Any = None,
    recover_logs: bool = True,
    on_started: Callable[[], None] | None = None,
    reload_pending: Callable[[], bool] | None = None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (SIGHUP reloads); either drains
    (in-flight requests finish) and returns, so the process exits 0.

    `sockets`: listen on these already-bound sockets (the CLI binds its port itself;
    the workers of `serve_workers` share the supervisor's) instead of binding
    cfg.host:cfg.port. `app`: serve this app, built from `cfg` by the caller, instead
    of `create_app(cfg)`. `recover_logs`: first close out the request-log files that
    processes no longer running left open in `cfg.log_dir` (a worker passes False: its
    supervisor does it at start, and for each worker that dies).
    `on_started`: called once the server accepts connections (a worker tells its
    supervisor it serves).
    `reload_pending`: says (once) whether a SIGHUP came while the shim started, before
    the app took SIGHUP over (the CLI records one meanwhile): a reload, run once serving.
    """
    configure_logging(log_level, log_tag)
    raise_open_files_limit()
    if recover_logs:
        # before this process opens a log file: one named with our pid is an earlier one's
        recover_log_folder(cfg.log_dir, own_pid_is_stale=app is None)
    if app is None:
        app = create_app(cfg)
    server = _Server(uvicorn_config(app, cfg.host, cfg.port, log_level=log_level))

    def started() -> None:
        if on_started is not None:
            on_started()
        # the app's SIGHUP handler is in place now (its lifespan ran): send it the reload
        # asked for meanwhile. Still ours or ignored (an app without one): nothing happens.
        if reload_pending is not None and reload_pending():
            logger.info("SIGHUP received while starting: reloading now")
            if signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signal.SIGHUP)

    server.on_started = started

    # uvicorn re-raises a SIGTERM or SIGINT it caught once it has drained, under the
    # handler that was there before it; with the default ones the process then dies by
    # SIGTERM (status 143) or of a KeyboardInterrupt (status 130, with a traceback) after
    # a clean shutdown. A handler of ours makes a drained stop exit 0, as the multi-worker
    # supervisor does, so a service manager (and Ctrl-C) sees one answer for both.
    # The handler also asks for a stop, so a signal before uvicorn's own handler is in
    # place still stops the server (uvicorn checks should_exit after its startup).
    def stop(_signum: int, _frame: Any) -> None:
        server.should_exit = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class ServerHandle:
    app: ShimASGI
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def shim(self) -> Any:
        return self.app.shim

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. a health check) and wait for it."""
        loop = self.server_loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    server_loop: Any = None

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_in_thread(
    cfg_or_app: ShimConfig | ShimASGI,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_timeout: float = 20,
) -> ServerHandle:
    """Start the shim on a loopback port in a daemon thread; returns when it accepts requests."""
    app = cfg_or_app if isinstance(cfg_or_app, ShimASGI) else create_app(cfg_or_app)
    port = port or free_port()
    server = uvicorn.Server(uvicorn_config(app, host, port))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
    handle = ServerHandle(app=app, server=server, thread=None, host=host, port=port)  # type: ignore[arg-type]

    def run() -> None:
        loop = asyncio.new_event_loop()
        handle.server_loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())
        loop.close()

    t = threading.Thread(target=run, name=f"finops-shim-{port}", daemon=True)
    handle.thread = t
    t.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the shim did not start on {host}:{port}")
        time.sleep(0.02)
    return handle


@dataclass
class AppHandle:
    """Any ASGI app on a loopback port in a daemon thread (fake upstreams in tests and benches)."""

    app: Any
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_app_in_thread(
    app: Any, *, host: str = "127.0.0.1", port: int | None = None, ready_timeout: float = 20
) -> AppHandle:
    port = port or free_port()
    cfg = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="error",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    server = uvicorn.Server(cfg)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    t = threading.Thread(
        target=lambda: asyncio.run(server.serve()), name=f"asgi-{port}", daemon=True
    )
    t.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"app did not start on {host}:{port}")
        time.sleep(0.02)
    return AppHandle(app, server, t, host, port)
