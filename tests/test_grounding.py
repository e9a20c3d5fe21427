"""The grounding benchmark: its geometry against pixel counting, the word-matching rule against the
scenes' known word -> object links, the table against ``attnlab evaluate``'s independent loop, the
COCO-style box route on exported scenes against the mask run's box version, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import attnlab
from attnlab.cli import main
from attnlab.explain.boxes import read_boxes
from attnlab.explain.grounding import (
    RANDOM, box_to_shown, chance, format_grounding, ground, mask_to_shown, match_words, patch_region, scores,
)  # fmt: skip
from attnlab.explain.methods import Method
from attnlab.errors import AttnlabError
from attnlab.shapes import evaluate, make_scenes
from attnlab.shapes.evaluate import format_report
from attnlab.shapes.grounding import WORD_CLASSES, export_boxes, grounding, scene_box, scene_items, select_best_head

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------- geometry
def test_patch_region_against_pixel_counts():
    mask = np.zeros((12, 20), bool)
    mask[2:7, 3:11] = True  # 5 x 8 pixels
    region = patch_region(mask, (3, 4))  # patches of 4 x 5 pixels
    for r in range(3):
        for c in range(4):
            block = mask[4 * r : 4 * r + 4, 5 * c : 5 * c + 5]
            assert region.share[r, c] == pytest.approx(block.mean())
            assert region.touch[r, c] == block.any()
            assert region.inside[r, c] == mask[4 * r + 2, 5 * c + 2]  # the centre pixel
    hit, touch, mass = scores(np.where(np.arange(12).reshape(3, 4) == 5, 2.0, 0.0), region)  # the peak on patch (1, 1)
    assert (hit, touch, mass) == (float(mask[6, 7]), 1.0, pytest.approx(mask[4:8, 5:10].mean()))
    assert chance(region) == (pytest.approx(region.inside.mean()), pytest.approx(region.touch.mean()), pytest.approx(mask.mean()))
    assert scores(np.zeros((3, 4)), region) == (0.0, 0.0, 0.0)  # an empty map scores nothing


def test_boxes_and_masks_on_the_shown_image():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 30:45] = True
    box = scene_box(mask)
    assert box == (30, 10, 15, 10)
    assert np.array_equal(box_to_shown(box, (40, 60), (40, 60), (40, 60)), mask)  # same size: the box's pixels
    assert np.array_equal(mask_to_shown(mask, (40, 60), (40, 60)), mask)
    half = box_to_shown(box, (40, 60), (20, 30), (20, 30))  # halved: shown pixel (i, j) is the point (2j + 1, 2i + 1)
    assert np.array_equal(half, mask[1::2, 1::2])
    assert np.array_equal(mask_to_shown(mask, (20, 30), (20, 30)), mask[1::2, 1::2])
    padded = box_to_shown(box, (40, 60), (30, 30), (20, 30))  # padded square: nothing below the content
    assert not padded[20:].any() and np.array_equal(padded[:20], half)


# --------------------------------------------------------------------------- matching words to objects
def test_true_captions_match_the_objects_the_scene_says():
    scenes = make_scenes(300, 11, "eval")
    for s in scenes:
        got = match_words(s.words, [[o.size, o.color, o.shape] for o in s.objects])
        want = [() if k is None or w == "a" else (k,) for w, k in zip(s.words, s.word_objects)]
        assert got == want, s.caption


def test_matching_rule_plurals_synonyms_ties_and_stop_words():
    phrases = [["dog", "a brown dog"], ["dog", "a white dog"], ["frisbee"]]
    words = "two dogs chase the red disc".split()
    assert match_words(words, phrases) == [(), (0, 1), (), (), (), ()]  # "dogs": every dog (a tie)
    assert match_words(words, phrases, {"disc": ["frisbee"]})[-1] == (2,)
    assert match_words("a brown dog , a dog".split(), phrases) == [(), (0,), (0,), (), (), (0, 1)]


# --------------------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def shapes_model():
    return attnlab.load_model()


@pytest.fixture(scope="module")
def small_run(shapes_model):
    return grounding(shapes_model, n=12, seed=5, batch_size=5, progress=False)


def test_raw_touch_rates_equal_attnlab_evaluate(shapes_model, small_run):
    ev = evaluate(shapes_model, n=12, seed=5, batch_size=5)
    table = small_run["conditions"]["true"]["mask"]
    for cls in ("shape", "color", "size", "all"):
        for layer, rate in enumerate(ev["pointing"][cls]["layers"]):
            assert table[f"raw, layer {layer}"][cls]["touch"] == pytest.approx(rate)
            assert table[f"raw, layer {layer}"][cls]["words"] == ev["pointing"][cls]["words"]
        assert table[RANDOM][cls]["touch"] == pytest.approx(ev["pointing"][cls]["random_patch"])
    assert ev["criterion"] == "touch"
    hit = evaluate(shapes_model, n=12, seed=5, batch_size=5, criterion="hit")  # one vocabulary: the table's "hit" column
    assert hit["criterion"] == "hit"
    for cls in ("shape", "color", "size", "all"):
        for layer, rate in enumerate(hit["pointing"][cls]["layers"]):
            assert table[f"raw, layer {layer}"][cls]["hit"] == pytest.approx(rate)
        assert table[RANDOM][cls]["hit"] == pytest.approx(hit["pointing"][cls]["random_patch"])
        assert hit["pointing"][cls]["random_patch"] < ev["pointing"][cls]["random_patch"]
    report = format_report(hit)
    assert "criterion: hit = the peak patch's centre lies inside the named object" in report
    assert "chance: a uniformly random patch, under the same criterion (hit)" in report
    with pytest.raises(AttnlabError, match="criterion='centre' is not a pointing-game criterion"):
        evaluate(shapes_model, n=1, criterion="centre")
    assert small_run["classes"] == ["shape", "color", "size", "all"]
    best = f"best_head (L{shapes_model.spec.best_head[0]} H{shapes_model.spec.best_head[1]})"
    assert best in table and set(small_run["methods"]) >= {"layer_mean", "rollout", "chefer_rollout", "grad_attn (L2)", "relevance"}
    for row, cells in table.items():  # the real methods point far better than chance
        if row != RANDOM:
            assert cells["color"]["touch"] > 3 * table[RANDOM]["color"]["touch"], row


def test_a_run_is_deterministic_and_the_boxes_route_equals_the_box_version(shapes_model, small_run, tmp_path):
    again = grounding(shapes_model, n=12, seed=5, batch_size=5, progress=False)
    assert again == small_run
    path = export_boxes(make_scenes(12, 5, "eval"), tmp_path / "scenes")
    items, classes = read_boxes(tmp_path / "scenes", path)
    assert classes == WORD_CLASSES and len(items) == 12
    boxed = ground(shapes_model, items, kinds=("box",), word_classes=classes, batch_size=5, progress=False)
    for condition in ("generated", "true"):
        assert boxed["conditions"][condition]["box"] == small_run["conditions"][condition]["box"]
    assert boxed["conditions"]["true"]["box"] != small_run["conditions"]["true"]["mask"]  # boxes are not masks
    assert "object boxes" in format_grounding(boxed)


def test_best_head_record_is_the_best_head_on_its_own_scenes(shapes_model):
    record = select_best_head(shapes_model, n=6, batch_size=6)
    assert 0 <= record["layer"] < 3 and 0 <= record["head"] < 4 and "900000..900005" in record["scenes"]
    # recount here: the chosen head has the highest hit rate of all heads on those scenes
    from attnlab.shapes.grounding import SELECTION_START
    from attnlab.shapes.scenes import SEP_ID, encode_caption, make_scene, scene_seed

    scenes = [make_scene(scene_seed(0, SELECTION_START + i, "eval")) for i in range(6)]
    rates = np.zeros((3, 4))
    n = 0
    for s in scenes:
        t = attnlab.caption(shapes_model, s.image, tokens=[*encode_caption(s.caption), SEP_ID])
        for step, (word, obj) in enumerate(zip(s.words, s.word_objects)):
            if obj is None or word == "a":
                continue
            region = patch_region(s.objects[obj].mask, t.grid)
            peaks = t.cross_attention[:, :, step].reshape(3, 4, -1).argmax(-1)
            rates += region.inside.reshape(-1)[peaks]
            n += 1
    assert rates[record["layer"], record["head"]] / n == pytest.approx(record["hit_rate"], abs=1e-4)
    assert rates.max() == rates[record["layer"], record["head"]]


def test_an_own_method_list_and_a_wrapped_model(tmp_path):
    from test_explain import Tiny, wrapped  # a captioner that is not attnlab's, through wrap

    model = wrapped(Tiny(1))
    scenes = make_scenes(3, 2, "eval")
    items = scene_items(scenes)
    for it in items:  # the tiny model's vocabulary knows no shapes words: no true condition, words unmatched
        it.truth = None
    result = ground(model, items, methods=[Method("relevance"), Method("raw", 0)], progress=False)
    assert list(result["conditions"]) == ["generated"] or result["conditions"] == {}
    assert result["methods"] == ["relevance", "raw, layer 0"]


# --------------------------------------------------------------------------- the command line
def test_cli_grounding_json_and_text(capsys):
    assert main(["grounding", "--n", "3", "--seed", "1", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 3 and set(result["conditions"]) == {"generated", "true"}
    assert main(["grounding", "--n", "3", "--seed", "1", "--quiet", "--regions", "box"]) == 0
    out = capsys.readouterr().out
    assert "object boxes" in out and "relevance" in out and "best for shape words by hit (true captions, boxes)" in out
    last = out.strip().splitlines()[-1]  # each criterion with its own chance level
    assert "hit " in last and "touch " in last and last.count("(chance ") == 2 and "(uniform map " in last


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "x"], "go together"),
        (["--n", "0"], "--n must be a whole number"),
        (["--synonyms", "s.json"], "--synonyms is for"),
        (["--images", "IMG", "--boxes", "missing.json"], "no boxes file"),
        (["--images", "IMG", "--boxes", "BAD"], "not a JSON boxes file"),
        (["--images", "IMG", "--boxes", "NOBOX"], "bbox"),
        (["--images", "IMG", "--boxes", "NOFILE"], "not in --images"),
        (["--images", "IMG", "--boxes", "BOXES", "--n", "5"], "--n and --seed choose shapes scenes"),
    ],
)
def test_cli_grounding_refuses_bad_input_in_one_line(args, message, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    good = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "dog"}],
            "annotations": [{"image_id": 1, "bbox": [0, 0, 4, 4], "category_id": 1}]}  # fmt: skip
    (tmp_path / "nofile.json").write_text(json.dumps(good))
    (tmp_path / "boxes.json").write_text(json.dumps(good))
    nobox = dict(good, annotations=[{"image_id": 1, "bbox": [0, 0, -4, 4], "category_id": 1}])
    (tmp_path / "nobox.json").write_text(json.dumps(nobox))
    names = {"IMG": tmp_path / "img", "BAD": tmp_path / "bad.json", "NOBOX": tmp_path / "nobox.json",
             "NOFILE": tmp_path / "nofile.json", "BOXES": tmp_path / "boxes.json", "missing.json": tmp_path / "missing.json"}  # fmt: skip
    argv = ["grounding", "--quiet", *[str(names.get(a, a)) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_best_head_record_travels_with_checkpoints(shapes_model, tmp_path):
    import torch

    from attnlab import AttnlabError
    from attnlab.hub import BUNDLED, read_checkpoint
    from attnlab.shapes.grounding import record_best_head

    stored = read_checkpoint(BUNDLED)["meta"]["best_head"]
    assert shapes_model.spec.best_head == (stored["layer"], stored["head"])
    saved = attnlab.save_checkpoint(shapes_model, tmp_path / "copy.pt")
    assert attnlab.load_model(checkpoint=saved).spec.best_head == shapes_model.spec.best_head
    record_best_head(saved, {"layer": 1, "head": 3}, tmp_path / "other.pt")
    assert attnlab.load_model(checkpoint=tmp_path / "other.pt").spec.best_head == (1, 3)
    obj = read_checkpoint(saved)
    assert all(torch.equal(obj["model"][k], v) for k, v in read_checkpoint(tmp_path / "other.pt")["model"].items())
    for bad in ({"layer": 7, "head": 0}, {"layer": "x", "head": 0}, [1]):
        obj["meta"]["best_head"] = bad
        torch.save(obj, tmp_path / "bad.pt")
        with pytest.raises(AttnlabError, match="best-head record|records best head"):
            attnlab.load_model(checkpoint=tmp_path / "bad.pt")
