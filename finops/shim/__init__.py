"""The live routing shim: an OpenAI-compatible proxy in front of vLLM tiers.

It classifies (router artifact or rule policy), caps context, caches
deterministic responses, coalesces and de-duplicates, routes with fallback,
and writes one lake `requests` record per request. Entry points:
`finops shim serve` (CLI), `create_app(cfg)` (ASGI), `serve_in_thread(cfg)`
(tests, notebooks), `serve_workers(cfg, n)` (several processes on one port).
"""

from finops.shim.app import Shim, ShimASGI, create_app
from finops.shim.config import ConfigError, ShimConfig, from_flags, hash_key, load_config
from finops.shim.server import ServerHandle, serve_in_thread
from finops.shim.workers import Supervisor, serve_workers

__all__ = [
    "ConfigError",
    "ServerHandle",
    "Shim",
    "ShimASGI",
    "ShimConfig",
    "Supervisor",
    "create_app",
    "from_flags",
    "hash_key",
    "load_config",
    "serve_in_thread",
    "serve_workers",
]
