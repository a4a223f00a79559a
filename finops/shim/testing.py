"""Helpers for tests, benchmarks and the live demo (not used on the serving path).

`train_demo_router` trains a real router with finops.router's own training
entry point (`finops.router.train.train`: fit, calibrate thresholds, evaluate,
export a verified artifact) on the demo labeled set, small enough to train in
seconds, so the shim can be exercised end to end with a trained classifier.
"""

from __future__ import annotations

from pathlib import Path

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
