"""The bundled shapes-cptr model (a timm ViT captioner), its training command and its evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab.models.cptr import CPTR
from attnlab.shapes import COLORS, SEP_ID, SHAPES, encode_caption, make_scenes
from attnlab.shapes.evaluate import evaluate, patch_overlap
from attnlab.shapes.model import MODELS, build_model
from attnlab.shapes.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled() -> CPTR:
    return attnlab.load_model("shapes-cptr")


def test_bundled_cptr_is_small_offline_and_a_vit(bundled):
    path = attnlab.hub.BUNDLED_CPTR
    assert path.stat().st_size <= 10_000_000
    shipped = sum(p.stat().st_size for p in path.parent.glob("*.pt"))
    assert shipped <= 20_000_000, f"all shipped weights together take {shipped / 1e6:.1f} MB"
    assert isinstance(bundled, CPTR) and bundled.name == "shapes-cptr" and not bundled.training
    spec = bundled.spec
    assert spec.prefix_tokens == 1 and spec.resize == "stretch" and spec.image_size == 128
    assert spec.vocab.token(spec.eos) == "[SEP]"
    assert bundled.grid(128, 128) == (8, 8)  # patch 16
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["train_config"]["model"] == "cptr" and meta["steps"] > 0


def test_bundled_cptr_captions_fresh_scenes(bundled):
    """What the weights README reports (98.2% exact on 500 held-out scenes): at least 95 of 100 other
    held-out scenes (about two standard deviations below), and every word a shapes word."""
    scenes = make_scenes(100, seed=12345, split="eval")
    traces = attnlab.caption(bundled, [s.image for s in scenes], record="none")
    exact = sum(t.caption == s.caption for t, s in zip(traces, scenes))
    assert exact >= 95, f"only {exact}/100 exact captions"
    assert all(w in bundled.vocab.tokens for t in traces for w in t.words)


def test_bundled_cptr_points_at_the_named_objects(bundled):
    """Colour and shape words: the best layer's peak lies on the named object, far above chance."""
    scenes = make_scenes(40, seed=777, split="eval")
    traces = attnlab.caption(bundled, [s.image for s in scenes], tokens=[[*encode_caption(s.caption), SEP_ID] for s in scenes])
    hits = np.zeros(traces[0].num_layers)
    chance = n = 0
    for s, t in zip(scenes, traces):
        maps = t.mean_heads()  # (layers, steps, gh, gw)
        for step, (word, obj) in enumerate(zip(s.words, s.word_objects)):
            if word not in COLORS and word not in SHAPES:
                continue
            overlap = patch_overlap(s.objects[obj].mask, t.grid).reshape(-1)  # (S,)
            hits += [overlap[maps[layer, step].argmax()] for layer in range(maps.shape[0])]
            chance += overlap.mean()
            n += 1
    assert hits.max() / n >= 0.8 and hits.max() / n > 4 * chance / n


def test_registry_builds_both_kinds():
    assert set(MODELS) == {"catr", "cptr"}
    cptr = build_model("cptr", seed=1)
    assert isinstance(cptr, CPTR) and cptr.name == "shapes-cptr" and len(cptr.vocab) == 24
    again = build_model("cptr", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(cptr.state_dict().values(), again.state_dict().values()))
    with pytest.raises(attnlab.AttnlabError, match="unknown shapes model"):
        build_model("rnn")


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, warmup=2, lr=2e-3, seed=3, model="cptr")


def test_cptr_training_resumes_exactly_and_loads(tmp_path):
    train(tmp_path / "full.pt", cfg=_cfg(4), progress=False)
    train(tmp_path / "part.pt", cfg=_cfg(4), progress=False, save_every=2, stop_after=2)
    with pytest.raises(attnlab.AttnlabError, match="other settings"):
        train(tmp_path / "part.pt", cfg=TrainConfig(**{**vars(_cfg(4)), "model": "catr"}), progress=False, resume=True)
    train(tmp_path / "part.pt", cfg=_cfg(4), progress=False, resume=True)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    part = torch.load(tmp_path / "part.pt", weights_only=True)
    assert full["format"] == "attnlab-cptr" and part["meta"]["steps"] == 4
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    model = attnlab.load_model("cptr", checkpoint=tmp_path / "full.pt")
    assert isinstance(model, CPTR) and model.name == "shapes-cptr" and model.vocab.tokens[:3] == ["[PAD]", "[CLS]", "[SEP]"]


def test_evaluate_reads_layers_from_the_traces(bundled):
    result = evaluate(bundled, n=10, seed=99, batch_size=5)
    assert len(result["pointing"]["color"]["layers"]) == 3  # shapes-cptr has 3 decoder layers
    assert result["pointing"]["all"]["words"] == sum(result["pointing"][c]["words"] for c in ("size", "color", "shape"))


def test_cli_evaluate_and_train_take_a_model(tmp_path, capsys):
    from attnlab.cli import main

    assert main(["evaluate", "shapes", "--model", "shapes-cptr", "--n", "5", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "exact captions" in out and "layer 2" in out
    assert main(["train", "shapes", "--model", "cptr", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "m.pt")]) == 0
    assert isinstance(attnlab.load_model(checkpoint=tmp_path / "m.pt"), CPTR)


def test_shapes_cptr_starts_from_sincos_positions():
    """Fresh models: prefix position zero; a patch's position is closer to its neighbour's than to a far patch's."""
    pos = build_model("cptr", seed=0).encoder.pos_embed[0].detach()  # (1 + 8 * 8, E)
    assert pos.shape[0] == 1 + 8 * 8 and float(pos[0].abs().sum()) == 0.0
    patch = lambda r, c: pos[1 + r * 8 + c]  # noqa: E731
    near, far = torch.dist(patch(3, 3), patch(3, 4)), torch.dist(patch(3, 3), patch(7, 7))
    assert near < far / 2
    # timm's layout, at the highest frequency: sin(row), sin(col), cos(row), cos(col) in the four quarters
    got = patch(3, 7)[[0, 32, 64, 96]]
    want = torch.tensor([3.0, 7.0, 3.0, 7.0])
    assert torch.allclose(got, torch.cat([want[:2].sin(), want[2:].cos()]), atol=1e-6)


def test_figures_and_explorer_take_its_traces_unchanged(bundled, tmp_path):
    """A ViT trace goes through the views, the explorer and the HTML page; the drawn map is the
    patch part of the row (the CLS weight is reported, not drawn), upsampled as torch does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnlab import plot

    scene = make_scenes(1, seed=31, split="eval")[0]
    trace = attnlab.caption(bundled, scene.image)
    assert trace.prefix_tokens == 1 and trace.prefix_share.shape == trace.cross_attention.shape[:3]
    np.testing.assert_allclose(trace.cross_attention.sum((-2, -1)) + trace.prefix_share, 1.0, atol=1e-5)
    fig = plot.overlay(trace, step=1)
    drawn = fig.axes[0].images[1].get_array()
    grid = torch.from_numpy(trace.cross_attention[-1, :, 1].astype(np.float64).mean(axis=0))[None, None]  # (1, 1, 8, 8)
    want = torch.nn.functional.interpolate(grid, size=(128, 128), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(drawn, want, atol=1e-6)
    for view in (plot.word_grid(trace), plot.head_grid(trace), plot.layer_head_grid(trace, 2), plot.attention_matrix(trace)):
        assert view.axes
    plt.close("all")
    explorer = attnlab.explore(trace)
    explorer.slider.value = 2
    assert explorer.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    page = attnlab.export_html(trace, tmp_path / "vit.html")
    assert page.stat().st_size > 1000 and "shapes-cptr" in page.read_text()
