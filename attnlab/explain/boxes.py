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
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import AttnlabError
from ..preprocess import MAX_PIXELS
from .grounding import GroundImage, GroundObject

MAX_BOXES_BYTES = 256 * 1024**2  # a boxes file larger than this is refused before it is read
MAX_JSON_OBJECTS = 2_000_000  # JSON objects ({...}) in one file, counted while it is parsed (COCO val2017: ~42,000)
MAX_OBJECTS = 1_000  # distinct objects (boxes) of one image, after exact duplicates are dropped (COCO: at most 93)

__all__ = ["read_boxes", "read_synonyms"]


class _TooMany(Exception):
    pass


class _NotRegular(OSError):
    pass


def _open_regular(path: Path):
    """``path`` opened for reading only if it is still a regular file (opened without blocking, then
    checked on the open file: a FIFO put in its place after the first check cannot block)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _json(path: Path, what: str) -> Any:
    """The JSON of ``path``, bounded before it is read (a regular file, at most ``MAX_BOXES_BYTES``)
    and while it is parsed (at most ``MAX_JSON_OBJECTS`` objects)."""
    try:
        with _open_regular(path) as fh:  # a FIFO or device would block or never end
            raw = fh.read(MAX_BOXES_BYTES + 1)  # bounded even if the file grows after the check
    except (FileNotFoundError, ValueError):
        raise AttnlabError(f"no {what} file at {path}: check the path") from None
    except _NotRegular:
        raise AttnlabError(f"{path} is not a regular file (a folder, pipe, socket or device): pass a JSON {what} file") from None
    except OSError as exc:
        raise AttnlabError(f"cannot read {path} ({exc.strerror or type(exc).__name__}): pass a readable JSON {what} file") from None
    if len(raw) > MAX_BOXES_BYTES:
        raise AttnlabError(f"{path} is larger than {MAX_BOXES_BYTES // 1024**2} MiB: split it into smaller {what} files")
    count = 0

    def counted(obj: dict) -> dict:
        nonlocal count
        count += 1
        if count > MAX_JSON_OBJECTS:
            raise _TooMany
        return obj

    try:
        return json.loads(raw.decode("utf-8"), object_hook=counted)
    except _TooMany:
        raise AttnlabError(f"{path} holds more than {MAX_JSON_OBJECTS:,} JSON objects: split it into smaller {what} files") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, a number of > 4300 digits
        raise AttnlabError(f"{path} is not a JSON {what} file ({type(exc).__name__}): see attnlab.explain.boxes for the layout") from None


def _list(data: dict, key: str, path: Path) -> list[dict]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise AttnlabError(f"{path}: '{key}' must be a list of objects")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _id(record: dict, key: str, path: Path, where: str) -> int | str:
    """``record[key]``, an id: a whole number or a string (COCO's ids are whole numbers)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AttnlabError(f"{path}: {where} has {key} {_shown(value)}; it must be a whole number or a string, as in COCO")
    return value


def _box(value: Any, path: Path, n: int) -> tuple[float, float, float, float]:
    box = None
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        try:
            box = tuple(float(v) for v in value)  # OverflowError: a whole number beyond any float (10**400)
        except OverflowError:
            box = None
    if box is None or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
        raise AttnlabError(f"{path}: annotation {n} has bbox {_shown(value)}; it must be [x, y, width, height] in pixels, width and height > 0")
    return box  # type: ignore[return-value]


def _image_size(folder: Path, name: str, path: Path, where: str) -> tuple[int, int]:
    """``(width, height)`` of the image file ``folder / name`` from its header: a regular file (a FIFO
    would block; checked on the file opened without blocking) of at most
    :data:`attnlab.preprocess.MAX_PIXELS` pixels (a decompression bomb is not decoded)."""
    file = folder / name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_regular(file) as fh, Image.open(fh) as img:
                width, height = img.size
    except FileNotFoundError:
        raise AttnlabError(f"{file} ({where} of {path}) is not in --images {folder}: check its file_name") from None
    except _NotRegular:
        raise AttnlabError(f"{file} ({where} of {path}) is not a regular file (a folder, pipe or device): file_name must name an image") from None
    except Image.DecompressionBombError:
        width = height = MAX_PIXELS  # beyond PIL's own limit: refused below
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise AttnlabError(f"{file} ({where} of {path}) is not an image PIL can read ({type(exc).__name__})") from None
    except (OSError, ValueError) as exc:  # too long a name, a NUL byte, no permission, a truncated header
        raise AttnlabError(f"{path}: {where} has a file_name attnlab cannot open ({type(exc).__name__}): fix its file_name") from None
    if width * height > MAX_PIXELS:
        raise AttnlabError(f"{file} ({where} of {path}) has more pixels than attnlab reads ({MAX_PIXELS:,}): downscale it first")
    return width, height


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


def _categories(data: dict, path: Path) -> dict[int | str, str]:
    categories: dict[int | str, str] = {}
    for n, c in enumerate(_list(data, "categories", path)):
        if "id" not in c or not isinstance(c.get("name"), str):
            raise AttnlabError(f"{path}: every category needs an 'id' and a 'name' (category {n} has not)")
        key = _id(c, "id", path, f"category {n}")
        if key in categories:
            raise AttnlabError(f"{path}: category {n} repeats id {key!r}: give every category its own id")
        categories[key] = c["name"]
    return categories


def _objects(data: dict, path: Path) -> tuple[dict[int | str, list[GroundObject]], dict[int | str, str]]:
    """The objects and the first true caption of each image id; exact duplicates (same image, words and box) dropped."""
    categories = _categories(data, path)
    objects: dict[int | str, list[GroundObject]] = {}
    truths: dict[int | str, str] = {}
    seen: set[tuple] = set()
    dropped = 0
    for n, a in enumerate(_list(data, "annotations", path)):
        if "caption" in a and "bbox" not in a:
            if isinstance(a["caption"], str):
                truths.setdefault(_id(a, "image_id", path, f"annotation {n}"), a["caption"])
            continue
        image = _id(a, "image_id", path, f"annotation {n}")
        words = []
        if "category_id" in a:
            category = _id(a, "category_id", path, f"annotation {n}")
            if category not in categories:
                raise AttnlabError(f"{path}: annotation {n} names category {category!r}, which 'categories' lacks")
            words.append(categories[category])
        if isinstance(a.get("phrase"), str):
            words.append(a["phrase"])
        if not words:
            raise AttnlabError(f"{path}: annotation {n} has neither a category_id nor a phrase: nothing names its box")
        box = _box(a.get("bbox"), path, n)
        if (image, *words, box) in seen:
            dropped += 1
            continue
        seen.add((image, *words, box))
        found = objects.setdefault(image, [])
        if len(found) == MAX_OBJECTS:
            raise AttnlabError(
                f"{path}: image {image!r} has more than {MAX_OBJECTS:,} distinct boxes (annotation {n}): "
                "attnlab scores at most that many objects per image; split or thin out its annotations"
            )
        found.append(GroundObject(words, None, box))
    if dropped:
        warnings.warn(f"{path}: {dropped:,} annotations repeat an earlier one exactly (same image, words and box) and were left out", stacklevel=3)
    return objects, truths


def read_boxes(images: str | Path, boxes: str | Path) -> tuple[list[GroundImage], dict[str, list[str]]]:
    """The images of a COCO-style boxes file (found in the folder ``images``) as benchmark items, in the
    file's order (images without a box are left out), and its word classes. Every problem is one line.

    Bounds: the file is read only when it is a regular file of at most :data:`MAX_BOXES_BYTES`
    holding at most :data:`MAX_JSON_OBJECTS` JSON objects; an annotation that repeats an earlier
    one exactly is left out (with a warning); an image may have at most :data:`MAX_OBJECTS`
    distinct boxes; image files are checked from their headers (regular files of at most
    :data:`attnlab.preprocess.MAX_PIXELS` pixels) before anything decodes them."""
    folder, path = Path(images), Path(boxes)
    if not folder.is_dir():
        raise AttnlabError(f"--images {folder} is not a folder of images")
    data = _json(path, "boxes")
    if not isinstance(data, dict):
        raise AttnlabError(f"{path} must be a JSON object with 'images', 'annotations' and 'categories'")
    objects, truths = _objects(data, path)
    items, listed = [], set()
    for n, entry in enumerate(_list(data, "images", path)):
        key = _id(entry, "id", path, f"image {n}")
        if key in listed:
            raise AttnlabError(f"{path}: image {n} repeats id {key!r}: give every image its own id")
        listed.add(key)
        if key not in objects:
            continue
        name = entry.get("file_name")
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise AttnlabError(f"{path}: image {key!r} has file_name {_shown(name)}; it must be a path inside --images")
        width, height = _image_size(folder, name, path, f"image {key!r}")
        items.append(GroundImage(str(folder / name), objects[key], (height, width), truths.get(key), name))
    if not items:
        raise AttnlabError(f"{path} lists no image with a box: nothing to score")
    classes = data.get("word_classes") or {}
    if not isinstance(classes, dict) or not all(isinstance(v, list) for v in classes.values()):
        raise AttnlabError(f"{path}: 'word_classes' must map a class name to a list of words")
    return items, {str(k): [str(w) for w in v] for k, v in classes.items()}
