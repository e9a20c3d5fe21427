"""The sample images ship inside the package: the same files from a checkout and from a wheel."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import attnlab
from attnlab.errors import AttnlabError
from attnlab.samples import sample_names, sample_path, sample_paths
from attnlab.cli.caption import sample_images

REPO = Path(__file__).resolve().parents[1]
NAMES = ["drawing-park.png", "drawing-tabletop.jpg", "scene-0.png", "scene-1.png", "scene-2.png", "scene-3.png"]


def test_samples_are_read_from_the_package():
    assert sample_names() == NAMES
    folder = Path(attnlab.__file__).parent / "samples"
    assert [p.name for p in sample_paths()] == NAMES and all(p.parent == folder for p in sample_paths())
    assert attnlab.sample_path("scene-0.png") == folder / "scene-0.png"
    assert sample_images() == sample_paths()  # what `attnlab demo` captions
    readme = (REPO / "data" / "README.md").read_text()
    assert "attnlab/samples/" in readme and all(n.split("-")[0] in readme for n in NAMES)  # provenance kept


def test_unknown_sample_is_a_one_line_error():
    with pytest.raises(AttnlabError, match="no sample image named 'cat.png': choose one of drawing-park.png"):
        sample_path("cat.png")


def test_a_built_wheel_holds_the_same_samples(tmp_path):
    """Build a wheel from a copy of the project (no network: this environment's setuptools) and compare the files."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "attnlab", src / "attnlab", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("attnlab-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in NAMES:
            data = z.read(f"attnlab/samples/{name}")
            assert hashlib.sha256(data).digest() == hashlib.sha256(sample_path(name).read_bytes()).digest()
        assert "attnlab/samples/__init__.py" in z.namelist()
