"""The bundled shapes model, its training command and its evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab.shapes import SEP_ID, encode_caption, make_scenes
from attnlab.shapes.evaluate import evaluate, patch_overlap
from attnlab.shapes.train import TrainConfig, scene_batch, train


@pytest.fixture(scope="module")
def bundled():
    return attnlab.load_model()


def test_bundled_model_is_small_and_offline(bundled):
    path = attnlab.hub.BUNDLED
    assert path.stat().st_size <= 10_000_000
    assert bundled.spec.name == "shapes"
    assert bundled.config.backbone == "small"
    assert bundled.config.enc_layers == 2 and bundled.config.dec_layers == 3
    grid = bundled.encode(torch.zeros(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))[3]
    assert grid[0] >= 8 and grid[1] >= 8


def test_bundled_weights_caption_fresh_scenes(bundled):
    """>= 95% exact captions on 100 held-out scenes never seen in training."""
    scenes = make_scenes(100, seed=12345, split="eval")
    traces = attnlab.caption(bundled, [s.image for s in scenes], record="none")
    exact = sum(t.caption == s.caption for t, s in zip(traces, scenes))
    assert exact >= 95, f"only {exact}/100 exact captions"


def test_bundled_attention_points_at_the_named_objects(bundled):
    """Colour words: the last layer's peak lies on the named object far above chance."""
    scenes = make_scenes(40, seed=777, split="eval")
    hits = chance = n = 0
    for s in scenes:
        t = attnlab.caption(bundled, s.image, tokens=[*encode_caption(s.caption), SEP_ID])
        best = t.mean_heads()  # (layers, steps, gh, gw)
        for step, (word, obj) in enumerate(zip(s.words, s.word_objects)):
            if word not in attnlab.shapes.COLORS:
                continue
            overlap = patch_overlap(s.objects[obj].mask, t.grid)  # (gh, gw)
            layer_hits = [overlap.reshape(-1)[best[layer, step].argmax()] for layer in range(best.shape[0])]
            hits += max(layer_hits)
            chance += overlap.mean()
            n += 1
    assert hits / n >= 0.8 and hits / n > 2 * chance / n


def test_patch_overlap_against_pixel_boxes():
    mask = np.zeros((128, 128), dtype=bool)
    mask[20:30, 70:75] = True  # rows 20-29, columns 70-74
    got = patch_overlap(mask, (8, 8))  # 16-pixel patches
    want = np.zeros((8, 8), dtype=bool)
    want[1, 4] = True  # rows 16-31, columns 64-79
    assert np.array_equal(got, want)
    got = patch_overlap(mask, (5, 7))  # non-square, non-dividing grid
    rows = [r for r in range(5) if (r * 128) // 5 <= 29 and -(-((r + 1) * 128) // 5) - 1 >= 20]
    cols = [c for c in range(7) if (c * 128) // 7 <= 74 and -(-((c + 1) * 128) // 7) - 1 >= 70]
    assert sorted(zip(*np.nonzero(got))) == [(r, c) for r in rows for c in cols]


def test_scene_batch_matches_the_generator():
    pixels, ids = scene_batch(3, 4, seed=5)
    assert pixels.shape == (4, 3, 128, 128) and ids.shape == (4, 16)
    from attnlab.shapes import make_scene, scene_seed

    scene = make_scene(scene_seed(5, 3 * 4 + 2, "train"))
    want = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(pixels[2], want)
    words = [1, *encode_caption(scene.caption), 2]
    assert ids[2, : len(words)].tolist() == words and (ids[2, len(words) :] == 0).all()


def _tiny_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, warmup=2, lr=2e-3, seed=3)


def test_training_reduces_the_loss_and_is_deterministic(tmp_path):
    cfg = _tiny_cfg(12)
    a = train(tmp_path / "a.pt", cfg=cfg, progress=False, save_every=100)
    train(tmp_path / "b.pt", cfg=cfg, progress=False, save_every=100)
    first = train(tmp_path / "c.pt", cfg=_tiny_cfg(1), progress=False)
    assert a["loss"] < first["loss"] - 0.3  # 12 steps learn the frequent words
    sa = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    model = attnlab.load_model(checkpoint=tmp_path / "a.pt")
    assert model.spec.name == "shapes" and model.spec.vocab.tokens[:3] == ["[PAD]", "[CLS]", "[SEP]"]


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    cfg = _tiny_cfg(6)
    train(tmp_path / "full.pt", cfg=cfg, progress=False)
    # stop after 3 steps (save_every=3 writes the resumable state), then resume to 6
    train(tmp_path / "part.pt", cfg=TrainConfig(**{**vars(cfg)}), progress=False, save_every=3, minutes=None, stop_after=3)
    train(tmp_path / "part.pt", cfg=cfg, progress=False, resume=True)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    part = torch.load(tmp_path / "part.pt", weights_only=True)
    assert part["meta"]["steps"] == 6
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])


def test_resume_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(attnlab.AttnlabError, match="nothing to resume"):
        train(tmp_path / "none.pt", cfg=_tiny_cfg(2), progress=False, resume=True)


def test_evaluate_reports_every_number(bundled):
    result = evaluate(bundled, n=20, seed=99, batch_size=10)
    assert 0 <= result["exact"] <= 1 and 0 <= result["word_accuracy"] <= 1
    for cat in ("size", "color", "shape", "all"):
        p = result["pointing"][cat]
        assert len(p["layers"]) == bundled.config.dec_layers
        assert 0 < p["random_patch"] < 1 and p["words"] > 0
    assert result["pointing"]["all"]["words"] == sum(result["pointing"][c]["words"] for c in ("size", "color", "shape"))
