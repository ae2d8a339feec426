"""The dashboard's files ship in the package: pyproject's package-data takes every file of
api/static (a wheel, not only an editable install, carries them), and the page names only
files the node serves."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from gpulane.api.dashboard import ASSETS, STATIC_DIR, STATIC_FILES

REPO = Path(__file__).resolve().parents[2]


def test_package_data_takes_every_file_of_the_page() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["gpulane"]
    package = REPO / "src" / "gpulane"
    files = sorted(p.relative_to(package).as_posix() for p in STATIC_DIR.iterdir())
    assert files == ["api/static/app.css", "api/static/app.js", "api/static/index.html"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), (name, patterns)


def test_the_page_links_only_the_files_the_node_serves() -> None:
    page = ASSETS["index.html"].body.decode()
    linked = set(re.findall(r'(?:src|href)="/static/([^"]+)"', page))
    assert linked == set(STATIC_FILES)
    # Inline script or style would be refused by the page's own CSP: there is none.
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    assert not re.search(r"\son\w+=", page)
