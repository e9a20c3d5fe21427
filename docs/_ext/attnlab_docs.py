"""Sphinx hooks of attnlab's documentation site.

``architecture``: the page shows the repository's ``ARCHITECTURE.md`` when the
checkout has one (relative links into the repository become plain text, since
the site holds no source files), and otherwise says where it will appear.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- attnlab-docs: ARCHITECTURE.md -->"
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((?!https?://|mailto:|#)[^)\s]+\)")


def architecture_text(root: Path = ROOT) -> str:
    """The text that replaces :data:`MARKER`: ARCHITECTURE.md, or a line saying it is absent."""
    path = root / "ARCHITECTURE.md"
    if not path.is_file():
        return "The repository's `ARCHITECTURE.md` is not part of this checkout yet; this page shows it once it is."
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"\A\s*#\s[^\n]*\n", "", text)  # its title: the page has its own
    return _LINK.sub(r"\1", text)


def _source_read(app, docname: str, source: list[str]) -> None:
    if MARKER in source[0]:
        source[0] = source[0].replace(MARKER, architecture_text())


def setup(app):
    app.connect("source-read", _source_read)
    app.add_config_value("attnlab_root", str(ROOT), "env")
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
