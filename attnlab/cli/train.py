"""``attnlab train`` and ``attnlab evaluate``: the shapes world's commands."""

from __future__ import annotations

import argparse

from ..errors import AttnlabError
from ..shapes.model import MODELS
from ..shapes.train import TrainConfig


def cmd_train(args: argparse.Namespace) -> int:
    from ..shapes.train import train

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
    from ..shapes.evaluate import evaluate, format_report

    if args.n < 1:
        raise AttnlabError("--n must be at least 1")
    model = load_model(None if args.checkpoint else args.model, checkpoint=args.checkpoint)
    if args.model == "shapes-vlm" and not args.checkpoint:  # a VLM replays its own generate: scored on its own captions
        from ..shapes.vlm import VLM_REPORT, evaluate_vlm

        print(format_report(evaluate_vlm(model, n=args.n, seed=args.seed, criterion=args.criterion)).replace(*VLM_REPORT))
        return 0
    print(format_report(evaluate(model, n=args.n, seed=args.seed, criterion=args.criterion)))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``train`` and ``evaluate`` commands."""
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
    p.add_argument("--model", choices=("shapes", "shapes-cptr", "shapes-vlm"), default="shapes",
                   help="which bundled model (default shapes; shapes-vlm: pointing on its own captions)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="evaluate this checkpoint (either kind) instead of a bundled one")
    p.add_argument("--criterion", choices=("touch", "hit"), default="touch",
                   help="pointing game: touch (default) = the peak patch overlaps the object; hit = its centre is inside")
    p.set_defaults(func=cmd_evaluate)
