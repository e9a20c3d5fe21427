"""The bundled shapes vision-language model (attnlab/weights/shapes-vlm): offline loading by the
class's own ``from_pretrained`` and by ``load_model``, captions equal to its own ``generate``,
its size, its exact captions on held-out scenes against the scenes module's true captions,
the package data that ships it, and the one-line error without transformers."""

from __future__ import annotations

import fnmatch
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab.shapes import make_scenes
from helpers import assert_error

transformers = pytest.importorskip("transformers", minversion="5")

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "attnlab" / "weights" / "shapes-vlm"
CHAT = "USER: <image> describe the scene . ASSISTANT:"  # the prompt, written out here (not read from attnlab)
EXACT_BOUND = 0.86  # on 50 held-out scenes; recorded on 500: 94.4% (attnlab/weights/README.md)


@pytest.fixture(scope="module")
def hf():
    """The model and processor loaded by transformers itself, offline."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(FOLDER), local_files_only=True, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(str(FOLDER), local_files_only=True)
    return model.eval(), processor


@pytest.fixture(scope="module")
def captioner():
    return attnlab.load_model("shapes-vlm")


def own_generate(model, processor, images) -> list[str]:
    """Greedy captions by the model's own generate (batched: every prompt has the same length)."""
    inputs = processor(text=[CHAT] * len(images), images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def test_loads_offline_with_its_own_class(hf):
    model, processor = hf
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.dtype == torch.float32
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert grid >= 8  # a grid fine enough to point with
    assert processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the scene ."}]}],
                                         add_generation_prompt=True, tokenize=False) == CHAT  # fmt: skip


def test_bundle_is_small_and_safetensors():
    files = {p.name: p.stat().st_size for p in FOLDER.iterdir() if p.is_file()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "processor_config.json" in files
    assert sum(files.values()) <= 8 * 1024 * 1024


def test_package_data_ships_every_file():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["attnlab"]
    for path in FOLDER.iterdir():
        rel = path.relative_to(ROOT / "attnlab").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


def test_load_model_captions_as_its_own_generate(hf, captioner):
    scenes = make_scenes(4, 3, "eval")
    traces = attnlab.caption(captioner, [s.image for s in scenes])
    assert [t.caption for t in traces] == own_generate(*hf, [s.image for s in scenes])
    assert traces[0].grid == (8, 8) and traces[0].meta["raw_prompt"] == CHAT


def test_exact_captions_on_held_out_scenes(hf):
    scenes = make_scenes(50, 0, "eval")  # the eval split: never trained on
    got = own_generate(*hf, [s.image for s in scenes])
    rate = np.mean([g == s.caption for g, s in zip(got, scenes)])
    assert rate >= EXACT_BOUND, rate


def test_cli_caption_runs_the_bundled_model(tmp_path, capsys, hf):
    from PIL import Image

    from attnlab.cli import main

    scene = make_scenes(1, 5, "eval")[0]
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    assert main(["caption", "--model", "shapes-vlm", str(tmp_path / "scene.png")]) == 0
    assert own_generate(*hf, [scene.image])[0] in capsys.readouterr().out


def test_without_transformers_one_line_error(monkeypatch):
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert_error(lambda: attnlab.load_model("shapes-vlm"), 'pip install "attnlab[hf]"')


def touched(mask: np.ndarray, grid: int = 8) -> np.ndarray:
    """``(grid, grid)`` bool: the 16-px patches holding at least one pixel of ``mask`` (128 x 128)."""
    side = mask.shape[0] // grid
    return mask.reshape(grid, side, grid, side).any(axis=(1, 3))


def test_evaluate_vlm_against_eager_attention(hf, captioner):
    """Exact captions from the model's own generate; pointing from one eager forward over the prompt and the
    generated caption, the image keys found by their token id, peaks and patches computed here."""
    from attnlab.shapes.scenes import COLORS, SHAPES, SIZES
    from attnlab.shapes.vlm import evaluate_vlm

    model, processor = hf
    n = 4
    scenes = make_scenes(n, 7, "eval")
    result = evaluate_vlm(captioner, n, 7)
    got = own_generate(model, processor, [s.image for s in scenes])
    assert result["exact"] == np.mean([g == s.caption for g, s in zip(got, scenes)])
    layers = model.config.text_config.num_hidden_layers
    hits, words = np.zeros(layers + 1), 0
    for s, text in zip(scenes, got):
        inputs = processor(text=[CHAT], images=[s.image], return_tensors="pt")
        P = inputs["input_ids"].shape[1]
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                att = model(input_ids=gen[:, :-1], pixel_values=inputs["pixel_values"], output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
        keys = np.flatnonzero(inputs["input_ids"][0].numpy() == model.config.image_token_index)  # 64, row-major
        mine = text.split(" ")
        for step, (word, obj) in enumerate(zip(s.words, s.word_objects)):
            if obj is None or word not in (*SHAPES, *COLORS, *SIZES) or step >= len(mine) or mine[step] != word:
                continue
            where = touched(s.objects[obj].mask)
            rows = [a[0, :, P - 1 + step, keys].mean(0).numpy() for a in att]  # per layer (64,): the head mean
            for k, row in enumerate([*rows, np.mean(rows, axis=0)]):
                hits[k] += where.reshape(-1)[int(np.argmax(row))]
            words += 1
    assert result["pointing"]["all"]["words"] == words > 0
    assert np.allclose(np.array([*result["pointing"]["all"]["layers"], result["pointing"]["all"]["mean_of_layers"]]) * words, hits)


def test_grounding_command_prints_the_vlm_table(capsys, hf):
    from attnlab.cli import main
    from attnlab.shapes.scenes import SHAPES

    assert main(["grounding", "--model", "shapes-vlm", "--n", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("  ")[0].strip() for line in out.splitlines()]
    layers = hf[0].config.text_config.num_hidden_layers
    for name in [*(f"raw, layer {i}" for i in range(layers)), "layer_mean", "rollout", f"grad_attn (L{layers - 1})",
                 "relevance", "contrast", "random map"]:
        assert name in rows, (name, out)
    # the shape words scored: the model's own shape words that name an object of their scene (counted here)
    scenes = make_scenes(2, 0, "eval")
    got = own_generate(*hf, [s.image for s in scenes])
    count = sum(1 for g, s in zip(got, scenes) for w in g.split(" ") if w in SHAPES and any(o.shape == w for o in s.objects))
    assert f"shape {count} ·" in out, out


def test_patch_targets_name_the_covering_object():
    from attnlab.shapes.scenes import COLORS, SHAPES, SIZES, make_scene
    from attnlab.shapes.train_vlm import patch_targets

    scene = next(s for s in (make_scene(2 * k) for k in range(50)) if len(s.objects) == 1)  # one object
    o = scene.objects[0]
    got = patch_targets(scene).reshape(3, 8, 8)
    covered = o.mask.reshape(8, 16, 8, 16).sum(axis=(1, 3)) >= 16  # (8, 8)
    assert covered.any() and (~covered).any()
    for k, (value, background) in enumerate([(list(COLORS).index(o.color), len(COLORS)), (SHAPES.index(o.shape), len(SHAPES)),
                                             (SIZES.index(o.size), len(SIZES))]):
        assert (got[k] == np.where(covered, value, background)).all()


def test_training_script_writes_a_loadable_model(tmp_path):
    from attnlab.shapes.train_vlm import main

    main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--eval-n", "2", "--width", "32",
          "--vision-layers", "1", "--text-layers", "1"])
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert model.config.text_config.hidden_size == 32 and (tmp_path / "train.pt").is_file()
    assert len(own_generate(model.eval(), processor, [make_scenes(1, 0, "eval")[0].image])) == 1


def test_a_vocabulary_is_refused():
    assert_error(lambda: attnlab.load_model("shapes-vlm", vocab="vocab.txt"), "brings its own tokenizer", "leave vocab out")


def test_loading_the_bundled_vlm_prints_nothing_and_restores_the_progress_bar(capfd):
    import transformers.utils.logging as bars

    assert bars.is_progress_bar_enabled()
    attnlab.load_model("shapes-vlm")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert bars.is_progress_bar_enabled()  # the user's setting is back


TINY = ["--batch-size", "2", "--eval-n", "2", "--width", "32", "--vision-layers", "1", "--text-layers", "1"]


def _train_error(argv) -> str:
    from attnlab.shapes.train_vlm import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert message.startswith("attnlab: error: ") and "\n" not in message
    return message


def test_training_never_writes_into_a_folder_of_the_users(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my notes")  # a name save_pretrained would write
    assert "files attnlab's trainer did not write" in _train_error(["--out", str(mine), "--steps", "1", *TINY])
    assert [p.name for p in mine.iterdir()] == ["config.json"] and (mine / "config.json").read_text() == "my notes"
    afile = tmp_path / "run.txt"
    afile.write_text("keep")
    assert "is a file, not a folder" in _train_error(["--out", str(afile), "--steps", "1", *TINY])
    assert afile.read_text() == "keep"


def test_a_run_is_continued_only_with_resume_and_a_damaged_state_is_one_line(tmp_path):
    from attnlab.shapes.train_vlm import main

    out = tmp_path / "run"
    assert "does not exist" in _train_error(["--out", str(out), "--steps", "1", "--resume", *TINY])
    assert not out.exists()  # nothing written for a refused run
    main(["--out", str(out), "--steps", "1", *TINY])
    state = (out / "train.pt").read_bytes()
    assert "pass --resume to continue it" in _train_error(["--out", str(out), "--steps", "2", *TINY])
    assert (out / "train.pt").read_bytes() == state  # the earlier run's state is kept
    main(["--out", str(out), "--steps", "2", "--resume", *TINY])
    assert torch.load(out / "train.pt", weights_only=True)["step"] == 2
    torch.save({"model": {}, "note": Path("x")}, out / "train.pt")  # an object weights_only refuses to build
    assert "is damaged" in _train_error(["--out", str(out), "--steps", "3", "--resume", *TINY])
    (out / "train.pt").write_bytes(b"not a checkpoint")
    assert "is damaged" in _train_error(["--out", str(out), "--steps", "3", "--resume", *TINY])
    main(["--out", str(tmp_path / "wide"), "--steps", "1", *TINY])
    wider = [a if a != "32" else "64" for a in TINY]
    assert "does not fit a model of these settings" in _train_error(["--out", str(tmp_path / "wide"), "--steps", "2", "--resume", *wider])
