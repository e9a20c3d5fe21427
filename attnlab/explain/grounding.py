"""The grounding benchmark: does a word's map point at the object the word names?

Given images whose objects are known (a pixel mask and/or a box each, and a
phrase naming them), :func:`ground` captions every image, explains every word
by every method (:mod:`attnlab.explain.methods`), matches the words to the
objects, and scores each word's map against its object:

* ``hit``: the map's peak patch has its centre pixel inside the object (the
  pointing game);
* ``touch``: the peak patch overlaps the object by at least one pixel (the
  default criterion of ``attnlab evaluate``; ``--criterion hit`` there is ``hit``);
* ``mass``: the share of the map's patch weight on the object, each patch
  counted with the fraction of its pixels inside;
* ``random map``: the same for a map that knows nothing: the expected hit and
  touch rates of a uniformly random peak patch and the mass of the uniform map.

Scores are averaged over words, for each class of words (e.g. shape, colour
and size words) and over all, in two conditions: the model's own (greedy)
captions, and the true captions fed by teacher forcing (when they are known).
Maps are read per word: the pieces of a WordPiece / BPE word are merged (their
maps averaged, :meth:`~attnlab.trace.CaptionTrace.by_word`).

Geometry. Objects are given in the source image's pixels; they are carried to
the image the model saw (the "shown" image of :func:`attnlab.preprocess.prepare_for`:
resized, maybe padded) by pixel centres: shown pixel ``(i, j)`` of the image
content is the source point ``((j + 0.5) W0 / w, (i + 0.5) H0 / h)``. A box
``[x, y, width, height]`` (COCO's order, in pixel edges) covers the source
points ``x <= X < x + width``, ``y <= Y < y + height``. The patch grid is
stretched over the shown image.

Matching words to objects (:func:`match_words`): words and phrases are
lowercased, stripped of punctuation and of :data:`STOP_WORDS`. A word names an
object when it equals a word of the object's phrase (or its category), when it
does so after dropping a plural ``s``/``es``, or when the user's synonym list
maps it to one (``{"puppy": ["dog"]}``). Consecutive naming words form a span
("small red circle"); the span names the object(s) whose phrase shares the most
of its words, and every word of the span is scored against that object (ties:
against the union of the tied objects, as a word such as "dogs" names every dog).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..captioner import as_captioner
from ..decode import caption, decode_batch
from ..diagnostics import patch_share
from ..errors import AttnlabError
from ..preprocess import ImageInput, prepare_for
from .methods import Method, explain_prepared, explanation_trace

STOP_WORDS = frozenset(
    {"a", "an", "the", "of", "and", "or", "with", "in", "on", "at", "to", "is", "are", "its", "his", "her", "their",
     "this", "that", "there", "some", "two", "three", "one", "it", "by", "for", "from", "near", "next"}
)  # fmt: skip
"""Words never matched to an object (articles, prepositions, numbers, ...)."""

METRICS = ("hit", "touch", "mass")
RANDOM = "random map"

__all__ = [
    "GroundImage",
    "GroundObject",
    "METRICS",
    "PatchRegion",
    "STOP_WORDS",
    "box_to_shown",
    "chance",
    "format_grounding",
    "ground",
    "mask_to_shown",
    "match_words",
    "patch_overlap",
    "patch_region",
    "peak_hits",
    "scores",
    "table_methods",
]


# ---------------------------------------------------------------------- geometry
def patch_overlap(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(gh, gw)`` bool: which grid patches overlap a ``(H, W)`` pixel mask.

    The grid is stretched over the image: patch ``(r, c)`` covers rows
    ``floor(r H / gh) .. ceil((r + 1) H / gh) - 1`` and likewise columns.
    """
    gh, gw = grid
    h, w = mask.shape
    out = np.zeros(grid, dtype=bool)
    for r in range(gh):
        y0, y1 = (r * h) // gh, -(-((r + 1) * h) // gh)
        for c in range(gw):
            x0, x1 = (c * w) // gw, -(-((c + 1) * w) // gw)
            out[r, c] = mask[y0:y1, x0:x1].any()
    return out


@dataclass
class PatchRegion:
    """An object seen on the patch grid: ``inside`` (centre pixel in the object), ``touch``
    (overlaps it) and ``share`` (the fraction of the patch's pixels in it), each ``(h, w)``."""

    inside: np.ndarray
    touch: np.ndarray
    share: np.ndarray


def patch_region(mask: np.ndarray, grid: tuple[int, int]) -> PatchRegion:
    """The :class:`PatchRegion` of a pixel mask ``(H, W)`` (of the shown image) on ``grid``."""
    gh, gw = grid
    h, w = mask.shape
    rows = np.minimum(((np.arange(gh) + 0.5) * h / gh).astype(np.int64), h - 1)  # (gh,) centre pixel rows
    cols = np.minimum(((np.arange(gw) + 0.5) * w / gw).astype(np.int64), w - 1)  # (gw,)
    return PatchRegion(mask[np.ix_(rows, cols)], patch_overlap(mask, grid), patch_share(mask, grid))


def peak_hits(maps: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Whether the peak patch of each map ``(..., h, w)`` lies in ``where`` ``(h, w)`` bool: ``(...)`` bool
    (the first patch, row by row, of equal peaks)."""
    flat = maps.reshape(*maps.shape[:-2], -1)  # (..., S)
    return where.reshape(-1)[flat.argmax(axis=-1)]


def scores(grid_map: np.ndarray, region: PatchRegion) -> tuple[float, float, float]:
    """``(hit, touch, mass)`` of one map ``(h, w)`` (non-negative) against ``region``; an all-zero map scores 0."""
    total = float(grid_map.sum())
    if total <= 0:
        return 0.0, 0.0, 0.0
    hit = float(peak_hits(grid_map, region.inside))
    touch = float(peak_hits(grid_map, region.touch))
    return hit, touch, float((grid_map * region.share).sum() / total)


def chance(region: PatchRegion) -> tuple[float, float, float]:
    """``(hit, touch, mass)`` expected of a map that knows nothing: a uniformly random peak, the uniform map."""
    return float(region.inside.mean()), float(region.touch.mean()), float(region.share.mean())


def _source_points(shown: tuple[int, int], content: tuple[int, int], source: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates ``(Y, X)`` of the shown pixels' centres ``(h,)``, ``(w,)`` (NaN on padding)."""
    ys = (np.arange(shown[0]) + 0.5) * source[0] / content[0]  # (H,)
    xs = (np.arange(shown[1]) + 0.5) * source[1] / content[1]  # (W,)
    ys[np.arange(shown[0]) >= content[0]] = np.nan
    xs[np.arange(shown[1]) >= content[1]] = np.nan
    return ys, xs


def mask_to_shown(mask: np.ndarray, shown: tuple[int, int], content: tuple[int, int]) -> np.ndarray:
    """A source pixel mask ``(H0, W0)`` on the shown image ``(H, W)`` bool (by pixel centres; padding is outside)."""
    ys, xs = _source_points(shown, content, mask.shape)
    ok_y, ok_x = ~np.isnan(ys), ~np.isnan(xs)
    out = np.zeros(shown, dtype=bool)
    iy = np.floor(ys[ok_y]).astype(np.int64)
    ix = np.floor(xs[ok_x]).astype(np.int64)
    out[np.ix_(ok_y, ok_x)] = mask[np.ix_(iy, ix)]
    return out


def box_to_shown(box: Sequence[float], source: tuple[int, int], shown: tuple[int, int], content: tuple[int, int]) -> np.ndarray:
    """A box ``[x, y, width, height]`` in source pixels (edges) on the shown image ``(H, W)`` bool."""
    x, y, w, h = (float(v) for v in box)
    ys, xs = _source_points(shown, content, source)
    with np.errstate(invalid="ignore"):
        rows = (ys >= y) & (ys < y + h)  # (H,), NaN compares False
        cols = (xs >= x) & (xs < x + w)  # (W,)
    return rows[:, None] & cols[None, :]


# ---------------------------------------------------------------------- words and objects
_PUNCT = re.compile(r"[^\w\s-]+")


def normal_words(text: str) -> list[str]:
    """Lowercase words of ``text`` without punctuation."""
    return _PUNCT.sub(" ", text.lower()).split()


def _forms(word: str, synonyms: Mapping[str, Iterable[str]]) -> set[str]:
    """``word``, without a plural ending, and its synonyms (each lowercased)."""
    found = {word}
    if len(word) > 3 and word.endswith("es"):
        found.add(word[:-2])
    if len(word) > 2 and word.endswith("s"):
        found.add(word[:-1])
    for w in list(found):
        found.update(str(s).lower() for s in synonyms.get(w, ()))
    return found


def match_words(
    words: Sequence[str], phrases: Sequence[Iterable[str]], synonyms: Mapping[str, Iterable[str]] | None = None
) -> list[tuple[int, ...]]:
    """For each caption word, the objects it names (empty: not scored). See the module docstring for the rule.

    ``phrases``: per object the words naming it (its phrase and category, any case).
    """
    syn = {str(k).lower(): v for k, v in (synonyms or {}).items()}
    names = [{w for p in phrase for w in normal_words(str(p))} - STOP_WORDS for phrase in phrases]
    named: list[set[int]] = []
    for word in words:
        parts = normal_words(word)
        key = parts[0] if len(parts) == 1 else ""
        if not key or key in STOP_WORDS:
            named.append(set())
            continue
        forms = _forms(key, syn)
        named.append({k for k, n in enumerate(names) if forms & n})
    out: list[tuple[int, ...]] = [()] * len(words)
    i = 0
    while i < len(words):
        if not named[i]:
            i += 1
            continue
        j = i
        while j < len(words) and named[j]:
            j += 1
        counts: dict[int, int] = {}
        for t in range(i, j):
            for k in named[t]:
                counts[k] = counts.get(k, 0) + 1
        best = max(counts.values())
        chosen = tuple(sorted(k for k, c in counts.items() if c == best))
        for t in range(i, j):
            out[t] = chosen
        i = j
    return out


@dataclass
class GroundObject:
    """One object of an image: the words naming it, and its mask and/or box in source pixels."""

    phrase: list[str]
    mask: np.ndarray | None = None  # (H0, W0) bool
    box: tuple[float, float, float, float] | None = None  # x, y, width, height


@dataclass
class GroundImage:
    """An image with its objects and, if known, its true caption."""

    image: ImageInput
    objects: list[GroundObject]
    source_size: tuple[int, int]  # (H0, W0)
    truth: str | None = None
    name: str = ""


# ---------------------------------------------------------------------- the benchmark
def table_methods(model: Any) -> list[Method]:
    """The methods of the table: raw attention of every decoder layer (head mean), the layer mean,
    the best head (when the model records one), rollout (causal), Chefer et al.'s rollout, grad x attention (last layer), relevance."""
    spec = as_captioner(model).spec
    from ..samples import sample_path

    probe = caption(model, sample_path("scene-0.png"), max_len=1)
    layers = probe.num_layers
    methods = [Method("raw", layer, None) for layer in range(layers)] + [Method("layer_mean")]
    if spec.best_head is not None:
        methods.append(Method("best_head", *spec.best_head))
    return methods + [Method("rollout"), Method("chefer_rollout"), Method("grad_attn", layers - 1), Method("relevance")]


def method_key(m: Method) -> str:
    """The row name of a method in the table (``"raw, layer 1"``, ``"best_head (L1 H2)"``, ...)."""
    return m.kind.key(m)


def explain_args(m: Method) -> dict[str, Any]:
    """The keyword arguments of :func:`attnlab.explain` that make method ``m``'s maps."""
    args: dict[str, Any] = {"method": m.name}
    if m.kind.layer:
        args["layer"] = m.layer
    if m.head is not None:
        args["head"] = m.head
    return args


@dataclass
class _Tally:
    """Sums of (hit, touch, mass) and word counts per condition, region kind, row and word class."""

    sums: dict[tuple[str, str, str, str], np.ndarray] = field(default_factory=dict)
    counts: dict[tuple[str, str, str, str], int] = field(default_factory=dict)

    def add(self, key: tuple[str, str, str, str], values: tuple[float, float, float]) -> None:
        self.sums[key] = self.sums.get(key, np.zeros(3)) + np.asarray(values)
        self.counts[key] = self.counts.get(key, 0) + 1


def _encode_truth(spec: Any, text: str) -> list[int] | None:
    """A true caption's ids (the end token added) by the vocabulary's ``encode``; ``None`` when it has none or cannot."""
    encode = getattr(spec.vocab, "encode", None)
    if encode is None:
        return None
    try:
        ids = [int(t) for t in encode(text)]
    except (AttnlabError, KeyError, ValueError, TypeError):
        return None
    return [*ids, spec.eos] if 0 < len(ids) < spec.max_len else None


def ground(
    model: Any,
    items: Sequence[GroundImage],
    *,
    methods: Sequence[Method] | None = None,
    kinds: Sequence[str] = ("mask", "box"),
    word_classes: Mapping[str, Iterable[str]] | None = None,
    synonyms: Mapping[str, Iterable[str]] | None = None,
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "grounding",
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score every method's maps against the objects of ``items`` (see the module docstring).

    ``kinds``: which object regions to score, ``"mask"`` and/or ``"box"`` (an object without
    one is skipped for that kind). ``word_classes``: class name -> its words (e.g. ``{"shape":
    [...], "color": [...]}``); every scored word also counts in ``"all"``. Returns a dict:
    ``{"model", "images", "methods", "classes", "kinds", "conditions": {condition: {kind:
    {row: {class: {"hit", "touch", "mass", "words"}}}}}, "unmatched": {condition: words}}``;
    conditions ``"generated"`` (the model's greedy captions) and ``"true"`` (teacher-forced
    true captions, when every item has one the vocabulary can encode). ``records``: a list that
    receives one dict per scored word, method and kind: ``image`` (index into ``items``),
    ``condition``, ``kind``, ``method`` (the row name), ``word``, ``step`` (its index among the
    caption's words), ``classes``, ``hit``, ``touch``, ``mass``, and ``explain``: the keyword
    arguments that make the same map with :func:`attnlab.explain` (``method``, ``layer``, ``head``).
    """
    from tqdm.auto import tqdm

    cap = as_captioner(model)
    spec = cap.spec
    methods = list(methods) if methods is not None else table_methods(model)
    classes = {str(c): {str(w).lower() for w in ws} for c, ws in (word_classes or {}).items()}
    rows = [method_key(m) for m in methods]
    tally = _Tally()
    unmatched: dict[str, int] = {}
    truths = [None if it.truth is None else _encode_truth(spec, it.truth) for it in items]
    conditions = ["generated"] + (["true"] if items and all(t is not None for t in truths) else [])
    bar = tqdm(total=len(items), desc=desc, unit="image", disable=not progress, leave=False)
    try:
        for start in range(0, len(items), batch_size):
            batch = list(items[start : start + batch_size])
            content: list[tuple[int, int]] = []
            pixels, shown = prepare_for([it.image for it in batch], spec, content=content)
            # the model's own captions from the same prepared inputs (each image is read and resized once)
            greedy = [t.token_ids.tolist() for t in decode_batch(model, pixels, shown, record="none")]
            regions: dict[tuple[int, tuple[int, ...], str], PatchRegion | None] = {}
            for condition in conditions:
                ids = greedy if condition == "generated" else truths[start : start + len(batch)]
                per_image, recs, where = explain_prepared(model, pixels, ids, methods)
                for i, item in enumerate(batch):
                    grid = recs[where[i][0]].grids[where[i][1]]
                    _score_image(spec, item, methods, rows, per_image[i], ids[i], grid, shown[i], content[i], kinds, classes,
                                 synonyms, regions, start + i, condition, tally, unmatched, records)  # fmt: skip
            bar.update(len(batch))
    finally:
        bar.close()
    table: dict[str, Any] = {}
    for (condition, kind, row, cls), sums in tally.sums.items():
        n = tally.counts[(condition, kind, row, cls)]
        cell = {metric: float(v / n) for metric, v in zip(METRICS, sums)}
        cell["words"] = n
        table.setdefault(condition, {}).setdefault(kind, {}).setdefault(row, {})[cls] = cell
    return {
        "model": spec.name,
        "images": len(items),
        "methods": rows,
        "classes": [*classes, "all"],
        "kinds": list(kinds),
        "conditions": table,
        "unmatched": unmatched,
    }


def _score_image(
    spec: Any, item: GroundImage, methods: list[Method], rows: list[str], per_method: dict[Method, np.ndarray],
    ids: list[int], grid: tuple[int, int], shown: np.ndarray, content: tuple[int, int], kinds: Sequence[str],
    classes: dict[str, set[str]], synonyms: Mapping[str, Iterable[str]] | None, regions: dict, i: int, condition: str,
    tally: _Tally, unmatched: dict[str, int], records: list[dict[str, Any]] | None,
) -> None:  # fmt: skip
    """Add image ``i``'s words to ``tally`` (all methods, every kind of region); ``per_method``: rows (steps, K)."""
    words = None
    matches: list[tuple[int, ...]] = []
    for m, row in zip(methods, rows):
        trace = explanation_trace(spec, m, per_method[m], ids, grid, shown).by_word()  # pieces merged into words
        maps = trace.cross_attention[0, 0].astype(np.float64)  # (words, h, w)
        if words is None:
            words = trace.words
            matches = match_words(words, [o.phrase for o in item.objects], synonyms)
            end = spec.vocab.token(spec.eos)
            missed = [w for w, o in zip(words, matches) if not o and w != end and normal_words(w) and normal_words(w)[0] not in STOP_WORDS]
            unmatched[condition] = unmatched.get(condition, 0) + len(missed)
        for t, objs in enumerate(matches):
            if not objs:
                continue
            word = normal_words(words[t])[0]
            labels = [c for c, ws in classes.items() if word in ws] + ["all"]
            for kind in kinds:
                region = _region(item, objs, kind, grid, shown.shape[:2], content, regions, i)
                if region is None:
                    continue
                values = scores(maps[t], region)
                if records is not None:
                    records.append({"image": i, "condition": condition, "kind": kind, "method": row, "explain": explain_args(m),
                                    "word": words[t], "step": t, "classes": labels, **dict(zip(METRICS, values))})  # fmt: skip
                for cls in labels:
                    tally.add((condition, kind, row, cls), values)
                    if m is methods[0]:
                        tally.add((condition, kind, RANDOM, cls), chance(region))


def _region(
    item: GroundImage, objs: tuple[int, ...], kind: str, grid: tuple[int, int], shown: tuple[int, int], content: tuple[int, int],
    cache: dict, i: int,
) -> PatchRegion | None:
    """The union of objects ``objs``'s masks or boxes (``kind``) on the grid; ``None`` when none has one (cached)."""
    key = (i, objs, kind)
    if key not in cache:
        masks = []
        for k in objs:
            o = item.objects[k]
            if kind == "mask" and o.mask is not None:
                masks.append(mask_to_shown(o.mask, shown, content))
            elif kind == "box" and o.box is not None:
                masks.append(box_to_shown(o.box, item.source_size, shown, content))
        cache[key] = patch_region(np.logical_or.reduce(masks), grid) if masks else None
    return cache[key]


# ---------------------------------------------------------------------- the table as text
CONDITION_TITLES = {
    "generated": "the model's own captions (greedy)",
    "true": "the true captions (teacher forcing)",
}
KIND_TITLES = {"mask": "object masks", "box": "object boxes"}


def format_grounding(result: dict[str, Any], kind: str | None = None) -> str:
    """The tables of :func:`ground` as text: per condition, rows = methods, then the random map;
    columns = hit / touch / mass (%) per word class."""
    kinds = [kind] if kind else result["kinds"]
    classes = result["classes"]
    lines = [f"attnlab grounding \u00b7 model {result['model']} \u00b7 {result['images']} images{result.get('source', '')}"]
    lines.append("hit: the peak patch's centre lies in the named object; touch: the peak patch overlaps it;")
    lines.append("mass: share of the map on the object; random map: a random peak patch / the uniform map (chance)")
    width = max(len(r) for r in [*result["methods"], RANDOM]) + 2
    for condition, per_kind in result["conditions"].items():
        for k in kinds:
            table = per_kind.get(k)
            if not table:
                continue
            first = next(iter(table.values()))
            counts = " \u00b7 ".join(f"{c} {first.get(c, {}).get('words', 0)}" for c in classes)
            lines += ["", f"{CONDITION_TITLES.get(condition, condition)}, {KIND_TITLES.get(k, k)} (words: {counts})"]
            lines.append(" " * width + "".join(f"{c + ' words' if c != 'all' else 'all words':<20}" for c in classes))
            lines.append(f"{'method':<{width}}" + "hit   touch mass    " * len(classes))
            for row in [*result["methods"], RANDOM]:
                cells = table.get(row)
                if cells is None:
                    continue
                text = ""
                for c in classes:
                    v = cells.get(c)
                    text += "-" * 3 + " " * 17 if v is None else f"{v['hit']:>4.0%}  {v['touch']:>4.0%}  {v['mass']:>4.0%}    "
                lines.append(f"{row:<{width}}{text.rstrip()}")
    if result.get("unmatched"):
        lines.append("")
        lines.append("words not matched to any object (not scored): " + ", ".join(f"{c} {n}" for c, n in result["unmatched"].items()))
    return "\n".join(lines)


def best_row(result: dict[str, Any], condition: str = "true", kind: str = "mask", cls: str = "shape", metric: str = "hit") -> tuple[str, float, float]:
    """The method with the highest ``metric`` for ``cls`` words, its score and the random map's."""
    table = result["conditions"][condition][kind]
    rows = [r for r in result["methods"] if r in table and cls in table[r]]
    if not rows:
        raise AttnlabError(f"no {cls} words were scored in the {condition} condition")
    best = max(rows, key=lambda r: table[r][cls][metric])
    return best, table[best][cls][metric], table[RANDOM][cls][metric]

