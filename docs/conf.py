"""Sphinx configuration of attnlab's documentation site.

Build (warnings are errors):  sphinx-build -W -b html docs docs/_build/html

The notebooks in ``notebooks/`` are stored without outputs; ``docs/notebooks/``
holds links to them and myst-nb executes them during the build (each in a
temporary folder), caching the results in ``docs/_build/.jupyter_cache`` so an
unchanged notebook is not run again. ``ATTNLAB_DOCS_EXECUTE=off`` skips the
execution (pages without outputs, for a quick look at the text).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout's attnlab, installed or not
sys.path.insert(0, str(DOCS / "_ext"))
# the notebooks' kernels inherit this environment: they draw with their inline backend, not a
# non-interactive one set for tests (MPLBACKEND=Agg would leave the pages without figures)
os.environ.pop("MPLBACKEND", None)
# ... and import this checkout's attnlab, as autodoc does, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

project = "attnlab"
author = "the attnlab developers"
copyright = "the attnlab developers, Apache-2.0"  # noqa: A001 (Sphinx's name)
release = version = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "attnlab_docs",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "make_figures.py"]
html_theme = "furo"
html_title = "attnlab"
html_static_path: list[str] = []

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

nb_execution_mode = os.environ.get("ATTNLAB_DOCS_EXECUTE", "cache")
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_execution_in_temp = True  # a notebook that writes files writes them into a temporary folder
nb_execution_timeout = 300  # per cell
nb_execution_raise_on_error = True
nb_merge_streams = True
