"""The ``attnlab`` command line: ``caption``, ``demo``, ``train``, ``evaluate``, ``grounding``.

Errors a user can fix are printed as one line, ``attnlab: error: ...``, on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import outputs
from .errors import AttnlabError
from .fileio import remove_stale_temps


def _error(message: str) -> None:
    print(f"attnlab: error: {message}", file=sys.stderr)


def cmd_caption(args: argparse.Namespace) -> int:
    from .decode import caption
    from .hub import load_model

    if args.model and args.checkpoint:
        raise AttnlabError("give --model or --checkpoint, not both")
    plans: list[outputs.Planned | None] = [None] * len(args.images)
    if args.out:  # every check before the (slow) model load
        out_dir = Path(args.out)
        outputs.check_out_dir(out_dir)
        plans = outputs.plan_outputs([outputs.Source.of_path(p) for p in args.images], out_dir)
        outputs.check_plan(plans, overwrite=args.overwrite)
        remove_stale_temps(out_dir)
    model = load_model(args.model, checkpoint=args.checkpoint, vocab=args.vocab, device=args.device)
    failures = 0
    results = []
    for image, plan in zip(args.images, plans):
        try:
            trace = caption(model, image, max_len=args.max_len, mode=args.mode)
            bad = trace.nonfinite()
            if bad:
                written = "; nothing written" if plan is not None else ""
                raise AttnlabError(f"{image}: the model's {', '.join(bad)} hold NaN or infinite values (its weights may be broken){written}")
            files = [str(p) for p in outputs.write_outputs(trace, plan, overwrite=args.overwrite)] if plan is not None else []
        except AttnlabError as exc:
            failures += 1
            _error(str(exc))
            results.append({"image": image, "error": str(exc)})
            continue
        results.append(
            {
                "image": image,
                "caption": trace.caption,
                "tokens": trace.token_ids.tolist(),
                "words": trace.words,
                "grid": list(trace.grid),
                "files": files,
            }
        )
        if not args.json:
            print(f"{image}: {trace.caption}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Caption images and see where the model looks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption images; with --out, write each trace (.npz) and word grid (.attn.png)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default=None, help="shapes (default, bundled), catr-v1, catr-v2, catr-v3")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="a CATR checkpoint of your own")
    p.add_argument("--vocab", default=None, metavar="PATH", help="vocab.txt for --checkpoint")
    p.add_argument("--max-len", type=int, default=None, metavar="N", help="most tokens to generate")
    p.add_argument("--mode", choices=("incremental", "template"), default="incremental")
    p.add_argument("--out", default=None, metavar="DIR", help="write <stem>.npz (trace) and <stem>.attn.png (word grid) here")
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that attnlab did not write for the same image")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_caption)

    from .shapes.cli import add_commands  # demo, train, evaluate live with the shapes world

    add_commands(sub)
    from .explain.cli import add_commands as add_grounding

    add_grounding(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"attnlab: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warning  # restored when the block ends
            return int(args.func(args) or 0)
    except AttnlabError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt as exc:
        _error(f"interrupted{': ' + str(exc) if str(exc) else ''}")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
