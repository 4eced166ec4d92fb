"""The console's static page as shipped (package data): nothing a strict Content-Security-Policy would block,
nothing from the internet, the key kept out of every browser store, streams read with fetch."""

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lm.serve.console.routes import ASSETS, CSP, asset

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).parents[2]


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


def test_the_page_has_no_inline_script_style_or_handler_and_loads_only_its_own_files():
    page = Tags()
    page.feed(asset("index.html").decode())
    scripts = [a for t, a in page.tags if t == "script"]
    assert scripts == [{"src": "console.js", "defer": None}] and not page.script_text.strip()
    for tag, attrs in page.tags:
        assert not [a for a in attrs if a.startswith("on") or a == "style"], (tag, attrs)
        for link in (attrs.get("src"), attrs.get("href")):
            assert link is None or link in ASSETS, link  # no CDN, nothing from elsewhere
    assert not any(t == "style" for t, _ in page.tags)


def test_the_csp_allows_only_the_pages_own_origin():
    rules = dict(rule.strip().split(" ", 1) for rule in CSP.split(";"))
    assert rules["default-src"] == "'self'" and rules["script-src"] == "'self'" and rules["style-src"] == "'self'"
    assert rules["img-src"] == "'self' blob:" and rules["frame-ancestors"] == "'none'"
    assert "unsafe" not in CSP


def test_the_script_keeps_the_key_in_memory_and_streams_with_fetch():
    js = asset("console.js").decode()
    for banned in ("localStorage.", "sessionStorage.", "document.cookie", "new EventSource", "eval(", "innerHTML",
                   "new Function", "https://", "//cdn"):
        assert banned not in js, banned
    assert set(re.findall(r"http://[^\s\"']+", js)) == {"http://www.w3.org/2000/svg"}  # a namespace, not a fetch
    assert "getReader()" in js and re.search(r'Authorization: "Bearer " \+ apiKey', js)


def test_the_static_files_are_package_data():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["lm"]
    shipped = {p.name for g in globs for p in (REPO / "lm").glob(g)}
    assert set(ASSETS) <= shipped
    assert "selenium" in " ".join(project["project"]["optional-dependencies"]["test"])
