"""Notebook 03 (train a router) runs top to bottom and shows its figures."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB = Path(__file__).resolve().parent.parent / "notebooks" / "03_train_router.ipynb"


def _run(monkeypatch, tmp_path: Path, *, rows: int, lake: Path) -> tuple:
    """Execute the notebook on `rows` demo rows with `lake`; the notebook and its text output."""
    monkeypatch.setenv("FINOPS_ROUTER_NB_ROWS", str(rows))
    monkeypatch.setenv("FINOPS_ROUTER_NB_DIR", str(tmp_path))
    monkeypatch.setenv("FINOPS_LAKE", str(lake))
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NB.parent)}}
    ).execute()
    text = "\n".join(
        o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    return nb, text


def test_notebook_03_executes(tmp_path: Path, monkeypatch) -> None:
    nb, text = _run(monkeypatch, tmp_path, rows=2000, lake=tmp_path / "no-lake")
    assert "this router would have saved $" in text
    assert "with 95% confidence" in text
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "95%" not in md and "0.02" not in md  # the guarantee's numbers are computed
    # the reliability chart carries a title (vega-lite JSON or its HTML embedding)
    outs = [str(o.get("data", {})) for c in nb.cells for o in c.get("outputs", [])]
    assert any("Reliability of P(needed tier" in o for o in outs)
    charts = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if any(k.startswith("application/vnd.vegalite") for k in o.get("data", {}))
        or "vegaEmbed" in str(o.get("data", {}).get("text/html", ""))
    ]
    keys = [sorted(o.get("data", {})) for c in nb.cells for o in c.get("outputs", [])]
    assert len(charts) >= 2, keys
    assert (tmp_path / "shipped" / "manifest.json").is_file()
    assert os.environ["FINOPS_ROUTER_NB_DIR"] == str(tmp_path)


def test_notebook_03_prices_from_the_lake(demo_lake: Path, tmp_path: Path, monkeypatch) -> None:
    """With a lake, section 5's dollars come from its cost marts, as the markdown says
    (train() used to be called without the lake, so they came from the catalog)."""
    _nb, text = _run(monkeypatch, tmp_path, rows=1500, lake=demo_lake)
    assert f"lake {demo_lake} (present)" in text
    assert f"lake cost marts ({demo_lake})" in text
    assert "price catalog" not in text
    # the replay's gap to section 5's saving is explained, and the curve's baseline named
    assert "is on the labeled test split" in text
    assert "against the routing the log shows" in text
    assert "The router reads prompt text, which the logs do not capture" in text
    assert "all on large (no router)" in text
    # the example decision says why: cumulative probability vs the tier's threshold
    assert re.search(r"routed to \w+ because .*P\(needed tier <= \w+\) = [\d.]+ >= threshold", text)
    m = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert m["evaluation"]["prices"]["source"].startswith(f"lake cost marts ({demo_lake})")
