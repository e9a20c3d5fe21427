"""Command-line parts that belong to the shapes world: ``demo``, ``train``, ``evaluate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import outputs
from ..errors import AttnlabError
from ..fileio import remove_stale_temps
from .model import MODELS
from .train import TrainConfig

DEFAULT_DEMO_DIR = "attnlab-demo"


def sample_images() -> list[Path]:
    """The sample images shipped inside the package (``attnlab/samples``, the same from a checkout or a wheel), sorted by name."""
    from ..samples import sample_paths

    return sample_paths()


def cmd_demo(args: argparse.Namespace) -> int:
    from ..decode import caption
    from ..hub import load_model
    from .scenes import make_scenes

    out = Path(args.out)
    outputs.check_out_dir(out)
    images: list[object] = [str(p) for p in sample_images()]
    sources = [outputs.Source.of_path(p) for p in images]
    if not images:  # an installed wheel has no data/ folder: draw fresh scenes instead
        scenes = make_scenes(4, seed=7, split="eval")
        images = [s.image for s in scenes]
        sources = [outputs.Source.of_array(f"scene-{i}.png", s.image, f"attnlab demo: eval scene {i} of seed 7") for i, s in enumerate(scenes)]
    plans = outputs.plan_outputs(sources, out)
    outputs.check_plan(plans, overwrite=args.overwrite)  # before the model load
    remove_stale_temps(out)
    model = load_model(args.model)
    print(f"attnlab demo: model {model.spec.name!r}, {len(images)} images -> {out}/")
    for image, plan in zip(images, plans):
        trace = caption(model, image)
        outputs.write_outputs(trace, plan, overwrite=args.overwrite)
        print(f"  {plan.stem}: {trace.caption}")
    print(f"wrote <name>{outputs.FIGURE_SUFFIX} (word grid) and <name>{outputs.TRACE_SUFFIX} (trace) per image into {out}/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = TrainConfig(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, model=args.model
    )
    result = train(args.out, minutes=args.minutes, cfg=cfg, resume=args.resume, init=args.init, overwrite=args.overwrite)
    print(
        f"trained {result['steps']} steps in {result['seconds'] / 60:.1f} min; "
        f"last batch: loss {result['loss']:.4f}, token accuracy {result['token_accuracy']:.3f}; wrote {result['out']}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..hub import load_model
    from .evaluate import evaluate, format_report

    if args.n < 1:
        raise AttnlabError("--n must be at least 1")
    model = load_model(None if args.checkpoint else args.model, checkpoint=args.checkpoint)
    print(format_report(evaluate(model, n=args.n, seed=args.seed, criterion=args.criterion)))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="caption the sample images with the bundled model and write the figures (offline)")
    p.add_argument("--out", default=DEFAULT_DEMO_DIR, metavar="DIR", help=f"output folder (default {DEFAULT_DEMO_DIR})")
    p.add_argument("--model", default=None, help="model name (default: the bundled shapes model)")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that attnlab did not write for the same image")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the shapes captioner on generated scenes")
    p.add_argument("world", choices=("shapes",))
    p.add_argument("--model", choices=tuple(MODELS), default="catr", help="architecture: catr (CNN, default) or cptr (timm ViT)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes (at a step boundary)")
    p.add_argument("--steps", type=int, default=3000, help="length of the schedule (default 3000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="shapes.pt", metavar="PATH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from PATH.train")
    p.add_argument("--init", default=None, metavar="CKPT", help="fine-tune from this shapes checkpoint (new schedule)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help=f"peak learning rate (default {TrainConfig.lr})")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="warm-up steps")
    p.add_argument("--overwrite", action="store_true", help="replace PATH or PATH.train even when training did not write them")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="caption accuracy and pointing game on held-out scenes")
    p.add_argument("world", choices=("shapes",))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="eval-split seed (held out from training)")
    p.add_argument("--model", choices=("shapes", "shapes-cptr"), default="shapes", help="which bundled model (default shapes)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="evaluate this checkpoint (either kind) instead of a bundled one")
    p.add_argument("--criterion", choices=("touch", "hit"), default="touch",
                   help="pointing game: touch (default) = the peak patch overlaps the object; hit = its centre is inside")
    p.set_defaults(func=cmd_evaluate)
