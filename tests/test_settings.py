"""The one decode path (issue 20): the checked settings object, the key layout, the one
assembler, ``util.evaluating``, and explanation methods as objects in one registry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import attnlab
from attnlab import AttnlabError
from attnlab.batch import plan_run, run_plan, run_settings
from attnlab.decode import decode_batch
from attnlab.explain import kinds
from attnlab.explain.kinds import KINDS, Method, MethodKind
from attnlab.explain.methods import METHODS
from attnlab.keys import KeyLayout
from attnlab.preprocess import prepare_for
from attnlab.settings import DecodeSettings, decode_settings
from attnlab.util import evaluating
from test_decode import CFG, image, make_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    return make_model()


# --------------------------------------------------------------------------- settings
def test_settings_are_checked_once_into_a_frozen_object(model):
    spec = model.spec
    s = decode_settings(spec, max_len=np.int64(3), beams=np.int32(2), length_penalty=0)
    assert (s.max_len, s.beams, s.length_penalty, s.record, s.mode, s.tokens) == (3, 2, 0.0, "cross", "incremental", None)
    assert type(s.max_len) is int and type(s.beams) is int and type(s.length_penalty) is float
    assert decode_settings(spec).max_len == CFG.max_positions - 1 == spec.max_len
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_len = 5  # type: ignore[misc]
    forced = decode_settings(spec, tokens=[3, 4, 2], n_images=2)
    assert forced.tokens == ((3, 4, 2), (3, 4, 2)) and forced.forced == [[3, 4, 2], [3, 4, 2]] and forced.steps == 3
    cases = [
        (dict(max_len=0), "max_len must be an integer from 1 to"),
        (dict(beams=0), "beams must be an integer from 1 to 64"),
        (dict(length_penalty=-1), "length_penalty must be a finite number >= 0"),
        (dict(mode="beam"), "mode must be 'incremental' or 'template'"),
        (dict(record="some"), "record must be 'none', 'cross' or 'all'"),
        (dict(tokens=[[3], [4]], n_images=3), "tokens gives 2 captions for 3 images"),
        (dict(tokens=[3, 2], beams=2), "beam search (beams > 1) has nothing to choose"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AttnlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
            decode_settings(spec, **kwargs)


def test_decode_batch_takes_settings_and_gives_what_caption_gives(model):
    spec = model.spec
    alone = attnlab.caption(model, [image(0), image(1)], max_len=4, record="all")
    pixels, shown = prepare_for([image(0), image(1)], spec)
    settings = decode_settings(spec, max_len=4, record="all", n_images=2)
    got = decode_batch(model, pixels, shown, settings=settings)
    for a, b in zip(alone, got):
        assert a.token_ids.tolist() == b.token_ids.tolist() and len(b.token_ids) <= 4
        np.testing.assert_array_equal(a.cross_attention, b.cross_attention)
        np.testing.assert_array_equal(a.decoder_self_attention, b.decoder_self_attention)
    with pytest.raises(AttnlabError, match="takes settings= or the separate arguments"):
        decode_batch(model, pixels, shown, settings=settings, beams=2)
    with pytest.raises(AttnlabError, match="tokens gives 1 captions for 2 images"):
        decode_batch(model, pixels, shown, settings=decode_settings(spec, tokens=[[3, 2]], n_images=1))


def test_batch_run_settings_keep_the_keys_that_old_traces_recorded(model):
    """A rerun skips an image only when meta["run"] is equal: the dict of the settings must keep its keys."""
    old = {"model": "tiny-test", "mode": "incremental", "max_len": 5, "beams": 2, "length_penalty": 0.5, "half": True}
    got = run_settings(model, max_len=5, beams=2, length_penalty=0.5, half=True)
    weights = got.pop("weights")
    assert got == old and isinstance(weights, str) and len(weights) == 16
    assert DecodeSettings(5, 2, 0.5).as_dict() == {"mode": "incremental", "max_len": 5, "beams": 2, "length_penalty": 0.5}


def test_library_errors_name_library_arguments(model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(image(0)).save(folder / "a.png")
    plan = plan_run([str(folder)], tmp_path / "out")
    for kwargs, message in ((dict(batch_size=0), "batch_size must be a whole number >= 1, not 0"),
                            (dict(batch_size=True), "batch_size must be a whole number >= 1, not True"),
                            (dict(workers=-1), "workers must be a whole number >= 0")):
        with pytest.raises(AttnlabError) as err:
            run_plan(model, plan, progress=False, **kwargs)
        assert str(err.value).startswith(message) and "--" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


# --------------------------------------------------------------------------- key layout
def test_key_layout_splits_rows_of_arrays_and_tensors_alike():
    rng = np.random.default_rng(0)
    rows = rng.random((2, 3, 5, 2 + 6 + 4))  # (layers, heads, steps, K): 2 prefix, 2 x 3 patches, 4 padding
    layout = KeyLayout(2, (2, 3))
    prefix, maps = layout.split(rows, padded=True)
    want = np.empty((2, 3, 5, 2, 3))
    for r in range(2):
        for c in range(3):
            want[..., r, c] = rows[..., 2 + r * 3 + c]  # patch (r, c) is key prefix + r * w + c
    np.testing.assert_array_equal(maps, want)
    np.testing.assert_array_equal(prefix, rows[..., :2])
    np.testing.assert_array_equal(layout.share(rows, padded=True), rows[..., 0] + rows[..., 1])
    t_prefix, t_maps = layout.split(torch.from_numpy(rows), padded=True)
    np.testing.assert_array_equal(t_maps.numpy(), want)
    np.testing.assert_array_equal(t_prefix.numpy(), rows[..., :2])
    with pytest.raises(AttnlabError, match="rows of 12 keys do not fit 2 prefix tokens \\+ a 2 x 3 grid"):
        layout.split(rows)  # padding is refused unless said
    assert KeyLayout(0, (2, 3)).share(rows[..., :6]) is None and layout.keys == 8


# --------------------------------------------------------------------------- evaluating
def test_evaluating_restores_every_submodules_flag_also_on_errors():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    net.train()
    net[1].eval()  # a frozen-dropout submodule inside a training model
    before = [m.training for m in net.modules()]
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before == [True, True, False, True, True]
    with pytest.raises(RuntimeError), evaluating(net):
        raise RuntimeError("inside")
    assert [m.training for m in net.modules()] == before
    net.eval()
    with evaluating(net):
        pass
    assert not any(m.training for m in net.modules())


def test_evaluating_a_wrapper_restores_its_inner_modules_flags():
    class Wrapper:  # a captioner that is not a module but holds one (as attnlab.wrap's does)
        def __init__(self) -> None:
            self.model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))

        @property
        def training(self) -> bool:
            return self.model.training

        def train(self, mode: bool = True):
            self.model.train(mode)
            return self

        def eval(self):
            return self.train(False)

    w = Wrapper()
    w.train()
    w.model[1].eval()
    with evaluating(w):
        assert not any(m.training for m in w.model.modules())
    assert [m.training for m in w.model.modules()] == [True, True, False]


def test_decoding_restores_a_submodules_own_flag(model):
    model.train()
    model.transformer.eval()  # the user froze one part
    try:
        attnlab.caption(model, image(0), max_len=1)
        attnlab.explain(model, image(0), "grad_attn", max_len=1)
        assert model.training and not model.transformer.training and model.backbone.training
    finally:
        model.eval()


# --------------------------------------------------------------------------- method registry
def test_labels_and_quantities_of_the_registered_methods():
    assert METHODS == ("raw", "layer_mean", "best_head", "rollout", "chefer_rollout", "grad_attn", "relevance", "contrast")
    assert Method("raw", 1, None).label == "raw attention, layer 1, mean of heads"
    assert Method("raw", 0, 2).label == "raw attention, layer 0, head 2"
    assert Method("best_head", 1, 3).label == "best head (layer 1, head 3)"
    assert Method("grad_attn", 1).label == "grad x attention (layer 1)"
    assert Method("relevance").quantity == "share of relevance" and Method("layer_mean").quantity == "attention weight"
    keys = [KINDS[m.name].key(m) for m in (Method("raw", 1), Method("best_head", 1, 2), Method("grad_attn", 1), Method("rollout"))]
    assert keys == ["raw, layer 1", "best_head (L1 H2)", "grad_attn (L1)", "rollout"]
    assert [n for n, k in KINDS.items() if k.gradients] == ["grad_attn", "relevance"]


def test_a_new_method_is_one_new_object(model, monkeypatch):
    """Registering one MethodKind makes explain() take it: its rows, label and quantity reach the trace."""

    def uniform(rec, b, cross, m):  # (T, K): the same weight on every key
        return np.full(cross.shape[2:], 1.0 / cross.shape[-1])

    flat = MethodKind("flat", lambda m: "the flat map", "share of nothing", rows=uniform)
    monkeypatch.setitem(kinds.KINDS, "flat", flat)
    trace = attnlab.explain(model, image(0), "flat", tokens=[3, 4, 2])
    h, w = trace.grid
    np.testing.assert_allclose(trace.cross_attention, 1.0 / (h * w), rtol=1e-6)  # no prefix keys in CATR
    assert trace.cross_attention.shape == (1, 1, 3, h, w)
    assert (trace.meta["method"], trace.meta["method_label"], trace.meta["quantity"]) == ("flat", "the flat map", "share of nothing")
    with pytest.raises(AttnlabError, match="uses every layer and head"):
        attnlab.explain(model, image(0), "flat", layer=0)


def test_explanation_run_is_decodings_teacher_forced_loop(model):
    """explain's recording (decode.greedy_steps with autograd on) gives caption(tokens=)'s logits and raw maps."""
    ids = [[3, 4, 10, 2], [5, 2]]
    traced = attnlab.caption(model, [image(0), image(1, 40, 64)], tokens=ids)
    raw = attnlab.explain(model, [image(0), image(1, 40, 64)], "raw", tokens=ids)
    for t, e in zip(traced, raw):
        np.testing.assert_allclose(e.logits, t.logits, atol=1e-5)
        np.testing.assert_allclose(e.cross_attention[0, 0], t.cross_attention[-1].mean(axis=0), atol=1e-6)


def test_the_grounding_table_rows_come_from_the_registry(model):
    from types import SimpleNamespace

    from attnlab.explain.grounding import method_key, table_methods

    want = [Method("raw", 0), Method("raw", 1), Method("layer_mean"), Method("rollout"), Method("chefer_rollout"),
            Method("grad_attn", 1), Method("relevance")]  # the tiny model has 2 decoder layers and no best-head record
    assert table_methods(model) == want
    recorded = [m for k in KINDS.values() for m in k.table_methods(3, SimpleNamespace(best_head=(1, 2)))]
    assert recorded[:5] == [Method("raw", 0), Method("raw", 1), Method("raw", 2), Method("layer_mean"), Method("best_head", 1, 2)]
    assert [method_key(m) for m in recorded][-5:] == ["rollout", "chefer_rollout", "grad_attn (L2)", "relevance", "contrast"]
