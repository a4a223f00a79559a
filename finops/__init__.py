"""finops: GPU and LLM serving economics for teams running vLLM on their own GPUs.

In a notebook::

    import finops
    db = finops.connect()            # DuckDB over data/lake (raw -> clean -> marts)
    db.sql("SELECT * FROM marts.tenant_daily").pl()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AppendResult", "Lake", "__version__", "connect", "refresh"]

# Loaded on first use: DuckDB, Polars and NumPy take ~0.6 s to import, which every
# `finops` command (and each shim worker, before it can ignore SIGHUP) paid at start.
_LAZY = {
    "connect": "finops.db",
    "refresh": "finops.db",
    "AppendResult": "finops.lake",
    "Lake": "finops.lake",
}

if TYPE_CHECKING:
    from finops.db import connect, refresh
    from finops.lake import AppendResult, Lake


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:
        # a submodule, as `finops.db` was once `import finops` had loaded it
        try:
            value = importlib.import_module(f"finops.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"finops.{name}":
                raise
            raise AttributeError(f"module 'finops' has no attribute {name!r}") from None
    globals()[name] = value
    return value
