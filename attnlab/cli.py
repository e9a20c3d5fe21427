"""The ``attnlab`` command line: ``caption``, ``demo``, ``train``, ``evaluate``.

Errors a user can fix are printed as one line, ``attnlab: error: ...``, on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import AttnlabError


def _error(message: str) -> None:
    print(f"attnlab: error: {message}", file=sys.stderr)


def write_outputs(trace, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.npz`` (the trace) and ``<stem>.png`` (the word grid); both or neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # "from . import plot" would go through attnlab.__getattr__("plot"), which does the same
    # import again and recurses until RecursionError while attnlab.plot is not yet imported
    from .plot import save_figure, word_grid

    npz = out_dir / f"{stem}.npz"
    png = out_dir / f"{stem}.png"
    written: list[Path] = []
    try:
        written.append(trace.save(npz))
        fig = word_grid(trace)
        try:
            written.append(save_figure(fig, png))
        finally:
            plt.close(fig)
    except BaseException as exc:
        for p in written:
            p.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, read-only folder, ...: one line, not a traceback
            reason = exc.strerror or type(exc).__name__
            raise AttnlabError(f"cannot write {npz.name} and {png.name} in {out_dir} ({reason}): choose a folder you can write to") from None
        raise
    return written


def _check_out_dir(out_dir: Path) -> None:
    """Fail before any work when ``--out`` cannot become a folder (nothing is created here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AttnlabError(f"--out {out_dir} is a file: give a folder")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AttnlabError(f"--out {out_dir} cannot be a folder: {existing} is a file; give another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AttnlabError(f"--out {out_dir}: {existing} is not writable; give a folder you can write to")


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """File stems for the outputs; repeated stems get ``-2``, ``-3`` ... suffixes."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def cmd_caption(args: argparse.Namespace) -> int:
    from .decode import caption
    from .hub import load_model

    if args.model and args.checkpoint:
        raise AttnlabError("give --model or --checkpoint, not both")
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        _check_out_dir(out_dir)  # before the (slow) model load
    model = load_model(args.model, checkpoint=args.checkpoint, vocab=args.vocab, device=args.device)
    failures = 0
    results = []
    for image, stem in zip(args.images, _unique_stems(args.images)):
        try:
            trace = caption(model, image, max_len=args.max_len, mode=args.mode)
            files = [str(p) for p in write_outputs(trace, out_dir, stem)] if out_dir is not None else []
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

    p = sub.add_parser("caption", help="caption images; with --out, write each trace (.npz) and word grid (.png)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default=None, help="shapes (default, bundled), catr-v1, catr-v2, catr-v3")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="a CATR checkpoint of your own")
    p.add_argument("--vocab", default=None, metavar="PATH", help="vocab.txt for --checkpoint")
    p.add_argument("--max-len", type=int, default=None, metavar="N", help="most tokens to generate")
    p.add_argument("--mode", choices=("incremental", "template"), default="incremental")
    p.add_argument("--out", default=None, metavar="DIR", help="write <stem>.npz and <stem>.png here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_caption)

    from .shapes.cli import add_commands  # demo, train, evaluate live with the shapes world

    add_commands(sub)
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
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
