"""The shipped student-style model (notebook 05): loads offline, wraps in three lines,
writes WordPiece pieces, and its maps point at the named objects far above chance."""

from __future__ import annotations

import pytest

import attnlab
from attnlab.shapes import CLS_ID, SEP_ID, make_scenes
from attnlab.shapes.evaluate import evaluate
from attnlab.shapes.student import BUNDLED_STUDENT, GRID, STUDENT_VOCAB, encode_pieces, load_student

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def wrapped():
    model = load_student()
    return attnlab.wrap(
        model, encode=model.encode, decode=model.decode, cross_attention="decoder.layers.*.multihead_attn",
        grid=GRID, image_size=128, mean=(0.5,) * 3, std=(0.5,) * 3, bos=CLS_ID, eos=SEP_ID, vocab=STUDENT_VOCAB,
    )  # fmt: skip


def test_student_weights_are_small_and_offline(wrapped):
    assert BUNDLED_STUDENT.stat().st_size <= 2_000_000
    assert wrapped.spec.prefix_tokens == 1  # the ViT's CLS token


def test_student_captions_in_pieces_and_points_above_chance(wrapped):
    result = evaluate(wrapped, n=40, seed=2, encode=encode_pieces)
    assert result["exact"] >= 0.3  # 55% on 300 scenes
    for kind in ("color", "shape"):
        p = result["pointing"][kind]
        assert max(p["layers"]) > 4 * p["random_patch"]
    scene = next(s for s in make_scenes(50, seed=4, split="eval") if "triangle" in s.words)
    trace = attnlab.caption(wrapped, scene.image, tokens=[*encode_pieces(scene.caption), SEP_ID])
    assert "##angle" in trace.words and "triangle" in trace.by_word().words
