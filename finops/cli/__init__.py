"""The `finops` command line.

Each module in this package that defines `register(app)` adds its commands;
`finops --help` lists them all. Modules import heavy libraries inside their
command functions so `finops --help` stays fast.
"""

from __future__ import annotations

import sys

if sys.argv[1:3] == ["shim", "serve"]:
    # SIGHUP (a reload) kills a process until it is ignored; the shim takes it once
    # serving. Ignored here, before typer and every command module are imported.
    import contextlib
    import signal

    # AttributeError: no SIGHUP (Windows); ValueError: imported off the main thread
    with contextlib.suppress(AttributeError, ValueError):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

import importlib
import pkgutil
import re

import typer

app = typer.Typer(
    name="finops",
    help="GPU and LLM-serving economics for teams running vLLM on their own GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    """Console-script entry point.

    A lake file that cannot be read (truncated by a full disk, not Parquet at all,
    damaged pages under a sound footer) would end any command in a traceback: it ends
    in one error line naming the file where DuckDB or finops.lake names it, else
    saying how to find it.
    """
    try:
        app()
    except Exception as exc:  # duckdb's own types, without importing it for --help
        lake = sys.modules.get("finops.lake")  # imported by whatever raised it, if it did
        if lake is not None and isinstance(exc, lake.LakeFileError):  # names the files
            typer.echo(f"error: {exc}", err=True)
            raise SystemExit(1) from None
        if not type(exc).__module__.lstrip("_").startswith("duckdb"):
            raise
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        bad = re.search(r"""file ['"]([^'"]+\.parquet)['"]""", text, re.IGNORECASE)
        if bad is not None:
            where = f"move {bad.group(1)} out of the lake folder and run the command again"
        elif re.search(
            r"TProtocolException|thrift|don't know what type|decompression|parquet|magic bytes",
            text,
            re.IGNORECASE,
        ):
            # a damaged page's error names no file: compaction reads every page and does
            where = (
                "`finops lake compact` reads every page and names each damaged file (it "
                "leaves them as they are): move those out of the lake folder"
            )
        else:
            raise
        typer.echo(f"error: a lake file cannot be read ({first}): {where}", err=True)
        raise SystemExit(1) from None
