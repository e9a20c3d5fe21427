"""The ``attnlab`` parser and entry point: each command's module adds its subcommands."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from ..errors import AttnlabError
from . import caption, grounding, train
from .messages import one_line_warning, print_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description="Caption images and see where the model looks.")
    sub = parser.add_subparsers(dest="command", required=True)
    caption.add_commands(sub)  # caption, demo
    train.add_commands(sub)  # train, evaluate (the shapes world)
    grounding.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = one_line_warning  # restored when the block ends
            return int(args.func(args) or 0)
    except AttnlabError as exc:
        print_error(str(exc))
        return 2
    except KeyboardInterrupt as exc:
        print_error(f"interrupted{': ' + str(exc) if str(exc) else ''}")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
