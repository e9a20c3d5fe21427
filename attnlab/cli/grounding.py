"""``attnlab grounding``: the grounding table on shapes scenes or on your own images with boxes.

A command of the top layer (in :mod:`attnlab.cli`): it uses both :mod:`attnlab.explain`
and :mod:`attnlab.shapes`, which itself builds on :mod:`attnlab.explain`.
"""

from __future__ import annotations

import argparse
import json

from ..errors import AttnlabError
from ..hub import model_names

DEFAULT_N = 500


def cmd_grounding(args: argparse.Namespace) -> int:
    from ..explain.grounding import RANDOM, best_row, format_grounding, ground
    from ..hub import load_model

    own = args.images is not None or args.boxes is not None
    if own and (args.images is None or args.boxes is None):
        raise AttnlabError("--images DIR and --boxes FILE.json go together")
    if own and (args.n is not None or args.seed is not None):
        raise AttnlabError("--n and --seed choose shapes scenes; with --images/--boxes every listed image is scored")
    if not own and args.synonyms is not None:
        raise AttnlabError("--synonyms is for --images/--boxes (shapes scenes name their objects exactly)")
    if args.batch_size < 1:
        raise AttnlabError("--batch-size must be at least 1")
    if own:  # every check of the inputs before the (slow) model load
        from ..explain.boxes import read_boxes, read_synonyms

        items, classes = read_boxes(args.images, args.boxes)
        synonyms = read_synonyms(args.synonyms)
    else:
        from ..shapes.grounding import check_scene_count

        check_scene_count(DEFAULT_N if args.n is None else args.n)
    model = load_model(None if args.checkpoint else args.model, checkpoint=args.checkpoint)
    progress = not args.quiet
    if own:
        result = ground(model, items, kinds=("box",), word_classes=classes, synonyms=synonyms, batch_size=args.batch_size,
                        progress=progress, desc=f"grounding {len(items)} images")  # fmt: skip
        result["source"] = f" ({args.images}, boxes {args.boxes})"
        kind, cls = "box", "all"
    else:
        from ..shapes.grounding import grounding

        result = grounding(model, DEFAULT_N if args.n is None else args.n, 0 if args.seed is None else args.seed,
                           batch_size=args.batch_size, progress=progress)  # fmt: skip
        kind, cls = args.regions or "mask", "shape"
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_grounding(result, kind))
    condition = "true" if "true" in result["conditions"] else "generated"
    best, hit, chance = best_row(result, condition, kind, cls)
    cell = result["conditions"][condition][kind][best][cls]
    rand = result["conditions"][condition][kind][RANDOM][cls]
    which = "true" if condition == "true" else "own"
    print(f"\nbest for {cls} words by hit ({which} captions, {'masks' if kind == 'mask' else 'boxes'}): {best}, hit {hit:.1%} "
          f"(chance {chance:.1%}), touch {cell['touch']:.1%} (chance {rand['touch']:.1%}), mass {cell['mass']:.1%} "
          f"(uniform map {rand['mass']:.1%})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grounding",
        help="how often each explanation method's map points at the object a word names (shapes scenes, or your images with boxes)",
    )
    p.add_argument("--model", default="shapes", metavar="NAME", help=f"one of {', '.join(model_names())} (default shapes); a file of your own: --checkpoint PATH")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="score this checkpoint instead of a named model")
    p.add_argument("--n", type=int, default=None, help=f"shapes scenes to score (default {DEFAULT_N}; the eval split, held out from training)")
    p.add_argument("--seed", type=int, default=None, help="which eval scenes (default 0)")
    p.add_argument("--regions", choices=("mask", "box"), default=None, help="shapes: score against object masks (default) or their boxes")
    p.add_argument("--images", default=None, metavar="DIR", help="your own images (with --boxes)")
    p.add_argument("--boxes", default=None, metavar="FILE.json", help="COCO-style boxes of the objects in --images (layout: attnlab.explain.boxes; docs/explanations.md)")
    p.add_argument("--synonyms", default=None, metavar="FILE.json", help='caption words naming categories: {"puppy": ["dog"]}')
    p.add_argument("--batch-size", type=int, default=50, help="images per batch (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.set_defaults(func=cmd_grounding)
