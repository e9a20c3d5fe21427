"""One registry of model names (``attnlab.hub.MODELS``): ``load_model``, its "unknown model"
error and the CLI's ``--model`` help all read it, so a new name is one new entry."""

from __future__ import annotations

import argparse

import pytest

import attnlab
from attnlab import AttnlabError, hub
from attnlab.cli import build_parser, main


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return " ".join(next(a.help for a in parser._actions if "--model" in a.option_strings).split())


def test_the_registry_holds_every_name_load_model_knows():
    assert set(hub.MODELS) == {"shapes", "shapes-cptr", "shapes-vlm", "catr-v1", "catr-v2", "catr-v3", "catr", "cptr"}
    assert hub.model_names() == ("shapes", "shapes-cptr", "shapes-vlm", "catr-v1", "catr-v2", "catr-v3")
    assert hub.model_names(with_checkpoint=True) == ("catr", "cptr")
    assert set(hub.CHECKPOINT_URLS) <= set(hub.MODELS)


def test_a_new_entry_loads_and_is_listed_everywhere(monkeypatch, capsys):
    bundled = attnlab.load_model()
    calls = []

    def load(name, vocab):
        calls.append((name, vocab))
        return bundled

    monkeypatch.setitem(hub.MODELS, "shapes-again", hub.NamedModel("the shapes model under a second name", load))
    assert attnlab.load_model("shapes-again") is bundled and calls == [("shapes-again", None)]
    with pytest.raises(AttnlabError) as err:
        attnlab.load_model("nope")
    listed = str(err.value)
    assert all(name in listed for name in hub.MODELS) and "checkpoint=PATH" in listed
    for command in ("caption", "grounding"):
        assert all(name in _help(command) for name in hub.model_names())
        assert "shapes-again" in _help(command)


@pytest.mark.parametrize("name", ["catr", "cptr"])
def test_names_that_need_a_checkpoint_say_so(name):
    with pytest.raises(AttnlabError, match=f"model '{name}' needs checkpoint=PATH"):
        attnlab.load_model(name)


@pytest.mark.parametrize("name", [["shapes"], 3, ""])
def test_names_that_are_not_names_are_one_line_errors(name):
    with pytest.raises(AttnlabError, match="unknown model"):
        attnlab.load_model(name)


def test_cli_unknown_model_lists_the_registry(capsys):
    assert main(["caption", "x.png", "--model", "nope"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(name in err for name in hub.model_names())
