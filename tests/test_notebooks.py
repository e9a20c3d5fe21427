"""Every notebook in notebooks/ runs top to bottom, offline, in under two minutes.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (this
interpreter: jupyter_client starts the ``python`` of a kernel spec as
``sys.executable``), with the notebook folder as working directory (the
notebooks read their images with ``attnlab.sample_path``), ``MPLBACKEND=Agg``, and ``ATTNLAB_CACHE``,
``IPYTHONDIR``, ``MPLCONFIGDIR`` and ``JUPYTER_RUNTIME_DIR`` in a temporary
folder (so no download cache is reused: notebook 04 takes its offline path
unless the network is up). Any error fails the test. The runtime of each
notebook is printed; the stored notebooks must hold no outputs.

Exercises: every check cell ends with ``check(my_answer, right, ...)``
(:mod:`attnlab.exercises`). Run with the placeholder left as ``None`` it must print
``not answered yet`` and nothing else. After each check cell the test runs two probe
cells in the same kernel: the placeholder set to a wrong answer of the right kind (the
cell must print ``wrong: try again`` and nothing else) and to the right answer the
check cell computed (it must print ``right``), then resets the placeholder.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import time
from pathlib import Path

import pytest

from attnlab.exercises import NOT_ANSWERED, RIGHT, WRONG

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
    "09_vision_language_models.ipynb",
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


WRONG_ANSWER = """
def _probe_wrong_answer(right, tol):
    \"\"\"An answer of the same kind as the right ones that is none of them (numbers: beyond tol).\"\"\"
    right = [r.tolist() if hasattr(r, "tolist") else r for r in right]
    first = right[0]
    if isinstance(first, bool):
        return not first
    if isinstance(first, (int, float)):
        return max(right) + 2 * tol + 1
    if isinstance(first, str):
        return first + " (not this)"
    if isinstance(first, (tuple, list)):
        return (max(r[0] for r in right) + 1, *first[1:])
    raise TypeError(f"no wrong answer for {first!r}")
"""


def _exercises(nb) -> list[dict]:
    """Every check cell: its index, placeholder, right answers (source) and tolerance (source)."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "check(" not in cell.source:
            continue
        last = ast.parse(cell.source).body[-1]
        call = last.value if isinstance(last, ast.Expr) else None
        if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "check"):
            continue
        if len(call.args) == 2 and isinstance(call.args[1], ast.Starred):
            right = f"list({ast.unparse(call.args[1].value)})"
        else:
            right = "[" + ", ".join(ast.unparse(a) for a in call.args[1:]) + "]"
        tol = next((ast.unparse(k.value) for k in call.keywords if k.arg == "tol"), "0.0")
        found.append({"cell": i, "placeholder": call.args[0].id, "right": right, "tol": tol, "check": ast.unparse(last)})
    return found


def _printed(cell) -> str:
    """What a cell showed: its stream text, and a marker for anything else it displayed."""
    return "".join(o.get("text", "") if o.get("output_type") == "stream" else f"<{o.get('output_type')}>" for o in cell.outputs)


def _execute(name: str) -> tuple[object, float, list[dict]]:
    """Run the notebook with probe cells after each check cell; return it without them,
    its runtime and the exercises with what their check cell and probes printed."""
    path = NOTEBOOKS_DIR / name
    nb = nbformat.read(path, as_version=4)
    exercises = _exercises(nb)
    cells = [nbformat.v4.new_code_cell(WRONG_ANSWER)]
    probes = {}
    for i, cell in enumerate(nb.cells):
        cells.append(cell)
        for ex in (e for e in exercises if e["cell"] == i):
            ph = ex["placeholder"]
            wrong = nbformat.v4.new_code_cell(f"{ph} = _probe_wrong_answer({ex['right']}, {ex['tol']})\n{ex['check']}")
            right = nbformat.v4.new_code_cell(f"{ph} = {ex['right']}[0]\n{ex['check']}\n{ph} = None")
            probes[i] = (wrong, right)
            cells += [wrong, right]
    run = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)
    client = nbclient.NotebookClient(
        run,
        kernel_name="python3",
        timeout=240,  # per cell
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    for ex in exercises:
        wrong, right = probes[ex["cell"]]
        ex.update(unanswered=_printed(nb.cells[ex["cell"]]), wrong=_printed(wrong), right_printed=_printed(right))
    return nb, seconds, exercises


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
    if name.startswith("09_"):  # real VLM processors, built offline: the hf extra
        pytest.importorskip("transformers", minversion="5")
    nb, seconds, exercises = _execute(name)
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
    start = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## Exercises" in c.source), None)
    assert start is not None, f"{name} has no exercises"
    announced = re.findall(r"^\*\*(\d+)\.\*\*", "\n".join(c.source for c in nb.cells[start:] if c.cell_type == "markdown"), re.M)
    assert announced == [str(k) for k in range(1, len(announced) + 1)] and 2 <= len(announced) <= 3, f"{name}: exercises {announced}"
    assert len(exercises) == len(announced), f"{name}: {len(announced)} exercises announced, {len(exercises)} check cells"
    for k, ex in enumerate(exercises, 1):
        answer_cell = nb.cells[ex["cell"] - 1]  # the answer cell comes right before its check cell
        assert ex["cell"] > start and re.search(rf"^{ex['placeholder']} = None\b", answer_cell.source, re.M), f"{name}: exercise {k}"
        # never the answer: unanswered and wrong print one fixed line; only the right answer is confirmed
        assert ex["unanswered"] == NOT_ANSWERED + "\n", f"{name}: exercise {k} printed {ex['unanswered']!r} unanswered"
        assert ex["wrong"] == WRONG + "\n", f"{name}: exercise {k} printed {ex['wrong']!r} for a wrong answer"
        assert ex["right_printed"].startswith(RIGHT) and ex["right_printed"].count("\n") == 1, f"{name}: exercise {k}: {ex['right_printed']!r}"
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
        assert text.count(NOT_ANSWERED) == 3
    elif name.startswith("09_"):  # the bookkeeping of real checkpoints, printed from their processors
        assert "Qwen2-VL  : 17 x 23 = 391" in text and "LLaVA-1.5 : 24 x 24 = 576" in text
        assert "LLaVA-NeXT: 576 base + 36 x (48 + 1 newline) = 2,340" in text
        assert "SmolVLM   : 3 x 4 tiles + 1 global = 13 views x 81 = 1,053" in text
        assert "(25% of the photo cut off)" in text and "[high-res: 36 rows of 48 + newline = 1,764]" in text
        # part 2: the bundled shapes VLM on held-out scenes, its shares, sinks, methods, a question, the table
        assert "model's caption:" in text and "8 x 8 = 64 image tokens" in text
        assert "the other keys of every row: prompt" in text and "weight per grid row (top to bottom)" in text
        assert text.count("mean share on the named object") == 3 and "the reference prompt as the model reads it:" in text
        assert "the question as the model reads it:" in text and "mean map distance" in text
        assert "attnlab grounding \u00b7 model shapes-vlm \u00b7 40 images" in text and "contrast" in text
        assert "best for shape words by hit:" in text and "best for color words by hit:" in text
        # what the prose says of them
        assert "layer 0: no sink tokens" in text and "layer 1: no sink tokens" in text  # the chosen scene
        flagged = re.search(r"flagged tokens: (\d+), on an object: (\d+), on background: (\d+)", text)
        assert flagged and int(flagged[1]) > 0 and flagged[3] == "0", "flagged tokens lie on objects only"
        agree = re.search(r"the same peak patch as raw: rollout for (\d+) of (\d+) words", text)
        assert agree and 2 * int(agree[1]) > int(agree[2]), "raw and rollout mostly agree on the peak"
        off = re.search(r"contrast : mean share on the named object \d+%, peak on it for (\d+) of (\d+) words", text)
        assert off and 2 * int(off[1]) < int(off[2]), "contrast's peak mostly lands off the object"
        assert "the same caption under both prompts: True" in text and "\nnot: contrast\n" in text
        assert "touch above hit for every method: True" in text
        mean = [int(v) for v in re.search(r"\nlayer_mean((?: +\d+%){12})", text)[1].split("%")[:-1]]  # 4 classes x hit, touch, mass
        best = dict((c, int(v)) for c, v in re.findall(r"best for (shape|color) words by hit: .+?, (\d+)%", text))
        assert best["shape"] - mean[0] <= 10 and best["color"] - mean[3] <= 10, "the best leads the layer mean by a few points"
    elif name.startswith("07_"):
        from attnlab.hub import BUNDLED_CPTR

        models = 2 if BUNDLED_CPTR.is_file() else 1  # the ViT's rows are computed when its weights are installed
        assert text.count("attnlab grounding \u00b7 model") == models, "one table per bundled model"
        assert text.count("its peak lands inside the object for") == models  # the reading, printed from the numbers
        assert "random map" in text and "relevance" in text and "rollout" in text and "share on CLS" in text
    elif name.startswith("06_"):
        assert text.count("pointing game") == 2  # both models' grounding numbers
        assert text.count("peak touches the named object for") == 2  # the word rows and the CLS row, measured
        assert "chance  : a random patch touches it for" in text
        assert "rollout from CLS" in text
    assert seconds < LIMIT_S, f"{name} took {seconds:.0f} s (limit {LIMIT_S:.0f} s)"
