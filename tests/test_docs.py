"""Executes the python blocks of every tutorial, in order, so the docs cannot rot."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_code_runs(path, tmp_path, monkeypatch):
    blocks = BLOCK.findall(path.read_text())
    assert blocks, f"{path.name} has no python blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"tutorial_{path.stem}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)  # noqa: S102
