"""`finops report`: figures -> JSON, Markdown summary, FOCUS export, and the HTML report.

The figures are computed once in this process (DuckDB over the lake); the notebook
`notebooks/04_weekly_report.ipynb` is then executed with papermill on that JSON, so
an analyst who edits the notebook changes the report without touching this code,
and the kernel does no heavy work (it starts in seconds).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import finops
from finops.report import figures as F
from finops.report.focus import focus_rows, split_allocation_problems, write_focus
from finops.report.render import notebook_to_html

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "04_weekly_report.ipynb"


@dataclass(frozen=True)
class ReportPaths:
    """Files one report run wrote."""

    html: Path
    summary: Path
    json: Path
    focus_csv: Path
    focus_parquet: Path
    seconds: float
    focus_metadata: Path | None = None  # the FOCUS schema metadata (FocusVersion, columns)

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if isinstance(v, Path)}


def summary_markdown(r: dict[str, Any]) -> str:
    """Ten lines for Slack or e-mail: headline numbers, then the top findings."""
    h, t = r["headline"], r["takeaways"]

    def val(key: str, fmt: Callable[[float], str], points: bool = False) -> str:
        v, ch, prev = h[key]["value"], h[key]["change"], h[key]["previous"]
        s = "n/a" if v is None else fmt(v)
        if h[key].get("not_comparable"):
            return s + " (change not comparable)"
        if ch is None:
            return s
        # weeks with gaps: the change is over the hours both have data for
        v = h[key].get("compared_value", v)
        # a share's change in percentage points, as the report's cards show it
        return s + (f" ({F.signed_pp(v - prev)})" if points else f" ({F.signed_pct(ch)})")

    # some requests on GPUs without a price: the per-request figures divide by the others
    n, unpriced = h["requests"]["value"], r["sources"].get("unpriced_requests") or 0
    priced = f" priced requests ({n - unpriced:,} of {n:,})" if n and unpriced else " requests"
    lines = [
        f"*GPU cost report {r['week']}* (vs {r.get('compare_text') or r['compare_to']})",
        f"- Spend {val('spend_usd', lambda v: f'${v:,.2f}')}, "
        f"requests {val('requests', lambda v: f'{v:,.0f}')}, "
        f"tokens {val('tokens', lambda v: f'{v / 1e6:,.1f}M')}",
        f"- Cost per 1k{priced} {val('usd_per_1k_requests', lambda v: f'${v:,.2f}')}, "
        f"per 1M{' priced' if priced != ' requests' else ''} tokens "
        f"{val('usd_per_1m_tokens', lambda v: f'${v:,.2f}')}",
        f"- GPU-hours {val('gpu_hours', lambda v: f'{v:,.0f}')}, utilization "
        f"{val('utilization', lambda v: f'{100 * v:.1f}%', points=True)} "
        f"({h.get('util_signal') or 'no signal'})",
    ]
    tail = [f"- {t[k]}" for k in ("forecast", "growth") if t.get(k)]
    rc = r.get("reconciliation") or {}
    if t.get("reconciliation") and rc:  # the report says it whole, under the tenant table
        tail.insert(
            0,
            f"- FOCUS export: tenants {F.usd(rc['usage_usd'])} busy time + "
            f"{F.usd(rc['idle_usd'])} idle capacity on untenanted rows = "
            f"{F.usd(rc['bill_usd'])}; the report's tables spread idle over tenants",
        )
    # what the changes above compare (a week with a day missing, a comparison week with a
    # gap): said whole, never behind "(+N more)", as it decides how the deltas read
    notes = r["sources"].get("comparison_notes") or []
    if notes:
        tail.append("- Changes: " + " ".join(notes))
    missing = [m for m in r["sources"]["missing"] if m not in notes]
    if missing:
        more = len(missing) - 1
        tail.append(f"- Missing: {missing[0]}" + (f" (+{more} more)" if more else ""))
    room = 10 - len(lines) - len(tail)
    lines += [f"- {s}" for s in r["findings"][: max(room, 0)]]
    return "\n".join([*lines, *tail][:10]) + "\n"


def prepare_out_dir(out: str | os.PathLike[str]) -> Path:
    """The output folder, created and proven writable before any figure is computed.

    A file in its place or a read-only folder would otherwise end in a traceback,
    and only after a minute of work.
    """
    out_dir = Path(out).resolve()  # the notebook runs in it: relative paths would double
    if out_dir.exists() and not out_dir.is_dir():
        raise F.ReportError(f"--out {out_dir}: exists and is not a folder (expected a folder)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise F.ReportError(
            f"--out {out_dir}: cannot write report files there ({exc.strerror or exc})"
        ) from None
    return out_dir


def execute_notebook(
    figures_json: Path, out_dir: Path, *, week: str, notebook: Path = NOTEBOOK
) -> Path:
    """Run the report notebook with papermill on precomputed figures; returns the executed copy."""
    import papermill as pm

    if not notebook.exists():
        raise F.ReportError(f"{notebook}: report notebook not found")
    executed = out_dir / f".report-{week}.ipynb"
    pm.execute_notebook(
        str(notebook),
        str(executed),
        parameters={"week": week, "figures_json": str(figures_json)},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(out_dir),
        kernel_manager_class=_local_kernel_manager(out_dir),
    )
    return executed


def _local_kernel_manager(folder: Path) -> type:
    """A kernel manager talking to its kernel over Unix sockets in `folder`.

    The default, TCP on loopback without encryption, made every `finops report` and
    `finops demo` print ipykernel's warning that the traffic "is susceptible to
    eavesdropping"; a socket file only this user can open has nothing to warn about.
    """
    from jupyter_client import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kw: Any) -> None:
            super().__init__(transport="ipc", ip=str(folder / "kernel"), **kw)

    return LocalKernelManager


def build_report(
    lake: str | os.PathLike[str] | None,
    week: str,
    out: str | os.PathLike[str],
    compare_to: str | None = None,
    router: str | os.PathLike[str] | None = None,
    *,
    growth: bool = True,
    notebook: Path = NOTEBOOK,
    log: Callable[[str], None] | None = None,
    allow_empty: bool = True,
) -> ReportPaths:
    """Write report-<week>.html, summary-<week>.md, report-<week>.json and focus-<week>.*.

    Returns their paths. Missing sources (no GPU metrics, no previous week, no
    router, a partial or empty week) are stated in the report, never an error;
    a malformed week or a lake folder that does not exist raise ReportError, and so
    does a week outside the lake's data with `allow_empty=False` (`compute`).
    """
    t0 = time.perf_counter()
    lake_path = Path(lake) if lake is not None else finops.db.default_lake_path()
    F.check_lake_folder(lake_path)
    out_dir = prepare_out_dir(out)
    db = finops.connect(lake_path)
    F.quiet(db)
    r = F.compute(
        db,
        week,
        compare_to=compare_to,
        router=router,
        growth=growth,
        log=log,
        allow_empty=allow_empty,
    )
    label = r["week"]
    json_path = out_dir / f"report-{label}.json"
    json_path.write_text(json.dumps(r, indent=2, default=str))
    summary = out_dir / f"summary-{label}.md"
    summary.write_text(summary_markdown(r))
    src = r["sources"]
    unpriced = {"gpu_hours": src["unpriced_gpu_hours"], "models": src["unpriced_models"]}
    gaps = {"gpu_hours": src["gpu_gap_hours"], "cost": src["gpu_gap_cost"]}
    rows = focus_rows(db, label)
    # FOCUS 1.3 split cost allocation: each tier-day's rows rebuild it (a bug otherwise)
    problems = split_allocation_problems(rows)
    if problems:
        raise F.ReportError("FOCUS export breaks split cost allocation: " + "; ".join(problems))
    csv, parquet = write_focus(rows, out_dir, label, unpriced, gaps)
    db.close()
    if log:
        log(f"figures, json, focus: {time.perf_counter() - t0:.1f}s")
    with tempfile.TemporaryDirectory(prefix="finops-report-") as tmp:
        executed = execute_notebook(json_path, Path(tmp), week=label, notebook=notebook)
        page = notebook_to_html(executed, title=f"GPU cost report {label}")
    html_path = out_dir / f"report-{label}.html"
    tmp_html = html_path.with_suffix(".html.tmp")
    tmp_html.write_text(page, encoding="utf-8")
    tmp_html.replace(html_path)
    seconds = time.perf_counter() - t0
    if log:
        log(f"report: {seconds:.1f}s")
    meta = out_dir / f"focus-{label}.metadata.json"
    return ReportPaths(html_path, summary, json_path, csv, parquet, seconds, meta)
