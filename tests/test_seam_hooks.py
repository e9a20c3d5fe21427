"""The seam's hooks for vision-language captioners, tested on the bundled model through a thin wrapper:
a list of end tokens (``spec.end_tokens``), per-image ``Encoded.meta`` in the trace, ``caption(prompt=)``."""

from __future__ import annotations

import dataclasses

import pytest

import attnlab
from attnlab.captioner import Encoded


class _Wrapped:
    """The bundled captioner with another spec and, optionally, per-image meta from begin()."""

    def __init__(self, inner, spec, meta=None, asked=None):
        self.inner, self.spec, self._meta, self.asked = inner, spec, meta, asked

    def begin(self, pixels, record):
        enc = self.inner.begin(pixels, record)
        meta = None if self._meta is None else [dict(self._meta) for _ in pixels]
        return Encoded(enc.state, enc.grids, enc.encoder_attention, enc.layouts, meta)

    def step(self, state, ids, record):
        return self.inner.step(state, ids, record)


@pytest.fixture(scope="module")
def model():
    return attnlab.load_model()


@pytest.fixture(scope="module")
def plain(model):
    return attnlab.caption(model, attnlab.sample_path("scene-0.png"))


def test_a_listed_end_token_ends_the_caption_like_eos(model, plain):
    ids = list(plain.token_ids)
    stop = int(ids[2])  # the third token the model writes ("red" on scene-0)
    assert stop != model.spec.eos and stop not in ids[:2]
    cap = _Wrapped(model, dataclasses.replace(model.spec, end_tokens=(stop,)))
    greedy = attnlab.caption(cap, attnlab.sample_path("scene-0.png"))
    assert list(greedy.token_ids) == ids[:3] and greedy.stopped == "end"
    beam = attnlab.caption(cap, attnlab.sample_path("scene-0.png"), beams=2)
    assert beam.stopped == "end" and beam.token_ids[-1] in (stop, model.spec.eos)


def test_end_tokens_must_be_whole_numbers(model):
    with pytest.raises(attnlab.AttnlabError, match="end_tokens must be a tuple of integers"):
        dataclasses.replace(model.spec, end_tokens=[3])


def test_begins_meta_reaches_each_trace(model, plain):
    cap = _Wrapped(model, model.spec, meta={"prompt": "Describe this image."})
    traces = attnlab.caption(cap, [attnlab.sample_path("scene-0.png"), attnlab.sample_path("scene-1.png")])
    assert [t.meta["prompt"] for t in traces] == ["Describe this image."] * 2
    assert list(traces[0].token_ids) == list(plain.token_ids)


def test_a_prompt_for_a_captioner_without_one_is_one_line(model):
    with pytest.raises(attnlab.AttnlabError, match="prompt= and raw_prompt= are for vision-language captioners") as err:
        attnlab.caption(model, attnlab.sample_path("scene-0.png"), prompt="What colour is the cross?")
    assert "\n" not in str(err.value)
