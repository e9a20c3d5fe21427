"""The documentation: its examples run, the site builds without warnings, a browser finds its way.

* Every ```` ```python ```` block of README.md and docs/*.md runs, and each value a page shows
  (``# -> VALUE``) is what the code gives (convention in ``tests/docs_examples.py`` and on the
  site's "About these pages").
* The site builds with the documented command, ``sphinx-build -W -b html docs docs/_build/html``
  (here into a temporary folder, from a fresh environment, notebooks executed or taken from the
  build's cache); the build time and the page count are printed.
* Headless Chromium (Debian's, through Playwright; skipped without them unless
  ``ATTNLAB_REQUIRE_BROWSER=1``) opens the built index, the API page and a notebook page, and finds
  ``attnlab.plot.word_grid`` through the site's search.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import docs_examples
from docs_examples import Block, ExampleError

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
BUILD_LIMIT_S = 600.0  # the whole build, notebooks included (CI runs it inside .ci/run)


# ------------------------------------------------------------------- the examples
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run_and_show_what_they_give(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))  # nothing downloaded is reused
    ran, checked, not_run = docs_examples.run_page(page)
    for block in not_run:
        print(f"{page.name}:{block.line}: not run ({block.not_run})")
    print(f"{page.name}: {ran} blocks run, {checked} shown values checked, {len(not_run)} not run")
    assert ran + len(not_run) == len(docs_examples.blocks(page))


def test_the_pages_with_examples_check_values():
    counts = {p.name: sum(b.code.count(docs_examples.SHOWS) for b in docs_examples.blocks(p)) for p in PAGES}
    assert counts["README.md"] >= 3 and counts["quickstart.md"] >= 5, counts
    for page in PAGES:  # the diagnostics example that once drifted shows a checked value wherever it appears
        for block in docs_examples.blocks(page):
            for line in block.code.splitlines():
                if ".diagnostics().line(" in line:
                    assert docs_examples.SHOWS in line, f"{page.name}: {line.strip()}"


def _run(code: str) -> dict:
    namespace: dict = {}
    docs_examples.run_block(Block("page.md", 10, code, None), namespace)
    return namespace


def test_harness_catches_a_value_the_code_does_not_give(capsys):
    _run("x = 1 + 1\nx  # -> 2\nprint('a', x)  # -> a 2\n'abcdef'  # -> 'ab...ef'\n")
    with pytest.raises(ExampleError, match=r"page.md:11: the page shows 3, the code gives 2"):
        _run("x = 1 + 1\nx  # -> 3\n")
    with pytest.raises(ExampleError, match="the page shows a 3, the code gives a 2"):
        _run("print('a', 1 + 1)  # -> a 3\n")
    with pytest.raises(ExampleError, match="must end an expression"):
        _run("y = 2  # -> 2\n")
    with pytest.raises(ExampleError, match="the code gives 2"):  # of `a; b  # -> v`, b shows v
        _run("x = 5; x - 3  # -> 5\n")
    with pytest.raises(ZeroDivisionError):
        _run("1 / 0\n")


def test_a_not_run_mark_needs_a_reason(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- not run: needs the network -->\n```python\nimport nowhere\n```\n")
    assert [b.not_run for b in docs_examples.blocks(page)] == ["needs the network"]
    page.write_text("<!-- not run: -->\n```python\nimport nowhere\n```\n")
    with pytest.raises(ExampleError, match="needs a reason"):
        docs_examples.blocks(page)


# ------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path_factory.mktemp("site") / "html"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the kernels' python
    start = time.perf_counter()
    # the documented command (`sphinx-build -W -b html docs docs/_build/html`), -E: no saved environment
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-E", "-b", "html", str(DOCS), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_LIMIT_S,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    pages = sorted(out.rglob("*.html"))
    print(f"site built in {seconds:.0f} s: {len(pages)} HTML pages")
    return out


def test_site_builds_without_warnings_with_every_page(site):
    for page in ("index", "quickstart", "own-model", "models", "figures", "cli", "files", "explanations",
                 "shapes", "notebooks", "architecture", "api/index", "api/core", "api/plot"):  # fmt: skip
        assert (site / f"{page}.html").is_file(), page
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        html = (site / "notebooks" / f"{nb.stem}.html").read_text(encoding="utf-8")
        assert "cell_output" in html, f"{nb.name} is shown without outputs"
    api = (site / "api" / "plot.html").read_text(encoding="utf-8")
    assert 'id="attnlab.plot.word_grid"' in api


# ------------------------------------------------------------------- the browser
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_browser_opens_the_site_and_finds_a_function_by_search(served):
    from test_browser import CHROMIUM_FLAGS, browser_prerequisites

    chromium = browser_prerequisites()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{served}/index.html")
            assert "attnlab" in page.title()
            page.locator("a[href='api/index.html']").first.click()
            page.wait_for_url("**/api/index.html")
            page.goto(f"{served}/api/core.html")
            page.locator("dt[id='attnlab.caption']").wait_for()
            assert "max_len" in page.locator("dt[id='attnlab.caption']").inner_text()
            page.goto(f"{served}/notebooks/05_your_own_model.html")
            page.locator(".cell_output img").first.wait_for()
            assert page.locator(".cell_output img").count() >= 3
            assert "prefix token(s): the CLS token" in page.locator(".cell_output").all_inner_texts().__str__()
            page.goto(f"{served}/search.html?q=word_grid")
            hit = page.locator("#search-results a[href*='attnlab.plot.word_grid']").first
            hit.wait_for()
            hit.click()
            page.wait_for_url("**/api/plot.html*")
            assert page.locator("dt[id='attnlab.plot.word_grid']").is_visible()
        finally:
            browser.close()


def test_architecture_page_shows_architecture_md_once_present(tmp_path):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from attnlab_docs import MARKER, architecture_text
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert MARKER in (DOCS / "architecture.md").read_text()
    assert "not part of this checkout yet" in architecture_text(tmp_path)
    (tmp_path / "ARCHITECTURE.md").write_text(
        "# Architecture\n\nThe [protocol](attnlab/captioner.py) and [PyTorch](https://pytorch.org), ![x](a.png).\n"
    )
    text = architecture_text(tmp_path)
    assert text.strip() == "The protocol and [PyTorch](https://pytorch.org), ![x](a.png)."
