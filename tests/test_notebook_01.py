"""notebooks/01_gpu_utilization.ipynb runs top to bottom on the demo lake and states numbers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_gpu_utilization.ipynb"


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            for kind in ("text/markdown", "text/plain"):
                if kind in out.get("data", {}):
                    parts.append(out["data"][kind])
    return "\n".join(parts)


def test_notebook_01_executes_on_demo_lake(
    demo_lake: Path, monkeypatch, artifacts_dir: Path
) -> None:
    monkeypatch.setenv("FINOPS_LAKE", str(demo_lake))
    monkeypatch.delenv("FINOPS_WEEK", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute(env={**os.environ, "FINOPS_LAKE": str(demo_lake)})
    nbformat.write(nb, artifacts_dir / "01_gpu_utilization.executed.ipynb")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = _text(nb)
    # the findings are sentences with computed numbers, not placeholders
    assert re.search(r"ran \*\*[\d,]+ GPU-hours\*\* for \*\*\$[\d,]+\.\d\d\*\*", text)
    assert re.search(r"GPU_UTIL reads \*\*\d+%\*\* while SM activity is \*\*\d+%\*\*", text)
    assert re.search(r"deepest trough is \*\*\d\d:00 UTC\*\*", text)
    charts = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if any("vegalite" in k for k in o.get("data", {}))
        or "vegaEmbed" in o.get("data", {}).get("text/html", "")
    ]
    assert len(charts) >= 4
