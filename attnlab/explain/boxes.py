"""Your own annotated images for the grounding benchmark: COCO-style boxes (``attnlab grounding --images DIR --boxes FILE``).

The boxes file is JSON in COCO's layout::

    {"images":      [{"id": 1, "file_name": "beach.jpg"}, ...],
     "annotations": [{"image_id": 1, "bbox": [x, y, width, height], "category_id": 18, "phrase": "a brown dog"},
                     {"image_id": 1, "caption": "a dog runs on the beach"}, ...],
     "categories":  [{"id": 18, "name": "dog"}, ...],
     "word_classes": {"animal": ["dog", "cat"], ...}}          # optional

An annotation with a ``bbox`` is an object (its box in the image file's pixels,
COCO's ``[x, y, width, height]``; its words are its category's name and its
optional ``phrase``, e.g. a Flickr30k Entities phrase); an annotation with a
``caption`` is a true caption (the first one of an image is used for the
teacher-forced condition, when the model's vocabulary can encode it).
``word_classes`` groups the scored words into rows of the table (every scored
word also counts in "all"). A synonym file, ``{"puppy": ["dog"], "man": ["person"]}``,
lets caption words name categories they do not spell; how words are matched
to boxes is in :mod:`attnlab.explain.grounding`.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import AttnlabError
from .grounding import GroundImage, GroundObject

MAX_BOXES_BYTES = 256 * 1024**2  # a boxes file larger than this is refused before it is read

__all__ = ["read_boxes", "read_synonyms"]


def _json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise AttnlabError(f"no {what} file at {path}: check the path")
    if path.stat().st_size > MAX_BOXES_BYTES:
        raise AttnlabError(f"{path} is larger than {MAX_BOXES_BYTES // 1024**2} MiB: split it into smaller {what} files")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AttnlabError(f"{path} is not a JSON {what} file ({type(exc).__name__}): see attnlab.explain.boxes for the layout") from None


def _list(data: dict, key: str, path: Path) -> list[dict]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise AttnlabError(f"{path}: '{key}' must be a list of objects")
    return value


def _box(value: Any, path: Path, n: int) -> tuple[float, float, float, float]:
    ok = isinstance(value, list) and len(value) == 4 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or value[2] <= 0 or value[3] <= 0:
        raise AttnlabError(f"{path}: annotation {n} has bbox {value!r}; it must be [x, y, width, height] with width and height > 0")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def read_synonyms(path: str | Path | None) -> dict[str, list[str]]:
    """A synonym file: ``{"word": ["name", ...]}`` (a single name may be a string)."""
    if path is None:
        return {}
    path = Path(path)
    data = _json(path, "synonyms")
    if not isinstance(data, dict):
        raise AttnlabError(f"{path} must map words to lists of names, e.g. {{\"puppy\": [\"dog\"]}}")
    out = {}
    for word, names in data.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AttnlabError(f"{path}: the synonyms of {word!r} must be a list of words")
        out[str(word).lower()] = [n.lower() for n in names]
    return out


def read_boxes(images: str | Path, boxes: str | Path) -> tuple[list[GroundImage], dict[str, list[str]]]:
    """The images of a COCO-style boxes file (found in the folder ``images``) as benchmark items, in the
    file's order (images without a box are left out), and its word classes. Every problem is one line."""
    folder, path = Path(images), Path(boxes)
    if not folder.is_dir():
        raise AttnlabError(f"--images {folder} is not a folder of images")
    data = _json(path, "boxes")
    if not isinstance(data, dict):
        raise AttnlabError(f"{path} must be a JSON object with 'images', 'annotations' and 'categories'")
    categories = {}
    for c in _list(data, "categories", path):
        if "id" not in c or not isinstance(c.get("name"), str):
            raise AttnlabError(f"{path}: every category needs an 'id' and a 'name'")
        categories[c["id"]] = c["name"]
    objects: dict[Any, list[GroundObject]] = {}
    truths: dict[Any, str] = {}
    for n, a in enumerate(_list(data, "annotations", path)):
        if "caption" in a and "bbox" not in a:
            if isinstance(a["caption"], str):
                truths.setdefault(a.get("image_id"), a["caption"])
            continue
        words = []
        if "category_id" in a:
            if a["category_id"] not in categories:
                raise AttnlabError(f"{path}: annotation {n} names category {a['category_id']!r}, which 'categories' lacks")
            words.append(categories[a["category_id"]])
        if isinstance(a.get("phrase"), str):
            words.append(a["phrase"])
        if not words:
            raise AttnlabError(f"{path}: annotation {n} has neither a category_id nor a phrase: nothing names its box")
        objects.setdefault(a.get("image_id"), []).append(GroundObject(words, None, _box(a.get("bbox"), path, n)))
    items = []
    for entry in _list(data, "images", path):
        if entry.get("id") not in objects:
            continue
        name = entry.get("file_name")
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise AttnlabError(f"{path}: image {entry.get('id')!r} has file_name {name!r}; it must be a path inside --images")
        file = folder / name
        try:
            with Image.open(file) as img:
                width, height = img.size
        except FileNotFoundError:
            raise AttnlabError(f"{file} is listed in {path} but not in --images {folder}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise AttnlabError(f"{file} is not an image PIL can read ({type(exc).__name__})") from None
        items.append(GroundImage(str(file), objects[entry["id"]], (height, width), truths.get(entry["id"]), name))
    if not items:
        raise AttnlabError(f"{path} lists no image with a box: nothing to score")
    classes = data.get("word_classes") or {}
    if not isinstance(classes, dict) or not all(isinstance(v, list) for v in classes.values()):
        raise AttnlabError(f"{path}: 'word_classes' must map a class name to a list of words")
    return items, {str(k): [str(w) for w in v] for k, v in classes.items()}
