"""finops: GPU and LLM serving economics for teams running vLLM on their own GPUs.

In a notebook::

    import finops
    db = finops.connect()            # DuckDB over data/lake (raw -> clean -> marts)
    db.sql("SELECT * FROM marts.tenant_daily").pl()
"""

from finops.db import connect, refresh
from finops.lake import AppendResult, Lake

__version__ = "0.1.0"
__all__ = ["AppendResult", "Lake", "__version__", "connect", "refresh"]
