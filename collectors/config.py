"""`collectors.toml`: what `finops collect` scrapes, how often, and where it writes.

See `examples/collectors.toml` for every option with its default. Errors
name the file, the target and the option, and say what was expected.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finops.schemas import CACHE_EVENTS, REQUESTS

KINDS = ("dcgm", "vllm", "nvml", "prometheus", "log")
LOG_TABLES = (REQUESTS.name, CACHE_EVENTS.name)
"""The lake tables a log target loads (what `finops ingest requests|cache-events` loads)."""


class ConfigError(ValueError):
    """A collectors.toml (or command line) that cannot run; the message says where."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def duration(value: Any, what: str, *, allow_zero: bool = False) -> float:
    """`"10s"`, `"5m"`, `"1h"`, `"250ms"` or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like '10s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):  # TOML's nan/inf: no interval to wait
            raise ConfigError(
                f"{what}: expected a finite duration like '10s' or a number of seconds, "
                f"got {value!r}"
            )
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(
                f"{what}: expected a duration like '10s', '5m', '1h' or seconds, got {value!r}"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(f"{what}: must be {'>=' if allow_zero else '>'} 0, got {value!r}")
    return seconds


@dataclass
class TargetConfig:
    """One thing to collect from."""

    kind: str
    name: str
    url: str | None = None
    interval: float = 10.0
    timeout: float = 5.0
    # vllm
    metric_prefixes: tuple[str, ...] = ("vllm:",)
    tier: str | None = None  # stored as labels.tier: the cost split finds the tier by it
    pod: str | None = None  # stored as labels.pod: the tier of the GPU pod of that name
    # prometheus
    query: str | None = None
    step: float = 15.0
    lookback: float = 3600.0
    lag: float = 60.0
    max_points: int = 11_000
    max_samples: int = 2_000_000  # series x steps per request (prometheus_api.MAX_SAMPLES)
    # log
    path: str | None = None
    mapping: str | None = None
    table: str = "requests"
    # nvml
    host: str | None = None
    max_bytes: int = 64 * 1024 * 1024


@dataclass
class CollectConfig:
    """The daemon's settings and its targets."""

    lake: Path
    checkpoint_dir: Path
    targets: list[TargetConfig] = field(default_factory=list)
    flush_interval: float = 10.0
    flush_rows: int = 200_000
    # rows held in memory while the lake cannot be written; past it the oldest are dropped
    max_buffered_rows: int = 2_000_000
    status_interval: float = 30.0
    jitter: float = 0.1
    backoff_initial: float = 1.0
    backoff_max: float = 300.0


_GLOBAL_KEYS = {
    "lake",
    "checkpoint_dir",
    "flush_interval",
    "flush_rows",
    "max_buffered_rows",
    "status_interval",
    "jitter",
    "backoff_initial",
    "backoff_max",
    "defaults",
}
_TARGET_KEYS = {
    "kind",
    "name",
    "url",
    "interval",
    "timeout",
    "metric_prefixes",
    "tier",
    "pod",
    "query",
    "step",
    "lookback",
    "lag",
    "max_points",
    "max_samples",
    "path",
    "mapping",
    "table",
    "host",
    "max_bytes",
}
_DURATIONS = ("interval", "timeout", "step", "lookback", "lag")
_VLLM_ONLY = ("tier", "pod")
# `--vllm mid=http://host:8000`: a tier name, '=', then the URL (a URL never starts so)
_TIER_URL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.*)$")
# the servers' own default ports, for a URL given as `host` (dcgm-exporter's: 9400)
_DEFAULT_PORT = {"dcgm": 9400, "vllm": 8000, "prometheus": 9090}


def make_target(
    raw: dict[str, Any], where: str, defaults: dict[str, Any] | None = None
) -> TargetConfig:
    """Validate one target table (from TOML or built from CLI flags)."""
    merged = {**(defaults or {}), **raw}
    unknown = sorted(set(merged) - _TARGET_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {unknown}; expected some of {sorted(_TARGET_KEYS)}"
        )
    kind = merged.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    kw: dict[str, Any] = {"kind": kind}
    for key in _VLLM_ONLY:
        if key in raw and kind != "vllm":
            raise ConfigError(f"{where}.{key}: only a vllm target takes {key}, this one is {kind}")
        if kind != "vllm":
            merged.pop(key, None)  # a [collect.defaults] tier is meant for the vllm targets
    for key in _DURATIONS:
        if key in merged:
            kw[key] = duration(merged[key], f"{where}.{key}", allow_zero=key == "lag")
    for key in ("url", "query", "path", "mapping", "table", "host", "tier", "pod"):
        if key in merged:
            if not isinstance(merged[key], str) or not merged[key]:
                raise ConfigError(
                    f"{where}.{key}: expected a non-empty string, got {merged[key]!r}"
                )
            kw[key] = merged[key]
    for key in ("max_points", "max_samples", "max_bytes"):
        if key in merged:
            v = merged[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                raise ConfigError(f"{where}.{key}: expected an integer >= 2, got {v!r}")
            kw[key] = v
    if "metric_prefixes" in merged:
        v = merged["metric_prefixes"]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}.metric_prefixes: expected a list of strings, got {v!r}")
        kw["metric_prefixes"] = tuple(v)
    if kind == "vllm" and (m := _TIER_URL.match(kw.get("url", ""))):
        if kw.get("tier", m.group(1)) != m.group(1):
            raise ConfigError(
                f"{where}: url names tier {m.group(1)!r} but tier = {kw['tier']!r}; give one"
            )
        if not m.group(2):
            raise ConfigError(f"{where}.url: {m.group(0)!r} names tier {m.group(1)!r} but no URL")
        kw["tier"], kw["url"] = m.group(1), m.group(2)
    if kind == "log" and kw.get("table", "requests") not in LOG_TABLES:
        raise ConfigError(
            f"{where}.table: a log target loads one of {list(LOG_TABLES)}, got {kw['table']!r}"
        )
    if kind in ("dcgm", "vllm", "prometheus") and not kw.get("url"):
        raise ConfigError(f"{where}: a {kind} target needs url")
    if kind == "prometheus" and not kw.get("query"):
        raise ConfigError(f"{where}: a prometheus target needs query (PromQL)")
    if kind == "log" and not kw.get("path"):
        raise ConfigError(f"{where}: a log target needs path (a file or a glob)")
    if kind in _DEFAULT_PORT:
        kw["url"] = target_url(kind, kw["url"], f"{where}.url")
    if kind in ("dcgm", "vllm") and kw["url"].endswith("/metrics/"):
        # `/metrics/` reaches vLLM's prometheus_client mount, which answers
        # OpenMetrics with escaped names; `/metrics` is the exporters' own route
        kw["url"] = kw["url"].rstrip("/")
    if kind == "vllm" and not kw["url"].rstrip("/").endswith("/metrics"):
        kw["url"] = kw["url"].rstrip("/").removesuffix("/v1") + "/metrics"
    if kw.get("timeout", 5.0) > kw.get("interval", 10.0) and kind != "prometheus":
        raise ConfigError(
            f"{where}: timeout ({kw.get('timeout', 5.0):g}s) must not exceed interval "
            f"({kw.get('interval', 10.0):g}s), or scrapes would overlap"
        )
    default_name = kw.get("url") or kw.get("path") or os.uname().nodename
    if kind == "prometheus":
        default_name = f"{kw['url']} {kw['query']}"
    name = merged.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected a non-empty string, got {name!r}")
    kw["name"] = name
    return TargetConfig(**kw)


def _mapping_near(base: Path, mapping: str, where: str) -> str:
    """A relative mapping: a file next to the config, else a shipped mapping's name."""
    from collectors.mapping import shipped_mappings

    near = base / mapping
    if near.is_file():
        return str(near)
    shipped = shipped_mappings()
    if mapping in shipped:
        return mapping
    raise ConfigError(
        f"{where}: {mapping!r} is no file in {base} and not a shipped mapping "
        f"(shipped: {', '.join(shipped) or 'none'})"
    )


def load(path: str | os.PathLike[str], *, lake: Path | None = None) -> CollectConfig:
    """Read and validate a collectors.toml; `lake` (from --lake) overrides the file's."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    glob = doc.get("collect", {})
    if not isinstance(glob, dict):
        raise ConfigError(f"{p}: [collect] must be a table")
    unknown = sorted(set(glob) - _GLOBAL_KEYS)
    if unknown:
        raise ConfigError(
            f"{p} [collect]: unknown option(s) {unknown}; expected some of {sorted(_GLOBAL_KEYS)}"
        )
    extra_top = sorted(set(doc) - {"collect", "target"})
    if extra_top:
        raise ConfigError(f"{p}: unknown section(s) {extra_top}; expected [collect] and [[target]]")
    base = p.parent
    for key in ("lake", "checkpoint_dir"):
        if key in glob and (not isinstance(glob[key], str) or not glob[key].strip()):
            raise ConfigError(
                f"{p} [collect].{key}: expected a path (a non-empty string), got {glob[key]!r}"
            )
    lake_path = lake or (base / glob["lake"] if "lake" in glob else None)
    if lake_path is None:
        from finops.db import default_lake_path

        lake_path = default_lake_path()
    cfg = CollectConfig(
        lake=Path(lake_path),
        checkpoint_dir=Path(base / glob["checkpoint_dir"])
        if "checkpoint_dir" in glob
        else Path(lake_path) / "_state",
    )
    for key in ("flush_interval", "status_interval", "backoff_initial", "backoff_max"):
        if key in glob:
            setattr(cfg, key, duration(glob[key], f"{p} [collect].{key}"))
    for key in ("flush_rows", "max_buffered_rows"):
        if key in glob:
            v = glob[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{p} [collect].{key}: expected an integer >= 1, got {v!r}")
            setattr(cfg, key, v)
    if "jitter" in glob:
        v = glob["jitter"]
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
            raise ConfigError(f"{p} [collect].jitter: expected a fraction in [0, 1), got {v!r}")
        cfg.jitter = float(v)
    if cfg.backoff_max < cfg.backoff_initial:
        raise ConfigError(f"{p} [collect]: backoff_max must be >= backoff_initial")
    defaults = glob.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{p} [collect.defaults]: must be a table")
    targets = doc.get("target", [])
    if not isinstance(targets, list) or not targets:
        raise ConfigError(f"{p}: no [[target]] entries: nothing to collect")
    for i, raw in enumerate(targets, start=1):
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{p} target #{i}: expected a table ([[target]] with kind = ..., url = ...), "
                f"got {raw!r}"
            )
        t = make_target(raw, f"{p} target #{i}", defaults)
        if t.kind == "log":
            t.path = str(base / t.path) if not os.path.isabs(t.path or "") else t.path
            if t.mapping and not os.path.isabs(t.mapping):
                t.mapping = _mapping_near(base, t.mapping, f"{p} target #{i} mapping")
        cfg.targets.append(t)
    names = [t.name for t in cfg.targets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{p}: target names must be unique, repeated: {dup} (set name = ...)")
    return cfg


def target_url(kind: str, url: str, where: str = "url") -> str:
    """A target's URL as given (`host`, `host:port` or a full URL) -> the one to scrape.

    `host[:port]` gets http:// and the server's default port (dcgm-exporter 9400, vLLM
    8000, Prometheus 9090); a dcgm-exporter URL without a path gets `/metrics`. A full
    URL must be http(s) with a host, or every scrape fails with the same transport error.
    """
    url = _http_url(url, _DEFAULT_PORT[kind], where)
    if kind == "dcgm":
        parts = urlsplit(url)
        url = parts._replace(path=parts.path or "/metrics").geturl()
    return url


def _http_url(url: str, port: int, where: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected http(s)://host[:port][/path], got {url!r}")
    try:
        has_port = parts.port is not None
    except ValueError:
        raise ConfigError(f"{where}: bad port in {url!r}") from None
    if "://" in url:
        return url
    return f"http://{parts.netloc}{'' if has_port else f':{port}'}{parts.path}" + (
        f"?{parts.query}" if parts.query else ""
    )
