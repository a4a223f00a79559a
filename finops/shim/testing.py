"""Helpers for tests, benchmarks and the live demo (not used on the serving path).

`train_demo_router` trains a real router with finops.router's own training
entry point (`finops.router.train.train`: fit, calibrate thresholds, evaluate,
export a verified artifact) on the demo labeled set, small enough to train in
seconds, so the shim can be exercised end to end with a trained classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TIERS = ["small", "mid", "large"]


def train_demo_router(
    out: Path,
    *,
    n: int = 800,
    seed: int = 1,
    upstream_models: dict[str, str] | None = None,
    quality_target: float = 0.9,
) -> Path:
    """Train on `n` demo labeled rows and export the artifact to `out` (replaced)."""
    import warnings

    from finops.router.data import demo_labeled_rows, from_records
    from finops.router.train import train

    rows = demo_labeled_rows(n, seed)
    data = from_records(
        ((f"demo:{i + 1}", r) for i, r in enumerate(rows)),
        tiers=TIERS,
        source=f"demo_labeled_rows(n={n}, seed={seed})",
        sha256=f"demo-{n}-{seed}",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on a tiny sample
        res = train(
            data,
            out,
            upstream=upstream_models or {t: t for t in TIERS},
            quality_target=quality_target,
            confidence=0.9,
            seed=seed,
            cv_folds=0,
            overwrite=True,
        )
    assert res.path is not None
    return Path(res.path)


def wait_for_records(shim: Any, n: int | None = None, timeout: float = 5.0) -> list[dict]:
    """The running shim's request-log records on disk, by time; with `n`, wait until that
    many are there (a record is queued right after its response is sent, so a client can
    see its response a moment before the record exists)."""
    import time

    import orjson

    deadline = time.monotonic() + timeout
    while True:
        shim.log.flush()
        out = []
        for p in sorted(Path(shim.cfg.log_dir).glob("requests-*.jsonl*")):
            out += [orjson.loads(line) for line in p.read_bytes().splitlines()]
        if n is None or len(out) >= n or time.monotonic() > deadline:
            return sorted(out, key=lambda r: r["ts"])
        time.sleep(0.02)
