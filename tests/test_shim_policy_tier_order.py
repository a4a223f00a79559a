"""A router whose tiers are in another order than the shim's [tiers] tables is refused.

The config's table order is cost order (cheapest first): the alias's embeddings go to the
first tier and fallback / context caps walk "up" it. A router trained small,mid,large
under a config listing large,mid,small would send those the wrong way, so it is refused
at start (and `shim check`) and at hot reload, where the old router keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from finops.shim import serve_in_thread
from finops.shim.app import build_router
from finops.shim.config import load_config
from finops.shim.policy import Router
from finops.shim.testing import train_demo_router

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@dataclass
class _Policy:
    tiers: list[str]
    version: str = "test-v1"
    upstream_models: dict[str, str] = field(default_factory=dict)


def test_router_tiers_in_another_order_than_the_config_are_refused() -> None:
    with pytest.raises(ValueError) as exc:
        Router(_Policy(["small", "mid", "large"]), ["large", "mid", "small"])
    msg = str(exc.value)
    assert "['small', 'mid', 'large'] (cheapest first)" in msg
    assert "in the order ['large', 'mid', 'small']" in msg
    with pytest.raises(ValueError, match="in the order"):  # a subset in another order too
        Router(_Policy(["small", "large", "xl"]), ["small", "mid", "xl", "large"])


def test_router_tiers_in_the_config_order_are_served() -> None:
    Router(_Policy(["small", "mid", "large"]), ["small", "mid", "large"])
    # the config may have more tiers than the router routes to, in the same order
    Router(_Policy(["small", "mid", "large"]), ["tiny", "small", "mid", "large", "xl"])
    Router(_Policy(["small", "large", "xl"]), ["small", "mid", "large", "xl"])


def _toml(path: Path, order: list[str], url: str, router: Path) -> Path:
    tables = "".join(f'[tiers.{t}]\nupstreams = ["{url}"]\n' for t in order)
    path.write_text(f'{tables}[router]\npath = "{router}"\n')
    return path


def test_start_and_hot_reload_refuse_a_config_in_another_order(tmp_path, upstream) -> None:
    _, url = upstream
    art = train_demo_router(tmp_path / "r", n=400)
    bad = _toml(tmp_path / "bad.toml", ["large", "mid", "small"], url, art)
    with pytest.raises(ValueError, match=r"router .* ranks its tiers \['small', 'mid', 'large'\]"):
        build_router(load_config(bad))
    conf = _toml(tmp_path / "shim.toml", ["small", "mid", "large"], url, art)
    with serve_in_thread(load_config(conf)) as h:
        version = h.shim.router.version
        _toml(conf, ["large", "mid", "small"], url, art)
        ok, msg = h.shim.reload()
        assert not ok and "in the order ['large', 'mid', 'small']" in msg, msg
        assert h.shim.router.version == version and h.shim.cfg.tier_names[0] == "small"
        assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
