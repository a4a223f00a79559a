"""Rebuild data/traces/demo-traces.parquet from the four public traces.

Why: `make demo` must run on a fresh clone with no download. The demo reads only
each request's arrival offset, prompt and output tokens and (Mooncake) prefix-cache
hit tokens; this keeps exactly those numbers, as `finops.demo.traffic.load_traces`
computes them from the originals, in one small Parquet file.

Usage: python scripts/embed_traces.py [TRACES_DIR]   (default: ../shared/data/traces)
"""

from __future__ import annotations

import sys
from pathlib import Path

from finops.demo.traffic import EMBEDDED_TRACES, SHARED_TRACES, _load_traces, traces_frame


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SHARED_TRACES
    frame = traces_frame(_load_traces(str(src)))
    EMBEDDED_TRACES.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(EMBEDDED_TRACES, compression="zstd", compression_level=19, statistics=False)
    print(f"{EMBEDDED_TRACES}: {frame.height} rows, {EMBEDDED_TRACES.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
