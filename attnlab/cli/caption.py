"""``attnlab caption`` (images one by one, folders and glob patterns) and ``attnlab demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import outputs
from ..errors import AttnlabError
from ..fileio import remove_stale_temps
from ..hub import MODELS
from .messages import print_error

DEFAULT_DEMO_DIR = "attnlab-demo"


_BATCH_ONLY = ("batch_size", "workers", "shard", "figures")


def cmd_caption(args: argparse.Namespace) -> int:
    from ..batch import is_pattern
    from ..hub import check_device

    if args.model and args.checkpoint:
        raise AttnlabError("give --model or --checkpoint, not both")
    check_device(args.device)
    if any(is_pattern(a) for a in args.images):
        return _caption_many(args)
    given = [f"--{name.replace('_', '-')}" for name in _BATCH_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise AttnlabError(
            f"{', '.join(given)} work on a folder or a glob pattern (attnlab caption photos/ --out DIR, or quote the "
            "pattern: 'photos/*.jpg'); images named one by one are captioned one by one"
        )
    return _caption_files(args)


def _caption_many(args: argparse.Namespace) -> int:
    """Folders and glob patterns: batches, worker processes, resume, shards (:mod:`attnlab.batch`)."""
    from ..batch import default_workers, parse_shard, plan_run, run_plan
    from ..settings import check_beams
    from ..hub import load_model

    if not args.out:
        raise AttnlabError("a folder or glob pattern needs --out DIR (one trace per image goes there)")
    if args.json:
        raise AttnlabError("--json is for images named one by one; a folder run lists its captions in DIR/captions.jsonl")
    shard = parse_shard(args.shard) if args.shard else (1, 1)
    batch_size = 8 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise AttnlabError(f"--batch-size must be a whole number >= 1, not {batch_size}")
    if args.workers is not None and args.workers < 0:
        raise AttnlabError(f"--workers must be a whole number >= 0 (0: read images in the main process), not {args.workers}")
    check_beams(args.beams, args.length_penalty)
    plan = plan_run(args.images, args.out, shard=shard, figures=args.figures, overwrite=args.overwrite, html=args.html)  # before the model load
    model = load_model(args.model, checkpoint=args.checkpoint, vocab=args.vocab, device=args.device)
    workers = default_workers() if args.workers is None else args.workers
    where = "" if shard == (1, 1) else f" (shard {shard[0]} of {shard[1]}: {len(plan.plans)} of {plan.total})"
    print(f"attnlab: {len(plan.plans)} images{where} -> {plan.out}/ with {model.spec.name!r} on {args.device}, "
          f"batch size {batch_size}, {workers} worker{'s' if workers != 1 else ''}", file=sys.stderr)  # fmt: skip
    report = run_plan(
        model, plan, batch_size=batch_size, workers=workers, max_len=args.max_len, beams=args.beams,
        length_penalty=args.length_penalty, half=args.half, mode=args.mode,
    )  # fmt: skip
    rate = report.captioned / report.seconds if report.seconds > 0 else 0.0
    print(
        f"captioned {report.captioned} images in {report.seconds:.1f} s ({rate:.1f} images/s); "
        f"{report.skipped} done earlier (skipped); {report.failed} errors; captions: {report.captions}"
    )
    if report.interrupted:
        done = report.captioned + report.skipped
        print_error(f"interrupted: {done} of {report.total} images are done; run the same command again to resume (finished images are skipped)")
        return 130
    if report.failed:
        print_error(f"{report.failed} images could not be captioned: see {report.errors} (one JSON line each, with the reason)")
        return 1
    return 0


def _caption_files(args: argparse.Namespace) -> int:
    """Images named one by one (outputs named by their stems, see :mod:`attnlab.outputs`)."""
    from ..batch import as_half
    from ..confidence import caption_notes, caption_summary
    from ..decode import caption
    from ..hub import load_model

    if args.html and not args.out:
        raise AttnlabError("--html writes a web page per image into --out DIR: give --out")
    plans: list[outputs.Planned | None] = [None] * len(args.images)
    if args.out:  # every check before the (slow) model load
        out_dir = Path(args.out)
        outputs.check_out_dir(out_dir)
        plans = outputs.plan_outputs([outputs.Source.of_path(p) for p in args.images], out_dir)
        outputs.check_plan(plans, overwrite=args.overwrite, html=args.html)
        remove_stale_temps(out_dir)
    model = load_model(args.model, checkpoint=args.checkpoint, vocab=args.vocab, device=args.device)
    failures = 0
    results = []
    for image, plan in zip(args.images, plans):
        try:
            trace = caption(model, image, max_len=args.max_len, mode=args.mode, beams=args.beams, length_penalty=args.length_penalty)
            if args.half:
                trace = as_half(trace)
            bad = trace.nonfinite()
            if bad:
                written = "; nothing written" if plan is not None else ""
                raise AttnlabError(f"{image}: the model's {', '.join(bad)} hold NaN or infinite values (its weights may be broken){written}")
            files = [str(p) for p in outputs.write_outputs(trace, plan, overwrite=args.overwrite, html=args.html)] if plan is not None else []
        except AttnlabError as exc:
            failures += 1
            print_error(str(exc))
            results.append({"image": image, "error": str(exc)})
            continue
        summary = caption_summary(trace)
        results.append(
            {
                "image": image,
                "caption": trace.caption,
                "tokens": trace.token_ids.tolist(),
                "words": trace.words,
                "grid": list(trace.grid),
                "files": files,
                **summary,
            }
        )
        if not args.json:
            print(f"{image}: {trace.caption}{caption_notes(summary, trace.steps)}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failures else 0


def sample_images() -> list[Path]:
    """The sample images shipped inside the package (``attnlab/samples``, the same from a checkout or a wheel), sorted by name."""
    from ..samples import sample_paths

    return sample_paths()


def cmd_demo(args: argparse.Namespace) -> int:
    from ..decode import caption
    from ..hub import load_model
    from ..shapes.scenes import make_scenes

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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``caption`` and ``demo`` commands."""
    p = sub.add_parser(
        "caption",
        help="caption images, folders or glob patterns; with --out, write each trace (.npz) and word grid (.attn.png)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE|DIR|GLOB")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"one of {', '.join(MODELS)} (default shapes, bundled; shapes-cptr is bundled too; catr-v1..v3 are "
                        "downloaded once; catr and cptr need --checkpoint)")  # fmt: skip
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint of your own: attnlab's (CATR-style or CPTR, from attnlab train) or a published CATR one")
    p.add_argument("--vocab", default=None, metavar="PATH", help="vocab.txt for --checkpoint")
    p.add_argument("--max-len", type=int, default=None, metavar="N", help="most tokens to generate")
    p.add_argument("--mode", choices=("incremental", "template"), default="incremental")
    p.add_argument("--out", default=None, metavar="DIR", help="write <stem>.npz (trace) and <stem>.attn.png (word grid) here")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that attnlab did not write for the same image")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON (with how each caption stopped, per-token probabilities, the beam score)")
    p.epilog = ("A caption cut at --max-len without the end token is marked [cut at the length limit ...]; one with tokens "
                "written at probability below 0.5 (no token had a majority) is marked [unsure: ...].")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (traces are stored on the CPU either way)")
    p.add_argument("--beams", type=int, default=1, metavar="K", help="beam search with K hypotheses per image (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="A",
                   help="beam search ranks captions by sum(log p) / length**A (default 1)")  # fmt: skip
    p.add_argument("--half", action="store_true", help="store attention maps as float16 (half the size, ~5e-4 precision)")
    p.add_argument("--html", action="store_true", help="with --out: also write each image's explorer as one offline web page (<name>.html)")
    g = p.add_argument_group("folders and glob patterns")
    g.add_argument("--batch-size", type=int, default=None, metavar="B", help="images decoded together (default 8)")
    g.add_argument("--workers", type=int, default=None, metavar="W", help="processes that read and resize images (default: a quarter of the cores, 1 to 4)")
    g.add_argument("--shard", default=None, metavar="K/N", help="process the K-th of N disjoint slices of the images")
    g.add_argument("--figures", action="store_true", help="also draw each word grid (<name>.attn.png); slower than captioning")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("demo", help="caption the sample images with the bundled model and write the figures (offline)")
    p.add_argument("--out", default=DEFAULT_DEMO_DIR, metavar="DIR", help=f"output folder (default {DEFAULT_DEMO_DIR})")
    p.add_argument("--model", default=None, help="model name (default: the bundled shapes model)")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that attnlab did not write for the same image")
    p.set_defaults(func=cmd_demo)
