"""Shim configuration: one TOML file (or CLI flags) -> a frozen `ShimConfig`.

Why a dataclass tree and not a dict: every field is checked once, at load
time, with an error naming the file and the key (`shim.toml: [tiers.small]
upstreams: expected a non-empty list of URLs`), so a bad hot-reload is refused
before it can touch live traffic. See `examples/shim.toml` for every key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

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
    # sha256 hex of the keys /metrics and /readyz's details ask for (none: both open)
    operator_keys: frozenset[str] = frozenset()
    feature_header: str = "x-feature"
    default_feature: str = "default"
    # caps
    caps: tuple[CapRule, ...] = ()
    token_counter: str = "estimate"
    # cache
    cache_enabled: bool = True
    cache_ttl_s: float = 300.0
    # chat message text stripped of leading/trailing whitespace in the key: off for chat
    # templates that put it in the prompt verbatim (then it changes the answer)
    cache_normalize_whitespace: bool = True
    cache_max_entries: int = 10_000
    # Idempotency-Key records kept per process without Redis (least recently used go
    # first; each holds its answer): a record must outlive retries, so its own bound
    idempotency_max_entries: int = 100_000
    cache_max_bytes: int = 256 * 1024 * 1024
    redis_url: str | None = None
    # the environment variable holding the secret that signs Redis values (not the
    # secret itself: config files get committed and printed)
    redis_secret_env: str | None = None
    idempotency_ttl_s: float = 86_400.0
    # how long the shim remembers which replica stored a Responses API answer and for
    # which tenant (previous_response_id, GET /v1/responses/{id}); see stored.py
    response_index_ttl_s: float = 86_400.0
    coalesce: bool = True
    # upstream behaviour
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 60.0
    # a non-streamed answer: vLLM sends nothing (not even its head) until it has
    # generated all of it, so its limit is the whole generation's (the OpenAI SDK's
    # own default is 600 s)
    response_timeout_s: float = 600.0
    read_timeout_s: float = 120.0
    max_connections: int = 512
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 10
    retry_budget_window_s: float = 10.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    # a replica that has held requests this long without answering any is hung: clients
    # giving up on it count against its circuit (0: never; a give-up then says nothing)
    hung_after_s: float = 30.0
    health_interval_s: float = 5.0
    # request limits
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    # a stream's write the client has not taken for this long ends it (nginx send_timeout)
    send_timeout_s: float = 60.0
    # request log
    log_dir: Path | None = None
    log_rotate_bytes: int = 64 * 1024 * 1024
    log_rotate_s: float = 300.0
    log_prompts: bool = False
    # hot reload
    watch: bool = False
    # SIGTERM: how long in-flight requests (a long generation) may run on before they
    # are cut (a stream then ends with an SSE error event and [DONE])
    drain_timeout_s: float = 30.0
    source_path: Path | None = None
    # command-line flags applied over the file (`with_overrides`): a reload re-reads the
    # file and applies these again, so `--api-key`/`--router`/`--log` survive SIGHUP
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def tier_names(self) -> list[str]:
        return list(self.tiers)

    @property
    def aliases(self) -> tuple[str, ...]:
        return (self.alias, *self.extra_aliases)


def hash_key(key: str | bytes) -> str:
    """The form API keys are stored in: hex sha256 of the key's bytes (UTF-8 for a str).

    Without surrounding whitespace, as auth strips it from the bearer token: a key hashed
    with a stray space or line break could never log in. A str from the command line that
    is not valid UTF-8 (surrogate escapes) is hashed as the bytes a client would send."""
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw.strip()).hexdigest()


EMPTY_KEY_SHA256 = hash_key("")


def _check_key_hash(h: Any, where: str) -> None:
    """A key as files hold it: its sha256, never the key itself, nor the empty key's."""
    _expect(
        isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h.lower()),
        where,
        "expected 64 hex characters (make one with `finops shim hash-key KEY`); plain keys are not accepted in files",
    )
    _expect(
        h.lower() != EMPTY_KEY_SHA256,
        where,
        "this is the hash of the empty key, which would let in any client that sends "
        "an empty bearer token",
    )


# requests name the model; two tiers serving one name would send all of it to the first
_SAME_MODEL = (
    "a model name goes to one tier (requests for it would all go to the first). Give "
    "each tier's vLLM its own --served-model-name (it takes several) and, for another "
    "name clients may send, a config file's [routing] model_aliases"
)


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


MIN_SECRET_BYTES = 16


def redis_secret(env: str | None, where: str = "[cache] redis_secret_env") -> bytes | None:
    """The Redis signing secret from environment variable `env` (None: unsigned).

    Read when the config is loaded (a missing secret stops the start, naming the
    variable) and again when the cache is built, so the secret is never in the config.
    """
    if env is None:
        return None
    value = os.environ.get(env, "")
    _expect(
        len(value.encode()) >= MIN_SECRET_BYTES,
        where,
        f"environment variable {env} must hold the signing secret, at least "
        f"{MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`); "
        + ("it is not set" if env not in os.environ else f"it has {len(value.encode())}"),
    )
    return value.encode()


def _table(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """Sub-table `key` of d ({} when absent); a non-table is an error."""
    v = d.get(key, {})
    _expect(isinstance(v, dict), f"{where}", f"expected a table, got {v!r}")
    return v


def _only(d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys a table does not have (a typo must not silently fall back to a default)."""
    unknown = [k for k in d if k not in allowed]
    _expect(
        not unknown,
        where,
        f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
        f"allowed: {', '.join(allowed)}",
    )


def _positive(v: float, where: str, *, zero_ok: bool = False) -> None:
    """A finite number > 0 (>= 0 with zero_ok)."""
    ok = math.isfinite(v) and (v >= 0 if zero_ok else v > 0)
    _expect(ok, where, f"expected a finite number {'>=' if zero_ok else '>'} 0, got {v!r}")


def _at_least(v: int, lo: int, where: str) -> None:
    _expect(v >= lo, where, f"expected an integer >= {lo}, got {v!r}")


def check_port(port: Any, where: str) -> int:
    """A TCP port 1..65535 (uvicorn would wrap 70000 to 4464, and 0 binds a random one)."""
    _expect(
        isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535,
        where,
        f"expected a port 1..65535, got {port!r}",
    )
    return port


def check_workers(workers: Any, where: str) -> int:
    _expect(
        isinstance(workers, int) and not isinstance(workers, bool) and 1 <= workers <= 256,
        where,
        f"expected 1..256, got {workers!r}",
    )
    return workers


def _check_url_port(u: SplitResult, url: str, where: str) -> None:
    """A URL's port, if it gives one, is a number from 1 to 65535."""
    try:
        port = u.port  # raises ValueError when out of range or not a number
    except ValueError:
        port = 0
    _expect(port != 0, where, f"{url!r}: the port must be a number from 1 to 65535")


def _split_url(url: str, shown: str, where: str) -> SplitResult:
    """urlsplit, with its ValueError (a '[' without its ']') as a ConfigError naming `where`."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {shown!r} cannot be read as a URL ({exc})") from None


def _masked(url: Any) -> Any:
    """`url` with any `user:password@` as `***@`, scheme or not (`user:pw@host:8000`): a
    ConfigError is printed, and goes to logs."""
    if not isinstance(url, str):
        return url
    return re.sub(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/@?#]*@", r"\1***@", url, count=1)


def _check_url(url: Any, where: str) -> str:
    """An upstream's root URL (no trailing slash or /v1), or a ConfigError saying why not.

    The host and port are checked here: an empty host used to send the traffic to
    127.0.0.1:80, and a port out of range failed every request with a 500.
    """
    shown = _masked(url)  # every message: the value as given, less any password
    _expect(
        isinstance(url, str) and url.startswith(("http://", "https://")),
        where,
        f"expected an http:// or https:// URL of a vLLM server, got {shown!r}"
        + (
            f" (did you mean 'http://{shown}'?)"
            if isinstance(url, str) and "://" not in url
            else ""
        ),
    )
    _expect(
        not any(c.isspace() for c in url),
        where,
        f"{shown!r} contains whitespace (a stray space or line break?)",
    )
    u = _split_url(url, shown, where)
    if "@" in u.netloc:
        raise ConfigError(
            f"{where}: {u.scheme}://***@{u.netloc.rpartition('@')[2]}{u.path}: credentials "
            "in the URL are not sent (they would also show in /metrics and the log); give "
            "the upstream's key as the tier's api_key"
        )
    _expect(bool(u.hostname), where, f"{url!r} has no host")
    _check_url_port(u, url, where)
    _expect(
        not u.query and not u.fragment,
        where,
        f"{url!r}: expected a server's root URL, without a query or fragment",
    )
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    # an endpoint's URL pasted instead of the server's (…/v1/chat/completions): every
    # request would go to <it>/v1/chat/completions, a 404 from vLLM at each call. A path
    # prefix without /v1 in it (a gateway's /chat) is the server's root behind a proxy.
    _expect(
        "/v1/" not in urlsplit(url).path + "/",
        where,
        f"{url!r}: expected the server's root URL (http://host:8000 or http://host:8000/v1),"
        " not an endpoint's; the shim adds /v1/chat/completions and the others",
    )
    return url


_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")
# headers the shim reads for itself, so a feature header of that name is never seen
RESERVED_HEADERS = {
    "authorization": "the API key",
    "content-length": "the body's length",
    "content-encoding": "the body's encoding",
    "idempotency-key": "Idempotency-Key replays",
    "expect": "100-continue",
    "x-request-id": "the request id passed on to vLLM",
}


def redacted_url(url: str) -> str:
    """`url` with its password (and a `password=` query value) as `***`: Redis URLs carry
    credentials, and what names them (errors, the shim's log) goes to log collectors."""
    try:
        u = urlsplit(url)
    except ValueError:
        return "<a Redis URL that cannot be read>"
    netloc = u.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:***@{hostport}"
    parts = u.query.split("&") if u.query else []
    query = "&".join(
        p.partition("=")[0] + "=***" if p.partition("=")[0].lower() == "password" else p
        for p in parts
    )
    if (netloc, query) == (u.netloc, u.query):
        return url
    if not netloc:  # unix:///path: geturl() would drop the empty authority's slashes
        return f"{u.scheme}://{u.path}?{query}"
    return u._replace(netloc=netloc, query=query).geturl()


def _check_redis_url(url: str, where: str) -> None:
    """A Redis URL that the client library will take: checked at load, as upstream URLs
    are, rather than a traceback when the shim starts (or a 500 per request)."""
    shown = redacted_url(url)
    _expect(
        url.startswith(("redis://", "rediss://", "unix://")),
        where,
        f"expected a redis://, rediss:// or unix:// URL, got {shown!r}",
    )
    _expect(not any(c.isspace() for c in url), where, f"{shown!r} contains whitespace")
    u = _split_url(url, shown, where)
    if u.scheme == "unix":
        _expect(bool(u.path), where, f"{shown!r}: expected unix:///path/to/redis.sock")
    else:
        _check_url_port(u, shown, where)
        db = u.path.lstrip("/")
        _expect(
            db == "" or db.isdigit(),
            where,
            f"{shown!r}: the path is the database number (redis://host:6379/0), got {u.path!r}",
        )
    # the options in its query string (socket_timeout=abc) as the client will read them
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        _expect(False, where, f"{shown!r}: {exc}")


def _check_urls(urls: list[Any], where: str) -> tuple[str, ...]:
    """Every URL checked; one listed twice (as http://h:8000/ and http://h:8000/v1, say)
    is refused: the replicas would share one metric series and one circuit."""
    out: list[str] = []
    for u in urls:
        url = _check_url(u, where)
        _expect(url not in out, where, f"{u!r} is listed twice (as {url!r})")
        out.append(url)
    return tuple(out)


def parse_config(
    data: dict[str, Any], *, source: str = "<config>", base: Path | None = None
) -> ShimConfig:
    """Validate a TOML document (already parsed) into a ShimConfig.

    Every table accepts only its documented keys (see examples/shim.toml), so a
    typo such as `[cache] enable = false` is an error naming the key, not a
    silently ignored line.
    """
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
    w = f"{source}: [server]"
    server = _table(data, "server", w)
    _only(server, ("host", "port", "watch", "workers", "drain_timeout_s"), w)
    kw: dict[str, Any] = {}
    kw["host"] = _get(server, "host", str, w, "127.0.0.1")
    _expect(bool(kw["host"]), f"{w} host", "expected a non-empty address")
    kw["port"] = check_port(_get(server, "port", int, w, 8080), f"{w} port")
    kw["watch"] = _get(server, "watch", bool, w, False)
    kw["workers"] = check_workers(_get(server, "workers", int, w, 1), f"{w} workers")
    kw["drain_timeout_s"] = _get(server, "drain_timeout_s", float, w, 30.0)
    _positive(kw["drain_timeout_s"], f"{w} drain_timeout_s")

    tiers_raw = data.get("tiers")
    _expect(
        isinstance(tiers_raw, dict) and tiers_raw,
        source,
        '[tiers] needs at least one tier, e.g. [tiers.small] upstreams = ["http://127.0.0.1:8000"]',
    )
    tiers: dict[str, TierConfig] = {}
    for name, t in tiers_raw.items():
        where = f"{source}: [tiers.{name}]"
        _expect(name.strip() != "", where, "expected a non-empty tier name")
        _expect(isinstance(t, dict), where, "expected a table")
        _only(t, ("upstreams", "upstream", "model", "api_key"), where)
        _expect(
            not ("upstreams" in t and "upstream" in t),
            where,
            "give `upstreams` or `upstream`, not both",
        )
        ups = t.get("upstreams", t.get("upstream"))
        if isinstance(ups, str):
            ups = [ups]
        _expect(
            isinstance(ups, list) and len(ups) > 0,
            f"{where} upstreams",
            "expected a non-empty list of URLs",
        )
        model = _get(t, "model", str, where, name)
        _expect(bool(model), f"{where} model", "expected a non-empty model name")
        tier_key = _get(t, "api_key", str, where, None)
        _expect(
            tier_key != "",
            f"{where} api_key",
            "expected the upstream's key, got an empty string (leave it out for none)",
        )
        # it goes into a header of every upstream request: a line break there (a key
        # pasted with its newline) ended the header block early or injected headers
        _expect(
            tier_key is None or all("!" <= c <= "~" for c in tier_key),
            f"{where} api_key",
            "expected printable ASCII without spaces or line breaks (a key pasted with "
            "its newline?)",
        )
        tiers[name] = TierConfig(
            name=name,
            upstreams=_check_urls(ups, f"{where} upstreams"),
            model=model,
            api_key=tier_key,
        )
    kw["tiers"] = tiers

    w = f"{source}: [routing]"
    routing = _table(data, "routing", w)
    _only(
        routing,
        (
            "alias",
            "extra_aliases",
            "explicit",
            "reroute",
            "model_aliases",
            "feature_header",
            "default_feature",
        ),
        w,
    )
    kw["alias"] = _get(routing, "alias", str, w, "auto")
    extra = _get(routing, "extra_aliases", list, w, [])
    for i, a in enumerate(extra):
        _expect(
            isinstance(a, str) and a != "",
            f"{w} extra_aliases[{i}]",
            f"expected a non-empty string, got {a!r}",
        )
    kw["extra_aliases"] = tuple(extra)
    aliases = [kw["alias"], *extra]
    _expect(kw["alias"] != "", f"{w} alias", "expected a non-empty string")
    dup = sorted({a for a in aliases if aliases.count(a) > 1})
    _expect(not dup, f"{w} extra_aliases", f"{dup} listed more than once (alias included)")
    clash = [a for a in aliases if a in tiers]
    _expect(
        not clash,
        f"{w} alias",
        f"{clash} is also a tier name; a name is either the routing alias or a tier",
    )
    # clients may send a tier's served model name too: one that is also an alias or
    # another tier's name was served by whichever rule the shim applied last
    served = {t.model: n for n, t in tiers.items() if t.model != n}
    clash = [a for a in aliases if a in served]
    _expect(
        not clash,
        f"{w} alias",
        f"{clash} is also the model name tier {[served[a] for a in clash]} serves; a name "
        "is either the routing alias or a tier's",
    )
    for model, n in served.items():
        _expect(
            model not in tiers,
            f"{source}: [tiers.{n}] model",
            f"{model!r} is also a tier's name: clients sending it would get one of two tiers",
        )
    kw["explicit"] = _get(routing, "explicit", str, w, "allow")
    _expect(
        kw["explicit"] in EXPLICIT_POLICIES,
        f"{w} explicit",
        f"expected one of {EXPLICIT_POLICIES}, got {kw['explicit']!r}",
    )
    if kw["explicit"] != "deny":  # deny refuses requests by model name: none is ambiguous
        seen: dict[str, str] = {}
        for name, t in tiers.items():
            other = seen.setdefault(t.model, name)
            _expect(
                other == name,
                f"{source}: [tiers.{name}] model",
                f"{t.model!r} is also the model [tiers.{other}] serves; {_SAME_MODEL} (or "
                '[routing] explicit = "deny")',
            )
    kw["reroute"] = dict(_get(routing, "reroute", dict, w, {}))
    kw["model_aliases"] = dict(_get(routing, "model_aliases", dict, w, {}))
    valid_targets = set(tiers) | set(aliases)
    for table in ("reroute", "model_aliases"):
        for k, v in kw[table].items():
            _expect(k.strip() != "", f"{w} {table}", "a key is empty; expected a model name")
            _expect(
                isinstance(v, str) and v in valid_targets,
                f"{w} {table}.{k}",
                f"target {v!r} is not a tier or the alias; tiers: {list(tiers)}, "
                f"aliases: {aliases}",
            )
            _expect(
                k not in aliases,
                f"{w} {table}.{k}",
                f"{k!r} is the routing alias already (always routed)",
            )
    # a model_aliases key is a new client name: one that already picks a tier (its name
    # or its upstream model name) would be served by two rules, and listed twice
    tier_names_of = {**{t.model: n for n, t in tiers.items()}, **{n: n for n in tiers}}
    for k in kw["model_aliases"]:
        _expect(
            k not in tier_names_of,
            f"{w} model_aliases.{k}",
            f"{k!r} already names tier {tier_names_of.get(k)!r}; a model_aliases key must be "
            'a new name (to send a tier\'s names elsewhere use explicit = "reroute")',
        )
    _expect(
        not kw["reroute"] or kw["explicit"] == "reroute",
        f"{w} reroute",
        f'only used with explicit = "reroute" (explicit is {kw["explicit"]!r})',
    )
    both = sorted(set(kw["reroute"]) & set(kw["model_aliases"]))
    _expect(
        not both,
        f"{w} reroute",
        f"{both} also in model_aliases: a name goes to one place; keep it in one table",
    )
    if kw["explicit"] == "deny":
        # deny refuses every name that picks a tier, model_aliases included: such an alias
        # could never be served, so say so now rather than answer 403 to every request
        dead = [k for k, v in kw["model_aliases"].items() if v in tiers]
        _expect(
            not dead,
            f"{w} model_aliases",
            f'{dead} point at a tier, which explicit = "deny" refuses; point them at '
            f'{kw["alias"]!r} or use explicit = "allow"',
        )
    kw["feature_header"] = fh = _get(routing, "feature_header", str, w, "x-feature").lower()
    _expect(
        bool(fh) and all(c in _TOKEN_CHARS for c in fh),
        f"{w} feature_header",
        f"expected an HTTP header name (letters, digits, '-'), got {fh!r}",
    )
    _expect(
        fh not in RESERVED_HEADERS,
        f"{w} feature_header",
        f"{fh!r} is read by the shim for itself ({RESERVED_HEADERS.get(fh)}); pick another "
        "header, such as x-feature",
    )
    kw["default_feature"] = _get(routing, "default_feature", str, w, "default")
    _expect(kw["default_feature"] != "", f"{w} default_feature", "expected a non-empty name")

    w = f"{source}: [router]"
    router = _table(data, "router", w)
    _only(router, ("path", "exploration_rate", "exploration_seed", "rules"), w)
    rp = _get(router, "path", str, w, None)
    if rp is not None:
        p = Path(rp)
        kw["router_path"] = p if p.is_absolute() or base is None else base / p
    rate = _get(router, "exploration_rate", float, w, 0.0)
    _expect(0.0 <= rate < 1.0, f"{w} exploration_rate", f"expected 0 <= rate < 1, got {rate}")
    kw["exploration_rate"] = rate
    kw["exploration_seed"] = _get(router, "exploration_seed", int, w, None)
    wr = f"{source}: [router.rules]"
    rules = _table(router, "rules", wr)
    _only(
        rules,
        ("small_max_tokens", "mid_max_tokens", "tools_min_tier", "code_min_tier", "features"),
        wr,
    )
    feats = dict(_get(rules, "features", dict, wr, {}))
    for f, tier in feats.items():
        _expect(
            isinstance(tier, str),
            f"{wr} features.{f}",
            f"expected a tier name (one of {list(tiers)}), got {tier!r}",
        )
        _expect(tier in tiers, f"{wr} features.{f}", f"unknown tier {tier!r}; tiers: {list(tiers)}")
    rr: dict[str, int] = {}
    for key, default in (
        ("small_max_tokens", 400),
        ("mid_max_tokens", 2000),
        ("tools_min_tier", 1),
        ("code_min_tier", 1),
    ):
        rr[key] = _get(rules, key, int, wr, default)
        _at_least(rr[key], 0, f"{wr} {key}")
        if key.endswith("_min_tier") and key in rules:  # the default fits any tier count
            _expect(
                rr[key] < len(tiers),
                f"{wr} {key}",
                f"expected a tier index 0..{len(tiers) - 1} (tiers cheapest first: "
                f"{list(tiers)}), got {rr[key]}",
            )
    _expect(
        rr["mid_max_tokens"] >= rr["small_max_tokens"],
        f"{wr} mid_max_tokens",
        f"expected >= small_max_tokens ({rr['small_max_tokens']}), got {rr['mid_max_tokens']}",
    )
    kw["rules"] = RuleRouterConfig(**rr, features=feats)

    w = f"{source}: [auth]"
    auth = _table(data, "auth", w)
    _only(auth, ("keys", "default_tenant", "operator_keys"), w)
    keys: dict[str, str] = {}
    for i, entry in enumerate(_get(auth, "keys", list, w, [])):
        we = f"{w} keys[{i}]"
        _expect(isinstance(entry, dict), we, 'expected {sha256 = "<hex>", tenant = "name"}')
        _only(entry, ("sha256", "tenant"), we)
        h = entry.get("sha256")
        _check_key_hash(h, f"{we} sha256")
        tenant = entry.get("tenant")
        _expect(isinstance(tenant, str) and tenant, f"{we} tenant", "expected a non-empty string")
        _expect(
            h.lower() not in keys,
            f"{we} sha256",
            f"the same key is listed twice (tenants {keys.get(h.lower())!r} and {tenant!r})",
        )
        keys[h.lower()] = tenant
    kw["api_keys"] = keys
    operators: set[str] = set()
    for i, h in enumerate(_get(auth, "operator_keys", list, w, [])):
        we = f"{w} operator_keys[{i}]"
        _check_key_hash(h, we)
        _expect(
            h.lower() not in keys,
            we,
            f"this key is also the API key of tenant {keys.get(h.lower())!r}: a tenant must not read "
            "/metrics (every tenant's traffic) with its own key; give operators their own",
        )
        _expect(h.lower() not in operators, we, "the same key is listed twice")
        operators.add(h.lower())
    kw["operator_keys"] = frozenset(operators)
    kw["default_tenant"] = _get(auth, "default_tenant", str, w, "default")
    _expect(kw["default_tenant"] != "", f"{w} default_tenant", "expected a non-empty name")

    w = f"{source}: [caps]"
    caps = _table(data, "caps", w)
    _only(caps, ("token_counter", "rule"), w)
    kw["token_counter"] = _get(caps, "token_counter", str, w, "estimate")
    _expect(
        kw["token_counter"] in TOKEN_COUNTERS,
        f"{w} token_counter",
        f"expected one of {TOKEN_COUNTERS}, got {kw['token_counter']!r}",
    )
    rules_out = []
    for i, r in enumerate(_get(caps, "rule", list, w, [])):
        wr = f"{source}: [[caps.rule]] #{i + 1}"
        _expect(isinstance(r, dict), wr, "expected a table")
        _only(r, ("max_input_tokens", "policy", "tier", "feature", "tenant"), wr)
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
        scope = {k: _get(r, k, str, wr, "*") for k in ("feature", "tenant")}
        for k, v in scope.items():
            _expect(v != "", f"{wr} {k}", 'expected a name, or "*" for any')
        rules_out.append(CapRule(mx, pol, tier, scope["feature"], scope["tenant"]))
    kw["caps"] = tuple(rules_out)

    w = f"{source}: [cache]"
    cache = _table(data, "cache", w)
    _only(
        cache,
        (
            "enabled",
            "ttl_s",
            "normalize_whitespace",
            "max_entries",
            "idempotency_max_entries",
            "max_bytes",
            "redis_url",
            "redis_secret_env",
            "idempotency_ttl_s",
            "response_index_ttl_s",
            "coalesce",
        ),
        w,
    )
    kw["cache_enabled"] = _get(cache, "enabled", bool, w, True)
    kw["cache_normalize_whitespace"] = _get(cache, "normalize_whitespace", bool, w, True)
    kw["cache_ttl_s"] = _get(cache, "ttl_s", float, w, 300.0)
    _positive(kw["cache_ttl_s"], f"{w} ttl_s")
    kw["cache_max_entries"] = _get(cache, "max_entries", int, w, 10_000)
    _at_least(kw["cache_max_entries"], 1, f"{w} max_entries")
    kw["idempotency_max_entries"] = _get(cache, "idempotency_max_entries", int, w, 100_000)
    _at_least(kw["idempotency_max_entries"], 1, f"{w} idempotency_max_entries")
    kw["cache_max_bytes"] = _get(cache, "max_bytes", int, w, 256 * 1024 * 1024)
    _at_least(kw["cache_max_bytes"], 1, f"{w} max_bytes")
    kw["redis_url"] = _get(cache, "redis_url", str, w, None)
    if kw["redis_url"] is not None:
        _check_redis_url(kw["redis_url"], f"{w} redis_url")
    kw["redis_secret_env"] = _get(cache, "redis_secret_env", str, w, None)
    if kw["redis_secret_env"] is not None:
        _expect(
            kw["redis_url"] is not None,
            f"{w} redis_secret_env",
            "signs Redis values; set redis_url too (the memory cache is not shared)",
        )
        redis_secret(kw["redis_secret_env"], f"{w} redis_secret_env")
    kw["idempotency_ttl_s"] = _get(cache, "idempotency_ttl_s", float, w, 86_400.0)
    _positive(kw["idempotency_ttl_s"], f"{w} idempotency_ttl_s")
    kw["response_index_ttl_s"] = _get(cache, "response_index_ttl_s", float, w, 86_400.0)
    _positive(kw["response_index_ttl_s"], f"{w} response_index_ttl_s")
    kw["coalesce"] = _get(cache, "coalesce", bool, w, True)

    w = f"{source}: [upstream]"
    up = _table(data, "upstream", w)
    # (key, type, default, lower bound: ">0" a positive finite number, ">=0", or a minimum int)
    up_keys: tuple[tuple[str, type, Any, Any], ...] = (
        ("connect_timeout_s", float, 2.0, ">0"),
        ("first_byte_timeout_s", float, 60.0, ">0"),
        ("response_timeout_s", float, 600.0, ">0"),
        ("read_timeout_s", float, 120.0, ">0"),
        ("max_connections", int, 512, 1),
        ("retry_budget_ratio", float, 0.2, ">=0"),
        ("retry_budget_min", int, 10, 0),
        ("retry_budget_window_s", float, 10.0, ">0"),
        ("breaker_failures", int, 5, 0),  # 0: no breaker
        ("breaker_cooldown_s", float, 10.0, ">=0"),
        ("hung_after_s", float, 30.0, ">=0"),  # 0: a client giving up never counts
        ("health_interval_s", float, 5.0, ">0"),
    )
    _only(up, tuple(k for k, *_ in up_keys), w)
    for key, typ, default, lo in up_keys:
        kw[key] = _get(up, key, typ, w, default)
        if typ is float:
            _positive(kw[key], f"{w} {key}", zero_ok=lo == ">=0")
        else:
            _at_least(kw[key], lo, f"{w} {key}")

    w = f"{source}: [limits]"
    lim = _table(data, "limits", w)
    _only(lim, ("max_body_bytes", "body_timeout_s", "send_timeout_s"), w)
    kw["max_body_bytes"] = _get(lim, "max_body_bytes", int, w, 4 * 1024 * 1024)
    _at_least(kw["max_body_bytes"], 1, f"{w} max_body_bytes")
    kw["body_timeout_s"] = _get(lim, "body_timeout_s", float, w, 30.0)
    _positive(kw["body_timeout_s"], f"{w} body_timeout_s")
    kw["send_timeout_s"] = _get(lim, "send_timeout_s", float, w, 60.0)
    _positive(kw["send_timeout_s"], f"{w} send_timeout_s")

    w = f"{source}: [log]"
    log = _table(data, "log", w)
    _only(log, ("dir", "rotate_bytes", "rotate_s", "prompts"), w)
    ld = _get(log, "dir", str, w, None)
    _expect(ld != "", f"{w} dir", "expected a folder, got an empty string")
    if ld is not None:
        p = Path(ld)
        kw["log_dir"] = p if p.is_absolute() or base is None else base / p
    kw["log_rotate_bytes"] = _get(log, "rotate_bytes", int, w, 64 * 1024 * 1024)
    _at_least(kw["log_rotate_bytes"], 1, f"{w} rotate_bytes")
    kw["log_rotate_s"] = _get(log, "rotate_s", float, w, 300.0)
    _positive(kw["log_rotate_s"], f"{w} rotate_s")
    kw["log_prompts"] = _get(log, "prompts", bool, w, False)
    return ShimConfig(**kw)


def load_config(path: Path) -> ShimConfig:
    """Read and validate a TOML file; relative paths in it resolve against its folder."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte order mark (Windows editors): TOML has none
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, column "
            f"{col}); TOML files are UTF-8: save it as UTF-8"
        ) from None
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
    models: list[str] | None = None,
) -> ShimConfig:
    """Build a config from `--upstream TIER=URL` / `--api-key KEY=TENANT` /
    `--model TIER=NAME` flags.

    Repeating a tier adds replicas; tier order on the command line is cost
    order (cheapest first). The upstream model name is the tier name unless
    `--model TIER=NAME` gives the name the tier's vLLM serves.
    """
    check_port(port, "--port")
    check_workers(workers, "--workers")
    tiers: dict[str, list[str]] = {}
    for spec in upstreams:
        tier, sep, url = spec.partition("=")
        given = f"{tier}{sep}{_masked(url)}" if sep else _masked(spec)  # less any password
        _expect(bool(sep and tier and url), "--upstream", f"expected TIER=URL, got {given!r}")
        # said in the flag's terms here, not as the [tiers]/[routing] tables they become
        _expect(
            tier != "auto",
            "--upstream",
            "'auto' is the routing alias (routed by the router), not a tier name; name the "
            "tier after what it serves, e.g. small=URL",
        )
        _check_url(url, f"--upstream {given}")
        tiers.setdefault(tier, []).append(url)
    _expect(bool(tiers), "--upstream", "give at least one --upstream TIER=URL (or --config FILE)")
    served: dict[str, str] = {}
    for spec in models or []:
        tier, sep, name = spec.partition("=")
        _expect(bool(sep and tier and name), "--model", f"expected TIER=NAME, got {spec!r}")
        _expect(
            tier in tiers,
            "--model",
            f"tier {tier!r} has no --upstream (tiers: {', '.join(tiers)})",
        )
        _expect(tier not in served, "--model", f"tier {tier!r} is given twice")
        other = next((t for t, n in served.items() if n == name), None)
        _expect(
            other is None,
            "--model",
            f"--model {other}={name} and --model {tier}={name}: {_SAME_MODEL}",
        )
        served[tier] = name
    keys = []
    for spec in api_keys or []:
        # the last "=": keys may end in base64 padding, tenant names do not have one
        key, sep, tenant = spec.rpartition("=")
        _expect(
            bool(sep and key.strip() and tenant),
            "--api-key",
            "expected KEY=TENANT (the key is hashed in memory, never stored)",
        )
        keys.append({"sha256": hash_key(key), "tenant": tenant})
    data: dict[str, Any] = {
        "server": {"host": host, "port": port, "workers": workers},
        "tiers": {
            t: {"upstreams": u, **({"model": served[t]} if t in served else {})}
            for t, u in tiers.items()
        },
        "auth": {"keys": keys},
    }
    if router is not None:
        data["router"] = {"path": str(router)}
    if log_dir is not None:
        data["log"] = {"dir": str(log_dir)}
    return parse_config(data, source="command line")


def with_overrides(cfg: ShimConfig, **changes: Any) -> ShimConfig:
    """Copy of cfg with command-line flags applied over it (None: flag not given).

    Besides ShimConfig fields, `extra_api_keys` ({sha256: tenant}) adds keys to
    those the file lists instead of replacing them. The flags are kept in
    `cfg.overrides`, and `reapply_overrides` applies them to a re-read file, so
    a hot reload keeps e.g. `--api-key` (without it auth would turn off).
    """
    given = {k: v for k, v in changes.items() if v is not None}
    if "port" in given:
        check_port(given["port"], "--port")
    if "workers" in given:
        check_workers(given["workers"], "--workers")
    return reapply_overrides(cfg, {**cfg.overrides, **given})


def reapply_overrides(cfg: ShimConfig, overrides: dict[str, Any]) -> ShimConfig:
    """cfg (typically just re-read from its file) with `overrides` applied and recorded."""
    fields = dict(overrides)
    extra = fields.pop("extra_api_keys", None)
    if extra and cfg.operator_keys & set(extra):
        raise ConfigError(
            "--api-key: a key given there is also in [auth] operator_keys; a tenant must "
            "not read /metrics with its own key"
        )
    if extra:
        base = fields.get("api_keys", cfg.api_keys)
        moved = sorted({(base[h], t) for h, t in extra.items() if base.get(h, t) != t})
        if moved:
            # the flag silently billed the file's key to another tenant
            raise ConfigError(
                f"--api-key: a key given there is also in {cfg.source_path} [auth] keys, for "
                f"another tenant ({moved[0][0]!r} in the file, {moved[0][1]!r} on the command "
                "line); a key bills one tenant: give it in one place"
            )
        fields["api_keys"] = {**base, **extra}
    return _replace(cfg, **fields, overrides=dict(overrides))


# Settings a running process cannot change (the listen socket, the worker count, objects
# built once at start: log writer folder, cache store, upstream connection pools, the
# file watch): a reload keeps the start's values and says which ones the file changed.
RESTART_ONLY: dict[str, str] = {
    "host": "[server] host",
    "port": "[server] port",
    "workers": "[server] workers",
    "watch": "[server] watch",
    "drain_timeout_s": "[server] drain_timeout_s",
    "log_dir": "[log] dir",
    "redis_url": "[cache] redis_url",
    "redis_secret_env": "[cache] redis_secret_env",
    "cache_max_entries": "[cache] max_entries",
    "idempotency_max_entries": "[cache] idempotency_max_entries",
    "cache_max_bytes": "[cache] max_bytes",
    "connect_timeout_s": "[upstream] connect_timeout_s",
    "max_connections": "[upstream] max_connections",
}


def check_auth_kept(old: ShimConfig, new: ShimConfig) -> None:
    """Refuse a reload that would turn auth off, or open /metrics, in a running shim.

    A file that lost its keys (commented out, a bad merge, the wrong ConfigMap) let
    every request in as the default tenant after a reload logged only at INFO; turning
    either off is a restart, where the AUTH IS OFF warning is printed."""
    where = f"{new.source_path}: [auth]"
    if old.auth_enabled and not new.auth_enabled:
        raise ConfigError(
            f"{where} keys: the file now lists no API key, which would turn auth off (every "
            f"request let in as tenant {new.default_tenant!r}); a reload never does that: "
            "restart the shim to turn auth off"
        )
    if old.operator_keys and not new.operator_keys:
        raise ConfigError(
            f"{where} operator_keys: the file now lists no operator key, which would open "
            "/metrics to anyone; a reload never does that: restart the shim to open it"
        )


def reread_config(old: ShimConfig) -> ShimConfig:
    """The config as its file says now, with the command-line flags applied again.

    Used by a reload and by a worker (re)started after one, so both serve what the
    file says now. RESTART_ONLY settings stay as the process started with them, with a
    warning naming those the file changed (a reload used to report success while they
    silently did not apply). Raises ConfigError if the file is bad, or if it
    would turn auth off (check_auth_kept).
    """
    if old.source_path is None:
        return old
    cfg = reapply_overrides(load_config(old.source_path), old.overrides)
    check_auth_kept(old, cfg)
    changed = [key for f, key in RESTART_ONLY.items() if getattr(cfg, f) != getattr(old, f)]
    if changed:
        logging.getLogger("finops.shim").warning(
            "%s: %s changed; these apply when the shim restarts (still serving the values"
            " it started with)",
            old.source_path,
            ", ".join(changed),
        )
    return _replace(cfg, **{f: getattr(old, f) for f in RESTART_ONLY})
