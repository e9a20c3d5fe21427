"""The sample images shipped inside attnlab (made by ``data/make_samples.py``; ``data/README.md`` says what each is).

They are read with :mod:`importlib.resources`, so a checkout and an installed
wheel give the same files:

>>> from attnlab.samples import sample_path, sample_names
>>> sample_names()
['drawing-park.png', 'drawing-tabletop.jpg', 'scene-0.png', 'scene-1.png', 'scene-2.png', 'scene-3.png']
>>> trace = attnlab.caption(model, sample_path("scene-0.png"))
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import AttnlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

__all__ = ["sample_names", "sample_path", "sample_paths"]


def _folder() -> Path:
    folder = resources.files(__name__)
    if not isinstance(folder, Path):  # a zipped install: the images are not files on disk
        raise AttnlabError("attnlab's sample images are not on disk (zipped install): install attnlab as a folder")
    return folder


def sample_names() -> list[str]:
    """File names of the sample images, sorted."""
    return sorted(p.name for p in _folder().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def sample_path(name: str) -> Path:
    """The path of the sample image ``name`` (e.g. ``"scene-0.png"``); pass it to :func:`attnlab.caption`."""
    names = sample_names()
    if name not in names:
        raise AttnlabError(f"no sample image named {name!r}: choose one of {', '.join(names)}")
    return _folder() / name


def sample_paths() -> list[Path]:
    """Every sample image's path, sorted by name."""
    return [_folder() / name for name in sample_names()]
