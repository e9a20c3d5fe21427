"""The project's own promises: dependencies listed twice agree, README commands are CI's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_every_runtime_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    env = (ROOT / "environment.yml").read_text()
    listed = {_name(m) for m in re.findall(r"^\s*-\s+([A-Za-z0-9_.\-\[\]]+[^\n#]*)$", env, flags=re.M)}
    missing = runtime - listed
    assert not missing, f"environment.yml lacks {sorted(missing)}"
    assert "python=3.11" in env and "-e ." in env


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "attnlab demo" in main_job and "pip install" in main_job
    assert "pytest" in tests and '".[dev,hf]"' in tests  # the Hugging Face tests run too
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run performs the README's test command step by step
    for step in [s.strip() for s in tests.split("&&")]:
        assert step in ci, f".ci/run does not run: {step}"


def test_console_script_points_at_main():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["attnlab"] == "attnlab.cli:main"
    from attnlab.cli import main

    assert callable(main)


PUBLIC_MODULES = [
    "attnlab", "attnlab.plot", "attnlab.rollout", "attnlab.explain", "attnlab.diagnostics", "attnlab.models", "attnlab.shapes",
]  # fmt: skip


def test_docs_name_every_public_name_and_every_command_line_option():
    """The docs site is the manual: the API reference documents each name a module exports (autodoc
    renders it, and the site's build fails on a name it cannot find) and the command-line page names
    each flag of each command."""
    import argparse
    import importlib

    from attnlab.cli import build_parser

    api = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "api").glob("*.md")))
    directive = r"^\.\. auto(?:function|class|data):: (?:[\w.]+\.)?{}$"
    missing = [
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
        if not re.search(directive.format(re.escape(name)), api, flags=re.M)
        and not (name in ("plot", "stats") and f"the module :mod:`attnlab.{name}`" in api)
    ]
    assert not missing, f"the API reference (docs/api/) does not document {missing}"
    cli = (ROOT / "docs" / "cli.md").read_text()
    flags = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            flags.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
    assert len(flags) > 20  # the walk found the subcommands' options
    absent = sorted(f for f in flags if not re.search(rf"{re.escape(f)}\b", cli))
    assert not absent, f"docs/cli.md does not mention the options {absent}"
