"""The bundled shapes vision-language model on held-out scenes: exact captions and the pointing game.

``attnlab evaluate shapes`` teacher-forces the true caption; a vision-language captioner
replays its own ``generate`` and takes no other tokens, so :func:`evaluate_vlm` scores the
model's own greedy captions: every size, colour and shape word the model wrote at the
position where the true caption has the same word is pointed (the peak patch of the
head-averaged map of the word's step over the image grid, per decoder layer and for the
mean of the layers) with the criteria of :mod:`attnlab.shapes.evaluate` (``"touch"`` by
default, or ``"hit"``). On an exactly right caption that is every such word.

``attnlab evaluate shapes --model shapes-vlm`` (or ``python -m attnlab.shapes.vlm --folder DIR`` for a
folder of your own) prints the report (the numbers recorded in
``attnlab/weights/README.md``).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from ..captioner import as_captioner
from ..decode import caption
from ..errors import AttnlabError
from ..explain.geometry import patch_overlap, patch_region, peak_hits
from .evaluate import CATEGORIES, CRITERIA, format_report
from .scenes import Scene, make_scenes

__all__ = ["VLM_REPORT", "evaluate_vlm"]
VLM_REPORT = ("pointing game:", "pointing game (the model's own captions, words right at their place):")
"""How :func:`attnlab.shapes.evaluate.format_report`'s pointing line is reworded for :func:`evaluate_vlm`."""


def _where(mask: np.ndarray, grid: tuple[int, int], criterion: str) -> np.ndarray:
    """``(gh, gw)`` bool: the patches a peak may fall on to count, under ``criterion``."""
    return patch_overlap(mask, grid) if criterion == "touch" else patch_region(mask, grid).inside


def evaluate_vlm(model: Any, n: int = 500, seed: int = 0, *, criterion: str = "touch", batch_size: int = 50) -> dict:
    """Score a vision-language captioner on ``n`` held-out scenes (the "eval" split of ``seed``).

    Returns the dict of :func:`attnlab.shapes.evaluate.evaluate` (``exact``, ``word_accuracy``,
    ``criterion``, ``pointing`` per class: ``layers``, ``mean_of_layers``, ``random_patch``,
    ``words``), the pointing measured on the model's own captions (see the module).
    """
    if criterion not in CRITERIA:
        raise AttnlabError(f"criterion={criterion!r} is not a pointing-game criterion: use 'touch' or 'hit'")
    spec = as_captioner(model).spec
    end = spec.vocab.token(spec.eos)  # the end token's word: counted in the per-word accuracy as evaluate does
    scenes = make_scenes(n, seed, split="eval")
    exact = word_hits = word_total = 0
    hits: dict[str, np.ndarray] = {}
    base = {k: 0.0 for k in (*CATEGORIES, "all")}
    count = {k: 0 for k in base}
    layers = 0
    for start in range(0, n, batch_size):
        chunk: list[Scene] = scenes[start : start + batch_size]
        for scene, trace in zip(chunk, caption(model, [s.image for s in chunk])):
            words, truth = trace.words, scene.words  # the trace's words end with the end token when the model wrote it
            exact += words == [*truth, end]
            word_hits += sum(1 for i, w in enumerate([*truth, end]) if i < len(words) and words[i] == w)
            word_total += len(truth) + 1
            maps = trace.view_attention(0).mean(axis=1)  # (layers, steps, gh, gw): heads averaged
            if not hits:
                layers = maps.shape[0]
                hits = {k: np.zeros(layers + 1) for k in base}
            for step, (word, obj) in enumerate(zip(truth, scene.word_objects)):
                category = next((k for k, ws in CATEGORIES.items() if word in ws), None)
                if category is None or obj is None or step >= len(words) or words[step] != word:
                    continue
                where = _where(scene.objects[obj].mask, trace.grid, criterion)  # (gh, gw)
                hit = np.append(peak_hits(maps[:, step], where), peak_hits(maps[:, step].mean(axis=0), where))  # (layers + 1,)
                for k in (category, "all"):
                    hits[k] += hit
                    base[k] += float(where.mean())
                    count[k] += 1
    rates = {
        k: {"layers": (hits[k][:layers] / max(count[k], 1)).tolist(), "mean_of_layers": float(hits[k][layers] / max(count[k], 1)),
            "random_patch": base[k] / max(count[k], 1), "words": count[k]}
        for k in hits
    }  # fmt: skip
    return {"scenes": n, "seed": seed, "exact": exact / n, "word_accuracy": word_hits / max(word_total, 1),
            "criterion": criterion, "pointing": rates}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``python -m attnlab.shapes.vlm [--n N] [--seed S] [--criterion touch|hit] [--folder DIR]``: print the report."""
    from ..hub import load_model

    p = argparse.ArgumentParser(description="Exact captions and the pointing game of the bundled shapes VLM on held-out scenes.")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--criterion", choices=tuple(CRITERIA), default="touch")
    p.add_argument("--folder", default=None, help="a save_pretrained folder to score instead of the bundled model")
    a = p.parse_args(argv)
    try:
        if a.folder is None:
            model = load_model("shapes-vlm")
        else:
            from ..hub import load_shapes_vlm

            model = load_shapes_vlm(a.folder)
        result = evaluate_vlm(model, a.n, a.seed, criterion=a.criterion)
    except AttnlabError as exc:
        raise SystemExit(f"attnlab: error: {exc}") from None
    print(format_report(result).replace(*VLM_REPORT))


if __name__ == "__main__":
    main()
