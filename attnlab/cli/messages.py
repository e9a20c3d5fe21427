"""How the command line reports: one line per error or warning on stderr, no traceback."""

from __future__ import annotations

import sys


def print_error(message: str) -> None:
    """``attnlab: error: message`` on stderr."""
    print(f"attnlab: error: {message}", file=sys.stderr)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning`` that prints ``attnlab: warning: message`` on stderr."""
    print(f"attnlab: warning: {message}", file=sys.stderr)
