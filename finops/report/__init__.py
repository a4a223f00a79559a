"""The weekly cost report: HTML (inline SVG, no scripts), Markdown summary, JSON, FOCUS 1.3.

from finops.report import build_report
paths = build_report("data/lake", "2026-W47", "reports/")
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "compute"]


def __getattr__(name: str) -> Any:  # lazy: `import finops.report.figures` stays light
    if name == "build_report":
        from finops.report.build import build_report

        return build_report
    if name == "compute":
        from finops.report.figures import compute

        return compute
    raise AttributeError(name)
