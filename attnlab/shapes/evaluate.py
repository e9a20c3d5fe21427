"""``attnlab evaluate shapes``: caption accuracy and the pointing game.

Pointing game: for every size, colour and shape word of a held-out scene's
true caption, teacher-force the caption (so each word is emitted at a known
step) and take the peak patch of the head-averaged cross-attention at the step
that emits the word. Two criteria, named as in ``attnlab grounding`` (whose
geometry, :mod:`attnlab.explain.geometry`, this module shares):

* ``"touch"`` (the default): the peak patch overlaps the object's mask by at
  least one pixel;
* ``"hit"``: the peak patch's centre pixel lies inside the object.

The chance level is that of a uniformly random patch under the same criterion:
the share of patches that touch the object (or whose centre is inside it),
averaged over the same words. The report names the criterion and its chance.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..decode import caption
from ..errors import AttnlabError
from ..explain.geometry import patch_overlap, patch_region, peak_hits
from ..trace import CaptionTrace
from .scenes import COLORS, SEP_ID, SHAPES, SIZES, Scene, encode_caption, make_scenes

CATEGORIES = {"size": set(SIZES), "color": set(COLORS), "shape": set(SHAPES)}
CRITERIA = {  # the pointing game's two criteria, as attnlab grounding names them
    "touch": "the peak patch overlaps the named object",
    "hit": "the peak patch's centre lies inside the named object",
}
__all__ = ["CATEGORIES", "CRITERIA", "evaluate", "format_report", "patch_overlap", "pointing"]


def _check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise AttnlabError(f"criterion={criterion!r} is not a pointing-game criterion: use 'touch' (the peak patch overlaps "
                           "the object) or 'hit' (its centre is inside)")
    return criterion


def _where(mask: np.ndarray, grid: tuple[int, int], criterion: str) -> np.ndarray:
    """``(gh, gw)`` bool: the patches a peak may fall on to count, under ``criterion``."""
    return patch_overlap(mask, grid) if criterion == "touch" else patch_region(mask, grid).inside


def pointing(trace: CaptionTrace, scene: Scene, criterion: str = "touch") -> list[tuple[int, str, np.ndarray, float]]:
    """The pointing game on one teacher-forced trace of ``scene``'s true caption.

    For every size, colour and shape word returns ``(step, category, hits, chance)``:
    ``hits`` ``(layers, heads + 1)`` bool says whether each head's map (and, in the
    last column, the head mean) peaks on the named object under ``criterion``
    (``"touch"``: the peak patch overlaps it; ``"hit"``: the peak patch's centre is
    inside it); ``chance`` is a random patch's rate under the same criterion.
    """
    _check_criterion(criterion)
    ca = trace.cross_attention  # (layers, heads, steps, gh, gw)
    maps = np.concatenate([ca, ca.mean(axis=1, keepdims=True)], axis=1)  # (layers, heads + 1, steps, gh, gw)
    out = []
    for step, (word, obj) in enumerate(zip(scene.words, scene.word_objects)):
        category = next((k for k, words in CATEGORIES.items() if word in words), None)
        if category is None or obj is None:
            continue
        where = _where(scene.objects[obj].mask, trace.grid, criterion)  # (gh, gw)
        out.append((step, category, peak_hits(maps[:, :, step], where), float(where.mean())))  # hits (layers, heads + 1)
    return out


def evaluate(
    model, n: int = 500, seed: int = 0, batch_size: int = 50, encode: Callable[[str], list[int]] = encode_caption,
    criterion: str = "touch",
) -> dict:
    """Score ``model`` (any captioner) on ``n`` held-out scenes (the "eval" split of ``seed``).

    Returns a dict: ``exact`` (share of exactly right captions), ``word_accuracy``
    (share of true caption tokens, end token included, predicted at their
    position by greedy decoding), ``criterion`` (``"touch"``, default, or ``"hit"``:
    see the module) and ``pointing``: for each category (size/color/shape/all) the
    rate under that criterion per layer, for the layer mean, and ``random_patch``,
    the chance level under the same criterion. ``encode``: the model's tokenisation of a caption
    (default: the shapes vocabulary's words); a word made of several pieces is
    pointed with the mean of its pieces' maps (:meth:`CaptionTrace.by_word`).
    """
    _check_criterion(criterion)
    scenes = make_scenes(n, seed, split="eval")
    exact = 0
    word_hits = word_total = 0
    layers = 0  # read off the first trace: nothing here reads the model's internals
    hits: dict[str, np.ndarray] = {}
    base = {k: 0.0 for k in (*CATEGORIES, "all")}
    count = {k: 0 for k in base}
    for start in range(0, n, batch_size):
        chunk: list[Scene] = scenes[start : start + batch_size]
        images = [s.image for s in chunk]
        greedy = caption(model, images, record="none")
        truth = [[*encode(s.caption), SEP_ID] for s in chunk]
        forced = [f.by_word() for f in caption(model, images, tokens=truth)]  # one step per word of the scene
        for scene, g, t, f in zip(chunk, greedy, truth, forced):
            if not hits:
                layers = f.num_layers
                hits = {k: np.zeros(layers + 1) for k in base}
            pred = g.token_ids.tolist()
            exact += pred == t
            word_hits += sum(1 for i, tok in enumerate(t) if i < len(pred) and pred[i] == tok)
            word_total += len(t)
            mean_of_layers = f.mean_heads().mean(axis=0)  # (steps, gh, gw): heads and layers averaged
            for step, cat, hit, chance in pointing(f, scene, criterion):
                where = _where(scene.objects[scene.word_objects[step]].mask, f.grid, criterion)  # (gh, gw)
                hit = np.append(hit[:, -1], peak_hits(mean_of_layers[step], where))  # (layers + 1,): head means
                for k in (cat, "all"):
                    hits[k] += hit
                    base[k] += chance
                    count[k] += 1
    rates = {
        k: {
            "layers": (hits[k][:layers] / max(count[k], 1)).tolist(),
            "mean_of_layers": float(hits[k][layers] / max(count[k], 1)),
            "random_patch": base[k] / max(count[k], 1),
            "words": count[k],
        }
        for k in hits
    }
    return {"scenes": n, "seed": seed, "exact": exact / n, "word_accuracy": word_hits / word_total, "criterion": criterion,
            "pointing": rates}


def format_report(result: dict) -> str:
    """The evaluation as a small text table, naming its pointing-game criterion and that criterion's chance level."""
    criterion = result.get("criterion", "touch")
    other = "hit" if criterion == "touch" else "touch"
    lines = [
        f"held-out scenes        : {result['scenes']} (eval split, seed {result['seed']})",
        f"exact captions         : {result['exact']:.1%}",
        f"per-word accuracy      : {result['word_accuracy']:.1%}",
        "pointing game: the peak patch of the head-averaged cross-attention of each size, colour and shape word",
        f"  criterion: {criterion} = {CRITERIA[criterion]} (--criterion {other}: {CRITERIA[other]})",
        f"  chance: a uniformly random patch, under the same criterion ({criterion})",
    ]
    first = next(iter(result["pointing"].values()))
    header = "  words   " + "".join(f"layer {i:<3d}" for i in range(len(first["layers"]))) + "mean     chance"
    lines.append(header)
    for k, v in result["pointing"].items():
        row = "".join(f"{x:<9.1%}" for x in v["layers"])
        lines.append(f"  {k:<7s} {row}{v['mean_of_layers']:<9.1%}{v['random_patch']:.1%}   (n={v['words']})")
    return "\n".join(lines)
