"""The ``attnlab`` command line: ``caption``, ``demo``, ``train``, ``evaluate``, ``grounding``.

Errors a user can fix are printed as one line, ``attnlab: error: ...``, on stderr.
One module per group of commands: :mod:`~attnlab.cli.caption` (caption, demo),
:mod:`~attnlab.cli.train` (train, evaluate), :mod:`~attnlab.cli.grounding`;
:mod:`~attnlab.cli.main` builds the parser and runs a command.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
