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
  records (the supervisor says so at start); the stored-response index (stored.py)
  is shared through Redis, or else a SQLite file in a folder the supervisor makes and
  removes; breakers and retry budgets are per worker;
- SIGHUP reloads every worker (one still starting is sent it once it serves: until
  then SIGHUP would kill it); SIGTERM or SIGINT drains them (in-flight requests
  finish, logs are fsynced; the supervisor closes its copy of the socket first, so a new
  connection is refused at once, as by one process, and a load balancer retries
  elsewhere); a worker that dies is restarted (the request-log file it left open is
  closed out; at start, so are those of processes no longer running);
- the supervisor keeps a verified copy of the config and router artifact the workers
  serve (checked at start, again at each SIGHUP and, with `[server] watch`, when the
  files change): a restarted worker serves that copy, as its siblings do, never the
  files as they are on disk now. A deploy staged without a reload (a new artifact or
  config put in place, no SIGHUP yet) reaches no worker before the others; files broken
  since the last reload (a tampered manifest, a broken config) do not make it die in a
  loop;
- a worker that cannot start at all logs one line and exits 3. While another worker
  serves, the supervisor keeps restarting it with a growing delay and says so; only
  when workers keep dying at start and none is serving does it stop with status 1
  (a bad file never makes it drain a healthy worker).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finops.shim.config import ShimConfig, check_auth_kept, reread_config
from finops.shim.metrics import MULTIPROC_ENV
from finops.shim.stored import STATE_DIR_ENV

log = logging.getLogger("finops.shim.workers")

CRASH_WINDOW_S = 10.0  # a worker that dies this soon after starting counts as a crash at start
MAX_QUICK_CRASHES = 3
BACKOFF_S = 2.0  # first delay before restarting a worker that keeps failing while others serve
BACKOFF_MAX_S = 60.0
WATCH_POLL_S = 2.0  # with [server] watch: how often the supervisor looks for changed files
EXIT_CANNOT_START = 3  # a worker's exit status when it can load neither the files nor the copy
KEEP_COPIES = 2  # verified artifact copies kept (the current one and the one before)
# blocked from a worker's exec until _worker ignores them (their default action kills it)
_START_BLOCKED = {signal.SIGHUP, signal.SIGINT}


@dataclass(frozen=True)
class LastGood:
    """The config and router the workers serve, as last verified by the supervisor.

    `artifact` is a private verified copy of `cfg.router_path` (None: no artifact, the
    rule policy). A worker started (or restarted) serves this, as its siblings do, not
    the files as they are on disk now: those may hold a deploy staged for the next
    reload, or a bad save.
    """

    cfg: ShimConfig
    artifact: Path | None
    version: str


def host_port(host: str, port: int) -> str:
    """host:port as in a URL (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """The listening socket all workers share. Refused: an OSError whose strerror says
    which address, and why."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = host_port(host, port)
        raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
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


class _CannotStart(Exception):
    """A worker can load neither the files nor the last good copy (the message says why)."""


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _worker_setup(cfg: ShimConfig, last_good: LastGood | None, wlog: logging.Logger) -> tuple:
    """(config, router) for a worker starting now: the supervisor's last good copy, the
    config and router its siblings serve (the files on disk may hold a deploy staged for
    the next reload, or a bad save). Without a copy (the supervisor could not keep one),
    the files as they are now. Raises _CannotStart (one line: which file, why)."""
    from finops.shim.app import build_router

    if last_good is None:
        try:
            new = reread_config(cfg)
        except Exception as exc:  # ConfigError; OSError from a file that went away
            raise _CannotStart(
                f"config file {cfg.source_path} refused ({_reason(exc)}); no verified copy "
                "to serve instead"
            ) from None
        try:
            return new, build_router(new)
        except Exception as exc:  # ArtifactError, OSError, ValueError (tiers), ImportError
            raise _CannotStart(
                f"router {new.router_path or 'rules'} refused ({_reason(exc)}); no verified "
                "copy to serve instead"
            ) from None
    try:
        router = build_router(replace(last_good.cfg, router_path=last_good.artifact))
    except Exception as exc:
        raise _CannotStart(
            f"the verified copy {last_good.artifact} of router {last_good.cfg.router_path} "
            f"failed ({_reason(exc)})"
        ) from None
    router.path = last_good.cfg.router_path  # a later reload loads the real path again
    wlog.debug(
        "serving router %s (verified copy %s), as the other workers do",
        router.version,
        last_good.artifact or "of the rule policy",
    )
    return last_good.cfg, router


def _worker(
    cfg: ShimConfig,
    sock: socket.socket,
    index: int,
    log_level: str,
    parent: int,
    last_good: LastGood | None = None,
    ready: Any = None,
) -> None:
    """One worker process: the ordinary shim app under uvicorn, on the shared socket."""
    # SIGHUP and SIGINT were blocked from the exec (see Supervisor._spawn): ignored now,
    # a pending one is dropped. SIGHUP: the app takes it once serving, and the supervisor
    # sends a reload asked for meanwhile then. SIGINT (Ctrl-C reaches the whole process
    # group): ignored while the app is built, then serve() stops on it as on SIGTERM
    # (uvicorn drains, and re-raises it under serve()'s handler: exit 0, without a
    # KeyboardInterrupt traceback); the supervisor drains a worker still starting with
    # SIGTERM.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_BLOCKED)
    from finops.shim.app import create_app
    from finops.shim.server import configure_logging, serve

    _exit_with_parent(parent)
    tag = f"worker-{index}"
    configure_logging(log_level, tag)
    wlog = logging.getLogger("finops.shim")
    # what its siblings serve: the supervisor's last good copy (refreshed at each SIGHUP,
    # and by [server] watch), not the files on disk, which may differ until the next reload
    try:
        cfg, router = _worker_setup(cfg, last_good, wlog)
        app = create_app(cfg, router=router)
    except Exception as exc:  # one line, no traceback: the supervisor restarts or stops
        wlog.debug("start failed", exc_info=True)
        msg = str(exc) if isinstance(exc, _CannotStart) else _reason(exc)
        wlog.error("cannot start: %s", msg)
        sys.exit(EXIT_CANNOT_START)
    serve(
        cfg,
        app=app,
        log_level=log_level,
        sockets=[sock],
        log_tag=tag,
        recover_logs=False,  # the supervisor does it (at start, and for each dead worker)
        on_started=None if ready is None else ready.set,
    )


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
        self._ready: list[Any] = []  # per worker: an Event it sets once it serves
        self._slot_crashes: list[int] = []  # per worker slot: quick deaths in a row
        self._due: list[float | None] = []  # per slot: when a delayed restart is due
        self._hup_due: list[bool] = []  # per slot: a reload to send once the worker serves
        self._quick_crashes = 0
        self._stop_signal: int | None = None
        self._reload = False
        self.last_good: LastGood | None = None
        self._copies_dir: Path | None = None
        self._copies: list[Path] = []
        self._signature: tuple = ()
        self._watched = cfg  # the config whose files _signature describes

    def _spawn(self, index: int, sock: socket.socket) -> Any:
        if self.cfg.watch:  # changed since the last poll: this worker starts from it too
            self._poll_files()
        # exec resets the child's handlers: SIGHUP and SIGINT kill it until _worker ignores
        # them, after a second of imports. Blocked here, the mask is inherited across exec,
        # so one sent meanwhile (to the process group, say) waits, and _worker drops it.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _START_BLOCKED)
        try:
            # the first Event starts multiprocessing's resource tracker, a child too, which
            # keeps SIGHUP blocked for good (killed by a group SIGHUP, it was relaunched and
            # printed a traceback per semaphore at exit); starting it unblocks SIGINT here
            ready = self._ctx.Event()
            signal.pthread_sigmask(signal.SIG_BLOCK, _START_BLOCKED)
            p = self._ctx.Process(
                target=_worker,
                args=(self.cfg, sock, index, self.log_level, os.getpid(), self.last_good, ready),
                name=f"finops-shim-worker-{index}",
                daemon=False,
            )
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.info("worker %d started (pid %d)", index, p.pid)
        if index < len(self._procs):
            self._procs[index] = p
            self._started[index] = time.monotonic()
            self._ready[index] = ready
            self._hup_due[index] = False  # it serves the last good copy, as reloaded
        else:
            self._procs.append(p)
            self._started.append(time.monotonic())
            self._ready.append(ready)
            self._slot_crashes.append(0)
            self._due.append(None)
            self._hup_due.append(False)
        return p

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop_signal = signum

    def run(
        self,
        sock: socket.socket | None = None,
        *,
        reload_pending: Callable[[], bool] | None = None,
    ) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0 clean, 1 crash loop).

        `sock`: the listening socket, already bound (the CLI binds it before its banner);
        None binds cfg.host:cfg.port. Closed when the drain begins, either way.
        `reload_pending`: says (once) whether a SIGHUP came before this took SIGHUP over
        (the CLI records one while it loads the router); it is a reload, run once the
        workers serve."""
        if sock is None:
            sock = bind_socket(self.cfg.host, self.cfg.port)  # first: a busy port is usual
        metrics_dir = tempfile.mkdtemp(prefix="finops-shim-metrics-")
        # state the workers share without Redis (the stored-response index: stored.py)
        state_dir = tempfile.mkdtemp(prefix="finops-shim-state-")
        previous_state = os.environ.get(STATE_DIR_ENV)
        os.environ[STATE_DIR_ENV] = state_dir
        self._copies_dir = Path(tempfile.mkdtemp(prefix="finops-shim-router-"))
        previous = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
        handlers = {
            s: signal.signal(s, self._on_signal)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        if reload_pending is not None and reload_pending():
            self._reload = True  # the config the CLI read may be older than that SIGHUP
        status = 0
        try:
            if self.cfg.redis_url is None:
                log.warning(
                    "%d workers without [cache] redis_url: each keeps its own response cache "
                    "and idempotency records (a retry that lands on another worker is served "
                    "and billed again)",
                    self.workers,
                )
            from finops.shim.server import recover_log_folder

            recover_log_folder(self.cfg.log_dir)  # files earlier shims killed hard left open
            self._signature = self._files_signature(self.cfg)
            try:
                self.last_good = self._verify(self.cfg)
            except Exception as exc:
                log.error(
                    "router %s: cannot keep a verified copy (%s); a worker that cannot load "
                    "the files will not start",
                    self.cfg.router_path,
                    _reason(exc),
                )
            for i in range(self.workers):
                self._spawn(i, sock)
            status = self._watch(sock)
        finally:
            # before the drain: with no worker accepting any more, a connection the kernel
            # queued on our copy would wait for the drain (up to 30 s) and then be reset
            sock.close()
            self._drain()
            for s, h in handlers.items():
                signal.signal(s, h)
            shutil.rmtree(metrics_dir, ignore_errors=True)
            shutil.rmtree(state_dir, ignore_errors=True)
            if previous_state is None:
                os.environ.pop(STATE_DIR_ENV, None)
            else:
                os.environ[STATE_DIR_ENV] = previous_state
            shutil.rmtree(self._copies_dir, ignore_errors=True)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
        return status

    # -- the last good config and router --
    def _verify(self, cfg: ShimConfig) -> LastGood:
        """Verify cfg's router and keep a private copy of its artifact; raises if refused."""
        from finops.shim.app import build_router

        if cfg.router_path is None:
            return LastGood(cfg, None, build_router(cfg).version)
        from finops.router.artifact import copy_verified
        from finops.shim.policy import Router

        assert self._copies_dir is not None
        dst = self._copies_dir / f"router-{len(self._copies) + 1}-{time.monotonic_ns()}"
        try:
            policy = copy_verified(cfg.router_path, dst)
            Router(policy, cfg.tier_names)  # it routes only to tiers the config has
        except BaseException:
            shutil.rmtree(dst, ignore_errors=True)
            raise
        self._copies.append(dst)
        for old in self._copies[:-KEEP_COPIES]:  # a worker starting now may still read the last
            shutil.rmtree(old, ignore_errors=True)
        self._copies = self._copies[-KEEP_COPIES:]
        return LastGood(cfg, dst, str(policy.version))

    @staticmethod
    def _files_signature(cfg: ShimConfig) -> tuple:
        """What the config file and the router artifact look like on disk (changes only)."""
        out: list[Any] = []
        for p in (cfg.source_path, cfg.router_path):
            if p is None:
                out.append(None)
                continue
            real = Path(p).resolve()
            files = [real / "manifest.json", real / "model.skops"] if real.is_dir() else [real]
            entry: list[Any] = [str(real)]
            for f in files:
                try:
                    st = f.stat()
                    entry.append((st.st_ino, st.st_size, st.st_mtime_ns))
                except OSError:
                    entry.append(None)
            out.append(tuple(entry))
        return tuple(out)

    def _refresh_last_good(self, why: str) -> bool:
        """Verify the files as they are now (the workers reload them too); keep a copy if
        good (True), which a worker started from now on serves.

        The files are watched from now on as this finds them (a refused config file: with
        the router watched before), so one bad save is refused once, not every poll."""
        try:
            cfg = reread_config(self.cfg)
            # and against what a restarted worker serves now: a reload that turned auth
            # on since the start must not be undone by the next one
            check_auth_kept(self.last_good.cfg if self.last_good else self.cfg, cfg)
        except Exception as exc:  # ConfigError, OSError
            self._signature = self._files_signature(self._watched)
            problem = f"config file {self.cfg.source_path} refused ({_reason(exc)})"
        else:
            self._watched = cfg
            self._signature = self._files_signature(cfg)
            try:
                self.last_good = self._verify(cfg)
                return True
            except Exception as exc:  # ArtifactError, OSError, ValueError (tiers)
                problem = f"router {cfg.router_path} refused ({_reason(exc)})"
        log.warning(
            "%s: %s; a worker restarted from now on serves the last good copy (router %s)",
            why,
            problem,
            self.last_good.version if self.last_good else None,
        )
        return False

    def _poll_files(self) -> None:
        """With [server] watch: the files changed since last seen are verified and, if
        good, become the copy a worker started from now on serves (the serving workers
        reload them themselves: they watch the files too). A worker still starting has
        the copy before it, and its own watch may first have looked at the files after
        the change: it is sent a reload once it serves."""
        if self._files_signature(self._watched) == self._signature:
            return
        if self._refresh_last_good("file change"):
            for i, ready in enumerate(self._ready):
                if self._due[i] is None and not ready.is_set():
                    self._hup_due[i] = True

    # -- watching the workers --
    def _serving(self, but: int) -> int:
        """Workers other than `but` that are alive and serve (said so, or lived long)."""
        now = time.monotonic()
        return sum(
            1
            for j, p in enumerate(self._procs)
            if j != but
            and self._due[j] is None
            and p.is_alive()
            and (self._ready[j].is_set() or now - self._started[j] >= CRASH_WINDOW_S)
        )

    def _watch(self, sock: socket.socket) -> int:
        from prometheus_client import multiprocess

        next_poll = time.monotonic() + WATCH_POLL_S
        while self._stop_signal is None:
            time.sleep(0.2)
            if self._reload:
                self._reload = False
                alive = [i for i, p in enumerate(self._procs) if self._due[i] is None]
                log.info("SIGHUP: reloading %d workers", len(alive))
                for i in alive:
                    self._hup_due[i] = True  # sent below, once the worker serves
                self._refresh_last_good("SIGHUP")
                for i, due in enumerate(self._due):
                    if due is not None:  # the files may be fixed: a waiting worker starts now
                        self._due[i] = time.monotonic()
            elif self.cfg.watch and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + WATCH_POLL_S
                self._poll_files()
            self._send_reloads()
            for i, p in enumerate(self._procs):
                if self._stop_signal is not None:
                    break
                due = self._due[i]
                if due is not None:
                    if time.monotonic() >= due:
                        self._due[i] = None
                        self._spawn(i, sock)
                    continue
                if p.is_alive():
                    continue
                multiprocess.mark_process_dead(p.pid)
                lived = time.monotonic() - self._started[i]
                log.error("worker %d (pid %d) exited with %s", i, p.pid, p.exitcode)
                self._recover_log(p.pid)
                if p.exitcode == -signal.SIGHUP:  # a reload sent by someone else, too early:
                    self._spawn(i, sock)  # not the files' fault, not a crash at start
                    continue
                quick = lived < CRASH_WINDOW_S
                self._quick_crashes = self._quick_crashes + 1 if quick else 0
                self._slot_crashes[i] = self._slot_crashes[i] + 1 if quick else 0
                serving = self._serving(but=i)
                if not serving and self._quick_crashes >= MAX_QUICK_CRASHES:
                    log.error(
                        "workers keep dying within %.0f s of starting and none is serving; "
                        "stopping (see the log above)",
                        CRASH_WINDOW_S,
                    )
                    return 1
                crashes = self._slot_crashes[i]
                if serving and crashes >= MAX_QUICK_CRASHES:
                    delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (crashes - MAX_QUICK_CRASHES))
                    log.error(
                        "worker %d died within %.0f s of starting %d times in a row; %d other "
                        "worker(s) still serving, so the supervisor keeps them and restarts "
                        "worker %d in %.0f s (backoff; SIGHUP retries at once)",
                        i,
                        CRASH_WINDOW_S,
                        crashes,
                        serving,
                        i,
                        delay,
                    )
                    self._due[i] = time.monotonic() + delay
                    continue
                self._spawn(i, sock)
        log.info("signal %d: draining %d workers", self._stop_signal, len(self._procs))
        return 0

    def _send_reloads(self) -> None:
        """SIGHUP the workers with a reload due that serve: one still starting would die of
        it (its app takes SIGHUP once serving; until then it ignores it, after imports)."""
        for i, p in enumerate(self._procs):
            if self._hup_due[i] and self._ready[i].is_set():
                self._hup_due[i] = False
                if p.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGHUP)

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
        # a worker cuts what still runs after [server] drain_timeout_s (uvicorn's graceful
        # timeout); a fixed 35 s here killed workers mid-drain when it was set longer
        deadline = time.monotonic() + self.cfg.drain_timeout_s + 5
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join(5)
            if p.exitcode != 0:
                self._recover_log(p.pid)


def serve_workers(
    cfg: ShimConfig,
    workers: int,
    *,
    log_level: str = "info",
    sock: socket.socket | None = None,
    reload_pending: Callable[[], bool] | None = None,
) -> int:
    """Serve with `workers` processes in the foreground; returns the exit status.
    `sock`: the listening socket, already bound (None: bind cfg.host:cfg.port).
    `reload_pending`: see Supervisor.run."""
    from finops.shim.server import configure_logging

    configure_logging(log_level)
    return Supervisor(cfg, workers, log_level=log_level).run(sock, reload_pending=reload_pending)
