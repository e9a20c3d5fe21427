"""Tests of the shapes world (`attnlab.shapes`), checked against independent computations."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from attnlab.errors import AttnlabError
from attnlab.shapes import (
    CLS_ID,
    COLORS,
    MAX_CAPTION_WORDS,
    PAD_ID,
    SEP_ID,
    SHAPES,
    SIZES,
    UNK_ID,
    VOCAB,
    Scene,
    decode_caption,
    encode_caption,
    make_scene,
    make_scenes,
    object_mask,
    scene_seed,
    shape_mask,
)

N_SEEDS = 300
SPEC_SHAPES = ["circle", "square", "triangle", "star", "cross"]
SPEC_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 50, 190),
}
SPEC_RADII = {"small": (7.0, 10.0), "large": (15.0, 20.0)}
SIGMA = 8.0  # pixel noise
JITTER = 20  # colour jitter
SIN36, COS36 = math.sin(math.radians(36)), math.cos(math.radians(36))


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [make_scene(seed) for seed in range(N_SEEDS)]


# ---------------------------------------------------------- independent geometry


def analytic_area(shape: str, r: float) -> float:
    """Area of the continuous shape of radius r."""
    R, rho = 1.15 * r, 0.5 * r
    return {
        "circle": math.pi * r * r,
        "square": (1.7 * r) ** 2,
        "triangle": 3 * math.sqrt(3) / 4 * R * R,  # equilateral, circumradius R
        "star": 10 * 0.5 * R * rho * SIN36,  # ten triangles (centre, tip, valley)
        "cross": 2 * (2 * r) * (0.76 * r) - (0.76 * r) ** 2,  # two bars minus the overlap
    }[shape]


def perimeter(shape: str, r: float) -> float:
    R, rho = 1.15 * r, 0.5 * r
    return {
        "circle": 2 * math.pi * r,
        "square": 4 * 1.7 * r,
        "triangle": 3 * math.sqrt(3) * R,
        "star": 10 * math.sqrt(R * R + rho * rho - 2 * R * rho * COS36),
        "cross": 4 * (0.76 * r + 2 * 0.62 * r),
    }[shape]


def bounding_radius(shape: str, r: float) -> float:
    """Distance from the centre to the farthest point of the shape."""
    return {
        "circle": r,
        "square": math.hypot(0.85 * r, 0.85 * r),
        "triangle": 1.15 * r,
        "star": 1.15 * r,
        "cross": math.hypot(r, 0.38 * r),
    }[shape]


def signed_margin(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """> 0 strictly inside, < 0 outside (a distance-like margin), from formulas other than the module's.

    dx, dy: offsets from the centre, y pointing down (image rows).
    """
    if shape == "circle":
        return r - np.hypot(dx, dy)
    if shape == "square":
        return 0.85 * r - np.maximum(np.abs(dx), np.abs(dy))
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        horizontal = np.minimum(r - ax, 0.38 * r - ay)
        vertical = np.minimum(0.38 * r - ax, r - ay)
        return np.maximum(horizontal, vertical)
    if shape == "triangle":
        # Equilateral triangle, apex up: inradius R/2; the outward normals of its
        # sides point down, up-left and up-right (180, 300, 60 degrees clockwise from up).
        R = 1.15 * r
        margins = []
        for deg in (180, 300, 60):
            a = math.radians(deg)
            ux, uy = math.sin(a), -math.cos(a)
            margins.append(R / 2 - (ux * dx + uy * dy))
        return np.minimum.reduce(margins)
    if shape == "star":
        # Fold the polar angle into [0, 36] degrees from the nearest tip; there the
        # boundary is the segment from the tip (R, 0) to the valley (rho, 36 deg).
        R, rho = 1.15 * r, 0.5 * r
        d = np.hypot(dx, dy)
        theta = np.degrees(np.arctan2(dx, -dy))  # clockwise from up
        phi = np.radians(np.abs(np.mod(theta + 36.0, 72.0) - 36.0))
        px, py = d * np.cos(phi), d * np.sin(phi)
        tx, ty = R, 0.0
        vx, vy = rho * COS36, rho * SIN36
        ex, ey = vx - tx, vy - ty
        cross = ex * (py - ty) - ey * (px - tx)
        inside_sign = np.sign(ex * (0 - ty) - ey * (0 - tx))  # the centre is inside
        return inside_sign * cross / math.hypot(ex, ey)
    raise AssertionError(shape)


# --------------------------------------------------------------------- images


def test_image_shape_and_dtype(scenes: list[Scene]) -> None:
    for s in scenes:
        assert s.image.shape == (128, 128, 3)
        assert s.image.dtype == np.uint8
        assert s.image.flags["C_CONTIGUOUS"]


def test_object_count_and_coverage(scenes: list[Scene]) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3}
    assert all(c > N_SEEDS / 6 for c in counts.values()), counts  # roughly uniform
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SPEC_SHAPES)
    assert {o.color for o in objects} == set(SPEC_COLORS)
    assert {o.size for o in objects} == {"small", "large"}


def test_radii_in_size_ranges(scenes: list[Scene]) -> None:
    for s in scenes:
        for o in s.objects:
            lo, hi = SPEC_RADII[o.size]
            assert lo <= o.radius <= hi, (s.seed, o.size, o.radius)


def test_no_two_objects_share_shape_and_color(scenes: list[Scene]) -> None:
    for s in scenes:
        kinds = [(o.shape, o.color) for o in s.objects]
        assert len(set(kinds)) == len(kinds), s.seed


def test_centres_apart_and_shapes_inside(scenes: list[Scene]) -> None:
    for s in scenes:
        for o in s.objects:
            b = bounding_radius(o.shape, o.radius)
            x, y = o.center
            assert b <= x <= 127 - b and b <= y <= 127 - b, (s.seed, o.shape, o.center)
        for i, a in enumerate(s.objects):
            for b in s.objects[:i]:
                d = math.dist(a.center, b.center)
                assert d >= 1.2 * (a.radius + b.radius) + 3, (s.seed, d)


def test_masks_nonempty_disjoint_within_shape_bounds(scenes: list[Scene]) -> None:
    rows, cols = np.mgrid[0:128, 0:128]
    for s in scenes:
        union = np.zeros((128, 128), dtype=int)
        for o in s.objects:
            assert o.mask.shape == (128, 128) and o.mask.dtype == bool
            assert o.mask.any()
            union += o.mask
            dist = np.hypot(cols[o.mask] - o.center[0], rows[o.mask] - o.center[1])
            assert dist.max() <= bounding_radius(o.shape, o.radius) + 1e-9
        assert union.max() <= 1, s.seed  # no pixel belongs to two objects


def test_mask_is_the_closed_shape(scenes: list[Scene]) -> None:
    """Every pixel centre clearly inside the shape is masked, every one clearly outside is not."""
    rows, cols = np.mgrid[0:128, 0:128].astype(float)
    checked = Counter()
    for s in scenes:
        for o in s.objects:
            m = signed_margin(o.shape, cols - o.center[0], rows - o.center[1], o.radius)
            clear = np.abs(m) > 1e-6  # pixel centres on the boundary may go either way
            assert np.array_equal(o.mask[clear], (m > 0)[clear]), (s.seed, o.shape)
            checked[o.shape] += 1
    assert set(checked) == set(SPEC_SHAPES)


def test_public_mask_helpers(scenes: list[Scene]) -> None:
    for s in scenes[:50]:
        for o in s.objects:
            assert np.array_equal(object_mask(o.shape, o.center, o.radius), o.mask)
    # shape_mask on points (offsets from the centre), radius 10: the tips of the
    # triangle and star lie 11.5 above the centre, the square's corner at (8.5, 8.5)
    x = np.array([0.0, 0.0, 8.4, 9.9, 0.0])
    y = np.array([-11.4, -11.6, 8.4, 3.7, 9.9])
    expected = {
        "circle": [False, False, False, False, True],
        "square": [False, False, True, False, False],
        "triangle": [True, False, False, False, False],
        "star": [True, False, False, False, False],
        "cross": [False, False, False, True, True],
    }
    for shape, want in expected.items():
        assert shape_mask(shape, x, y, 10.0).tolist() == want, shape
    with pytest.raises(AttnlabError):
        shape_mask("hexagon", x, y, 10.0)


def test_mask_area_matches_analytic_area(scenes: list[Scene]) -> None:
    # Each pixel stands for the unit square around its centre. For an axis-aligned
    # rectangle the counts along x and y are each within 1 of the side lengths,
    # so |count - area| < perimeter / 2 + 1; other shapes do better. Averaged over
    # many objects the pixelisation error cancels: the mean relative error of a
    # correct formula is ~0 (a wrong scale, e.g. 1.0 r for 1.15 r, is off by >10%).
    rel = {shape: [] for shape in SPEC_SHAPES}
    for s in scenes:
        for o in s.objects:
            area = analytic_area(o.shape, o.radius)
            count = int(o.mask.sum())
            assert abs(count - area) <= perimeter(o.shape, o.radius) / 2 + 2, (s.seed, o.shape, count, area)
            rel[o.shape].append((count - area) / area)
    for shape, errors in rel.items():
        assert len(errors) > 50
        assert abs(np.mean(errors)) < 0.015, (shape, np.mean(errors))


def test_painted_pixels_are_exactly_the_masks(scenes: list[Scene]) -> None:
    # The background is the per-channel median (objects cover well under half of
    # the image). Every object colour differs from every background by >= 127 in
    # some channel, noise rarely by 60 (7.5 sigma): a pixel differs by > 60 from
    # the background iff it was painted.
    for s in scenes:
        img = s.image.astype(float)
        background = np.median(img.reshape(-1, 3), axis=0)
        far = (np.abs(img - background) > 60).any(axis=2)
        union = np.logical_or.reduce([o.mask for o in s.objects])
        assert np.array_equal(far, union), (s.seed, int((far != union).sum()))


def test_object_colours(scenes: list[Scene]) -> None:
    residuals = []  # noise on objects, in channels far from 0 and 255
    for s in scenes:
        img = s.image.astype(float)
        for o in s.objects:
            pixels = img[o.mask]  # (n, 3)
            base = np.array(SPEC_COLORS[o.color], dtype=float)
            # jitter +-20, the mean of >= 100 noisy pixels within ~1, clipping at 255 shifts by < 4
            assert np.all(np.abs(pixels.mean(axis=0) - base) <= JITTER + 5), (s.seed, o.color)
            assert np.all(np.abs(pixels - base) <= JITTER + 6 * SIGMA), (s.seed, o.color)
            for ch in range(3):
                if 60 <= base[ch] <= 200:
                    residuals.append(pixels[:, ch] - pixels[:, ch].mean())
    noise = np.concatenate(residuals)
    assert 7.5 < noise.std() < 8.5  # Gaussian noise of sigma 8 over the objects too


def test_background_colour_and_noise(scenes: list[Scene]) -> None:
    stds = []
    for s in scenes:
        union = np.logical_or.reduce([o.mask for o in s.objects])
        bg = s.image[~union].astype(float)  # (n, 3)
        means = bg.mean(axis=0)
        # grey in [205, 245], each channel shifted by up to +-8; the mean of >10k pixels within 1
        assert np.all((197 - 1 <= means) & (means <= 253 + 1)), (s.seed, means)
        assert means.max() - means.min() <= 16 + 1, (s.seed, means)
        if means.max() <= 225:  # > 3.5 sigma below 255: clipping negligible
            stds.append(bg.std(axis=0))
    stds = np.array(stds)
    assert len(stds) > 50
    assert np.all((7.3 < stds) & (stds < 8.7)), stds.min()
    assert abs(stds.mean() - SIGMA) < 0.2


# -------------------------------------------------------------------- captions

PHRASE = r"a (small|large) (red|green|blue|yellow|purple) (circle|square|triangle|star|cross)"
CAPTION = re.compile(
    rf"^(?:{PHRASE}|{PHRASE} (?:left of|right of|above|below) {PHRASE}|{PHRASE} , {PHRASE} and {PHRASE})$"
)


def expected_relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How A relates to B ("A left of B" when B is to the right of A)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) > abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"  # y grows downwards: B below A


def test_caption_grammar_and_canonical_order(scenes: list[Scene]) -> None:
    for s in scenes:
        assert CAPTION.match(s.caption), s.caption
        assert s.caption == s.caption.lower() and "  " not in s.caption
        phrases = re.findall(PHRASE, s.caption)
        assert phrases == [(o.size, o.color, o.shape) for o in s.objects]
        keys = [(SPEC_SHAPES.index(o.shape), list(SPEC_COLORS).index(o.color)) for o in s.objects]
        assert keys == sorted(keys), s.caption


def test_relation_word_matches_centres(scenes: list[Scene]) -> None:
    seen = Counter()
    for s in scenes:
        if len(s.objects) != 2:
            continue
        a, b = s.objects
        words = s.caption.split(" ")
        rel = " ".join(words[4:-4])
        assert rel == expected_relation(a.center, b.center), (s.seed, s.caption, a.center, b.center)
        seen[rel] += 1
    assert set(seen) == {"left of", "right of", "above", "below"}


def test_two_object_scenes_have_a_dominant_axis(scenes: list[Scene]) -> None:
    for s in scenes:
        if len(s.objects) == 2:
            (ax, ay), (bx, by) = (o.center for o in s.objects)
            dx, dy = abs(bx - ax), abs(by - ay)
            assert max(dx, dy) >= 1.5 * min(dx, dy), (s.seed, dx, dy)


def test_word_objects(scenes: list[Scene]) -> None:
    for s in scenes:
        words = s.caption.split(" ")
        assert s.words == words
        assert len(s.word_objects) == len(words)
        for i, (word, obj) in enumerate(zip(words, s.word_objects)):
            if word in ("left", "right", "of", "above", "below", ",", "and"):
                assert obj is None, (s.caption, i)
                continue
            assert obj is not None and 0 <= obj < len(s.objects), (s.caption, i)
            o = s.objects[obj]
            assert word in ("a", o.size, o.color, o.shape), (s.caption, i, obj)
        # each object is described by exactly its own four consecutive words
        for k, o in enumerate(s.objects):
            idx = [i for i, obj in enumerate(s.word_objects) if obj == k]
            assert [words[i] for i in idx] == ["a", o.size, o.color, o.shape]
            assert idx == list(range(idx[0], idx[0] + 4))


# ----------------------------------------------------------------- determinism


def test_same_seed_same_scene() -> None:
    for seed in (0, 1, 12345, 2**40 + 3):
        a, b = make_scene(seed), make_scene(seed)
        assert a.seed == b.seed == seed
        assert np.array_equal(a.image, b.image)
        assert a.caption == b.caption and a.word_objects == b.word_objects
        assert len(a.objects) == len(b.objects)
        for oa, ob in zip(a.objects, b.objects):
            fields = ("shape", "color", "size", "radius", "center")
            assert [getattr(oa, f) for f in fields] == [getattr(ob, f) for f in fields]
            assert np.array_equal(oa.mask, ob.mask)


def test_different_seeds_differ(scenes: list[Scene]) -> None:
    images = {s.image.tobytes() for s in scenes}
    assert len(images) == len(scenes)
    layouts = {tuple(o.center for o in s.objects) for s in scenes}
    assert len(layouts) == len(scenes)
    assert len({s.caption for s in scenes}) > N_SEEDS // 2


def test_make_scenes_seed_streams() -> None:
    for split, parity in (("train", 0), ("eval", 1)):
        batch = make_scenes(4, 7, split=split)
        for i, s in enumerate(batch):
            assert s.seed == scene_seed(7, i, split) == 2 * (7 * 1_000_003 + i) + parity
            assert np.array_equal(s.image, make_scene(s.seed).image)
    assert [s.seed for s in make_scenes(3, 0)] == [0, 2, 4]  # split defaults to train
    train = {scene_seed(b, i, "train") for b in range(5) for i in range(1000)}
    evals = {scene_seed(b, i, "eval") for b in range(5) for i in range(1000)}
    assert len(train) == len(evals) == 5000  # distinct (seed, index) -> distinct seeds
    assert not train & evals
    with pytest.raises(AttnlabError):
        scene_seed(0, 0, "test")
    with pytest.raises(AttnlabError):
        scene_seed(-1, 0)
    with pytest.raises(AttnlabError):
        scene_seed(0, 1_000_003)


# ------------------------------------------------------------------ vocabulary


def test_constants() -> None:
    assert list(SHAPES) == SPEC_SHAPES
    assert dict(COLORS) == SPEC_COLORS and list(COLORS) == list(SPEC_COLORS)
    assert tuple(SIZES) == ("small", "large")
    assert VOCAB == [
        "[PAD]", "[CLS]", "[SEP]", "[UNK]", "a", "small", "large",
        "red", "green", "blue", "yellow", "purple",
        "circle", "square", "triangle", "star", "cross",
        "left", "right", "of", "above", "below", ",", "and",
    ]  # fmt: skip
    assert (PAD_ID, CLS_ID, SEP_ID, UNK_ID) == (0, 1, 2, 3)


def test_encode_decode(scenes: list[Scene]) -> None:
    for s in scenes:
        ids = encode_caption(s.caption)
        assert len(ids) == len(s.words) <= MAX_CAPTION_WORDS
        assert [VOCAB[i] for i in ids] == s.words  # every scene word is in the vocabulary
        assert min(ids) > UNK_ID
        assert decode_caption([CLS_ID, *ids, SEP_ID, PAD_ID, PAD_ID]) == s.caption
    assert max(len(s.words) for s in scenes) == MAX_CAPTION_WORDS
    assert encode_caption("a huge red star") == [4, UNK_ID, 7, 15]
    assert decode_caption(np.array([1, 4, 5, 7, 12, 2, 13])) == "a small red circle"


def test_sample_scenes_and_their_outlines():
    from PIL import Image

    from attnlab.samples import sample_path
    from attnlab.shapes import outlines, sample_scene

    scene = sample_scene("scene-0.png")
    with Image.open(sample_path("scene-0.png")) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), scene.image)  # the scene behind the shipped file
    assert scene.words[:4] == ["a", "small", "red", "triangle"]
    every = outlines(scene)
    assert len(every) == len(scene.objects) and all(m.shape == (128, 128) and m.dtype == bool for m in every)
    (red,) = outlines(scene, words=[1, 2, 3])  # three words, one object
    colour = scene.image[red].astype(float).mean(0)
    assert colour[0] > 150 and colour[1] < 90 and colour[2] < 90  # the mask is the red triangle's pixels
    assert outlines(scene, words=[4]) == []  # ",": names no object
    with pytest.raises(AttnlabError, match="not a shapes sample"):
        sample_scene("drawing-park.png")
    with pytest.raises(AttnlabError, match="word indices"):
        outlines(scene, words=[99])
