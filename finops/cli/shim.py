"""`finops shim serve|hash-key|check`: run the OpenAI-compatible routing shim."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from finops.cli._common import fail

LOG_LEVELS = ("debug", "info", "warning", "error")

shim_app = typer.Typer(help="The live routing shim in front of vLLM tiers.", no_args_is_help=True)


def _build_config(
    config: Path | None,
    upstream: list[str] | None,
    router: Path | None,
    api_key: list[str] | None,
    log: Path | None,
    host: str | None,
    port: int | None,
    workers: int | None = None,
    model: list[str] | None = None,
):  # -> ShimConfig
    from finops.shim.config import (
        ConfigError,
        check_port,
        check_workers,
        from_flags,
        hash_key,
        load_config,
        with_overrides,
    )

    try:
        # flag values first: a bad --port must not be wrapped (70000 -> 4464) or reported late
        if port is not None:
            check_port(port, "--port")
        if host is not None and not host.strip():
            # "" would listen on every interface (auth may be off): never by accident
            fail("--host: expected a non-empty address (such as 127.0.0.1 or 0.0.0.0)")
        if workers is not None:
            check_workers(workers, "--workers")
        if config is not None:
            if upstream or model:
                fail(
                    "give either --config FILE or --upstream TIER=URL (and --model TIER=NAME) "
                    "flags, not both; a config file names models in [tiers.X] model"
                )
            cfg = load_config(config)
            changes: dict = {
                "host": host,
                "port": port,
                "workers": workers,
                "log_dir": log,
                "router_path": router,
            }
            if api_key:
                keys = {}
                for spec in api_key:
                    k, sep, tenant = spec.rpartition("=")  # keys may end in "="
                    if not (sep and k.strip() and tenant):
                        # the value is a secret: say what is wrong with it, not what it is
                        fail(
                            "--api-key: expected KEY=TENANT (the key is hashed in memory, "
                            "never stored); one value has no '=' or an empty side"
                        )
                    h = hash_key(k)
                    if h in keys:  # refused as in the file and with flags only
                        fail(
                            f"--api-key: the same key is given twice (tenants {keys[h]!r} and "
                            f"{tenant!r}); a key bills one tenant"
                        )
                    keys[h] = tenant
                # added to the file's keys, and again after every reload (cfg.overrides)
                changes["extra_api_keys"] = keys
            return with_overrides(cfg, **changes)
        if not upstream:
            fail("give --config FILE, or at least one --upstream TIER=URL (tiers cheapest first)")
        return from_flags(
            upstream,
            router=router,
            api_keys=api_key,
            log_dir=log,
            host=host or "127.0.0.1",
            port=8080 if port is None else port,
            workers=1 if workers is None else workers,
            models=model,
        )
    except ConfigError as exc:
        fail(str(exc))


def _check_router(cfg):  # -> the policy
    """The config's router, loaded and verified; one error line naming where it came from."""
    from finops.shim.app import build_router

    try:
        return build_router(cfg)
    except Exception as exc:
        from_file = cfg.source_path is not None and cfg.overrides.get("router_path") is None
        where = f"{cfg.source_path}: [router] path" if from_file else "--router"
        fail(f"{where}: {exc}")


class _HeldSighup:
    """SIGHUP's handler while `shim serve` starts (seconds: the router is loaded twice).

    SIGHUP's default action kills the process, and ignored, a reload asked for meanwhile
    (a deploy right after a restart) was lost. Recorded here instead, it is run once the
    shim serves (`take`, called then, says whether one came)."""

    def __init__(self) -> None:
        self.pending = False

    def __call__(self, _signum: int, _frame: object) -> None:
        self.pending = True

    def take(self) -> bool:
        pending, self.pending = self.pending, False
        return pending


def _check_log_dir(log_dir: Path) -> None:
    if log_dir.exists() and not log_dir.is_dir():
        fail(f"request log folder {log_dir}: a file, not a folder")


@shim_app.command("serve")
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML config (see examples/shim.toml).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default 8080).")] = None,
    upstream: Annotated[
        list[str] | None,
        typer.Option(
            "--upstream",
            help="TIER=URL of a vLLM server; repeat for replicas and tiers, cheapest tier first.",
        ),
    ] = None,
    router: Annotated[
        Path | None,
        typer.Option("--router", help="Trained router artifact folder (default: the rule policy)."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="TIER=NAME: the model name that tier's vLLM serves (default: the tier name).",
        ),
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="KEY=TENANT (split at the last '='); repeatable. None given: auth is off, "
            "tenant 'default'.",
        ),
    ] = None,
    log: Annotated[
        Path | None, typer.Option("--log", help="Folder for the JSONL request log.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Shim processes sharing the port (default 1, or \\[server] workers); "
            "about one per core above ~1,000 req/s. Share the cache with \\[cache] redis_url.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
) -> None:
    """Serve the OpenAI-compatible shim (SIGHUP reloads config and router)."""
    # a reload asked for while the router loads (seconds) must neither kill the process
    # (SIGHUP's default action) nor be lost: recorded, and run once the shim serves (the
    # app, or the supervisor, takes SIGHUP over by then)
    held = _HeldSighup()
    signal.signal(signal.SIGHUP, held)
    if log_level.lower() not in LOG_LEVELS:
        fail(f"--log-level: expected one of {'|'.join(LOG_LEVELS)}, got {log_level!r}")
    log_level = log_level.lower()
    cfg = _build_config(config, upstream, router, api_key, log, host, port, workers, model)
    from finops.shim.server import serve as _serve

    # the artifact and the log folder before binding the port: a clear error, not a traceback
    _check_router(cfg)
    if cfg.log_dir is not None:
        _check_log_dir(cfg.log_dir)
        try:
            cfg.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"request log folder {cfg.log_dir}: cannot create it ({exc.strerror})")
    if not cfg.auth_enabled:
        typer.secho(
            f"WARNING: AUTH IS OFF - no API keys configured; every request is tenant '{cfg.default_tenant}'.",
            fg="red",
            bold=True,
            err=True,
        )
    from finops.shim.workers import bind_socket, host_port, serve_workers

    # bound before the banner, for one process as for --workers: a taken port or an
    # unknown host is one line naming them and a non-zero status (uvicorn printed the
    # bare errno text and exited 0), never after a banner saying the shim is on
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as exc:
        fail(exc.strerror or str(exc))
    with sock:
        typer.echo(
            f"finops shim on http://{host_port(cfg.host, sock.getsockname()[1])}/v1  tiers: "
            + ", ".join(f"{n}->{list(t.upstreams)}" for n, t in cfg.tiers.items())
            + f"  alias: {cfg.alias}  router: {cfg.router_path or 'rules-v1'}"
            + f"  log: {cfg.log_dir or 'off'}  workers: {cfg.workers}",
            err=True,
        )
        if cfg.workers > 1:
            try:
                status = serve_workers(
                    cfg, cfg.workers, log_level=log_level, sock=sock, reload_pending=held.take
                )
            except OSError as exc:  # its temporary folders
                fail(str(exc))
            raise typer.Exit(status)
        _serve(cfg, log_level=log_level, sockets=[sock], reload_pending=held.take)


@shim_app.command("hash-key")
def hash_key_cmd(
    key: Annotated[
        str,
        typer.Argument(
            help="The API key to hash (for \\[auth] keys and operator_keys); `-` reads it from standard input,"
            " which keeps it out of the process list and the shell history."
        ),
    ],
) -> None:
    """Print the sha256 form an API key is stored in."""
    from finops.shim.config import EMPTY_KEY_SHA256, hash_key

    # the bytes as given, whitespace stripped as auth strips the bearer token (hash_key):
    # a key that is not UTF-8 is hashed as a client sends it, not a UnicodeEncodeError
    digest = hash_key(sys.stdin.buffer.readline() if key == "-" else key)
    if digest == EMPTY_KEY_SHA256:
        fail("hash-key: the key is empty; give the API key clients will send")
    typer.echo(digest)


@shim_app.command("check")
def check(config: Annotated[Path, typer.Argument(help="TOML config to validate.")]) -> None:
    """Validate a config file and its router artifact without serving."""
    cfg = _build_config(config, None, None, None, None, None, None)
    r = _check_router(cfg)
    if cfg.log_dir is not None:
        _check_log_dir(cfg.log_dir)
    typer.echo(
        f"ok: {len(cfg.tiers)} tiers {cfg.tier_names}, router {r.version}, auth {'on' if cfg.auth_enabled else 'OFF'}, /metrics {'operator keys' if cfg.operator_keys else 'open'}, {len(cfg.caps)} cap rules"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(shim_app, name="shim")
