"""MkDocs hook: serve MathJax from the built site itself, so formulas render offline.

The renderer comes from a packaged dependency (``django-static-mathjax``, which ships MathJax 3
as static files; a ``dev`` extra of flowtext): after every build its ``tex-mml-chtml.js`` bundle
and the folders it loads on demand (fonts, TeX extensions, menu, accessibility) are copied to
``site/javascripts/mathjax/``, the path ``mkdocs.yml`` names in ``extra_javascript``. Nothing is
fetched from the network at build or view time.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

BUNDLE = "tex-mml-chtml.js"
TARGET = Path("javascripts") / "mathjax"


def mathjax_root() -> Path:
    """The packaged MathJax ``es5`` folder (raises ``ModuleNotFoundError`` if not installed)."""
    return Path(str(files("mathjax"))) / "static" / "mathjax" / "es5"


def on_post_build(config: Any, **_: Any) -> None:
    """Copy the MathJax bundle and its on-demand folders into the site."""
    src = mathjax_root()
    if not (src / BUNDLE).is_file():
        raise FileNotFoundError(f"no MathJax bundle at {src / BUNDLE}; pip install -e '.[dev]'")
    dst = Path(config["site_dir"]) / TARGET
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / BUNDLE, dst / BUNDLE)
    for folder in (p for p in src.iterdir() if p.is_dir()):
        shutil.copytree(folder, dst / folder.name, dirs_exist_ok=True)
