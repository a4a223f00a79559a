"""Several shim processes on one listening socket, under a small supervisor.

Why: one shim process is one Python interpreter, so it proxies about 1,000-2,000
requests/s per core (parsing, routing and logging are Python). A host with more
cores serves more by running more processes, as gunicorn and uvicorn do with
`--workers`. `finops shim serve --workers N` (or `[server] workers = N`):

- the socket is bound once, here, and every worker accepts on it (the kernel
  hands each new connection to one of them);
- `/metrics` on any worker reports all of them (prometheus_client's multiprocess
  mode, in a private folder removed at exit);
- each worker writes its own request-log files (the pid is in their names);
- the response cache, idempotency records and in-flight coalescing are per worker
  unless `[cache] redis_url` is set, which shares the cache and the idempotency
  records (the supervisor says so at start); breakers and retry budgets are per
  worker;
- SIGHUP reloads every worker; SIGTERM or SIGINT drains them (in-flight requests
  finish, logs are fsynced); a worker that dies is restarted, and a worker that
  keeps dying at start stops the supervisor with an error instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from finops.shim.config import ConfigError, ShimConfig, reread_config
from finops.shim.metrics import MULTIPROC_ENV

log = logging.getLogger("finops.shim.workers")

CRASH_WINDOW_S = 10.0  # a worker that dies this soon after starting counts as a crash at start
MAX_QUICK_CRASHES = 3


def bind_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """The listening socket all workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _exit_with_parent(parent: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies (Linux), so a
    supervisor killed hard does not leave workers serving the port unsupervised."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(cfg: ShimConfig, sock: socket.socket, index: int, log_level: str, parent: int) -> None:
    """One worker process: the ordinary shim app under uvicorn, on the shared socket."""
    from finops.shim.server import serve

    # a reload forwarded before the app installs its handler must not kill the worker
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _exit_with_parent(parent)
    # a worker restarted after a reload serves what the file says now, like its siblings
    # (the supervisor's copy is the config at start); a file broken since keeps that copy
    try:
        cfg = reread_config(cfg)
    except ConfigError as exc:
        logging.getLogger("finops.shim").error(
            "worker-%d: config file refused, serving the config of the start: %s", index, exc
        )
    serve(cfg, log_level=log_level, sockets=[sock], log_tag=f"worker-{index}")


class Supervisor:
    """Start, watch, reload and stop `workers` shim processes (see the module docstring)."""

    def __init__(self, cfg: ShimConfig, workers: int, *, log_level: str = "info") -> None:
        if workers < 1:
            raise ValueError(f"workers: expected 1 or more, got {workers}")
        self.cfg = cfg
        self.workers = workers
        self.log_level = log_level
        self._ctx = multiprocessing.get_context("spawn")  # no fork after numpy/BLAS threads
        self._procs: list[Any] = []
        self._started: list[float] = []
        self._quick_crashes = 0
        self._stop_signal: int | None = None
        self._reload = False

    def _spawn(self, index: int, sock: socket.socket) -> Any:
        p = self._ctx.Process(
            target=_worker,
            args=(self.cfg, sock, index, self.log_level, os.getpid()),
            name=f"finops-shim-worker-{index}",
            daemon=False,
        )
        p.start()
        log.info("worker %d started (pid %d)", index, p.pid)
        return p

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop_signal = signum

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0 clean, 1 crash loop)."""
        sock = bind_socket(self.cfg.host, self.cfg.port)  # first: a busy port is the usual error
        metrics_dir = tempfile.mkdtemp(prefix="finops-shim-metrics-")
        previous = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
        handlers = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        status = 0
        try:
            if self.cfg.redis_url is None:
                log.warning(
                    "%d workers without [cache] redis_url: each keeps its own response cache "
                    "and idempotency records (a retry that lands on another worker is served "
                    "and billed again)",
                    self.workers,
                )
            for i in range(self.workers):
                self._procs.append(self._spawn(i, sock))
                self._started.append(time.monotonic())
            status = self._watch(sock)
        finally:
            self._drain()
            for s, h in handlers.items():
                signal.signal(s, h)
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
        return status

    def _watch(self, sock: socket.socket) -> int:
        from prometheus_client import multiprocess

        while self._stop_signal is None:
            time.sleep(0.2)
            if self._reload:
                self._reload = False
                log.info("SIGHUP: reloading %d workers", len(self._procs))
                for p in self._procs:
                    if p.is_alive():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p.pid, signal.SIGHUP)
            for i, p in enumerate(self._procs):
                if p.is_alive() or self._stop_signal is not None:
                    continue
                multiprocess.mark_process_dead(p.pid)
                lived = time.monotonic() - self._started[i]
                log.error("worker %d (pid %d) exited with %s", i, p.pid, p.exitcode)
                self._recover_log(p.pid)
                self._quick_crashes = self._quick_crashes + 1 if lived < CRASH_WINDOW_S else 0
                if self._quick_crashes >= MAX_QUICK_CRASHES:
                    log.error(
                        "workers keep dying within %.0f s of starting; stopping (see the log above)",
                        CRASH_WINDOW_S,
                    )
                    return 1
                self._procs[i] = self._spawn(i, sock)
                self._started[i] = time.monotonic()
        log.info("signal %d: draining %d workers", self._stop_signal, len(self._procs))
        return 0

    def _recover_log(self, pid: int) -> None:
        if self.cfg.log_dir is None:
            return
        from finops.shim.requestlog import recover_open_files

        try:
            for path in recover_open_files(self.cfg.log_dir, pid):
                log.warning("closed out the request log %s the dead worker left open", path)
        except OSError as exc:
            log.error("could not close out the dead worker's request log: %s", exc)

    def _drain(self) -> None:
        for p in self._procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)  # uvicorn: finish in-flight requests, then exit
        deadline = time.monotonic() + 35  # uvicorn's graceful timeout is 30 s
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join(5)
            if p.exitcode != 0:
                self._recover_log(p.pid)


def serve_workers(cfg: ShimConfig, workers: int, *, log_level: str = "info") -> int:
    """Serve with `workers` processes in the foreground; returns the exit status."""
    from finops.shim.server import configure_logging

    configure_logging(log_level)
    return Supervisor(cfg, workers, log_level=log_level).run()
