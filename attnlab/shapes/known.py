"""What is known about a shapes scene, in the form the figures take: object masks to outline, the shipped samples.

* :func:`outlines`: the boolean masks of a scene's objects (all, or those some
  caption words name), for ``outlines=`` of every figure in :mod:`attnlab.plot`.
* :func:`sample_scene`: the :class:`~attnlab.shapes.scenes.Scene` behind a
  shipped sample image ``scene-0.png`` ... ``scene-3.png``
  (``make_scenes(4, seed=7, split="eval")``, see ``data/README.md``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import AttnlabError
from .scenes import Scene, make_scenes

SAMPLE_SCENES = {f"scene-{i}.png": i for i in range(4)}  # the shipped samples: make_scenes(4, seed=7, split="eval")
SAMPLE_SEED = 7

__all__ = ["outlines", "sample_scene"]


def outlines(scene: Scene, words: Sequence[int] | None = None) -> list[np.ndarray]:
    """The ``(128, 128)`` bool masks of ``scene``'s objects, for ``outlines=`` of the figures.

    ``words``: caption word indices; only the objects they name (``a``, size,
    colour and shape words name one; relations none) are returned, each once.
    Default: every object of the scene.
    """
    if not isinstance(scene, Scene):
        raise AttnlabError(f"expected a shapes Scene, got {type(scene).__name__}: pass e.g. attnlab.shapes.sample_scene('scene-0.png')")
    if words is None:
        return [obj.mask for obj in scene.objects]
    n = len(scene.word_objects)
    picked: list[int] = []
    for w in words:
        if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or not -n <= int(w) < n:
            raise AttnlabError(f"words holds {w!r}: use caption word indices 0..{n - 1}")
        obj = scene.word_objects[int(w)]
        if obj is not None and obj not in picked:
            picked.append(obj)
    return [scene.objects[i].mask for i in picked]


def sample_scene(name: str) -> Scene:
    """The scene behind the shipped sample image ``name`` (``"scene-0.png"`` ... ``"scene-3.png"``): its objects and masks."""
    if name not in SAMPLE_SCENES:
        raise AttnlabError(f"{name!r} is not a shapes sample with known objects: choose one of {', '.join(SAMPLE_SCENES)}")
    return make_scenes(len(SAMPLE_SCENES), SAMPLE_SEED, split="eval")[SAMPLE_SCENES[name]]
