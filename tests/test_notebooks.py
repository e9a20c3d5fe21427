"""Every notebook in notebooks/ runs top to bottom, offline, in under two minutes.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (this
interpreter: jupyter_client starts the ``python`` of a kernel spec as
``sys.executable``), with the notebook folder as working directory (the
notebooks read their images with ``attnlab.sample_path``), ``MPLBACKEND=Agg``, and ``ATTNLAB_CACHE``,
``IPYTHONDIR``, ``MPLCONFIGDIR`` and ``JUPYTER_RUNTIME_DIR`` in a temporary
folder (so no download cache is reused: notebook 04 takes its offline path
unless the network is up). Any error fails the test. The runtime of each
notebook is printed; the stored notebooks must hold no outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = [
    "01_dimensions.ipynb",
    "02_heads_vs_average.ipynb",
    "03_word_slider.ipynb",
    "04_reproduce_blog_figure.ipynb",
    "05_your_own_model.ipynb",
    "06_cnn_vs_vit.ipynb",
    "07_is_attention_explanation.ipynb",
    "08_many_images.ipynb",
]
LIMIT_S = 120.0  # each notebook, kernel start included
OFFLINE_SENTENCE = "Offline: CATR's weights and example image cannot be downloaded here"


def _text(nb) -> str:
    """All stream and text/plain outputs of the executed notebook."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(str(out["data"].get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    for name in ("ATTNLAB_CACHE", "IPYTHONDIR", "MPLCONFIGDIR", "JUPYTER_RUNTIME_DIR"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet debugpy warning on stderr
    # a kernel spec whose argv is "python" resolves to this interpreter; make a bare PATH lookup agree
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return tmp_path


def _execute(name: str) -> tuple[object, float]:
    path = NOTEBOOKS_DIR / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=240,  # per cell
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{name} cell {i} was saved with outputs: clear them"
            assert cell.get("execution_count") is None, f"{name} cell {i} was saved with an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, offline_env):
    nb, seconds = _execute(name)
    print(f"\n[notebooks] {name}: {seconds:.1f} s")
    text = _text(nb)
    stderr = [
        out.get("text", "")
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stderr"
    ]
    noisy = [t for t in stderr if "Warning" in t or "Traceback" in t]
    assert not noisy, f"{name} wrote warnings to stderr: {noisy[:2]}"
    if name.startswith("01_"):
        for shape in ("(128, 1, 256)", "(361, 1, 256)", "(1, 128, 361)", "(1, 8, 128, 361)", "(14, 19)", "(266, 1, 256)"):
            assert shape in text, f"notebook 01 did not print {shape}"
        assert "template and incremental traces are identical" in text
        assert "weights the caller got == mean of the 8 per-head maps, every call" in text
        assert "weight matrix at step 1 (128, 361)" in text
    elif name.startswith("02_"):
        assert "disagreement score" in text and "mean   peak at" in text
        # the prose discusses these results (the notebook also asserts them where it states them)
        assert "the head mean beats every single head in every layer: True" in text
        assert "the mean's peak is not on it" in text
    elif name.startswith("03_"):
        # every explorer came out as a widget view (the browser test checks that it renders)
        views = sum(
            1 for cell in nb.cells for out in cell.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in out.get("data", {})
        )
        assert views == 5, f"expected 5 explorers, got {views} widget views"
        assert "words with p >= 0.9:" in text  # the out-of-distribution lesson shows the probabilities
    if name != "01_dimensions.ipynb":
        assert "model.config" not in "".join(c.source for c in nb.cells), f"{name} reads model internals"
    exercises = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## Exercises" in c.source), None)
    assert exercises is not None, f"{name} has no exercises"
    checks = [c for c in nb.cells[exercises:] if c.cell_type == "code" and '"right" if' in c.source]
    assert 2 <= len(checks) <= 3, f"{name}: {len(checks)} exercise checks"
    if name.startswith("04_"):
        offline = [line for line in text.splitlines() if line.startswith("Offline:")]
        if offline:  # no network (the usual case here): one sentence, then the bundled model's figure
            assert len(offline) == 1 and offline[0].startswith(OFFLINE_SENTENCE)
            assert offline[0].count(". ") == 0 and offline[0].endswith(".")
            assert "shapes:" in text and "stands in for CATR v3" in offline[0]
            assert "the last layer is layer 2 (layer=-1)" in text
        else:
            assert "catr-v3:" in text
    elif name.startswith("08_"):
        assert "captioned 300 images" in text and "second run: 300 done earlier, 0 captioned" in text
        assert "entropy / log(S) per head" in text and "random patch" in text
        assert text.count("-> not yet") == 3
    elif name.startswith("07_"):
        from attnlab.hub import BUNDLED_CPTR

        models = 2 if BUNDLED_CPTR.is_file() else 1  # the ViT's rows are computed when its weights are installed
        assert text.count("attnlab grounding \u00b7 model") == models, "one table per bundled model"
        assert text.count("its peak lands inside the object for") == models  # the reading, printed from the numbers
        assert "random map" in text and "relevance" in text and "rollout" in text and "share on CLS" in text
    elif name.startswith("06_"):
        assert text.count("pointing game") == 2  # both models' grounding numbers
        assert text.count("peak on the named object for") == 2  # the word rows and the CLS row, measured
        assert "rollout from CLS" in text
    assert seconds < LIMIT_S, f"{name} took {seconds:.0f} s (limit {LIMIT_S:.0f} s)"
