"""`finops.connect` on a path that is no lake folder: an error, not an empty lake whose
figures all read zero (every CLI command already refused it)."""

from __future__ import annotations

from pathlib import Path

import pytest

import finops


def test_a_missing_lake_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no/such/lake: no lake here \(`finops demo`"):
        finops.connect(tmp_path / "no" / "such" / "lake")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a lake folder"):
        finops.connect(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is an empty lake
    assert finops.connect(empty).sql("SELECT count(*) FROM requests").fetchall() == [(0,)]
