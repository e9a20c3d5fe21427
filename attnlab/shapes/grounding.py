"""The grounding benchmark on shapes scenes, the best-head record, and scenes as COCO-style boxes.

* :func:`grounding`: :func:`attnlab.explain.grounding.ground` on ``n`` held-out
  scenes (the ``"eval"`` split of ``seed``), each object known by its exact mask
  and its bounding box, its phrase "SIZE COLOR SHAPE"; word classes shape,
  colour and size (``attnlab grounding``).
* :func:`select_best_head`: the decoder head whose raw cross-attention grounds
  best on other held-out scenes (:data:`SELECTION_START` onwards of the eval
  split of seed 0, disjoint from every benchmark run with ``n <= MAX_SCENES``),
  and :func:`record_best_head`, which writes that record into a checkpoint
  (weights unchanged): how the bundled models got theirs.
* :func:`export_boxes`: scenes as image files plus a COCO-style ``boxes.json``
  (what ``attnlab grounding --images DIR --boxes FILE`` reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttnlabError
from ..explain.geometry import patch_region, peak_hits
from ..explain.grounding import GroundImage, GroundObject, ground
from ..explain.methods import Method
from ..fileio import atomic_create, atomic_write
from .scenes import COLORS, SEP_ID, SHAPES, SIZES, Scene, encode_caption, make_scene, make_scenes, scene_seed

WORD_CLASSES: dict[str, list[str]] = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}
"""The word classes of the shapes table, in the order it prints them."""
MAX_SCENES = 100_000  # benchmark runs: scenes 0 .. n-1 of the eval split
SELECTION_START = 900_000  # best-head selection: scenes from here on of the eval split of seed 0
SELECTION_SCENES = 200

__all__ = ["WORD_CLASSES", "export_boxes", "grounding", "record_best_head", "scene_box", "scene_items", "select_best_head"]


def scene_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The tight box ``[x, y, width, height]`` (pixel edges) of a mask's pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def scene_items(scenes: list[Scene]) -> list[GroundImage]:
    """The scenes as benchmark items: every object with its phrase, mask and box; the true caption."""
    items = []
    for s in scenes:
        objects = [GroundObject([o.size, o.color, o.shape], o.mask, scene_box(o.mask)) for o in s.objects]
        items.append(GroundImage(s.image, objects, s.image.shape[:2], s.caption, f"scene seed {s.seed}"))
    return items


def check_scene_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_SCENES:
        raise AttnlabError(f"--n must be a whole number from 1 to {MAX_SCENES:,} (the scenes from {SELECTION_START:,} on choose the best head)")
    return int(n)


def grounding(
    model: Any, n: int = 500, seed: int = 0, *, batch_size: int = 50, progress: bool = True, methods: list[Method] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The grounding table of ``model`` on ``n`` held-out scenes (eval split of ``seed``: ``make_scenes(n, seed,
    "eval")``); see :func:`attnlab.explain.grounding.ground` for what is measured and returned (and ``records``)."""
    n = check_scene_count(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AttnlabError(f"--seed must be a whole number >= 0, not {seed!r}")
    scenes = make_scenes(n, int(seed), split="eval")
    result = ground(model, scene_items(scenes), methods=methods, word_classes=WORD_CLASSES, batch_size=batch_size,
                    progress=progress, desc=f"grounding {n} scenes", records=records)  # fmt: skip
    result["source"] = f" (shapes scenes 0..{n - 1}, eval split, seed {seed})"
    result["seed"] = int(seed)
    return result


# ---------------------------------------------------------------------- the best head
def select_best_head(model: Any, n: int = SELECTION_SCENES, batch_size: int = 50) -> dict[str, Any]:
    """The decoder head whose raw cross-attention points best at the named objects.

    Scenes: ``SELECTION_START .. SELECTION_START + n - 1`` of the eval split of seed 0 (no
    benchmark run of at most :data:`MAX_SCENES` scenes uses them), true captions fed by
    teacher forcing. Score: the pointing-game hit rate (the peak patch's centre in the object's
    mask) over every size, colour and shape word; ties go to the earlier layer, then head.
    Returns the record stored in checkpoints: ``{"layer", "head", "hit_rate", "mean_head_hit_rate",
    "scenes", "rule"}``.
    """
    from ..decode import caption

    scenes = [make_scene(scene_seed(0, SELECTION_START + i, "eval")) for i in range(n)]
    hits = None
    words = 0
    for start in range(0, n, batch_size):
        chunk = scenes[start : start + batch_size]
        traces = caption(model, [s.image for s in chunk], tokens=[[*encode_caption(s.caption), SEP_ID] for s in chunk])
        for s, t in zip(chunk, traces):
            ca = t.require_attention().astype(np.float64)  # (layers, heads, steps, h, w)
            maps = np.concatenate([ca, ca.mean(axis=1, keepdims=True)], axis=1)  # (layers, heads + 1, steps, h, w)
            if hits is None:
                hits = np.zeros(maps.shape[:2])
            for step, (word, obj) in enumerate(zip(s.words, s.word_objects)):
                if obj is None or not any(word in ws for ws in WORD_CLASSES.values()):
                    continue
                region = patch_region(s.objects[obj].mask, t.grid)
                hits += peak_hits(maps[:, :, step], region.inside)
                words += 1
    rates = hits[:, :-1] / max(words, 1)  # (layers, heads)
    layer, head = np.unravel_index(int(np.argmax(rates)), rates.shape)  # the first of equals: earlier layer, head
    return {
        "layer": int(layer),
        "head": int(head),
        "hit_rate": round(float(rates[layer, head]), 4),
        "mean_head_hit_rate": round(float(hits[layer, -1] / max(words, 1)), 4),
        "scenes": f"eval split, seed 0, scenes {SELECTION_START}..{SELECTION_START + n - 1} ({words} words)",
        "rule": "highest pointing-game hit rate (peak patch centre in the object's mask) over size, colour and shape "
        "words of the teacher-forced true captions; ties: earlier layer, then head",
    }


def record_best_head(path: str | Path, record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``record`` into the ``meta["best_head"]`` of the attnlab checkpoint at ``path`` (or a copy at
    ``out``), everything else, the weights included, unchanged; the write is atomic."""
    from ..hub import read_checkpoint

    source = Path(path)
    obj = read_checkpoint(source)
    if obj.get("format") not in ("attnlab-catr", "attnlab-cptr"):
        raise AttnlabError(f"{source} is not an attnlab checkpoint: save the model with attnlab.save_checkpoint first")
    meta = dict(obj.get("meta") or {})
    meta["best_head"] = dict(record)
    obj["meta"] = meta
    return atomic_write(Path(out) if out is not None else source, lambda fh: torch.save(obj, fh))


# ---------------------------------------------------------------------- COCO-style boxes
def export_boxes(scenes: list[Scene], folder: str | Path) -> Path:
    """Write each scene as ``scene-<i>.png`` into ``folder`` and a COCO-style ``boxes.json`` beside them:
    ``images`` (id, file_name, width, height), ``annotations`` (a box with its category and phrase per
    object; a caption per image), ``categories`` (the shapes) and ``word_classes``. Returns the JSON's path.
    Files that are already there are refused (nothing is overwritten)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"scene-{i:05d}.png" for i in range(len(scenes))]
    clash = [n for n in [*names, "boxes.json"] if (folder / n).exists()]
    if clash:
        raise AttnlabError(f"{folder / clash[0]} already exists: export into an empty folder")
    categories = [{"id": i + 1, "name": shape} for i, shape in enumerate(SHAPES)]
    images, annotations = [], []
    written: list[Path] = []
    try:
        for i, (scene, name) in enumerate(zip(scenes, names)):
            written.append(atomic_create(folder / name, lambda fh, img=scene.image: Image.fromarray(img).save(fh, format="PNG")))
            images.append({"id": i + 1, "file_name": name, "height": int(scene.image.shape[0]), "width": int(scene.image.shape[1])})
            for o in scene.objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": list(scene_box(o.mask)),
                                    "category_id": SHAPES.index(o.shape) + 1, "phrase": f"{o.size} {o.color} {o.shape}"})  # fmt: skip
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": scene.caption})
        data = {"images": images, "annotations": annotations, "categories": categories, "word_classes": WORD_CLASSES}
        return atomic_create(folder / "boxes.json", lambda fh: fh.write(json.dumps(data, indent=1).encode()))
    except BaseException:
        for path in written:  # a failed export leaves nothing behind
            path.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """``python -m attnlab.shapes.grounding CHECKPOINT [--out PATH]``: choose the best head and record it."""
    import argparse

    from ..hub import load_model

    parser = argparse.ArgumentParser(description="Choose the decoder head that grounds best on held-out shapes scenes "
                                     "and record it in an attnlab checkpoint's meta (weights unchanged).")  # fmt: skip
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default=None, help="write a copy here instead of updating CHECKPOINT")
    parser.add_argument("--n", type=int, default=SELECTION_SCENES)
    args = parser.parse_args(argv)
    try:
        record = select_best_head(load_model(checkpoint=args.checkpoint), n=args.n)
        path = record_best_head(args.checkpoint, record, args.out)
    except AttnlabError as exc:
        raise SystemExit(f"attnlab: error: {exc}") from None
    print(f"best head of {args.checkpoint}: layer {record['layer']}, head {record['head']} (hit rate {record['hit_rate']:.1%}, "
          f"that layer's head mean {record['mean_head_hit_rate']:.1%}); recorded in {path}")


if __name__ == "__main__":
    main()
