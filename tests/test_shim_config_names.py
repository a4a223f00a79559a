"""Names a config gives two meanings are refused at load, in the terms the operator used
(file and tables, or flags)."""

from __future__ import annotations

import dataclasses
import tomllib

import httpx
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.shim import serve_in_thread
from finops.shim.config import ConfigError, from_flags, parse_config

TWO_TIERS_ONE_MODEL = (
    '[tiers.small]\nupstreams = ["http://127.0.0.1:9"]\nmodel = "fake"\n'
    '[tiers.large]\nupstreams = ["http://127.0.0.1:9"]\nmodel = "fake"\n'
)


def test_two_tiers_serving_one_model_name_fail_shim_check(tmp_path):
    """Requests for `fake` silently all went to `small`; `shim check` said ok."""
    conf = tmp_path / "shim.toml"
    conf.write_text(TWO_TIERS_ONE_MODEL)
    res = CliRunner().invoke(app, ["shim", "check", str(conf)])
    assert res.exit_code != 0, res.output
    out = " ".join(res.output.split())
    assert "shim.toml: [tiers.large] model: 'fake' is also the model [tiers.small] serves" in out
    assert "--served-model-name" in out and "model_aliases" in out


def test_two_tiers_serving_one_model_name_fail_the_flags():
    with pytest.raises(
        ConfigError,
        match=r"^--model: --model small=fake and --model large=fake: a model name goes to one",
    ):
        from_flags(
            ["small=http://127.0.0.1:9", "large=http://127.0.0.1:9"],
            models=["small=fake", "large=fake"],
        )
    res = CliRunner().invoke(
        app,
        [
            "shim",
            "serve",
            "--upstream",
            "small=http://127.0.0.1:9",
            "--upstream",
            "large=http://127.0.0.1:9",
            "--model",
            "small=fake",
            "--model",
            "large=fake",
            "--port",
            "1",
        ],
    )
    assert res.exit_code == 2 and "--model small=fake and --model large=fake" in res.output


def test_upstream_flag_and_table_errors_read_naturally(tmp_path):
    with pytest.raises(ConfigError) as exc:
        from_flags(["small=localhost:18100"])
    assert str(exc.value) == (
        "--upstream small=localhost:18100: expected an http:// or https:// URL of a vLLM "
        "server, got 'localhost:18100' (did you mean 'http://localhost:18100'?)"
    )
    with pytest.raises(ConfigError) as exc:
        from_flags(["small=http://admin:s3cret@localhost"])
    assert "s3cret" not in str(exc.value) and "small=http://***@localhost" in str(exc.value)
    conf = tmp_path / "shim.toml"
    conf.write_text("[tiers.small]\nupstreams = []\n")
    res = CliRunner().invoke(app, ["shim", "check", str(conf)])
    assert "shim.toml: [tiers.small] upstreams: expected a non-empty list of URLs" in " ".join(
        res.output.split()
    )


def test_an_unknown_model_404_lists_every_name_clients_may_send(tmp_path, fakes):
    """It listed only the tier names: the served model names and aliases clients are
    told to use elsewhere were left out."""
    _f, url = fakes()
    text = (
        f'[tiers.small]\nupstreams = ["{url}"]\nmodel = "llama-8b"\n'
        f'[tiers.large]\nupstreams = ["{url}"]\nmodel = "llama-70b"\n'
        '[routing]\nextra_aliases = ["router"]\nmodel_aliases = {"gpt-4o-mini" = "small"}\n'
    )
    cfg = parse_config(tomllib.loads(text), source="shim.toml")
    with serve_in_thread(dataclasses.replace(cfg, log_dir=tmp_path)) as h:
        for path, body in (
            ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/embeddings", {"input": "hi"}),
        ):
            r = httpx.post(h.base_url + path, json={**body, "model": "gpt-5"})
            assert r.status_code == 404, r.text
            msg = r.json()["error"]["message"]
            assert msg.startswith("The model `gpt-5` does not exist here; use one of `auto`, ")
            for name in ("router", "small", "large", "llama-8b", "llama-70b", "gpt-4o-mini"):
                assert f"`{name}`" in msg, msg


def test_two_tiers_may_share_a_model_name_when_explicit_is_deny():
    """Under deny no request picks a tier by model name, so one name is not ambiguous."""
    cfg = parse_config(
        tomllib.loads(TWO_TIERS_ONE_MODEL + '[routing]\nexplicit = "deny"\n'), source="shim.toml"
    )
    assert [t.model for t in cfg.tiers.values()] == ["fake", "fake"]
    with pytest.raises(ConfigError, match=r'or \[routing\] explicit = "deny"'):
        parse_config(tomllib.loads(TWO_TIERS_ONE_MODEL + '[routing]\nexplicit = "allow"\n'))


@pytest.mark.parametrize(
    "value",
    [
        "user:s3cret@localhost:8000",  # no scheme: the masking needed `://`
        "http://user:s3cret@local host:8000",  # the whitespace message
        "ftp://user:s3cret@localhost:8000",  # the wrong scheme's "got ..."
    ],
)
def test_a_password_in_an_upstream_flag_never_shows(value):
    with pytest.raises(ConfigError) as exc:
        from_flags([f"small={value}"])
    assert "s3cret" not in str(exc.value) and "***@" in str(exc.value), str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse_config({"tiers": {"small": {"upstreams": [value]}}})
    assert "s3cret" not in str(exc.value) and "***@" in str(exc.value), str(exc.value)


def test_a_password_in_a_malformed_upstream_flag_never_shows():
    with pytest.raises(ConfigError) as exc:
        from_flags(["http://user:s3cret@localhost:8000"])  # no TIER=
    assert "s3cret" not in str(exc.value) and "***@" in str(exc.value), str(exc.value)
