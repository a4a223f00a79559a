"""Benchmark: `finops report` for a 10M-request, 64-GPU week (goal: under a minute).

Synthesizes the week with the cost benchmark's generator (`bench/bench_marts.py`,
imported, not copied), then times in the same run:

1. baseline: one DuckDB scan of the week's request files aggregating requests and
   tokens by tenant (the least any report over those requests must read);
2. report: `finops.report.build_report` end to end (cost marts, every section, the
   growth simulation, FOCUS export, papermill notebook, HTML with inline SVG).

Prints both times and the ratio report/baseline. Usage:

    uv run python bench/bench_report.py [--quick] [--requests N] [--gpus N] [--no-growth]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_marts import WEEK, synthesize

GOAL_S = 60.0
GOAL_SIZE = (10_000_000, 64)  # requests, GPUs: the week the one-minute goal is set for


def verdict(seconds: float, n_req: int, gpus: int, quick: bool, growth: bool) -> str:
    """Under/over the minute only for the goal's week and whole report: else it says little."""
    if (n_req, gpus) == GOAL_SIZE and growth:
        return f"{'under' if seconds < GOAL_S else 'OVER'} one minute"
    run = f"{'quick: ' if quick else ''}{n_req / 1e6:g}M requests/{gpus} GPUs"
    if not growth:
        run += ", no growth simulation"
    goal = f"{GOAL_SIZE[0] / 1e6:g}M/{GOAL_SIZE[1]} with growth"
    return f"({run}; the one-minute goal is judged at {goal})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M requests, 16 GPUs")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--no-growth", action="store_true", help="skip the growth simulation")
    ap.add_argument("--keep", type=Path, default=None, help="write lake and report here")
    args = ap.parse_args()
    n_req = args.requests or (1_000_000 if args.quick else 10_000_000)
    gpus = args.gpus or (16 if args.quick else 64)

    import duckdb

    from finops.report import build_report

    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    root = args.keep or tmp
    lake, out = root / "lake", root / "out"
    shutil.rmtree(lake, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        counts = synthesize(lake, n_req, gpus)
        print(
            f"synthesized {counts['requests']:,} requests, {counts['gpu_samples']:,} GPU samples "
            f"({gpus} GPUs) in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        con = duckdb.connect()
        base = con.sql(
            f"""SELECT tenant, count(*) AS requests, sum(input_tokens + output_tokens) AS tokens
                FROM read_parquet('{lake}/requests/**/*.parquet') GROUP BY ALL"""
        ).fetchall()
        t_base = time.perf_counter() - t0
        con.close()
        t0 = time.perf_counter()
        paths = build_report(lake, WEEK, out, growth=not args.no_growth)
        t_rep = time.perf_counter() - t0
        size = paths.html.stat().st_size / 1024
        said = verdict(t_rep, n_req, gpus, args.quick, growth=not args.no_growth)
        print(
            f"baseline (one DuckDB scan, requests by tenant, {len(base)} tenants): {t_base:.2f} s"
        )
        print(
            f"report   (finops report {WEEK}, {size:,.0f} KiB HTML): {t_rep:.2f} s   "
            f"ratio {t_rep / t_base:.1f}x   {said}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
