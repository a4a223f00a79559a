"""`finops collect` as a daemon when the lake cannot be written for a while: it says so,
keeps what it collected, and once writing works again every scrape and every log line
lands exactly once (the --once path, which never retries, is in test_cli_errors_io)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_cli_errors_io import _log
from test_dcgm import TEXT, serve

import finops

ROOT = Path(__file__).resolve().parent.parent
GPU = 'gpu="0",UUID="GPU-0000",modelName="NVIDIA L4",Hostname="node-a"'


def _count(lake: Path, sql: str) -> int:
    try:
        return finops.connect(lake).sql(sql).fetchall()[0][0]
    except Exception:  # a view over a table with no file yet
        return -1


def test_a_failed_write_is_retried_and_loses_nothing(tmp_path: Path) -> None:
    log, lake = _log(tmp_path / "requests.jsonl"), tmp_path / "lake"
    scrapes = iter(range(1_000_000))

    def payload() -> tuple[int, str, bytes]:
        n = next(scrapes)
        return 200, TEXT, f"DCGM_FI_DEV_GPU_UTIL{{{GPU}}} {n % 100}\n".encode()

    # a file where each table's folder should be: every append fails until it is gone
    lake.mkdir()
    for table in ("gpu_samples", "requests", "scrape_health"):
        (lake / table).write_text("not a folder")
    with serve({"/metrics": payload}) as base:
        cfg = tmp_path / "collectors.toml"
        cfg.write_text(
            f'[collect]\nlake = "{lake}"\nflush_interval = "300ms"\nstatus_interval = "1h"\n'
            'backoff_initial = "200ms"\nbackoff_max = "200ms"\n'
            '[collect.defaults]\ninterval = "200ms"\ntimeout = "200ms"\n'
            f'[[target]]\nkind = "dcgm"\nurl = "{base}/metrics"\nname = "gpu"\n'
            f'[[target]]\nkind = "log"\npath = "{log}"\ntable = "requests"\n'
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from finops.cli import main; main()",
                "collect",
                "-c",
                str(cfg),
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while not any("will retry" in line for line in lines):
                assert proc.poll() is None, "".join(lines)
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.1)
            time.sleep(1.0)  # a few more failed flushes with rows held back
            for table in ("gpu_samples", "requests", "scrape_health"):
                (lake / table).unlink()
            while _count(lake, "SELECT count(*) FROM raw.requests") < 20:
                assert proc.poll() is None, "".join(lines)
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
            reader.join(timeout=10)
    out = "".join(lines)
    assert rc == 0, out
    assert "Traceback" not in out
    assert f"collect: writing to {lake} failed, will retry: " in out
    db = finops.connect(lake)
    # every log line once, although its first reads could not be written
    assert db.sql("SELECT count(*), count(DISTINCT request_id) FROM raw.requests").fetchall() == [
        (20, 20)
    ]
    # every successful scrape's sample is there, the ones held back while writes failed too
    up = db.sql("SELECT count(*) FROM raw.scrape_health WHERE target = 'gpu' AND up").fetchall()
    got = db.sql("SELECT count(DISTINCT ts) FROM raw.gpu_samples").fetchall()
    assert got == up and up[0][0] > 5
