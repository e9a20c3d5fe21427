"""Run the Python examples of a Markdown page (README.md, docs/*.md) and check what they show.

The convention (also on the docs site's "About these pages"):

* Every fenced ```` ```python ```` block of a page runs, in page order, in one
  namespace per page, in a fresh temporary working directory.
* A line that ends with ``# -> VALUE`` shows a value: the statement ending on
  that line must be an expression, and ``repr()`` of its value must equal
  ``VALUE``; for a ``print(...)`` call, what it printed (without the last
  newline) must. ``...`` inside ``VALUE`` matches any text (as doctest's
  ELLIPSIS). Any other comment is prose and is not checked.
* A block right after a line ``<!-- not run: REASON -->`` is not run (it needs
  the network or a GPU); the reason is required.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->\s*$")
SHOWS = "# ->"


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the block's first code line
    code: str
    not_run: str | None  # the reason, for a block marked "not run"


class ExampleError(AssertionError):
    """An example failed or shows a value its code does not give."""


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        if "not run" in before and not (reason and reason.group(1)):
            raise ExampleError(f"{path.name}:{line - 1}: a 'not run' mark needs a reason: <!-- not run: REASON -->")
        found.append(Block(path.name, line, m.group(1), reason.group(1) if reason else None))
    return found


def _shown(code: str) -> dict[int, str]:
    """Line number (1-based, in the block) -> the VALUE of its ``# -> VALUE`` comment."""
    shown = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(SHOWS):
            shown[tok.start[0]] = tok.string[len(SHOWS) :].strip()
    return shown


def matches(expected: str, got: str) -> bool:
    """``expected`` equals ``got``, each ``...`` in it standing for any text."""
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, got, flags=re.S) is not None


def _is_print(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "print"
    )


def run_block(block: Block, namespace: dict) -> int:
    """Run one block in ``namespace``; returns how many shown values it checked."""
    where = f"{block.page}, the block at line {block.line}"
    tree = ast.parse(block.code, filename=where)
    shown = _shown(block.code)
    ends = {node.end_lineno: node for node in tree.body}
    for lineno in shown:
        if not isinstance(ends.get(lineno), ast.Expr):
            raise ExampleError(f"{block.page}:{block.line + lineno - 1}: '# ->' must end an expression statement")
    for node in tree.body:
        ast.increment_lineno(node, block.line - 1)
        lineno = node.end_lineno - block.line + 1
        if lineno not in shown or ends[lineno] is not node:  # of `a; b  # -> v` only b shows v
            exec(compile(ast.Module([node], type_ignores=[]), block.page, "exec"), namespace)
            continue
        expected, out = shown[lineno], io.StringIO()
        with contextlib.redirect_stdout(out):
            value = eval(compile(ast.Expression(node.value), block.page, "eval"), namespace)
        got = out.getvalue().removesuffix("\n") if _is_print(node) else repr(value)
        if _is_print(node):
            print(got)
        if not matches(expected, got):
            raise ExampleError(
                f"{block.page}:{block.line + lineno - 1}: the page shows {expected}, the code gives {got}"
            )
    return len(shown)


def run_page(path: Path) -> tuple[int, int, list[Block]]:
    """Run every block of a page in order (cwd is the caller's); (blocks run, values checked, not run)."""
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__docs_example__"}
    ran = checked = 0
    skipped = []
    try:
        for block in blocks(path):
            if block.not_run:
                skipped.append(block)
                continue
            checked += run_block(block, namespace)
            ran += 1
    finally:
        plt.close("all")
    return ran, checked, skipped
