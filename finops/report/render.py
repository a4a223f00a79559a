"""Executed notebook -> one self-contained HTML file (no code, no scripts, inline SVG).

nbconvert's templates load require.js and vega-embed from CDNs for charts; a report
that must open as an e-mail attachment, offline and on a phone cannot. So this
module writes the page itself: markdown cells and display outputs only, every
Vega-Lite output rendered to SVG offline with vl-convert, CSS inlined (responsive
and print rules), and no external reference left.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat

TEMPLATE = Path(__file__).with_name("templates") / "report.html.j2"
_VEGALITE = re.compile(r"^application/vnd\.vegalite\.v\d+\+json$")
_XMLNS = re.compile(r'\s+xmlns(:\w+)?="http[^"]*"')


def chart_theme() -> dict[str, Any]:
    """Altair theme for the report: quiet axes, system fonts, readable on paper."""
    font = "-apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
    return {
        "config": {
            "font": font,
            "view": {"stroke": None},
            "title": {"fontSize": 14, "anchor": "start", "color": "#1f2d3d", "fontWeight": 600},
            "axis": {"labelColor": "#4a5568", "titleColor": "#4a5568", "gridColor": "#e2e8f0"},
            "legend": {"labelColor": "#4a5568", "titleColor": "#4a5568"},
        }
    }


def frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Records as a polars DataFrame for a chart, every all-null column typed Float64.

    A column that is null in every row (a cost with no priced GPU data) has polars'
    Null dtype, which Altair cannot type ("Unexpected DtypeKind: Unknown"): the report
    failed instead of saying the spend is unknown.
    """
    import polars as pl

    df = pl.DataFrame(list(rows)) if rows else pl.DataFrame()
    nulls = [c for c, t in df.schema.items() if t == pl.Null]
    return df.with_columns(pl.col(nulls).cast(pl.Float64)) if nulls else df


def known(df: Any, col: str) -> bool:
    """Whether `df` has a non-null value in `col` (a chart of nothing but unknowns is none)."""
    return col in df.columns and df[col].null_count() < df.height


def kpi_card(
    label: str,
    h: Mapping[str, Any],
    fmt: Callable[[float], str],
    *,
    good_when_down: bool = True,
    points: bool = False,
) -> str:
    """One headline card (HTML): the value (n/a when unknown) and its change vs the
    compared week, red when it moved the wrong way; `h` is a `headline` entry."""
    from finops.report.figures import signed_pct, signed_pp

    v, ch = h["value"], h["change"]
    cls = ""
    if ch is not None:
        cls = "bad" if (ch > 0) == good_when_down and abs(ch) > 0.005 else "good"
    # weeks with gaps: the change is over the hours both weeks have data for
    base = h.get("compared_value", v)
    if ch is not None and points and h["previous"] is not None:
        # a share's change in percentage points (3.5% -> 4.1% is +0.6 pp, not +16.6%)
        text = signed_pp(base - h["previous"])
    else:
        text = "" if ch is None else signed_pct(ch)
    delta = "" if ch is None else f"<span class='delta {cls}'>{text}</span>"
    if h.get("not_comparable"):  # a gap in one week's data: no move to show
        delta = (
            f"<span class='delta' title='{html.escape(h['not_comparable'], quote=True)}'>"
            "not comparable</span>"
        )
    val = "n/a" if v is None else fmt(v)
    return (
        f"<div class='kpi'><div class='label'>{html.escape(label)}</div>"
        f"<div class='value'>{val}</div>{delta}</div>"
    )


def _fmt(v: Any, col: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if col in ("share", "touched_share", "idle_share") or col.endswith("_share"):
            return f"{100 * v:.1f}%"
        if col in ("z", "z_requests"):
            return f"{v:.2f}"  # 3.5 is the threshold: a flagged 3.504 must not read 3.5
        if col == "usual_requests":
            return f"{v:,.0f}"
        if "cost" in col or "usd" in col or col in ("usual",):
            return f"${v:,.2f}"
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def table_html(rows: Sequence[Mapping[str, Any]], columns: Iterable[str]) -> str:
    """A compact HTML table of records (numbers right-aligned, dollars and shares formatted)."""
    cols = [c for c in columns if rows and c in rows[0]]
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            num = isinstance(v, int | float) and not isinstance(v, bool)
            cells.append(f"<td class='{'num' if num else ''}'>{_fmt(v, c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<div class='table-wrap'><table><thead><tr>"
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table></div>"
    )


def vegalite_to_svg(spec: Mapping[str, Any] | str) -> str:
    """Render a Vega-Lite spec offline (vl-convert, no network) to inline SVG."""
    import vl_convert as vlc

    svg = vlc.vegalite_to_svg(spec if isinstance(spec, str) else json.dumps(spec))
    return clean_svg(svg)


def clean_svg(svg: str) -> str:
    """Inline-ready SVG: no XML prolog, no namespace URLs (HTML5 does not need them)."""
    svg = re.sub(r"^\s*<\?xml[^>]*>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>", "", svg)
    svg = _XMLNS.sub("", svg)
    svg = re.sub(r"<script.*?</script>", "", svg, flags=re.S | re.I)
    return svg


def _markdown(text: str) -> str:
    """Markdown -> HTML with raw HTML escaped: the text carries names from the data
    (client-chosen feature and tenant headers), which must never become live tags.
    Markup the notebook means goes through display(HTML(...)) with escaped values."""
    import mistune

    md = mistune.create_markdown(escape=True, plugins=["strikethrough", "table"])
    return str(md(text))


def _output_html(out: Mapping[str, Any]) -> str | None:
    """The HTML of one notebook output, best representation first; None to skip it."""
    kind = out.get("output_type")
    if kind == "error":
        tb = "\n".join(out.get("traceback", []))
        tb = re.sub(r"\x1b\[[0-9;]*m", "", tb)
        return f"<pre class='error'>{html.escape(tb)}</pre>"
    if kind == "stream":
        return None  # logs and warnings are for the analyst, not the reader
    data = out.get("data", {})
    for mime, value in data.items():
        if _VEGALITE.match(mime):
            return f"<figure class='chart'>{vegalite_to_svg(value)}</figure>"
    if "image/svg+xml" in data:
        svg = data["image/svg+xml"]
        svg = "".join(svg) if isinstance(svg, list) else svg
        return f"<figure class='chart'>{clean_svg(svg)}</figure>"
    if "text/html" in data:
        h = data["text/html"]
        return "".join(h) if isinstance(h, list) else h
    if "text/markdown" in data:
        m = data["text/markdown"]
        return _markdown("".join(m) if isinstance(m, list) else m)
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            b = data[mime] if isinstance(data[mime], str) else base64.b64encode(data[mime]).decode()
            return f"<img alt='' src='data:{mime};base64,{b.strip()}'>"
    return None  # text/plain reprs only: nothing a reader needs


def notebook_body(nb: nbformat.NotebookNode) -> str:
    """Markdown cells and displayed outputs of an executed notebook, code hidden."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(_markdown(cell.source))
        elif cell.cell_type == "code":
            for out in cell.get("outputs", []):
                h = _output_html(out)
                if h:
                    parts.append(h)
    return "\n".join(parts)


def strip_external(page: str) -> str:
    """Drop any <script> and external src/href an output might carry (the page stays offline)."""
    page = re.sub(r"<script\b.*?</script>", "", page, flags=re.S | re.I)
    page = re.sub(r"<link\b[^>]*>", "", page, flags=re.I)
    page = re.sub(r'\s(src|href)="(?:https?:)?//[^"]*"', "", page, flags=re.I)
    page = re.sub(r"\s(src|href)='(?:https?:)?//[^']*'", "", page, flags=re.I)
    return page


def notebook_to_html(nb_path: str | Path, *, title: str) -> str:
    """The self-contained report page for an executed notebook."""
    import jinja2

    nb = nbformat.read(str(nb_path), as_version=4)
    env = jinja2.Environment(autoescape=False)
    page = env.from_string(TEMPLATE.read_text()).render(title=title, body=notebook_body(nb))
    return strip_external(page)
