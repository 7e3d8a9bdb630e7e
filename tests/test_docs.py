"""Executes the python blocks of every tutorial, in order, so the docs cannot rot."""

import os
import re
import subprocess
import sys
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


EXTERNAL = re.compile(r'<(script|link)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]+)"[^>]*>')


def test_built_site_loads_nothing_from_the_network(tmp_path):
    """The site works offline: no script, stylesheet or font from a CDN; MathJax is served
    from the site itself (copied from a packaged dependency by docs/hooks/offline_maths.py)."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(site)],
        cwd=ROOT, env=env, check=True, timeout=600,
    )  # fmt: skip
    found = {
        (page.relative_to(site).as_posix(), m.group(2))
        for page in site.rglob("*.html")
        for m in EXTERNAL.finditer(page.read_text(encoding="utf-8"))
        if m.group(1) == "script" or re.search(r'rel="(stylesheet|preconnect|preload)"', m.group(0))
    }
    assert not found, sorted(found)[:5]
    bundle = site / "javascripts" / "mathjax" / "tex-mml-chtml.js"
    assert bundle.stat().st_size > 100_000
    assert any((site / "javascripts" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    theory = (site / "theory" / "index.html").read_text(encoding="utf-8")
    assert 'src="../javascripts/mathjax/tex-mml-chtml.js"' in theory
    assert 'class="arithmatex"' in theory  # the page does have formulas to render
