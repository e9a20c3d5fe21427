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

The parts live in their own modules: :mod:`attnlab.explain.geometry` (objects carried to
the shown image, patch regions, scores), :mod:`attnlab.explain.words` (which words name
which objects) and :mod:`attnlab.explain.tables` (the tables as text); their public names
are importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..captioner import SequenceCaptioner, as_captioner
from ..decode import caption, decode_batch
from ..errors import AttnlabError
from ..preprocess import ImageInput, prepare_for
from ..trace import CaptionTrace
from .geometry import PatchRegion, box_to_shown, chance, mask_to_shown, patch_overlap, patch_region, peak_hits, scores
from .kinds import KINDS
from .contrast import reference_of
from .methods import Method, explain_prepared, explain_sequence, explanation_trace
from .tables import METRICS, RANDOM, best_row, format_grounding
from .words import STOP_WORDS, match_words, normal_words

__all__ = [
    "GroundImage",
    "GroundObject",
    "METRICS",
    "PatchRegion",
    "RANDOM",
    "STOP_WORDS",
    "best_row",
    "box_to_shown",
    "chance",
    "format_grounding",
    "ground",
    "mask_to_shown",
    "match_words",
    "normal_words",
    "patch_overlap",
    "patch_region",
    "peak_hits",
    "scores",
    "table_methods",
]


# ---------------------------------------------------------------------- what is scored
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
    one_sequence = isinstance(as_captioner(model), SequenceCaptioner)  # contrast: only there; chefer_rollout: not there
    kinds = [k for k in KINDS.values() if (k.sequence is not None if one_sequence else not k.prompted)]
    return [m for kind in kinds for m in kind.table_methods(layers, spec)]  # the registry's order


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
                traces = _word_traces(model, methods, pixels, shown, ids, condition == "true")  # per image, per method
                for i, item in enumerate(batch):
                    _score_image(spec, item, methods, rows, traces[i], shown[i], content[i], kinds, classes,
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


def _word_traces(model: Any, methods: list[Method], pixels: Any, shown: list[np.ndarray], ids: list[list[int]],
                 forced: bool) -> list[list[CaptionTrace]]:
    """Per image, each method's explanation trace (pieces merged into words), in ``methods``' order. A captioner
    whose words attend over one sequence (a vision-language model) explains through its teacher-forced pass."""
    cap = as_captioner(model)
    if isinstance(cap, SequenceCaptioner):
        per_method = [explain_sequence(cap, m, pixels, shown, ids, reference_of(None) if m.kind.prompted else None, forced)
                      for m in methods]  # fmt: skip
        return [[t[i].by_word() for t in per_method] for i in range(len(ids))]
    per_image, recs, where = explain_prepared(model, pixels, ids, methods)
    return [[explanation_trace(cap.spec, m, per_image[i][m], ids[i], recs[where[i][0]].grids[where[i][1]], shown[i]).by_word()
             for m in methods] for i in range(len(ids))]  # fmt: skip


def _score_image(
    spec: Any, item: GroundImage, methods: list[Method], rows: list[str], traces: list[CaptionTrace],
    shown: np.ndarray, content: tuple[int, int], kinds: Sequence[str],
    classes: dict[str, set[str]], synonyms: Mapping[str, Iterable[str]] | None, regions: dict, i: int, condition: str,
    tally: _Tally, unmatched: dict[str, int], records: list[dict[str, Any]] | None,
) -> None:  # fmt: skip
    """Add image ``i``'s words to ``tally`` (all methods, every kind of region); ``traces``: each method's, by word."""
    words = None
    matches: list[tuple[int, ...]] = []
    grid = traces[0].grid
    for m, row, trace in zip(methods, rows, traces):
        maps = trace.view_attention(0)[0, 0].astype(np.float64)  # (words, h, w): the first view (the whole photo)
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
