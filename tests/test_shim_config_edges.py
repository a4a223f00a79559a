"""Shim config edge cases: reloads that would turn auth off, --api-key conflicts with the
file, whitespace and non-UTF-8 keys at hash time, [router.rules] features values that are
not tier names, and IPv6 URLs missing their ']'."""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib

import httpx
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.shim import serve_in_thread
from finops.shim.config import ConfigError, from_flags, hash_key, load_config, parse_config
from finops.shim.workers import Supervisor

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
TIER = '[tiers.small]\nupstreams = ["http://127.0.0.1:8000"]\n'


def _auth(keys: dict[str, str], operators: tuple[str, ...] = ()) -> str:
    listed = ", ".join(f'{{ sha256 = "{hash_key(k)}", tenant = "{t}" }}' for k, t in keys.items())
    ops = ", ".join(f'"{hash_key(k)}"' for k in operators)
    return f"[auth]\nkeys = [{listed}]\noperator_keys = [{ops}]\n"


# -- 1. a reload never turns auth off, nor opens /metrics --


def test_a_reload_that_drops_every_api_key_or_operator_key_is_refused(tmp_path, upstream):
    _, url = upstream
    tier = f'[tiers.small]\nupstreams = ["{url}"]\n'
    conf = tmp_path / "shim.toml"
    conf.write_text(tier + _auth({"sk-t": "acme"}, ("sk-ops",)))
    cfg = dataclasses.replace(load_config(conf), log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        post = h.base_url + "/chat/completions"
        conf.write_text(tier + "[auth]\n# keys = ...\n")  # the keys lost in an edit
        ok, msg = h.call(h.shim.areload())  # what SIGHUP and the file watch run
        assert not ok
        assert "[auth] keys: the file now lists no API key" in msg and "restart" in msg
        assert httpx.post(post, json=CHAT).status_code == 401  # auth still on
        ready = httpx.get(h.url + "/readyz", headers={"authorization": "Bearer sk-ops"}).json()
        assert "no API key" in ready["last_reload_error"]
        # keys kept, operator keys emptied: /metrics would open to anyone
        conf.write_text(tier + _auth({"sk-t": "acme"}))
        ok, msg = h.shim.reload()
        assert not ok and "operator_keys: the file now lists no operator key" in msg
        assert httpx.get(h.url + "/metrics").status_code == 401
        # other key changes still reload
        conf.write_text(tier + _auth({"sk-new": "acme"}, ("sk-ops",)))
        ok, msg = h.shim.reload()
        assert ok, msg
        good = {"authorization": "Bearer sk-new"}
        assert httpx.post(post, json=CHAT, headers=good).status_code == 200


def test_the_supervisor_keeps_no_copy_of_a_config_that_turns_auth_off(tmp_path):
    conf = tmp_path / "shim.toml"
    conf.write_text(TIER)  # started with auth off: turning it on by reload is fine
    sup = Supervisor(load_config(conf), 2)
    sup._copies_dir = tmp_path / "copies"
    sup.last_good = sup._verify(sup.cfg)
    conf.write_text(TIER + _auth({"sk-t": "acme"}))
    assert sup._refresh_last_good("SIGHUP")
    assert sup.last_good.cfg.auth_enabled
    # a worker restarted after this would serve what the supervisor keeps: auth on still
    conf.write_text(TIER)
    assert not sup._refresh_last_good("SIGHUP")
    assert sup.last_good.cfg.auth_enabled


# -- 2. --api-key never moves a key to another tenant --


def test_api_key_flag_conflicting_with_the_file_or_itself_is_refused(tmp_path):
    conf = tmp_path / "shim.toml"
    conf.write_text(TIER + _auth({"sk1": "acme"}))
    runner = CliRunner()
    res = runner.invoke(app, ["shim", "check", str(conf)])
    assert res.exit_code == 0, res.output
    # a router that is not there: refused after the flags, so serve never starts serving
    serve = ["shim", "serve", "--config", str(conf), "--router", str(tmp_path / "none")]
    res = runner.invoke(app, [*serve, "--api-key", "sk1=other"])
    assert res.exit_code != 0
    line = res.output.strip()
    assert line.startswith("error: --api-key: a key given there is also in")
    assert "'acme' in the file, 'other' on the command line" in line and "sk1" not in line
    res = runner.invoke(app, [*serve, "--api-key", "sk2=a", "--api-key", "sk2=b"])
    assert res.exit_code != 0
    assert "error: --api-key: the same key is given twice (tenants 'a' and 'b')" in res.output
    res = runner.invoke(app, [*serve, "--api-key", " \t=a"])  # a blank key: never logs in
    assert res.exit_code != 0 and "error: --api-key: expected KEY=TENANT" in res.output


def test_a_reload_that_moves_a_command_line_key_in_the_file_is_refused(tmp_path):
    from finops.cli.shim import _build_config
    from finops.shim.config import reread_config

    conf = tmp_path / "shim.toml"
    conf.write_text(TIER)
    cfg = _build_config(conf, None, None, ["sk1=acme"], None, None, None)
    conf.write_text(TIER + _auth({"sk1": "acme"}))  # the same key, same tenant: no conflict
    assert reread_config(cfg).api_keys == {hash_key("sk1"): "acme"}
    conf.write_text(TIER + _auth({"sk1": "other"}))
    with pytest.raises(ConfigError, match="'other' in the file, 'acme' on the command line"):
        reread_config(cfg)


# -- 3. keys hashed as auth reads them --


def test_keys_are_hashed_without_surrounding_whitespace_and_as_raw_bytes():
    runner = CliRunner()
    plain = hash_key("sk-acme")
    for given in ("sk-acme \n", " sk-acme\r\n", "\tsk-acme\n"):
        res = runner.invoke(app, ["shim", "hash-key", "-"], input=given)
        assert res.exit_code == 0 and res.output.strip() == plain, repr(given)
    res = runner.invoke(app, ["shim", "hash-key", " sk-acme "])
    assert res.exit_code == 0 and res.output.strip() == plain
    res = runner.invoke(app, ["shim", "hash-key", "-"], input=b" \t\n")
    assert res.exit_code == 2 and "the key is empty" in res.output
    # not UTF-8: the bytes a client sends in its header are what auth hashes
    res = runner.invoke(app, ["shim", "hash-key", "-"], input=b"cl\xe9\n")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == hashlib.sha256(b"cl\xe9").hexdigest()
    cfg = from_flags(["small=http://127.0.0.1:8000"], api_keys=[" sk-acme=acme"])
    assert cfg.api_keys == {plain: "acme"}
    with pytest.raises(ConfigError, match="--api-key: expected KEY=TENANT"):
        from_flags(["small=http://127.0.0.1:8000"], api_keys=["  =acme"])


# -- 4. and 5. values of the wrong shape: one error line naming the key --


def test_a_features_value_that_is_not_a_tier_name_is_an_error(tmp_path):
    conf = tmp_path / "shim.toml"
    conf.write_text(TIER + '[router.rules]\nfeatures = { chat = ["small"] }\n')
    res = CliRunner().invoke(app, ["shim", "check", str(conf)])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.exception
    assert (
        "[router.rules] features.chat: expected a tier name (one of ['small']), got ['small']"
        in res.output
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[tiers.small]\nupstreams = ["http://[fd00::5:8000"]\n', "[tiers.small] upstreams"),
        (TIER + '[cache]\nredis_url = "redis://[fd00::5:6379/0"\n', "[cache] redis_url"),
    ],
)
def test_an_ipv6_url_missing_its_bracket_is_a_config_error(tmp_path, text, where):
    conf = tmp_path / "shim.toml"
    conf.write_text(text)
    res = CliRunner().invoke(app, ["shim", "check", str(conf)])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.exception
    assert f"{where}" in res.output and "cannot be read as a URL (Invalid IPv6 URL)" in res.output
    with pytest.raises(
        ConfigError, match=r"--upstream small=http://\[fd00::5:8000: 'http://\[fd00::5:8000'"
    ):
        from_flags(["small=http://[fd00::5:8000"])
    with pytest.raises(ConfigError, match="cannot be read as a URL"):
        parse_config(tomllib.loads(text), source="shim.toml")
