"""`finops collect`: scrape DCGM / vLLM / NVML / Prometheus and tail logs into the lake."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finops.cli._common import LakeOption, fail, resolve_lake


def collect(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="collectors.toml (see examples/).")
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Try every target once, write, exit 0.")
    ] = False,
    lake: LakeOption = None,
    dcgm: Annotated[
        list[str] | None, typer.Option("--dcgm", help="dcgm-exporter URL or host[:port].")
    ] = None,
    vllm: Annotated[
        list[str] | None,
        typer.Option(
            "--vllm",
            help="vLLM base or /metrics URL, or host[:port] (port 8000); TIER=URL "
            "(e.g. mid=http://vllm-mid-0:8000) names its tier, which the prefill/decode cost split needs when no GPU pod "
            "shares the URL's host name.",
        ),
    ] = None,
    nvml: Annotated[bool, typer.Option("--nvml", help="Read this host's GPUs via NVML.")] = False,
    prometheus: Annotated[
        list[str] | None,
        typer.Option("--prometheus", help="Prometheus/Thanos base URL or host[:port] (9090)."),
    ] = None,
    query: Annotated[
        list[str] | None, typer.Option("--query", help="PromQL for each --prometheus URL.")
    ] = None,
    log: Annotated[
        list[str] | None, typer.Option("--log", help="Request/usage log file or glob to tail.")
    ] = None,
    mapping: Annotated[
        str | None, typer.Option("--mapping", help="Column mapping for --log files.")
    ] = None,
    interval: Annotated[str, typer.Option(help="Scrape interval for flag targets.")] = "10s",
    timeout: Annotated[str, typer.Option(help="Per-attempt timeout for flag targets.")] = "5s",
    step: Annotated[str, typer.Option(help="query_range step for --prometheus.")] = "15s",
    since: Annotated[
        str, typer.Option(help="How far back a first --prometheus query reaches.")
    ] = "1h",
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints (default: <lake>/_state).")
    ] = None,
    max_buffered_rows: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Rows held in memory while the lake cannot be written (disk full...); past "
            "it the oldest are dropped, counted on stderr and in scrape_health "
            "(default: 2000000, about 1 GB). Failed writes are retried every flush "
            "interval, doubling to backoff_max.",
        ),
    ] = None,
) -> None:
    """Collect into the lake: from a config file, or ad hoc from flags.

    With --once every target is tried once and the command exits 0 even when
    some were down (their scrape_health rows say why); otherwise it runs until
    SIGTERM/SIGINT, then flushes and exits 0.

    Scrape each vLLM replica individually (pod IPs or a headless Service's
    per-pod names): a URL that load-balances across replicas reaches another
    process on each scrape; such a target is reported down ("URL reaches more
    than one vLLM process") and no increase is taken across two processes.
    """
    import asyncio

    import polars as pl

    from collectors import config as cfgmod
    from collectors.checkpoint import CheckpointError
    from collectors.daemon import Collector, LakeWriteError

    flags = any([dcgm, vllm, nvml, prometheus, log])
    if query and not prometheus:
        fail("--query needs --prometheus URL")
    if prometheus and not query:
        fail("--prometheus needs at least one --query PROMQL")
    try:
        if config is not None:
            if flags:
                fail("give either --config or target flags (--dcgm, --vllm, ...), not both")
            cfg = cfgmod.load(config, lake=lake)
        else:
            if not flags:
                fail(
                    "nothing to collect: give --config FILE or --dcgm/--vllm/--nvml/--prometheus/--log"
                )
            path = resolve_lake(lake)
            cfg = cfgmod.CollectConfig(
                lake=path, checkpoint_dir=checkpoint_dir or path / "_state", status_interval=30.0
            )
            common = {"interval": interval, "timeout": timeout}
            raw: list[dict] = []
            raw += [{"kind": "dcgm", "url": u, **common} for u in dcgm or []]
            raw += [{"kind": "vllm", "url": u, **common} for u in vllm or []]
            if nvml:
                raw.append({"kind": "nvml", **common})
            raw += [
                {
                    "kind": "prometheus",
                    "url": u,
                    "query": q,
                    "step": step,
                    "lookback": since,
                    "timeout": "60s",
                    "interval": interval,
                }
                for u in prometheus or []
                for q in query or []
            ]
            raw += [
                {"kind": "log", "path": p, **({"mapping": mapping} if mapping else {}), **common}
                for p in log or []
            ]
            for i, r in enumerate(raw, start=1):
                cfg.targets.append(_flag_target(cfgmod, r, f"target #{i} ({r['kind']})"))
            names = [t.name for t in cfg.targets]
            if len(set(names)) != len(names):
                fail(f"the same target is given twice: {sorted(names)}")
        if checkpoint_dir is not None:
            cfg.checkpoint_dir = checkpoint_dir
        if max_buffered_rows is not None:
            cfg.max_buffered_rows = max_buffered_rows
    except cfgmod.ConfigError as exc:
        fail(str(exc))
    resolve_lake(cfg.lake)  # a file where the lake folder should be: one error line
    try:
        collector = Collector(cfg)
    except CheckpointError as exc:
        fail(str(exc))
    if once:
        try:
            outcomes = asyncio.run(collector.run_once())
        except LakeWriteError as exc:
            fail(f"{exc} (--once: not retrying)", code=1)
        except (OSError, pl.exceptions.ComputeError) as exc:  # never a write: see flush
            fail(f"collect failed: {exc}", code=1)
        for o in outcomes:
            state = "up  " if o.up else "DOWN"
            msg = f"{state} {o.kind:<10} {o.target}  {o.samples:,} samples"
            if o.rejected:
                msg += f", {o.rejected:,} rejected"
            msg += f", {o.duration_ms:.0f} ms"
            if o.error:
                msg += f"  ({o.error})"
            typer.echo(msg)
        up = sum(o.up for o in outcomes)
        typer.echo(f"{up}/{len(outcomes)} targets up; lake: {cfg.lake}")
        return
    try:
        asyncio.run(collector.run_forever())
    except LakeWriteError as exc:  # the final flush, at shutdown
        fail(str(exc), code=1)
    except (OSError, pl.exceptions.ComputeError) as exc:
        fail(f"collect failed: {exc}", code=1)


def register(app: typer.Typer) -> None:
    app.command("collect")(collect)


# the config keys the flags set: an error about one names the flag that was typed
_FLAG_OF = {
    "lookback": "--since",
    "interval": "--interval",
    "timeout": "--timeout",
    "step": "--step",
    "mapping": "--mapping",
    "query": "--query",
}


def _flag_target(cfgmod: Any, raw: dict, where: str) -> Any:
    """`make_target` for a target built from flags, its errors worded as flags."""
    try:
        return cfgmod.make_target(raw, where)
    except cfgmod.ConfigError as exc:
        msg = str(exc)
        for key, flag in {**_FLAG_OF, "url": f"--{raw.get('kind')}"}.items():
            if msg.startswith(f"{where}.{key}: "):
                raise cfgmod.ConfigError(f"{flag}: {msg[len(where) + len(key) + 3 :]}") from None
        raise
