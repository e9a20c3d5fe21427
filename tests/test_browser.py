"""The word-slider explorer in a real JupyterLab, driven by headless Chromium.

Starts its own JupyterLab server (127.0.0.1, a free port, a token, every
Jupyter/IPython/matplotlib directory in a temporary folder) on a copy of
``notebooks/03_word_slider.ipynb`` (its images come from the package), opens it in
Debian's Chromium through Playwright, runs every cell and checks that the
first explorer really renders as widgets (not as the ``IntSlider(...)`` text
fallback), then moves its word slider with the keyboard and waits until the
attention image and the word label change.

Needs the ``playwright`` Python package and a Chromium binary (Debian's
``chromium``; never ``playwright install``). Without them the test is skipped,
unless ``ATTNLAB_REQUIRE_BROWSER=1`` (CI), where it fails. With
``ATTNLAB_SCREENSHOTS=DIR`` the before/after screenshots of the attention image
(and of the whole page) are written to DIR.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_word_slider.ipynb"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# texts that mean a widget did not render (searched inside output areas only:
# the code cells themselves may contain such words)
FALLBACK_TEXTS = ("IntSlider(", "Error displaying widget", "AttentionExplorer(children=")

SERVER_START_S = 60.0
PAGE_S = 60.0
KERNEL_S = 60.0
RUN_ALL_S = 90.0
CHANGE_S = 20.0
WHOLE_S = 170.0  # every wait below is also cut to what is left of this budget: the test ends within 3 minutes


# ---------------------------------------------------------------- prerequisites
def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    for path in (found, *CHROMIUM_CANDIDATES):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("ATTNLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (ATTNLAB_REQUIRE_BROWSER=1: the browser test must run)")
    pytest.skip(reason)


def browser_prerequisites() -> str:
    """The Chromium binary that playwright drives (skip, or fail under ATTNLAB_REQUIRE_BROWSER=1, without one)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _skip_or_fail("the playwright Python package is not installed (pip install playwright; no browser download needed)")
    chromium = _chromium()
    if chromium is None:
        _skip_or_fail("no Chromium binary (Debian: apt-get install chromium)")
    return chromium


def _prerequisites() -> str:
    chromium = browser_prerequisites()
    try:
        import jupyterlab  # noqa: F401
        import ipywidgets  # noqa: F401
    except ImportError as exc:
        _skip_or_fail(f"{exc.name} is not installed")
    return chromium


# ------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isolated_env(base: Path) -> dict[str, str]:
    """Environment for the server (and its kernels): nothing read from or written to $HOME."""
    env = dict(os.environ)
    dirs = {
        "JUPYTER_CONFIG_DIR": base / "jupyter-config",
        "JUPYTER_DATA_DIR": base / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": base / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": base / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": base / "lab-workspaces",
        "IPYTHONDIR": base / "ipython",
        "MPLCONFIGDIR": base / "matplotlib",
        "ATTNLAB_CACHE": base / "attnlab-cache",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env.pop("MPLBACKEND", None)  # the kernel picks its inline backend itself
    env.pop("JUPYTER_PATH", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # the "get Jupyter news?" toast covers the page; news_url=None alone does not stop it
    notification = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    return env


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


class LabServer:
    """A JupyterLab server of our own; ``stop()`` ends it (terminate, then kill)."""

    def __init__(self, root: Path, base: Path) -> None:
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        self.log_path = base / "jupyterlab.log"
        self._log = open(self.log_path, "wb")
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.token={self.token}",
            "--allow-root",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.expose_app_in_browser=True",
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=root, env=_isolated_env(base), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter-lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                _get(f"{self.url}/api/status?token={self.token}", timeout=2.0)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        raise AssertionError(f"jupyter-lab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def _shutdown_kernels(self) -> None:
        try:
            kernels = json.loads(_get(f"{self.url}/api/kernels?token={self.token}"))
            for k in kernels:
                req = urllib.request.Request(f"{self.url}/api/kernels/{k['id']}?token={self.token}", method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass  # the server's own shutdown stops its kernels too

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self._shutdown_kernels()
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=15)
        finally:
            self._log.close()


# -------------------------------------------------------------- page helpers
KERNEL_READY_JS = """() => {
  const app = window.jupyterapp;
  const w = app && app.shell && app.shell.currentWidget;
  const ctx = w && w.sessionContext;
  const kernel = ctx && ctx.session && ctx.session.kernel;
  return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}"""

# every code cell has run (an execution count) and the kernel is idle again
RUN_DONE_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  if (!kernel || kernel.status !== 'idle') return false;
  const cells = w.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type === 'code' && !cell.executionCount) return false;
  }
  return true;
}"""

ERRORS_JS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    for (const out of cell.outputs.toJSON()) {
      if (out.output_type === 'error') errors.push(`cell ${i}: ${out.ename}: ${out.evalue}`);
    }
  }
  return errors;
}"""


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)  # (h, w, 3)


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose colour moved by more than 24 levels in some channel (1.0 if sizes differ)."""
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a - b).max(axis=-1) > 24).mean())


def drive_word_slider(root: Path, notebook_rel: str, base: Path, shots: Path | None) -> dict:
    """Open ``root/notebook_rel`` in JupyterLab + Chromium, run it, move the first explorer's slider.

    Returns what it measured (for the test's assertions and its printout).
    """
    from playwright.sync_api import sync_playwright

    chromium = _prerequisites()
    deadline = time.monotonic() + WHOLE_S

    def ms(cap_s: float) -> float:
        """A wait of at most ``cap_s`` seconds and at most what is left of the budget, in ms."""
        left = deadline - time.monotonic()
        if left <= 1:
            raise AssertionError(f"the browser test ran out of its {WHOLE_S:.0f} s budget")
        return 1000 * min(cap_s, left)

    result: dict = {}
    server = LabServer(root, base)
    try:
        server.wait_until_up(min(SERVER_START_S, WHOLE_S))
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                user_data_dir=str(base / "chromium-profile"),
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1100},
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(ms(PAGE_S))
                page.goto(f"{server.url}/lab/tree/{notebook_rel}?token={server.token}&reset", timeout=ms(PAGE_S))
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=ms(PAGE_S))
                # the execution indicator's data-status="idle" comes before the kernel is really ready:
                # also wait for the toolbar's kernel name and the session's kernel itself
                page.wait_for_selector(".jp-Toolbar .jp-KernelName", timeout=ms(KERNEL_S))
                page.wait_for_function(
                    "() => { const e = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName');"
                    " return e && /python/i.test(e.textContent); }",
                    timeout=ms(KERNEL_S),
                )
                page.wait_for_function(KERNEL_READY_JS, timeout=ms(KERNEL_S))

                start = time.monotonic()
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                page.wait_for_function(RUN_DONE_JS, timeout=ms(RUN_ALL_S), polling=500)
                result["run_all_s"] = time.monotonic() - start

                errors = page.evaluate(ERRORS_JS)
                assert not errors, f"the notebook raised in JupyterLab: {errors}"

                outputs = page.locator(".jp-OutputArea")
                # the first explorer: the first output holding a slider (its first slider is the word slider)
                explorer = page.locator(".jp-OutputArea-output:has(.widget-slider)").first
                explorer.wait_for(state="visible", timeout=ms(30))
                text = "\n".join(outputs.all_inner_texts())
                for bad in FALLBACK_TEXTS:
                    assert bad not in text, f"widget did not render: {bad!r} found in the outputs"

                slider = explorer.locator(".widget-slider").first
                handle = slider.locator(".noUi-handle").first
                readout = slider.locator(".widget-readout").first
                label = explorer.locator(".widget-hbox > .widget-label")
                image = explorer.locator("img").first
                image.wait_for(state="visible", timeout=ms(30))
                page.wait_for_function(
                    "(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=ms(30)
                )
                page.set_default_timeout(ms(30))
                image.scroll_into_view_if_needed()
                result["widget_counts"] = {
                    "sliders": page.locator(".jp-OutputArea .widget-slider").count(),
                    "images": page.locator(".jp-OutputArea .widget-image").count(),
                }

                before_png = image.screenshot()
                before = _pixels(before_png)
                result["readout_before"] = readout.inner_text().strip()
                result["label_before"] = label.first.inner_text().strip()
                if shots is not None:
                    (shots / "word_slider_before.png").write_bytes(before_png)

                handle.focus()
                page.keyboard.press("ArrowRight")
                moved_at = time.monotonic()
                after_png, changed = before_png, 0.0
                change_s = min(CHANGE_S, ms(CHANGE_S) / 1000)
                while time.monotonic() - moved_at < change_s:
                    page.wait_for_timeout(250)
                    after_png = image.screenshot()
                    changed = _changed_fraction(before, _pixels(after_png))
                    if changed > 0.02:
                        break
                result["image_changed_after_s"] = time.monotonic() - moved_at
                result["changed_fraction"] = changed
                result["image_size"] = before.shape[:2]
                page.wait_for_timeout(300)  # let the label catch up with the image
                result["readout_after"] = readout.inner_text().strip()
                result["label_after"] = label.first.inner_text().strip()
                if shots is not None:
                    (shots / "word_slider_after.png").write_bytes(after_png)
                    page.screenshot(path=str(shots / "jupyterlab_page.png"), full_page=False)
            finally:
                context.close()
    finally:
        server.stop()
        result["server_returncode"] = server.proc.returncode
    return result


# ------------------------------------------------------------------------ test
def test_word_slider_in_jupyterlab(tmp_path):
    _prerequisites()
    assert NOTEBOOK.is_file(), f"missing {NOTEBOOK}"
    # a copy of the notebook (it reads its images from the installed package: attnlab.sample_path)
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy2(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    shots = os.environ.get("ATTNLAB_SCREENSHOTS")
    shots_dir = None
    if shots:
        shots_dir = Path(shots).expanduser().resolve()
        shots_dir.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    r = drive_word_slider(root, f"notebooks/{NOTEBOOK.name}", tmp_path / "base", shots_dir)
    total = time.monotonic() - start
    print(
        f"\n[browser] run-all {r['run_all_s']:.1f} s, image changed {r['image_changed_after_s']:.2f} s after the key press "
        f"({100 * r['changed_fraction']:.1f}% of {r['image_size'][0]}x{r['image_size'][1]} px), "
        f"readout {r['readout_before']!r} -> {r['readout_after']!r}, "
        f"label {r['label_before']!r} -> {r['label_after']!r}, widgets {r['widget_counts']}, whole test {total:.1f} s"
    )
    if shots_dir is not None:
        print(f"[browser] screenshots in {shots_dir}")

    assert r["widget_counts"]["sliders"] >= 1 and r["widget_counts"]["images"] >= 1
    assert r["changed_fraction"] > 0.02, f"the attention image did not change ({r['changed_fraction']:.4f} of pixels)"
    assert r["readout_before"] != r["readout_after"], "the slider readout did not move"
    assert int(r["readout_after"]) == int(r["readout_before"]) + 1
    assert r["label_before"] != r["label_after"], "the word label did not change"
    assert r["label_after"].startswith(f"{r['readout_after']}:"), r["label_after"]
    assert r["server_returncode"] is not None, "the JupyterLab server is still running"
