"""Helpers for tests, benchmarks and the live demo (not used on the serving path).

`train_demo_router` fits the router pipeline on the demo labeled set through
finops.router's public API (`model.build_pipeline`, `artifact.write_artifact`)
and exports a verified artifact: a real trained router, small enough to
train in seconds, for exercising the shim end to end.
"""

from __future__ import annotations

import warnings
from pathlib import Path

TIERS = ["small", "mid", "large"]


def train_demo_router(
    out: Path, *, n: int = 600, seed: int = 1, upstream_models: dict[str, str] | None = None
) -> Path:
    """Train on `n` demo labeled rows and write the artifact to `out` (a new folder)."""
    import numpy as np
    import polars as pl

    from finops.router import features as F
    from finops.router.artifact import _FRAME_SCHEMA, write_artifact
    from finops.router.data import demo_labeled_rows
    from finops.router.model import build_pipeline

    rows = demo_labeled_rows(n, seed)
    feats, labels = [], []
    for r in rows:
        body = {"messages": r["messages"]} if "messages" in r else {"prompt": r["prompt"]}
        text, turns = F.body_text(body)
        feats.append(
            F.extract(
                text=text,
                turn_count=turns,
                has_tools=r["has_tools"],
                feature=r["feature"],
                tenant=r["tenant"],
            )
        )
        labels.append(TIERS.index(r["label"]))
    X = pl.DataFrame(feats, schema=_FRAME_SCHEMA())
    y = np.asarray(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saga's convergence warning on a tiny sample
        pipe = build_pipeline(True, cv=2, max_iter=100, seed=seed).fit(X, y)
    return write_artifact(
        out,
        pipe,
        tiers=TIERS,
        upstream_models=upstream_models or {t: t for t in TIERS},
        decision={
            "thresholds": {"small": 0.6, "mid": 0.7},
            "quality_target": 0.9,
            "confidence": 0.9,
        },
        uses_prompt_text=True,
        training_data={"rows": n, "seed": seed, "source": "finops.router.data.demo_labeled_rows"},
        evaluation={"train_accuracy": float((pipe.predict(X) == y).mean())},
        drift={},
    )
