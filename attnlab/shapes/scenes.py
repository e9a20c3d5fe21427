"""Shapes world: tiny synthetic captioning scenes with exact object masks.

Every scene is a 128x128 RGB image of 1 to 3 coloured shapes on a noisy grey
background, a caption that names them ("a small red circle left of a large
blue star"), the exact pixel mask of each object and, for every caption word,
the object it refers to. Because the ground truth is known pixel by pixel, a
captioner's cross-attention can be scored against where each word's object
really is.

The generator (all randomness from ``np.random.default_rng(seed)``):

* background: one grey level in [205, 245] per image, each channel shifted by
  up to +-8;
* 1 to 3 objects, no two with the same (shape, color); shapes ``SHAPES``,
  colors ``COLORS`` (each channel jittered uniformly by up to +-20), sizes
  small (radius in [7, 10] px) or large (radius in [15, 20] px);
* objects lie fully inside the image and apart: centres at least
  ``1.2 * (r1 + r2) + 3`` px from each other;
* Gaussian pixel noise (sigma 8) over the whole image, objects included, then
  rounding and clipping to 0..255.

Geometry. Pixel ``image[i, j]`` is centred at ``(x, y) = (j, i)``: x grows to
the right, y grows downwards, ``ShapeObject.center`` is ``(x, y)`` in these
units. A pixel belongs to an object (its mask is True) when its centre lies in
the closed shape, and exactly the masked pixels are painted with the object's
colour. For an object of radius r: a circle of radius r; an axis-aligned
square of half-side 0.85 r; an upward triangle of circumradius 1.15 r; a
five-pointed star, point up, outer radius 1.15 r, inner radius 0.5 r; a plus
shaped cross with arm half-length r and half-width 0.38 r. Each whole shape
(its bounding circle, see ``BOUND_RADIUS``) lies within ``[0, 127]`` in x and y.

Captions are lowercase words separated by single spaces. Objects come in
canonical order (by shape in ``SHAPES`` order, then by colour in ``COLORS``
order), each as "a SIZE COLOR SHAPE". One object: that phrase. Two objects:
"A REL B", where REL says where A is relative to B along the dominant axis of
the offset from A's centre to B's: B to the right gives "left of", to the left
"right of", below "above", above "below". Layouts whose dominant offset is
less than 1.5 times the other are resampled, so the relation is never
ambiguous. Three objects: "A , B and C" (the comma is a word of its own).

Noise bank. Drawing 49,152 fresh Gaussian numbers costs more than everything
else in a scene together, so the noise of an image is a window, at a random
offset, of one fixed bank of ``NOISE_BANK_SIZE`` N(0, 8^2) samples (seeded,
built on first use, rounded to integers: the noise-free image is integer, so
this equals rounding the noisy image). Within an image the noise values are
independent Gaussians; across images they come from the same bank. The scene
is still a pure function of its seed.

Held-out convention (seed split). ``make_scenes(n, seed, split)`` gives scene
i the seed ``scene_seed(seed, i, split) = 2 * (seed * 1_000_003 + i) + s``
with ``s = 0`` for ``split="train"`` and ``s = 1`` for ``split="eval"``:
training scenes have even seeds, evaluation scenes odd seeds, so the two
streams never share a scene, whatever base seeds are used (for ``seed >= 0``
and ``n <= 1_000_003``, distinct ``(seed, i)`` also give distinct seeds).
Calling ``make_scene`` directly with a seed of your own choice bypasses the
convention: keep to even seeds for training and odd seeds for evaluation.
Held out means unseen images and layouts; captions themselves repeat, as
there are only 23,250 different ones.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AttnlabError

IMAGE_SIZE = 128
"""Height and width of every scene image, in pixels."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""Shape names, in canonical order."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 50, 190),
}
"""Colour name -> base RGB, in canonical order. Each object jitters every
channel uniformly by up to +-``COLOR_JITTER``."""

SIZES: tuple[str, ...] = ("small", "large")
"""Size words."""

RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (7.0, 10.0), "large": (15.0, 20.0)}
"""Size word -> (min, max) object radius in pixels (uniform)."""

BOUND_RADIUS: dict[str, float] = {
    "circle": 1.0,
    "square": 0.85 * math.sqrt(2.0),
    "triangle": 1.15,
    "star": 1.15,
    "cross": math.hypot(1.0, 0.38),
}
"""Shape -> radius of its bounding circle, in units of the object radius r."""

GREY_RANGE = (205, 245)  # background grey level, inclusive
GREY_SHIFT = 8  # per-channel shift of the background, +-
COLOR_JITTER = 20  # per-channel jitter of object colours, +-
NOISE_SIGMA = 8.0  # Gaussian pixel noise
MIN_GAP_FACTOR, MIN_GAP_PX = 1.2, 3.0  # centres >= 1.2 (r1 + r2) + 3 apart
DOMINANCE = 1.5  # two-object scenes: |dominant offset| >= 1.5 |other offset|

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
RELATION_WORDS: tuple[str, ...] = ("left", "right", "of", "above", "below")
VOCAB: list[str] = [
    *SPECIAL_TOKENS,
    "a",
    *SIZES,
    *COLORS,
    *SHAPES,
    *RELATION_WORDS,
    ",",
    "and",
]
"""Word-level vocabulary: token id -> word."""
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
"""Word -> token id (the inverse of :data:`VOCAB`)."""
#: The special token ids (padding, caption start CLS, caption end SEP, unknown word).
PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3  # CLS starts a caption, SEP ends it
MAX_CAPTION_WORDS = 14  # "a s c x , a s c x and a s c x"
"""The most words a caption has (three objects of four words, two separators)."""

NOISE_BANK_SIZE = 1 << 20
_NOISE_BANK_SEED = 20240601
_noise_bank: np.ndarray | None = None  # (NOISE_BANK_SIZE,) int16

SEED_STRIDE = 1_000_003
"""Seeds of consecutive scenes are this far apart (see :func:`scene_seed`)."""
SPLITS = ("train", "eval")
"""The splits; their scene seeds never overlap."""


@dataclass
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: one of ``SHAPES``.
        color: one of ``COLORS`` (the colour name; the painted RGB is jittered).
        size: one of ``SIZES``.
        radius: the object radius r in pixels.
        center: ``(x, y)`` of the shape's centre, x = column, y = row.
        mask: ``(128, 128)`` bool, exactly the pixels painted for this object.
    """

    shape: str
    color: str
    size: str
    radius: float
    center: tuple[float, float]
    mask: np.ndarray


@dataclass
class Scene:
    """An image, its caption and the ground truth behind every caption word.

    Attributes:
        image: ``(128, 128, 3)`` uint8 RGB.
        caption: lowercase words separated by single spaces.
        objects: the objects in canonical order (the caption's order).
        word_objects: one entry per caption word: the index in ``objects`` of
            the object that "a"/size/colour/shape words describe, ``None`` for
            relation words, "," and "and".
        seed: the seed that ``make_scene`` turns into this scene.
    """

    image: np.ndarray
    caption: str
    objects: list[ShapeObject]
    word_objects: list[int | None]
    seed: int

    @property
    def words(self) -> list[str]:
        """The caption split into words (same length as ``word_objects``)."""
        return self.caption.split(" ")


# --------------------------------------------------------------------- geometry


def _polar(radius: float, degrees_from_up: float) -> tuple[float, float]:
    """The point at ``radius`` from the origin, ``degrees_from_up`` clockwise from straight up."""
    a = math.radians(degrees_from_up)
    return radius * math.sin(a), -radius * math.cos(a)  # y grows downwards


def _half_planes(pieces: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge half-planes of a union of convex polygons (vertices for radius 1).

    Returns ``(ex, ey, c)``, each ``(pieces, vertices)``: the point ``(x, y)``
    lies on the inner side of (or on) edge k of piece p of the shape of radius
    r when ``ex[p, k] * y - ey[p, k] * x >= r * c[p, k]``.
    """
    v = np.array(pieces, dtype=np.float64)  # (pieces, vertices, 2)
    x, y = v[..., 0], v[..., 1]
    area2 = (x * np.roll(y, -1, axis=1) - y * np.roll(x, -1, axis=1)).sum(axis=1)  # (pieces,)
    v = np.where(area2[:, None, None] < 0, v[:, ::-1], v)  # make every piece counter-clockwise
    e = np.roll(v, -1, axis=1) - v  # (pieces, vertices, 2): edge k runs from vertex k to k + 1
    c = e[..., 0] * v[..., 1] - e[..., 1] * v[..., 0]
    return e[..., 0], e[..., 1], c


# The triangle and the star as unions of convex polygons; the star is five
# kites (centre, valley, tip, valley).
_POLYGONS = {
    "triangle": _half_planes([[_polar(1.15, a) for a in (0, 120, 240)]]),
    "star": _half_planes(
        [
            [(0.0, 0.0), _polar(0.5, tip - 36), _polar(1.15, tip), _polar(0.5, tip + 36)]
            for tip in (0, 72, 144, 216, 288)
        ]
    ),
}


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Which offsets ``(x, y)`` from an object's centre lie in the closed shape of radius ``r``.

    ``x`` and ``y`` are broadcastable float arrays, e.g. ``(1, w)`` and ``(h, 1)``;
    the result is bool with their broadcast shape, e.g. ``(h, w)``.
    """
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= r) & (ay <= 0.38 * r)) | ((ax <= 0.38 * r) & (ay <= r))
    if shape in _POLYGONS:  # inside every edge of some piece
        ex, ey, c = (a.reshape(a.shape + (1,) * max(np.ndim(x), np.ndim(y))) for a in _POLYGONS[shape])
        return (ex * y - ey * x >= r * c - 1e-9).all(axis=1).any(axis=0)  # (pieces, edges, ...) -> (...)
    raise AttnlabError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _window(shape: str, center: tuple[float, float], r: float) -> tuple[slice, slice, np.ndarray]:
    """Rows, columns and ``(h, w)`` bool mask of the shape within its bounding box."""
    cx, cy = center
    b = BOUND_RADIUS[shape] * r
    j0, j1 = max(0, math.ceil(cx - b)), min(IMAGE_SIZE - 1, math.floor(cx + b))
    i0, i1 = max(0, math.ceil(cy - b)), min(IMAGE_SIZE - 1, math.floor(cy + b))
    xs = np.arange(j0, j1 + 1, dtype=np.float64)[None, :] - cx  # (1, w)
    ys = np.arange(i0, i1 + 1, dtype=np.float64)[:, None] - cy  # (h, 1)
    return slice(i0, i1 + 1), slice(j0, j1 + 1), shape_mask(shape, xs, ys, r)


def object_mask(shape: str, center: tuple[float, float], r: float) -> np.ndarray:
    """The ``(128, 128)`` bool mask of a shape of radius ``r`` centred at ``center = (x, y)``."""
    rows, cols, local = _window(shape, center, r)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[rows, cols] = local
    return mask


def relation(a: tuple[float, float], b: tuple[float, float]) -> str | None:
    """Where A is relative to B ("left of", "right of", "above", "below").

    ``a`` and ``b`` are ``(x, y)`` centres. ``None`` when neither axis of the
    offset from A to B is at least ``DOMINANCE`` times the other.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= DOMINANCE * abs(dy) and dx != 0:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= DOMINANCE * abs(dx) and dy != 0:
        return "above" if dy > 0 else "below"
    return None


# ------------------------------------------------------------------- generation


def _noise(rng: np.random.Generator) -> np.ndarray:
    """``(3, 128, 128)`` int16 N(0, 8^2) noise rounded to integers: a random window of the shared bank.

    The noise-free image is integer, so adding rounded noise is the same as
    rounding the noisy image.
    """
    global _noise_bank
    if _noise_bank is None:
        bank = np.random.default_rng(_NOISE_BANK_SEED).standard_normal(NOISE_BANK_SIZE, dtype=np.float32)
        _noise_bank = np.rint(bank * np.float32(NOISE_SIGMA)).astype(np.int16)
    n = IMAGE_SIZE * IMAGE_SIZE * 3
    start = int(rng.integers(0, NOISE_BANK_SIZE - n + 1))
    return _noise_bank[start : start + n].reshape(3, IMAGE_SIZE, IMAGE_SIZE)


def _place(rng: np.random.Generator, shapes: list[str], radii: list[float]) -> list[tuple[float, float]]:
    """Centres for the objects: inside the image, apart, and (two objects) unambiguous.

    Objects are placed one after the other, each at the first of 64 uniform
    candidate centres that keeps the rules with the objects already placed
    (rejection sampling, batched); when none does, the layout starts over.
    """
    while True:
        centers: list[tuple[float, float]] = []
        for shape, r in zip(shapes, radii):
            b = BOUND_RADIUS[shape] * r  # keeps the whole shape within [0, 127]
            cand = rng.uniform(b, IMAGE_SIZE - 1 - b, size=(64, 2))  # (64, 2) candidate (x, y)
            ok = np.ones(64, dtype=bool)
            for (px, py), pr in zip(centers, radii):
                dist = np.hypot(cand[:, 0] - px, cand[:, 1] - py)
                ok &= dist >= MIN_GAP_FACTOR * (r + pr) + MIN_GAP_PX
            if len(shapes) == 2 and centers:  # the relation must have a dominant axis
                dx, dy = np.abs(cand[:, 0] - centers[0][0]), np.abs(cand[:, 1] - centers[0][1])
                ok &= np.maximum(dx, dy) >= DOMINANCE * np.minimum(dx, dy)
            if not ok.any():
                break
            x, y = cand[int(np.argmax(ok))]
            centers.append((float(x), float(y)))
        else:
            return centers


def make_scene(seed: int) -> Scene:
    """The scene of ``seed`` (the same seed always gives the same scene).

    See the module docstring for the seed convention of training and evaluation.
    """
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    kinds = np.sort(rng.choice(len(SHAPES) * len(COLORS), size=n, replace=False))  # canonical order
    shapes = [SHAPES[int(k) // len(COLORS)] for k in kinds]
    colors = [list(COLORS)[int(k) % len(COLORS)] for k in kinds]
    sizes = [SIZES[int(s)] for s in rng.integers(0, len(SIZES), size=n)]
    radii = [float(rng.uniform(*RADIUS_RANGE[s])) for s in sizes]
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=(n, 3))  # (n, 3)
    centers = _place(rng, shapes, radii)
    grey = int(rng.integers(GREY_RANGE[0], GREY_RANGE[1] + 1))
    shift = rng.integers(-GREY_SHIFT, GREY_SHIFT + 1, size=3)  # (3,)

    # Paint channel-first (3, H, W), filling channel-last arrays is slow in numpy;
    # int16 leaves room for the noise before clipping.
    planes = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.int16)  # (3, H, W)
    for ch in range(3):
        planes[ch] = grey + shift[ch]
    objects = []
    for shape, color, size, r, c, jit in zip(shapes, colors, sizes, radii, centers, jitter):
        rows, cols, local = _window(shape, c, r)  # local: (h, w)
        for ch in range(3):
            np.copyto(planes[ch, rows, cols], COLORS[color][ch] + jit[ch], where=local)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)  # (H, W)
        mask[rows, cols] = local
        objects.append(ShapeObject(shape, color, size, r, c, mask))
    planes += _noise(rng)
    np.clip(planes, 0, 255, out=planes)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (H, W, 3)
    for ch in range(3):  # channel by channel is fastest
        image[..., ch] = planes[ch]

    # caption: (text, index of the object it describes or None) pieces
    pieces: list[tuple[str, int | None]] = [
        (f"a {o.size} {o.color} {o.shape}", i) for i, o in enumerate(objects)
    ]
    if n == 2:
        pieces.insert(1, (relation(centers[0], centers[1]) or "", None))  # never "": _place checked it
    elif n == 3:
        pieces.insert(1, (",", None))
        pieces.insert(3, ("and", None))
    words: list[str] = []
    word_objects: list[int | None] = []
    for text, obj in pieces:
        for word in text.split(" "):
            words.append(word)
            word_objects.append(obj)
    return Scene(image, " ".join(words), objects, word_objects, int(seed))


def scene_seed(seed: int, index: int, split: str = "train") -> int:
    """The seed of scene ``index`` of ``make_scenes(..., seed, split)``.

    ``2 * (seed * 1_000_003 + index) + (0 if split == "train" else 1)``: train
    seeds are even, eval seeds odd.
    """
    if split not in SPLITS:
        raise AttnlabError(f"unknown split {split!r}; use 'train' or 'eval'")
    if seed < 0 or not 0 <= index < SEED_STRIDE:
        raise AttnlabError(f"need seed >= 0 and 0 <= index < {SEED_STRIDE}, got seed={seed}, index={index}")
    return 2 * (seed * SEED_STRIDE + index) + SPLITS.index(split)


def make_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """``n`` scenes of one split: scene i is ``make_scene(scene_seed(seed, i, split))``."""
    return [make_scene(scene_seed(seed, i, split)) for i in range(n)]


# ------------------------------------------------------------------------- text


def encode_caption(caption: str) -> list[int]:
    """Token ids of the caption's words (no start/end tokens; unknown words -> ``UNK_ID``)."""
    return [WORD_TO_ID.get(w, UNK_ID) for w in caption.split()]


def decode_caption(ids: list[int] | np.ndarray) -> str:
    """The words of ``ids``, space separated; stops at ``SEP_ID``, skips ``PAD_ID`` and ``CLS_ID``."""
    words = []
    for i in (int(t) for t in ids):
        if i == SEP_ID:
            break
        if i not in (PAD_ID, CLS_ID):
            words.append(VOCAB[i] if 0 <= i < len(VOCAB) else "[UNK]")
    return " ".join(words)


def word_class(word: str) -> str | None:
    """The kind of a shapes-world caption word, for statistics by class
    (:func:`attnlab.stats.aggregate` ``group=``): ``"size"``, ``"colour"``, ``"shape"``,
    ``"relation"``, ``"article"`` (a), ``"joiner"`` (, and), ``"end"`` ([SEP]); ``None`` otherwise."""
    if word in SIZES:
        return "size"
    if word in COLORS:
        return "colour"
    if word in SHAPES:
        return "shape"
    if word in RELATION_WORDS:
        return "relation"
    return {"a": "article", ",": "joiner", "and": "joiner", "[SEP]": "end"}.get(word)


def save_scenes(folder: str | os.PathLike, n: int, *, seed: int = 0, split: str = "eval") -> list[Path]:
    """Write ``make_scenes(n, seed, split)`` as PNG files ``scene-00000.png`` ... into ``folder``
    (created if needed), e.g. to caption them as a folder (``attnlab caption FOLDER --out DIR``).

    Returns the paths. An existing file of the same name is refused, never replaced.
    """
    from PIL import Image

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise AttnlabError(f"n must be a whole number >= 1, not {n!r}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(int(n)):  # one scene at a time: memory stays flat for any n
        scene = make_scene(scene_seed(seed, i, split))  # the scenes of make_scenes(n, seed, split)
        path = root / f"scene-{i:05d}.png"
        try:
            with path.open("xb") as fh:
                Image.fromarray(scene.image).save(fh, format="PNG")
        except FileExistsError:
            raise AttnlabError(f"{path} exists: save the scenes into an empty folder") from None
        paths.append(path)
    return paths
