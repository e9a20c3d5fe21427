"""The layering ARCHITECTURE.md describes, checked on the sources: every module imports, no
import circle among attnlab's modules or its packages (lazy imports inside functions
count too: the graph is read with ``ast``, independent of what runs), and no private name
(``_x``) is imported from another module.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attnlab"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(module imported, name taken from it or "", line) for every attnlab import in the file, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "attnlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnlab":
                continue
            for a in node.names:  # "from . import rules" imports the module attnlab.x.rules
                sub = f"{target}.{a.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> modules whose import runs first: the target and each package above it that
    does not hold the importer (a package's own modules import each other while it loads)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in MODULES and step != name and not name.startswith(step + "."):
                    graph[name].add(step)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _unit(module: str) -> str:
    """``attnlab.explain.methods`` -> ``attnlab.explain``: the package (or top module) a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_the_cycle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"attnlab.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name):
    assert importlib.import_module(name).__name__ == name


def test_no_import_circle_among_modules():
    assert _cycles(_graph()) == []


def test_no_import_circle_among_packages():
    units: dict[str, set[str]] = {}
    for name, targets in _graph().items():
        if name == "attnlab":  # the package's front door re-exports from every layer
            continue
        units.setdefault(_unit(name), set()).update(_unit(t) for t in targets if _unit(t) not in (_unit(name), "attnlab"))
    assert _cycles(units) == []


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {taken} from {target}"
        for name, path in MODULES.items()
        for target, taken, line in _imports(name, path)
        if taken.startswith("_") and not taken.startswith("__")
    ]
    assert private == []


# what knows a model class: the models, the adapters, and loading by name
MODEL_LAYER = ("attnlab.models", "attnlab.adapters", "attnlab.hub", "attnlab.checkpoints", "attnlab.config_check")
# what runs on any captioner, and what draws traces: never a model class (ARCHITECTURE.md)
ABOVE_THE_SEAM = ("attnlab.decode", "attnlab.rollout", "attnlab.explain", "attnlab.batch", "attnlab.outputs",
                  "attnlab.stats", "attnlab.plot", "attnlab.explorer")


def test_engines_and_views_never_import_a_model_class():
    graph = _graph()
    found = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if _unit(name) in ABOVE_THE_SEAM
        for target in targets
        if any(target == m or target.startswith(m + ".") for m in MODEL_LAYER)
    ]
    assert found == []
