"""`finops lake info|compact` and `finops sql` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake

runner = CliRunner()


@pytest.fixture
def small_lake(tmp_path: Path) -> Path:
    lake = Lake(tmp_path / "lake", fsync=False)
    for day in (16, 17):
        for part in range(2):  # two files per partition, so compaction has work
            lake.append(
                "requests",
                [
                    {
                        "request_id": f"r-{day}-{part}-{i}",
                        "ts": f"2026-11-{day}T{10 + i}:00:00Z",
                        "tenant": "acme" if i % 2 else "globex",
                        "input_tokens": 100 * (i + 1),
                        "output_tokens": 10,
                    }
                    for i in range(3)
                ],
                source="test",
            )
    return lake.path


def test_lake_info_lists_tables_rows_and_dates(small_lake: Path) -> None:
    res = runner.invoke(app, ["lake", "info", "--lake", str(small_lake), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["table"]: r for r in json.loads(res.stdout)}
    assert rows["requests"]["rows"] == 12
    assert rows["requests"]["files"] == 4
    assert (rows["requests"]["first_date"], rows["requests"]["last_date"]) == (
        "2026-11-16",
        "2026-11-17",
    )
    assert rows["gpu_samples"]["rows"] == 0


def test_lake_info_missing_lake_is_a_clean_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["lake", "info", "--lake", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "no lake here" in res.stderr
    assert "Traceback" not in res.output


def test_lake_compact_merges_files_and_keeps_results(small_lake: Path) -> None:
    query = (
        "SELECT tenant, count(*) AS n, sum(input_tokens) AS t FROM requests GROUP BY 1 ORDER BY 1"
    )
    before = runner.invoke(app, ["sql", query, "--lake", str(small_lake), "--format", "csv"])
    res = runner.invoke(app, ["lake", "compact", "--lake", str(small_lake)])
    assert res.exit_code == 0, res.output
    assert len(Lake(small_lake).files("requests")) == 2
    after = runner.invoke(app, ["sql", query, "--lake", str(small_lake), "--format", "csv"])
    assert before.stdout == after.stdout
    assert "globex" in after.stdout


def test_lake_compact_rejects_unknown_table(small_lake: Path) -> None:
    res = runner.invoke(app, ["lake", "compact", "--lake", str(small_lake), "--table", "nope"])
    assert res.exit_code == 2
    assert "unknown table 'nope'" in res.stderr


def test_sql_csv_and_json(small_lake: Path) -> None:
    q = "SELECT request_id, input_tokens FROM requests ORDER BY request_id LIMIT 2"
    csv = runner.invoke(app, ["sql", q, "--lake", str(small_lake), "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    df = pl.read_csv(csv.stdout.encode())
    assert df.columns == ["request_id", "input_tokens"]
    assert df["request_id"].to_list() == ["r-16-0-0", "r-16-0-1"]
    js = runner.invoke(app, ["sql", q, "--lake", str(small_lake), "--format", "json"])
    assert js.exit_code == 0, js.output
    assert json.loads(js.stdout) == [
        {"request_id": "r-16-0-0", "input_tokens": 100},
        {"request_id": "r-16-0-1", "input_tokens": 200},
    ]
    table = runner.invoke(app, ["sql", q, "--lake", str(small_lake)])
    assert table.exit_code == 0 and "r-16-0-0" in table.stdout


def test_sql_csv_writes_nested_values_as_json(small_lake: Path) -> None:
    """A list or struct column (list(...), SHOW ALL TABLES) ended the CSV in a 40-line
    traceback ("CSV format does not support nested data"); it is JSON text in its cell."""
    q = (
        "SELECT 'a' AS k, [1, 2] AS xs, {'n': 1, 'tags': ['x']} AS s, NULL::INT[] AS none "
        "FROM requests LIMIT 1"
    )
    res = runner.invoke(app, ["sql", q, "--lake", str(small_lake), "--format", "csv"])
    assert res.exit_code == 0, res.output
    row = pl.read_csv(res.stdout.encode()).row(0, named=True)
    assert row["k"] == "a" and json.loads(row["xs"]) == [1, 2]
    assert json.loads(row["s"]) == {"n": 1, "tags": ["x"]} and row["none"] is None
    tables = runner.invoke(
        app, ["sql", "SHOW ALL TABLES", "--lake", str(small_lake), "--format", "csv"]
    )
    assert tables.exit_code == 0 and "Traceback" not in tables.output


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_sql_interval_results_are_text(small_lake: Path, fmt: str) -> None:
    """`max(ts) - min(ts)`, a coverage check's first query, ended in a Polars traceback
    ("could not import from month_day_nano_interval type"); intervals read as text."""
    q = 'SELECT INTERVAL 1 DAY AS "a day", INTERVAL 90 MINUTE AS m, 2 AS n FROM requests LIMIT 1'
    res = runner.invoke(app, ["sql", q, "--lake", str(small_lake), "--format", fmt])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "1 day" in res.stdout and "01:30:00" in res.stdout


def test_sql_table_keeps_cents_on_large_values(small_lake: Path) -> None:
    res = runner.invoke(app, ["sql", "SELECT 6249.6::DOUBLE AS bill", "--lake", str(small_lake)])
    assert res.exit_code == 0, res.output
    assert "6,249.60" in res.stdout


@pytest.mark.parametrize(
    ("query", "needle"),
    [("SELEC 1", "syntax error"), ("SELECT * FROM no_such_table", "no_such_table")],
)
def test_sql_bad_query_is_a_clean_error(small_lake: Path, query: str, needle: str) -> None:
    res = runner.invoke(app, ["sql", query, "--lake", str(small_lake)])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: SQL error")
    assert needle in res.stderr.lower()
    assert "Traceback" not in res.output


def test_sql_bad_format_is_a_clean_error(small_lake: Path) -> None:
    res = runner.invoke(app, ["sql", "SELECT 1", "--lake", str(small_lake), "--format", "xml"])
    assert res.exit_code == 2
    assert "--format must be table, csv or json" in res.stderr


@pytest.mark.parametrize(
    "args",
    [["sql", "SELECT count(*) AS n FROM requests"], ["lake", "compact"]],
    ids=["sql", "compact"],
)
def test_a_missing_lake_is_an_error_not_an_empty_answer(tmp_path: Path, args: list[str]) -> None:
    """As `lake info`: a typo in --lake must not read as "no requests"."""
    missing = tmp_path / "no-such-lake"
    res = runner.invoke(app, [*args, "--lake", str(missing)])
    assert res.exit_code == 2, res.output
    assert res.stderr == (
        f"error: {missing}: no lake here (run `finops demo` or `finops collect` first)\n"
    )
    assert res.stdout == "" and not missing.exists()


@pytest.mark.parametrize("query", ["", "   ", "/* only a comment */"])
def test_sql_without_a_statement_is_one_error_line(small_lake: Path, query: str) -> None:
    res = runner.invoke(app, ["sql", query, "--lake", str(small_lake)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: SQL: no statement to run")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output


@pytest.mark.parametrize(
    "query",
    ["SET threads = 1", "CREATE TEMP VIEW v AS SELECT 1 AS x", "SELECT 1 AS x; SET threads = 1"],
)
def test_sql_statements_without_a_result_set_run(small_lake: Path, query: str) -> None:
    res = runner.invoke(app, ["sql", query, "--lake", str(small_lake), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert isinstance(json.loads(res.stdout), list)


def test_sql_json_writes_nan_and_infinity_as_null(small_lake: Path) -> None:
    """`NaN` and `Infinity` are not JSON: jq and JSON.parse rejected the whole output."""
    q = (
        "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, ['-inf'::DOUBLE, 1.5] AS c, "
        "{'x': 'nan'::DOUBLE} AS d, 2.5::DOUBLE AS e"
    )
    res = runner.invoke(app, ["sql", q, "--lake", str(small_lake), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert rows == [{"a": None, "b": None, "c": [None, 1.5], "d": {"x": None}, "e": 2.5}]
