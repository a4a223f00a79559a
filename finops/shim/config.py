"""Shim configuration: one TOML file (or CLI flags) -> a frozen `ShimConfig`.

Why a dataclass tree and not a dict: every field is checked once, at load
time, with an error naming the file and the key (`shim.toml: [tiers.small]
upstreams: expected a non-empty list of URLs`), so a bad hot-reload is refused
before it can touch live traffic. See `examples/shim.toml` for every key.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CAP_POLICIES = ("reject", "truncate")
EXPLICIT_POLICIES = ("allow", "deny", "reroute")
TOKEN_COUNTERS = ("estimate", "upstream")


class ConfigError(ValueError):
    """A configuration the shim refuses to run with; the message names file and key."""


@dataclass(frozen=True)
class TierConfig:
    name: str
    upstreams: tuple[str, ...]  # root URLs, e.g. http://10.0.0.5:8000 (no /v1)
    model: str  # the model name the upstream serves for this tier
    api_key: str | None = None  # upstream key (never the client's), if the upstream wants one


@dataclass(frozen=True)
class CapRule:
    """A maximum input size; tier/feature/tenant "*" match anything."""

    max_input_tokens: int
    policy: str = "reject"
    tier: str = "*"
    feature: str = "*"
    tenant: str = "*"

    def matches(self, tier: str, feature: str, tenant: str) -> bool:
        return (
            self.tier in ("*", tier)
            and self.feature in ("*", feature)
            and self.tenant in ("*", tenant)
        )


@dataclass(frozen=True)
class RuleRouterConfig:
    """Thresholds of the rule-based policy (used when no artifact is given)."""

    small_max_tokens: int = 400
    mid_max_tokens: int = 2000
    tools_min_tier: int = 1  # index into tiers: requests with tools go at least here
    code_min_tier: int = 1
    features: dict[str, str] = field(default_factory=dict)  # feature -> tier, wins over sizes


@dataclass(frozen=True)
class ShimConfig:
    tiers: dict[str, TierConfig]  # insertion order = cheapest first
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # shim processes sharing the port (finops.shim.workers)
    alias: str = "auto"
    extra_aliases: tuple[str, ...] = ()
    explicit: str = "allow"
    reroute: dict[str, str] = field(default_factory=dict)
    model_aliases: dict[str, str] = field(default_factory=dict)  # client name -> tier
    router_path: Path | None = None
    rules: RuleRouterConfig = field(default_factory=RuleRouterConfig)
    exploration_rate: float = 0.0
    exploration_seed: int | None = None
    api_keys: dict[str, str] = field(default_factory=dict)  # sha256 hex -> tenant
    default_tenant: str = "default"
    feature_header: str = "x-feature"
    default_feature: str = "default"
    # caps
    caps: tuple[CapRule, ...] = ()
    token_counter: str = "estimate"
    # cache
    cache_enabled: bool = True
    cache_ttl_s: float = 300.0
    cache_max_entries: int = 10_000
    cache_max_bytes: int = 256 * 1024 * 1024
    redis_url: str | None = None
    idempotency_ttl_s: float = 86_400.0
    coalesce: bool = True
    # upstream behaviour
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 60.0
    read_timeout_s: float = 120.0
    max_connections: int = 512
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 10
    retry_budget_window_s: float = 10.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    health_interval_s: float = 5.0
    # request limits
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    # request log
    log_dir: Path | None = None
    log_rotate_bytes: int = 64 * 1024 * 1024
    log_rotate_s: float = 300.0
    log_prompts: bool = False
    # hot reload
    watch: bool = False
    source_path: Path | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def tier_names(self) -> list[str]:
        return list(self.tiers)

    @property
    def aliases(self) -> tuple[str, ...]:
        return (self.alias, *self.extra_aliases)


def hash_key(key: str) -> str:
    """The form API keys are stored in: hex sha256 of the key's UTF-8 bytes."""
    return hashlib.sha256(key.encode()).hexdigest()


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _get(
    d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any
) -> Any:
    if key not in d:
        return default
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, float))
    names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
    _expect(ok, f"{where} {key}", f"expected {names}, got {v!r}")
    return v


def _check_url(url: Any, where: str) -> str:
    _expect(
        isinstance(url, str) and url.startswith(("http://", "https://")),
        where,
        f"expected an http(s) URL of a vLLM server, got {url!r}",
    )
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def parse_config(
    data: dict[str, Any], *, source: str = "<config>", base: Path | None = None
) -> ShimConfig:
    """Validate a TOML document (already parsed) into a ShimConfig."""
    known = {
        "server",
        "tiers",
        "routing",
        "router",
        "auth",
        "caps",
        "cache",
        "upstream",
        "log",
        "limits",
    }
    unknown = set(data) - known
    _expect(not unknown, source, f"unknown sections {sorted(unknown)}; expected {sorted(known)}")
    server = data.get("server", {})
    kw: dict[str, Any] = {}
    kw["host"] = _get(server, "host", str, f"{source}: [server]", "127.0.0.1")
    kw["port"] = _get(server, "port", int, f"{source}: [server]", 8080)
    kw["watch"] = _get(server, "watch", bool, f"{source}: [server]", False)
    kw["workers"] = _get(server, "workers", int, f"{source}: [server]", 1)
    _expect(
        1 <= kw["workers"] <= 256,
        f"{source}: [server]",
        f"workers: expected 1..256, got {kw['workers']}",
    )

    tiers_raw = data.get("tiers")
    _expect(
        isinstance(tiers_raw, dict) and tiers_raw,
        source,
        '[tiers] needs at least one tier, e.g. [tiers.small] upstreams = ["http://127.0.0.1:8000"]',
    )
    tiers: dict[str, TierConfig] = {}
    for name, t in tiers_raw.items():
        where = f"{source}: [tiers.{name}]"
        _expect(isinstance(t, dict), where, "expected a table")
        ups = t.get("upstreams", t.get("upstream"))
        if isinstance(ups, str):
            ups = [ups]
        _expect(
            isinstance(ups, list) and len(ups) > 0,
            where,
            "upstreams: expected a non-empty list of URLs",
        )
        tiers[name] = TierConfig(
            name=name,
            upstreams=tuple(_check_url(u, f"{where} upstreams") for u in ups),
            model=_get(t, "model", str, where, name),
            api_key=_get(t, "api_key", str, where, None),
        )
    kw["tiers"] = tiers

    routing = data.get("routing", {})
    w = f"{source}: [routing]"
    kw["alias"] = _get(routing, "alias", str, w, "auto")
    kw["extra_aliases"] = tuple(_get(routing, "extra_aliases", list, w, []))
    kw["explicit"] = _get(routing, "explicit", str, w, "allow")
    _expect(
        kw["explicit"] in EXPLICIT_POLICIES, f"{w} explicit", f"expected one of {EXPLICIT_POLICIES}"
    )
    kw["reroute"] = dict(_get(routing, "reroute", dict, w, {}))
    kw["model_aliases"] = dict(_get(routing, "model_aliases", dict, w, {}))
    valid_targets = set(tiers) | {kw["alias"], *kw["extra_aliases"]}
    for k, v in {**kw["reroute"], **kw["model_aliases"]}.items():
        _expect(
            v in valid_targets,
            f"{w} {k}",
            f"target {v!r} is not a tier or the alias; tiers: {list(tiers)}",
        )
    kw["feature_header"] = _get(routing, "feature_header", str, w, "x-feature").lower()
    kw["default_feature"] = _get(routing, "default_feature", str, w, "default")

    router = data.get("router", {})
    w = f"{source}: [router]"
    rp = _get(router, "path", str, w, None)
    if rp is not None:
        p = Path(rp)
        kw["router_path"] = p if p.is_absolute() or base is None else base / p
    rate = _get(router, "exploration_rate", float, w, 0.0)
    _expect(0.0 <= rate < 1.0, f"{w} exploration_rate", f"expected 0 <= rate < 1, got {rate}")
    kw["exploration_rate"] = rate
    kw["exploration_seed"] = _get(router, "exploration_seed", int, w, None)
    rules = router.get("rules", {})
    wr = f"{source}: [router.rules]"
    feats = dict(_get(rules, "features", dict, wr, {}))
    for f, tier in feats.items():
        _expect(tier in tiers, f"{wr} features.{f}", f"unknown tier {tier!r}; tiers: {list(tiers)}")
    kw["rules"] = RuleRouterConfig(
        small_max_tokens=_get(rules, "small_max_tokens", int, wr, 400),
        mid_max_tokens=_get(rules, "mid_max_tokens", int, wr, 2000),
        tools_min_tier=_get(rules, "tools_min_tier", int, wr, 1),
        code_min_tier=_get(rules, "code_min_tier", int, wr, 1),
        features=feats,
    )

    auth = data.get("auth", {})
    w = f"{source}: [auth]"
    keys: dict[str, str] = {}
    for i, entry in enumerate(_get(auth, "keys", list, w, [])):
        we = f"{w} keys[{i}]"
        _expect(isinstance(entry, dict), we, 'expected {sha256 = "<hex>", tenant = "name"}')
        h = entry.get("sha256")
        _expect(
            isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h.lower()),
            f"{we} sha256",
            "expected 64 hex characters (make one with `finops shim hash-key KEY`); plain keys are not accepted in files",
        )
        tenant = entry.get("tenant")
        _expect(isinstance(tenant, str) and tenant, f"{we} tenant", "expected a non-empty string")
        keys[h.lower()] = tenant
    kw["api_keys"] = keys
    kw["default_tenant"] = _get(auth, "default_tenant", str, w, "default")

    caps = data.get("caps", {})
    w = f"{source}: [caps]"
    kw["token_counter"] = _get(caps, "token_counter", str, w, "estimate")
    _expect(
        kw["token_counter"] in TOKEN_COUNTERS,
        f"{w} token_counter",
        f"expected one of {TOKEN_COUNTERS}",
    )
    rules_out = []
    for i, r in enumerate(_get(caps, "rule", list, w, [])):
        wr = f"{source}: [[caps.rule]] #{i + 1}"
        _expect(isinstance(r, dict), wr, "expected a table")
        mx = r.get("max_input_tokens")
        _expect(
            isinstance(mx, int) and not isinstance(mx, bool) and mx > 0,
            f"{wr} max_input_tokens",
            f"expected a positive integer, got {mx!r}",
        )
        pol = _get(r, "policy", str, wr, "reject")
        _expect(pol in CAP_POLICIES, f"{wr} policy", f"expected one of {CAP_POLICIES}, got {pol!r}")
        tier = _get(r, "tier", str, wr, "*")
        _expect(
            tier == "*" or tier in tiers,
            f"{wr} tier",
            f"unknown tier {tier!r}; tiers: {list(tiers)}",
        )
        rules_out.append(
            CapRule(
                mx, pol, tier, _get(r, "feature", str, wr, "*"), _get(r, "tenant", str, wr, "*")
            )
        )
    kw["caps"] = tuple(rules_out)

    cache = data.get("cache", {})
    w = f"{source}: [cache]"
    kw["cache_enabled"] = _get(cache, "enabled", bool, w, True)
    kw["cache_ttl_s"] = _get(cache, "ttl_s", float, w, 300.0)
    kw["cache_max_entries"] = _get(cache, "max_entries", int, w, 10_000)
    kw["cache_max_bytes"] = _get(cache, "max_bytes", int, w, 256 * 1024 * 1024)
    kw["redis_url"] = _get(cache, "redis_url", str, w, None)
    kw["idempotency_ttl_s"] = _get(cache, "idempotency_ttl_s", float, w, 86_400.0)
    kw["coalesce"] = _get(cache, "coalesce", bool, w, True)

    up = data.get("upstream", {})
    w = f"{source}: [upstream]"
    for key, typ, default in (
        ("connect_timeout_s", float, 2.0),
        ("first_byte_timeout_s", float, 60.0),
        ("read_timeout_s", float, 120.0),
        ("max_connections", int, 512),
        ("retry_budget_ratio", float, 0.2),
        ("retry_budget_min", int, 10),
        ("retry_budget_window_s", float, 10.0),
        ("breaker_failures", int, 5),
        ("breaker_cooldown_s", float, 10.0),
        ("health_interval_s", float, 5.0),
    ):
        kw[key] = _get(up, key, typ, w, default)
        _expect(kw[key] >= 0, f"{w} {key}", f"expected >= 0, got {kw[key]}")

    lim = data.get("limits", {})
    w = f"{source}: [limits]"
    kw["max_body_bytes"] = _get(lim, "max_body_bytes", int, w, 4 * 1024 * 1024)
    kw["body_timeout_s"] = _get(lim, "body_timeout_s", float, w, 30.0)

    log = data.get("log", {})
    w = f"{source}: [log]"
    ld = _get(log, "dir", str, w, None)
    if ld is not None:
        p = Path(ld)
        kw["log_dir"] = p if p.is_absolute() or base is None else base / p
    kw["log_rotate_bytes"] = _get(log, "rotate_bytes", int, w, 64 * 1024 * 1024)
    kw["log_rotate_s"] = _get(log, "rotate_s", float, w, 300.0)
    kw["log_prompts"] = _get(log, "prompts", bool, w, False)
    return ShimConfig(**kw)


def load_config(path: Path) -> ShimConfig:
    """Read and validate a TOML file; relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = parse_config(data, source=str(path), base=path.parent)
    return _replace(cfg, source_path=path)


def _replace(cfg: ShimConfig, **changes: Any) -> ShimConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def from_flags(
    upstreams: list[str],
    *,
    router: Path | None = None,
    api_keys: list[str] | None = None,
    log_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
) -> ShimConfig:
    """Build a config from `--upstream TIER=URL` / `--api-key KEY=TENANT` flags.

    Repeating a tier adds replicas; tier order on the command line is cost
    order (cheapest first). The tier name is also the upstream model name.
    """
    tiers: dict[str, list[str]] = {}
    for spec in upstreams:
        tier, sep, url = spec.partition("=")
        _expect(bool(sep and tier and url), "--upstream", f"expected TIER=URL, got {spec!r}")
        tiers.setdefault(tier, []).append(url)
    _expect(bool(tiers), "--upstream", "give at least one --upstream TIER=URL (or --config FILE)")
    keys = []
    for spec in api_keys or []:
        key, sep, tenant = spec.partition("=")
        _expect(
            bool(sep and key and tenant),
            "--api-key",
            "expected KEY=TENANT (the key is hashed in memory, never stored)",
        )
        keys.append({"sha256": hash_key(key), "tenant": tenant})
    data: dict[str, Any] = {
        "server": {"host": host, "port": port, "workers": workers},
        "tiers": {t: {"upstreams": u} for t, u in tiers.items()},
        "auth": {"keys": keys},
    }
    if router is not None:
        data["router"] = {"path": str(router)}
    if log_dir is not None:
        data["log"] = {"dir": str(log_dir)}
    return parse_config(data, source="command line")


def with_overrides(cfg: ShimConfig, **changes: Any) -> ShimConfig:
    """Copy of cfg with some fields changed (CLI --host/--port over the file)."""
    return _replace(cfg, **{k: v for k, v in changes.items() if v is not None})
