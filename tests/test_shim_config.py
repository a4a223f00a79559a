"""Shim configuration: validation of every table, CLI overrides across hot reload,
explicit-model policies, cap precedence, and OpenAI-shaped errors for unknown paths."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import re
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from finops.shim import serve_in_thread
from finops.shim.app import Shim
from finops.shim.caps import applicable_cap
from finops.shim.config import CapRule, ConfigError, from_flags, load_config, parse_config
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.server import run_app_in_thread

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shim.toml"
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
TIER = '[tiers.small]\nupstreams = ["http://127.0.0.1:8000"]\n'


def _two_tiers(url: str, routing: str) -> str:
    return (
        f'[tiers.small]\nupstreams = ["{url}"]\nmodel = "llama-8b"\n'
        f'[tiers.large]\nupstreams = ["{url}"]\nmodel = "llama-70b"\n[routing]\n{routing}\n'
    )


def _cfg(text: str, tmp_path: Path):
    cfg = parse_config(tomllib.loads(text), source="shim.toml")
    return dataclasses.replace(cfg, log_dir=tmp_path / "log")


# -- 1. command-line overrides survive a hot reload --


def test_reload_keeps_cli_api_keys(tmp_path, upstream):
    from finops.cli.shim import _build_config

    _, url = upstream
    conf = tmp_path / "shim.toml"
    conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\n')
    cfg = _build_config(conf, None, None, ["sk-secret=acme"], tmp_path / "log", None, None)
    good = {"authorization": "Bearer sk-secret"}
    with serve_in_thread(cfg) as h:
        post = h.base_url + "/chat/completions"
        assert httpx.post(post, json=CHAT).status_code == 401
        ok, msg = h.call(h.shim.areload())  # what SIGHUP and the file watch run
        assert ok, msg
        assert h.shim.cfg.auth_enabled
        assert httpx.post(post, json=CHAT).status_code == 401  # auth still on
        assert httpx.post(post, json=CHAT, headers=good).status_code == 200
        # a key added to the file joins the command-line key; both work after the reload
        file_key = "a" * 64
        conf.write_text(
            f'[tiers.small]\nupstreams = ["{url}"]\n'
            f'[auth]\nkeys = [{{sha256 = "{file_key}", tenant = "filed"}}]\n'
        )
        ok, msg = h.shim.reload()
        assert ok, msg
        assert h.shim.cfg.api_keys[file_key] == "filed"
        assert httpx.post(post, json=CHAT, headers=good).status_code == 200


def test_reload_keeps_cli_router_path_and_workers_get_the_overrides(tmp_path, monkeypatch):
    from finops.cli.shim import _build_config
    from finops.shim import app as app_mod
    from finops.shim.policy import Router, RulePolicy

    # any path loads the rule policy here: the test is about which path the config keeps
    monkeypatch.setattr(
        app_mod,
        "build_router",
        lambda cfg: Router(RulePolicy(cfg.tier_names, cfg.rules), cfg.tier_names),
    )
    conf = tmp_path / "shim.toml"
    conf.write_text(TIER + '[router]\npath = "from-file"\n')
    cli_router = tmp_path / "from-cli"
    cfg = _build_config(conf, None, cli_router, ["sk-secret=acme"], None, None, None)
    # worker processes get the config pickled (multiprocessing spawn): overrides travel with it
    cfg = pickle.loads(pickle.dumps(cfg))
    shim = Shim(cfg)
    ok, msg = shim.reload()
    assert ok, msg
    assert shim.cfg.router_path == cli_router
    assert list(shim.cfg.api_keys.values()) == ["acme"]


# -- 2. explicit policies --


def test_reroute_covers_the_upstream_model_name(tmp_path, upstream):
    f, url = upstream
    cfg = _cfg(_two_tiers(url, 'explicit = "reroute"\nreroute = {large = "auto"}'), tmp_path)
    with serve_in_thread(cfg) as h:
        for name in ("large", "llama-70b"):
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": name})
            assert r.status_code == 200, r.text
            assert r.headers["x-finops-tier"] == "small", name  # routed, not sent to large
            assert f.bodies[-1]["model"] == "llama-8b"
        # /v1/models says where each name goes, after the reroute (it said "tier large")
        info = {m["id"]: m["finops"] for m in httpx.get(h.base_url + "/models").json()["data"]}
    assert info["large"]["kind"] == "reroute" and info["large"]["served_by"] == "router"
    assert info["llama-70b"]["served_by"] == "router" and info["small"]["served_by"] == "small"


def test_deny_routes_aliases_of_the_alias_and_refuses_tier_names(tmp_path, upstream):
    _, url = upstream
    cfg = _cfg(_two_tiers(url, 'explicit = "deny"\nmodel_aliases = {"gpt-4o" = "auto"}'), tmp_path)
    with serve_in_thread(cfg) as h:
        post = h.base_url + "/chat/completions"
        assert httpx.post(post, json={**CHAT, "model": "gpt-4o"}).status_code == 200
        for name in ("large", "llama-70b"):
            r = httpx.post(post, json={**CHAT, "model": name})
            assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        # an unknown name's 404 points only at what routes, not at tiers refused with 403
        r = httpx.post(post, json={**CHAT, "model": "gpt-5"})
        assert (
            r.status_code == 404 and "use one of `auto`, `gpt-4o`." in r.json()["error"]["message"]
        )
        assert "large" not in r.json()["error"]["message"]
    # an alias to a tier could never be served under deny: refused at load time
    with pytest.raises(ConfigError, match=r"model_aliases: \['cheap'\] point at a tier"):
        parse_config(
            tomllib.loads(_two_tiers(url, 'explicit = "deny"\nmodel_aliases = {cheap = "small"}'))
        )
    with pytest.raises(ConfigError, match=r'reroute: only used with explicit = "reroute"'):
        parse_config(tomllib.loads(_two_tiers(url, 'reroute = {large = "auto"}')))


@pytest.mark.parametrize(
    ("routing", "small_model", "match"),
    [
        ('extra_aliases = ["llama-70b"]', "llama-8b", r"alias: \['llama-70b'\] is also the model"),
        ('alias = "llama-70b"', "llama-8b", r"alias: \['llama-70b'\] is also the model"),
        ("", "large", r"\[tiers.small\] model: 'large' is also a tier's name"),
        ("", "auto", r"alias: \['auto'\] is also the model"),
        (
            'explicit = "reroute"\nmodel_aliases = {"gpt-4o" = "small"}\n'
            'reroute = {"gpt-4o" = "large"}',
            "llama-8b",
            r"reroute: \['gpt-4o'\] also in model_aliases",
        ),
    ],
)
def test_a_name_two_rules_would_serve_is_refused_at_load(routing, small_model, match):
    """An alias equal to a tier's served model name (clients may send it) went through
    the classifier to another model; a tier serving another tier's name, or a name in
    both model_aliases and reroute, were served by whichever rule the shim applied last,
    and /v1/models described another. All passed `shim check`."""
    text = (
        f'[tiers.small]\nupstreams = ["http://127.0.0.1:9"]\nmodel = "{small_model}"\n'
        '[tiers.large]\nupstreams = ["http://127.0.0.1:9"]\nmodel = "llama-70b"\n'
        f"[routing]\n{routing}\n"
    )
    with pytest.raises(ConfigError, match=match):
        parse_config(tomllib.loads(text), source="shim.toml")


def _model_ids(h) -> list[str]:
    return [m["id"] for m in httpx.get(h.base_url + "/models").json()["data"]]


def test_model_aliases_key_may_not_name_a_tier_and_models_lists_each_name_once(tmp_path, upstream):
    _, url = upstream
    # a key equal to a tier name or a tier's upstream model name would be served by two rules
    for key, tier in (("small", "small"), ("llama-70b", "large")):
        with pytest.raises(
            ConfigError,
            match=rf"shim.toml: \[routing\] model_aliases.{key}: '{key}' already names tier '{tier}'",
        ):
            _cfg(_two_tiers(url, f'model_aliases = {{"{key}" = "auto"}}'), tmp_path)
    # reroute keys are tier names by design
    cfg = _cfg(_two_tiers(url, 'explicit = "reroute"\nreroute = {small = "auto"}'), tmp_path)
    assert cfg.reroute == {"small": "auto"}
    # /v1/models never lists a name twice, even for a config built past the checks
    cfg = _cfg(_two_tiers(url, 'model_aliases = {"gpt-4o" = "auto"}'), tmp_path)
    cfg = dataclasses.replace(cfg, model_aliases={"small": "large", "gpt-4o": "auto"})
    with serve_in_thread(cfg) as h:
        assert _model_ids(h) == ["auto", "small", "large", "llama-8b", "llama-70b", "gpt-4o"]


def test_models_lists_only_usable_names_under_deny(tmp_path, upstream):
    _, url = upstream
    routing = 'model_aliases = {"gpt-4o" = "auto"}\nextra_aliases = ["router"]\n'
    cfg = _cfg(_two_tiers(url, routing + 'explicit = "deny"'), tmp_path)
    with serve_in_thread(cfg) as h:
        ids = _model_ids(h)
        assert ids == ["auto", "router", "gpt-4o"]  # not the tiers, which answer 403
        for name in ids:
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": name})
            assert r.status_code == 200, (name, r.text)
    # allow (and reroute) keep listing the tiers
    cfg = _cfg(_two_tiers(url, routing + 'explicit = "allow"'), tmp_path)
    with serve_in_thread(cfg) as h:
        ids = _model_ids(h)
        assert ids == ["auto", "router", "small", "large", "llama-8b", "llama-70b", "gpt-4o"]
        for name in ids:  # every name listed is one the shim takes
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": name})
            assert r.status_code == 200, (name, r.text)


# -- 3. cap precedence --


def test_cap_tie_prefers_the_more_specific_rule_then_reject(tmp_path, upstream):
    generic = CapRule(100, "truncate")
    specific = CapRule(100, "reject", tier="small", tenant="acme")
    assert applicable_cap((generic, specific), "small", "default", "acme") is specific
    assert applicable_cap((specific, generic), "small", "default", "acme") is specific
    same = (CapRule(100, "truncate"), CapRule(100, "reject"))
    assert applicable_cap(same, "small", "f", "t").policy == "reject"
    assert (
        applicable_cap((CapRule(50, "truncate"), specific), "small", "f", "acme").max_input_tokens
        == 50
    )
    # live: the rule order in the file does not decide
    _, url = upstream
    cfg = _cfg(
        f'[tiers.small]\nupstreams = ["{url}"]\n'
        '[[caps.rule]]\nmax_input_tokens = 20\npolicy = "truncate"\n'
        '[[caps.rule]]\ntier = "small"\nmax_input_tokens = 20\npolicy = "reject"\n',
        tmp_path,
    )
    msgs = [
        {"role": "user", "content": "x" * 200},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "last"},
    ]
    with serve_in_thread(cfg) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "messages": msgs})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# -- 4. validation --


@pytest.mark.parametrize(
    ("extra", "table", "key"),
    [
        ("[cache]\nenable = false\n", r"\[cache\]", "enable"),
        ("[cache]\nttl = 60\n", r"\[cache\]", "ttl"),
        (
            '[[caps.rule]]\nmax_input_tokens = 100\npolcy = "truncate"\n',
            r"\[\[caps.rule\]\] #1",
            "polcy",
        ),
        ('modle = "llama"\n', r"\[tiers.small\]", "modle"),
        ('[routing]\nexplict = "deny"\n', r"\[routing\]", "explict"),
        ("[server]\nprot = 1\n", r"\[server\]", "prot"),
        ("[router.rules]\nsmall_max = 1\n", r"\[router.rules\]", "small_max"),
        ("[upstream]\nconnect_timeout = 1\n", r"\[upstream\]", "connect_timeout"),
        (
            '[auth]\nkeys = [{sha256 = "' + "a" * 64 + '", tenant = "t", name = "x"}]\n',
            r"\[auth\] keys\[0\]",
            "name",
        ),
    ],
)
def test_unknown_keys_name_file_table_key_and_the_allowed_ones(tmp_path, extra, table, key):
    p = tmp_path / "bad.toml"
    p.write_text(TIER + extra)
    with pytest.raises(
        ConfigError, match=rf"bad.toml: {table}: unknown key '{key}'; allowed: "
    ) as e:
        load_config(p)
    assert len(str(e.value).split("allowed: ")[1].split(", ")) >= 2


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("[cache]\nttl_s = -5\n", r"\[cache\] ttl_s: expected a finite number > 0"),
        ("[cache]\nttl_s = nan\n", r"\[cache\] ttl_s: expected a finite number > 0, got nan"),
        ("[cache]\nmax_entries = -1\n", r"\[cache\] max_entries: expected an integer >= 1"),
        ("[cache]\nmax_bytes = 0\n", r"\[cache\] max_bytes: expected an integer >= 1"),
        ("[cache]\nidempotency_ttl_s = -1\n", r"\[cache\] idempotency_ttl_s"),
        ("[cache]\nresponse_index_ttl_s = 0\n", r"\[cache\] response_index_ttl_s"),
        ("[limits]\nmax_body_bytes = -1\n", r"\[limits\] max_body_bytes"),
        ("[limits]\nbody_timeout_s = -1\n", r"\[limits\] body_timeout_s"),
        ("[log]\nrotate_bytes = -1\n", r"\[log\] rotate_bytes"),
        (
            "[upstream]\nmax_connections = 0\n",
            r"\[upstream\] max_connections: expected an integer >= 1",
        ),
        ("[upstream]\nread_timeout_s = inf\n", r"\[upstream\] read_timeout_s"),
        ("[server]\nport = 70000\n", r"\[server\] port: expected a port 1..65535, got 70000"),
        ("[server]\nport = -1\n", r"\[server\] port: expected a port 1..65535"),
        ("[server]\nport = 0\n", r"\[server\] port: expected a port 1..65535"),
        ("[routing]\nextra_aliases = [1, 2]\n", r"extra_aliases\[0\]: expected a non-empty string"),
        ('[routing]\nalias = "small"\n', r"\[routing\] alias: \['small'\] is also a tier name"),
        ('[routing]\nextra_aliases = ["small"]\n', r"is also a tier name"),
        ("[routing]\nmodel_aliases = {x = 1}\n", r"model_aliases.x: target 1 is not a tier"),
        (
            "[router.rules]\nsmall_max_tokens = 5000\nmid_max_tokens = 10\n",
            r"mid_max_tokens: expected >=",
        ),
        ('[cache]\nredis_url = "localhost:6379"\n', r"\[cache\] redis_url"),
        (
            '[cache]\nredis_url = "redis://127.0.0.1:99999/0"\n',
            r"\[cache\] redis_url: .*the port must be a number from 1 to 65535",
        ),
        ('[cache]\nredis_url = "redis://h:6379/cache"\n', r"the path is the database number"),
        ('[cache]\nredis_url = "unix://"\n', r"expected unix:///path/to/redis.sock"),
        ('[routing]\nmodel_aliases = {"" = "auto"}\n', r"model_aliases: a key is empty"),
        ('[routing]\ndefault_feature = ""\n', r"default_feature: expected a non-empty name"),
        ('[auth]\ndefault_tenant = ""\n', r"default_tenant: expected a non-empty name"),
        ('[log]\ndir = ""\n', r"\[log\] dir: expected a folder"),
        ('[caps]\ntoken_counter = "tiktoken"\n', r"got 'tiktoken'"),
        (
            '[[caps.rule]]\nmax_input_tokens = 10\ntenant = ""\n',
            r"#1 tenant: expected a name, or \"\*\" for any",
        ),
        ("[router.rules]\ntools_min_tier = 9\n", r"tools_min_tier: expected a tier index 0..0"),
        ('[routing]\nfeature_header = "Authorization"\n', r"is read by the shim for itself"),
        ('[routing]\nfeature_header = "idempotency-key"\n', r"is read by the shim for itself"),
        ('[routing]\nfeature_header = "x feature:"\n', r"expected an HTTP header name"),
        ("[server]\nworkers = 0\n", r"\[server\] workers: expected 1..256"),
        ("cache = 5\n", r"\[cache\]: expected a table"),
    ],
)
def test_out_of_range_values_are_refused(extra, match):
    text = extra + TIER if extra.startswith("cache =") else TIER + extra  # a top-level key first
    with pytest.raises(ConfigError, match=rf"shim.toml: .*{match}"):
        parse_config(tomllib.loads(text), source="shim.toml")


@pytest.mark.parametrize(
    ("env", "extra", "match"),
    [
        (None, 'redis_secret_env = "FINOPS_TEST_SECRET"', r"FINOPS_TEST_SECRET .* it is not set"),
        ("short", 'redis_secret_env = "FINOPS_TEST_SECRET"', r"at least 16 bytes .* it has 5"),
        ("x" * 32, "redis_secret_env = 7", r": expected str, got 7"),
    ],
)
def test_the_redis_signing_secret_is_checked_at_load(monkeypatch, env, extra, match):
    monkeypatch.delenv("FINOPS_TEST_SECRET", raising=False)
    if env is not None:
        monkeypatch.setenv("FINOPS_TEST_SECRET", env)
    text = TIER + f'[cache]\nredis_url = "redis://127.0.0.1:1/0"\n{extra}\n'
    with pytest.raises(ConfigError, match=rf"shim.toml: \[cache\] redis_secret_env.*{match}"):
        parse_config(tomllib.loads(text), source="shim.toml")
    # without redis_url there is nothing to sign
    monkeypatch.setenv("FINOPS_TEST_SECRET", "x" * 32)
    with pytest.raises(ConfigError, match="set redis_url too"):
        parse_config(
            tomllib.loads(TIER + '[cache]\nredis_secret_env = "FINOPS_TEST_SECRET"\n'), source="s"
        )
    ok = TIER + '[cache]\nredis_url = "redis://h:1/0"\nredis_secret_env = "FINOPS_TEST_SECRET"\n'
    assert parse_config(tomllib.loads(ok), source="s").redis_secret_env == "FINOPS_TEST_SECRET"


def test_example_config_with_every_option_parses(monkeypatch):
    monkeypatch.setenv("FINOPS_SHIM_REDIS_SECRET", "0123456789abcdef")
    cfg = load_config(EXAMPLE)
    assert cfg.tier_names == ["small", "mid", "large"] and len(cfg.caps) == 2
    # the commented-out options, switched on, parse too
    text = EXAMPLE.read_text()
    for line, on in (
        ('# path = "artifacts/router-v3"', 'path = "artifacts/router-v3"'),
        ('# redis_url = "redis://127.0.0.1:6379/0"', 'redis_url = "redis://127.0.0.1:6379/0"'),
        ('# redis_secret_env = "FINOPS_SHIM', 'redis_secret_env = "FINOPS_SHIM'),
        ('# dir = "logs/shim"', 'dir = "logs/shim"'),
        ('# api_key = "..."', 'api_key = "..."'),
    ):
        assert line in text
        text = text.replace(line, on)
    cfg = parse_config(tomllib.loads(text), source="example")
    assert cfg.redis_url and cfg.log_dir and cfg.router_path and cfg.tiers["large"].api_key


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "--port: expected a port 1..65535, got 70000"),
        (["--port", "-1"], "--port: expected a port 1..65535, got -1"),
        (["--workers", "0"], "--workers: expected 1..256, got 0"),
        (["--log-level", "loud"], "--log-level: expected one of debug|info|warning|error"),
        (["--api-key", "sk-secret-value"], "--api-key: expected KEY=TENANT"),
        # "" would listen on every interface (it did with a config file)
        (["--host", ""], "--host: expected a non-empty address"),
    ],
)
def test_cli_flag_values_are_checked(tmp_path, monkeypatch, flags, message):
    from finops.cli import app
    from finops.shim import server, workers

    def must_not_serve(*_a, **_kw):
        raise AssertionError("a bad flag value got as far as serving")

    monkeypatch.setattr(server, "serve", must_not_serve)
    monkeypatch.setattr(workers, "serve_workers", must_not_serve)
    conf = tmp_path / "shim.toml"
    conf.write_text(TIER)
    runner = CliRunner()
    for source in (["--upstream", "small=http://127.0.0.1:1"], ["--config", str(conf)]):
        res = runner.invoke(app, ["shim", "serve", *source, *flags])
        assert res.exit_code == 2, res.output
        assert message in res.output
        assert "sk-s" not in res.output  # a malformed key is never echoed, not even a prefix


def test_hash_key_reads_the_key_from_stdin():
    from finops.cli import app
    from finops.shim.config import hash_key

    res = CliRunner().invoke(app, ["shim", "hash-key", "-"], input="sk-acme\n")
    assert res.exit_code == 0 and res.output.strip() == hash_key("sk-acme")
    res = CliRunner().invoke(app, ["shim", "hash-key", "-"], input="\n")
    assert res.exit_code == 2 and "the key is empty" in res.output


def test_empty_api_key_is_refused_in_cli_and_config():
    from finops.cli import app
    from finops.shim.config import EMPTY_KEY_SHA256

    res = CliRunner().invoke(app, ["shim", "hash-key", ""])
    assert res.exit_code == 2 and "the key is empty" in res.output
    text = TIER + f'[auth]\nkeys = [{{sha256 = "{EMPTY_KEY_SHA256}", tenant = "t"}}]\n'
    with pytest.raises(ConfigError, match=r"keys\[0\] sha256: this is the hash of the empty key"):
        parse_config(tomllib.loads(text), source="shim.toml")


@pytest.mark.parametrize("key", ["sk-up\\r\\nx-injected: yes", "sk-up\\n", "sk up", "sk-\\u00e9"])
def test_an_upstream_key_that_cannot_be_a_header_value_is_refused(key):
    """The tier's api_key is written into every upstream request's Authorization header:
    a line break (a key pasted with its newline) injected headers or ended the head."""
    text = f'[tiers.small]\nupstreams = ["http://127.0.0.1:9"]\napi_key = "{key}"\n'
    with pytest.raises(ConfigError, match=r"tiers.small\] api_key.*printable ASCII"):
        parse_config(tomllib.loads(text), source="shim.toml")


def test_help_keeps_config_table_names():
    """Rich reads "[server]" in a help text as markup and drops it."""
    from finops.cli import app

    serve = CliRunner().invoke(app, ["shim", "serve", "--help"], env={"COLUMNS": "200"})
    assert "[server] workers" in serve.output and "[cache] redis_url" in serve.output
    hash_key = CliRunner().invoke(app, ["shim", "hash-key", "--help"], env={"COLUMNS": "200"})
    assert "[auth] keys" in hash_key.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://", "has no host"),
        ("http://127.0.0.1:99999", "the port must be a number from 1 to 65535"),
        ("http://127.0.0.1:0", "the port must be a number from 1 to 65535"),
        ("http://127.0.0.1:80a", "the port must be a number from 1 to 65535"),
        ("http://127.0.0.1:8000/?x=1", "without a query or fragment"),
        ("http://admin:s3cret@10.0.0.5:8000", "credentials in the URL are not sent"),
        ("http://127.0.0.1:8000 ", "contains whitespace"),
        ("http://127.0.0.1:8000/v1/chat/completions", "expected the server's root URL"),
        ("http://127.0.0.1:8000/foo/v1/chat", "expected the server's root URL"),
        ("http://127.0.0.1:8000/v1/v1", "expected the server's root URL"),
    ],
)
def test_upstream_urls_are_checked(url, message):
    for data in (
        {"tiers": {"small": {"upstreams": [url]}}},
        None,  # the same through --upstream
    ):
        with pytest.raises(ConfigError, match=message) as exc:
            if data is None:
                from_flags([f"small={url}"])
            else:
                parse_config(data, source="shim.toml")
        assert "s3cret" not in str(exc.value)


def test_upstream_flag_errors_name_the_flag_not_a_config_table():
    with pytest.raises(ConfigError, match=r"^--upstream: 'auto' is the routing alias"):
        from_flags(["auto=http://127.0.0.1:1"])
    with pytest.raises(
        ConfigError,
        match=r"^--upstream small=127.0.0.1:18000: expected an http:// or https:// URL of a "
        r"vLLM server, got '127.0.0.1:18000' \(did you mean 'http://127.0.0.1:18000'\?\)$",
    ):
        from_flags(["small=127.0.0.1:18000"])


def test_a_gateway_path_prefix_is_a_root_url():
    """A vLLM behind a gateway's path prefix (without /v1 in it) is a root URL."""
    cfg = from_flags(["small=https://gw.example.com/chat/v1"])
    assert cfg.tiers["small"].upstreams == ("https://gw.example.com/chat",)


def test_empty_tier_names_and_keys_are_refused():
    for data, match in (
        ({"tiers": {"": {"upstreams": ["http://h:1"]}}}, r"\[tiers\.\]: expected a non-empty"),
        (
            {"tiers": {"small": {"upstreams": ["http://h:1"], "api_key": ""}}},
            r"\[tiers.small\] api_key: expected the upstream's key, got an empty string",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_config(data, source="shim.toml")


def test_a_config_file_that_is_not_utf8_is_named_with_the_byte_and_line(tmp_path):
    conf = tmp_path / "shim.toml"
    conf.write_bytes(b"# caf\xe9\n" + TIER.encode())
    with pytest.raises(ConfigError) as exc:
        load_config(conf)
    assert str(exc.value) == (
        f"{conf}: not UTF-8 text (byte 0xe9 at line 1, column 6); TOML files are UTF-8: "
        "save it as UTF-8"
    )
    from finops.cli import app

    res = CliRunner().invoke(app, ["shim", "check", str(conf)])
    assert res.exit_code == 2 and "not UTF-8 text (byte 0xe9 at line 1" in res.output
    assert "Traceback" not in res.output
    # a byte order mark (Windows editors write one) is read past
    conf.write_bytes(b"\xef\xbb\xbf" + TIER.encode())
    assert list(load_config(conf).tiers) == ["small"]


def test_api_keys_may_end_in_equals_signs():
    """Base64 keys end in padding: KEY=TENANT splits at the last '='."""
    from finops.shim.config import hash_key

    cfg = from_flags(["small=http://h:1"], api_keys=["sk-AbC9===acme"])
    assert cfg.api_keys == {hash_key("sk-AbC9=="): "acme"}


def test_check_and_serve_name_a_missing_router_and_a_log_folder_that_is_a_file(
    tmp_path, monkeypatch
):
    from finops.cli import app
    from finops.shim import server

    def must_not_serve(*_a, **_kw):
        raise AssertionError("a bad path got as far as serving")

    monkeypatch.setattr(server, "serve", must_not_serve)
    conf = tmp_path / "shim.toml"
    runner = CliRunner()
    conf.write_text(TIER + f'[router]\npath = "{tmp_path / "gone"}"\n')
    res = runner.invoke(app, ["shim", "check", str(conf)])
    assert res.exit_code == 2
    assert f"{conf}: [router] path: {tmp_path / 'gone'}: no such folder" in res.output
    res = runner.invoke(
        app, ["shim", "serve", "--upstream", "small=http://127.0.0.1:1", "--router", str(conf)]
    )
    assert res.exit_code == 2
    assert f"--router: {conf}: a file, not a folder" in res.output
    conf.write_text(TIER + f'[log]\ndir = "{conf}"\n')
    for cmd in (["check", str(conf)], ["serve", "--config", str(conf)]):
        res = runner.invoke(app, ["shim", *cmd])
        assert res.exit_code == 2, res.output
        assert f"request log folder {conf}: a file, not a folder" in res.output


def test_an_upstream_listed_twice_in_a_tier_is_refused():
    ups = ["http://h:8000", "http://h:8000/", "http://h:8000/v1"]
    with pytest.raises(ConfigError, match=r"'http://h:8000/' is listed twice"):
        parse_config({"tiers": {"small": {"upstreams": ups}}}, source="shim.toml")
    # one server for several tiers is fine (several served model names)
    cfg = from_flags(["small=http://h:8000", "large=http://h:8000/v1"])
    assert cfg.tiers["small"].upstreams == cfg.tiers["large"].upstreams == ("http://h:8000",)


# -- 5. unknown paths --


def test_unknown_paths_get_an_openai_shaped_404(tmp_path, upstream):
    _, url = upstream
    cfg = _cfg(f'[tiers.small]\nupstreams = ["{url}"]\n', tmp_path)
    with serve_in_thread(cfg) as h:
        for method, path in (("GET", "/v1/nope"), ("POST", "/v1/chat/complete"), ("GET", "/x")):
            r = httpx.request(method, h.url + path, json=CHAT)
            assert r.status_code == 404
            assert r.headers["content-type"] == "application/json"
            err = r.json()["error"]
            assert (err["type"], err["param"], err["code"]) == (
                "invalid_request_error",
                None,
                "not_found",
            )
            assert path in err["message"]
        r = httpx.post(h.base_url + "/models")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        # (Starlette builds the header from a set: the order varies)
        assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET", "HEAD"]
        assert httpx.get(h.base_url + "/models").status_code == 200


# -- 6. metrics across reload --


def test_a_reload_moving_a_tier_to_a_new_replica_stays_ready_and_asks_lengths_again(
    tmp_path, fakes
):
    """A tier moved to a new, healthy replica read as down in /readyz between the swap and
    its first probe (a load balancer's probe could take the shim out), and /v1/models'
    max_model_len was asked once ever: a model redeployed longer kept its old length."""
    old, old_url = fakes(name="m", max_model_len=8192)
    _new, new_url = fakes(name="m", max_model_len=8192)
    conf = tmp_path / "shim.toml"
    conf.write_text(f'[tiers.small]\nupstreams = ["{old_url}"]\nmodel = "m"\n')
    with serve_in_thread(load_config(conf)) as h:

        def length() -> int | None:
            return httpx.get(h.base_url + "/models").json()["data"][0].get("max_model_len")

        deadline = time.monotonic() + 5
        while length() != 8192 and time.monotonic() < deadline:
            time.sleep(0.05)
        old.max_model_len = 131072  # redeployed with a longer context
        ok, msg = h.call(h.shim.areload())
        assert ok, msg
        assert length() == 131072
        conf.write_text(f'[tiers.small]\nupstreams = ["{new_url}"]\nmodel = "m"\n')
        ready = []

        async def reload_and_watch() -> tuple[bool, str]:
            task = asyncio.create_task(h.shim.areload())
            while not task.done():
                ready.append(h.shim.readiness()[0])
                await asyncio.sleep(0)
            ready.append(h.shim.readiness()[0])
            return await task

        ok, msg = h.call(reload_and_watch())
        assert ok, msg
    assert all(ready), ready


def test_reload_stops_reporting_removed_upstreams(tmp_path, upstream):
    _, url = upstream
    gone = "http://127.0.0.1:9"
    conf = tmp_path / "shim.toml"

    def write(ups: list[str]) -> None:
        listed = ", ".join(f'"{u}"' for u in ups)
        conf.write_text(f'[tiers.small]\nupstreams = [{listed}]\n[log]\ndir = "log"\n')

    def gauges(h) -> list[str]:
        text = httpx.get(h.url + "/metrics").text
        return [
            line
            for line in text.splitlines()
            if line.startswith(("finops_shim_circuit_state{", "finops_shim_upstream_outstanding{"))
        ]

    write([gone, url])
    with serve_in_thread(load_config(conf)) as h:
        breaker = h.shim.pool.tiers["small"][0].breaker
        breaker.state, breaker.opened_at = 1, time.monotonic()  # open, in its cooldown
        before = gauges(h)
        assert f'finops_shim_circuit_state{{tier="small",upstream="{gone}"}} 1.0' in before
        write([url])
        ok, msg = h.shim.reload()
        assert ok, msg
        after = gauges(h)
        assert len(after) == 2 and not any(gone in line for line in after), after
        assert [c["upstream"] for c in httpx.get(h.url + "/readyz").json()["circuits"]] == [url]
        # an upstream added back is reported again
        write([gone, url])
        assert h.shim.reload()[0]
        assert sum(gone in line for line in gauges(h)) == 2


def test_overlapping_reloads_end_on_what_the_file_says_now(tmp_path, upstream):
    """A slow reload (an artifact takes seconds to load) overtaken by a second one must
    not be swapped in last: the shim would serve the old file with no error shown."""
    import asyncio

    _, url = upstream
    conf = tmp_path / "shim.toml"

    def write(model: str) -> None:
        conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\nmodel = "{model}"\n')

    write("m0")
    with serve_in_thread(load_config(conf)) as h:
        real, read = h.shim._build, []

        def slow_first_build():
            built = real()
            read.append(built[0].tiers["small"].model)
            if len(read) == 1:
                time.sleep(0.6)  # the first reload is still loading when the file changes
            return built

        h.shim._build = slow_first_build

        async def two_reloads():
            write("m1")
            first = asyncio.create_task(h.shim.areload())
            await asyncio.sleep(0.2)
            write("m2")
            return await asyncio.gather(first, h.shim.areload())

        results = h.call(two_reloads())
        assert all(ok for ok, _ in results), results
        assert read == ["m1", "m2"]
        assert h.shim.cfg.tiers["small"].model == "m2"
        assert h.shim.pool.tiers["small"][0].model == "m2"


def test_readyz_stays_ready_across_a_reload_that_changes_upstreams(tmp_path, upstream):
    """A reload that renames a tier's model or adds a replica made new upstream objects of
    unknown reachability: /readyz said 503 until the next health round, which takes a
    replica out of its load balancer on every deploy."""
    _, url = upstream
    other = run_app_in_thread(FakeUpstream())
    conf = tmp_path / "shim.toml"
    conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\nmodel = "a"\n')
    try:
        with serve_in_thread(dataclasses.replace(load_config(conf), health_interval_s=60)) as h:
            deadline = time.monotonic() + 10
            while httpx.get(h.url + "/readyz").status_code != 200:
                assert time.monotonic() < deadline, "never ready"
                time.sleep(0.05)
            conf.write_text(f'[tiers.small]\nupstreams = ["{url}", "{other.url}"]\nmodel = "b"\n')
            ok, msg = h.call(h.shim.areload())
            assert ok, msg
            r = httpx.get(h.url + "/readyz")
            assert r.status_code == 200, r.text
            assert sorted(r.json()["tiers"]["small"]["reachable"]) == sorted([url, other.url])
    finally:
        other.stop(2)


def test_reload_applies_what_it_can_and_names_what_needs_a_restart(tmp_path, upstream, caplog):
    _, url = upstream
    conf = tmp_path / "shim.toml"
    base = f'[tiers.small]\nupstreams = ["{url}"]\n'
    conf.write_text(base)
    with serve_in_thread(load_config(conf)) as h:
        conf.write_text(
            base + "[cache]\nmax_entries = 1\n[upstream]\nmax_connections = 1\n"
            "breaker_failures = 2\nretry_budget_min = 3\n[log]\nrotate_s = 1\n"
        )
        with caplog.at_level("WARNING", logger="finops.shim"):
            ok, msg = h.shim.reload()
        assert ok, msg
        warned = [r.getMessage() for r in caplog.records if "restarts" in r.getMessage()]
        assert len(warned) == 1 and "[cache] max_entries, [upstream] max_connections" in warned[0]
        # kept (and shown as kept), since the running objects were built with them
        assert h.shim.cfg.cache_max_entries == 10_000 and h.shim.cfg.max_connections == 512
        # applied to the running objects
        (u,) = h.shim.pool.tiers["small"]
        assert u.breaker.failures_to_open == 2 and u.budget.minimum == 3
        assert h.shim.log.rotate_s == 1


def test_removed_upstream_gauges_read_zero_in_multiprocess_mode(tmp_path, monkeypatch):
    import warnings

    from finops.shim.metrics import MULTIPROC_ENV, ShimMetrics

    m = ShimMetrics()
    m.circuit_state.labels("small", "http://a").set(1)
    m.outstanding.labels("small", "http://a").set(3)
    # removing would not reach the other workers' files (prometheus_client only warns)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.drop_upstream("small", "http://a")
    labels = {"tier": "small", "upstream": "http://a"}
    assert m.registry.get_sample_value("finops_shim_circuit_state", labels) == 0
    assert m.registry.get_sample_value("finops_shim_upstream_outstanding", labels) == 0
    monkeypatch.delenv(MULTIPROC_ENV)
    m.drop_upstream("small", "http://a")
    assert m.registry.get_sample_value("finops_shim_circuit_state", labels) is None
    m.drop_upstream("small", "http://never-made")  # a no-op


def test_model_flag_names_what_the_tier_serves(tmp_path, upstream):
    """`--upstream small=URL --model small=llama-8b`: the upstream gets the name its vLLM
    serves, and that name also picks the tier."""
    from finops.cli import app
    from finops.shim import from_flags

    f, url = upstream
    cfg = from_flags([f"small={url}", f"large={url}"], models=["small=llama-8b"])
    assert cfg.tiers["small"].model == "llama-8b" and cfg.tiers["large"].model == "large"
    with serve_in_thread(dataclasses.replace(cfg, log_dir=tmp_path / "log")) as h:
        for name in ("small", "llama-8b"):
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": name})
            assert r.status_code == 200 and r.headers["x-finops-tier"] == "small"
            assert f.bodies[-1]["model"] == "llama-8b"
    for flags, message in (
        (["--model", "mid=x"], "--model: tier 'mid' has no --upstream"),
        (["--model", "small"], "--model: expected TIER=NAME"),
        (["--model", "small=a", "--model", "small=b"], "--model: tier 'small' is given twice"),
    ):
        res = CliRunner().invoke(
            app, ["shim", "serve", "--upstream", f"small={url}", *flags, "--port", "1"]
        )
        assert res.exit_code == 2 and message in res.output, res.output


def test_sighup_after_stop_is_ignored_not_fatal(tmp_path):
    """Shim.stop() removes the loop's SIGHUP handler, which puts back the default action
    (terminate); a reload asked for while the process drains and exits must not kill it."""
    import asyncio
    import signal

    cfg = _cfg(TIER, tmp_path)
    before = signal.getsignal(signal.SIGHUP)

    async def start_and_stop() -> None:
        shim = Shim(cfg)
        await shim.start()
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)  # the app's
        await shim.stop()

    try:
        asyncio.run(start_and_stop())
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def _reload_under_a_waiting_request(tmp_path, big: str, small: str, headers: dict, n: int):
    """`n` requests for tier `large` (its upstream hangs) are waiting when a reload to
    config `small` removes it; returns (statuses and codes, the shim's /metrics)."""
    hang = run_app_in_thread(FakeUpstream("hang"))
    conf = tmp_path / "shim.toml"
    conf.write_text(big.format(hang=hang.url))
    out: list = []
    try:
        with serve_in_thread(load_config(conf)) as h:

            def req() -> None:
                body = {**CHAT, "model": "large"}
                r = httpx.post(
                    h.base_url + "/chat/completions", json=body, headers=headers, timeout=30
                )
                out.append((r.status_code, r.json()["error"]["code"]))

            threads = [threading.Thread(target=req) for _ in range(n)]
            for t in threads:
                t.start()
                time.sleep(0.3)
            conf.write_text(small)
            ok, msg = h.shim.reload()
            assert ok, msg
            for t in threads:
                t.join(30)
            metrics = httpx.get(h.url + "/metrics").text
    finally:
        hang.stop(2)
    return sorted(out), metrics, hang


def test_a_request_waiting_across_a_reload_that_removes_its_tier(tmp_path, upstream):
    """A duplicate (Idempotency-Key) waiting for its original while a reload removes
    their tier and its cap: the original times out (504), the duplicate gets the 503
    that says so (it was a 500: the old config's cap looked the tier up in the new
    pool). And the removed upstream's circuit, opened by the original's timeout after
    the reload, is not reported by /metrics forever."""
    _, url = upstream
    small = f'[tiers.small]\nupstreams = ["{url}"]\n'
    big = small + (
        '[tiers.large]\nupstreams = ["{hang}"]\n'
        "[upstream]\nresponse_timeout_s = 1.5\nbreaker_failures = 1\n"
        '[caps]\n[[caps.rule]]\ntier = "large"\nmax_input_tokens = 1000\npolicy = "reject"\n'
    )
    got, metrics, hang = _reload_under_a_waiting_request(
        tmp_path, big, small, {"idempotency-key": "k1"}, 2
    )
    assert got == [(503, "tier_unavailable"), (504, "upstream_timeout")]
    assert hang.url not in metrics


# -- operator keys: /metrics and /readyz's details off the tenants' reach --


def test_operator_keys_guard_metrics_and_readyz_details(tmp_path, upstream):
    """/metrics labels every tenant's traffic and /readyz names replica URLs: with
    [auth] operator_keys, /metrics takes one of those keys (a tenant's is refused) and
    /readyz answers anyone its status but only an operator its details. A reload that
    drops the keys is refused: opening both takes a restart."""
    from finops.shim.config import hash_key

    _, url = upstream
    conf = tmp_path / "shim.toml"
    auth = (
        f'[auth]\nkeys = [{{ sha256 = "{hash_key("sk-tenant")}", tenant = "acme" }}]\n'
        f'operator_keys = ["{hash_key("sk-ops")}"]\n'
    )
    conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\n{auth}')
    ops = {"authorization": "Bearer sk-ops"}
    tenant = {"authorization": "Bearer sk-tenant"}
    with serve_in_thread(dataclasses.replace(load_config(conf), log_dir=tmp_path / "log")) as h:
        for headers in ({}, tenant, {"authorization": "Bearer nope"}):
            r = httpx.get(h.url + "/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert "operator_keys" in r.json()["error"]["message"]
        r = httpx.get(h.url + "/metrics", headers=ops)
        assert r.status_code == 200 and "finops_shim_requests_total" in r.text
        deadline = time.monotonic() + 10
        while httpx.get(h.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(h.url + "/readyz", headers=tenant).json() == {"ready": True}
        full = httpx.get(h.url + "/readyz", headers=ops).json()
        assert full["ready"] is True and url in full["tiers"]["small"]["serving"]
        # the operator's key is no tenant's: inference refuses it
        post = h.base_url + "/chat/completions"
        assert httpx.post(post, json=CHAT, headers=ops).status_code == 401
        assert httpx.post(post, json=CHAT, headers=tenant).status_code == 200
        conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\n')
        ok, msg = h.call(h.shim.areload())
        assert not ok and "restart the shim" in msg, msg  # turning auth off is a restart
        assert httpx.get(h.url + "/metrics").status_code == 401
        assert "tiers" not in httpx.get(h.url + "/readyz").json()


@pytest.mark.parametrize(
    ("operator_keys", "message"),
    [
        ('["sk-ops"]', "operator_keys[0]: expected 64 hex characters"),
        (f'["{"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"]', "empty key"),
        ('["{t}"]', "also the API key of tenant 'acme'"),
        ('["{o}", "{o}"]', "operator_keys[1]: the same key is listed twice"),
        ('"{o}"', "operator_keys"),
    ],
)
def test_operator_keys_are_checked_at_load(tmp_path, operator_keys, message):
    from finops.shim.config import hash_key

    ops = operator_keys.replace("{t}", hash_key("sk-tenant")).replace("{o}", hash_key("sk-o"))
    text = (
        TIER + f'[auth]\nkeys = [{{ sha256 = "{hash_key("sk-tenant")}", tenant = "acme" }}]\n'
        f"operator_keys = {ops}\n"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(text, tmp_path)


def test_operator_key_given_again_as_a_tenant_key_on_the_command_line_is_refused(tmp_path, capsys):
    import typer

    from finops.cli.shim import _build_config
    from finops.shim.config import hash_key

    conf = tmp_path / "shim.toml"
    conf.write_text(TIER + f'[auth]\noperator_keys = ["{hash_key("sk-ops")}"]\n')
    with pytest.raises(typer.Exit):
        _build_config(conf, None, None, ["sk-ops=acme"], tmp_path / "log", None, None)
    assert "--api-key: a key given there is also in [auth] operator_keys" in capsys.readouterr().err
