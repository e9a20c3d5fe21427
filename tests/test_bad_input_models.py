"""Bad input to the model and input surfaces (issue 18, items 6 and 8-12): ``grounding --boxes``
files, ``train shapes --resume`` state files, CPTR checkpoints' ``encoder_args``, ``wrap`` and
``from_huggingface``. Each case is one line of :class:`AttnlabError` (or a bounded result), never a
traceback, a hang, gigabytes of memory or a silently wrong set-up."""

from __future__ import annotations

import json
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnlab.cli import main
from attnlab.errors import AttnlabError
from helpers import assert_error as one_line

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ------------------------------------------------------------------------ grounding --boxes
GOOD = {
    "images": [{"id": 1, "file_name": "a.png"}],
    "categories": [{"id": 1, "name": "dog"}],
    "annotations": [{"image_id": 1, "bbox": [0, 0, 4, 4], "category_id": 1}],
}


def boxes_file(tmp_path: Path, data) -> tuple[Path, Path]:
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    if not (folder / "a.png").exists():
        Image.new("RGB", (16, 12), (200, 10, 10)).save(folder / "a.png")
    path = tmp_path / "boxes.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return folder, path


def read(tmp_path, data):
    from attnlab.explain.boxes import read_boxes

    return read_boxes(*boxes_file(tmp_path, data))


def png_header(path: Path, width: int, height: int) -> Path:
    """A valid 1 x 1 PNG whose header claims ``width`` x ``height`` pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # over IHDR's type and 13 data bytes
    path.write_bytes(bytes(data))
    return path


def without(key: str, record: dict, **changes) -> dict:
    return {**{k: v for k, v in record.items() if k != key}, **changes}


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"annotations": [without("x", GOOD["annotations"][0], image_id=[1])]}, ["annotation 0", "image_id", "[1]"]),
        ({"annotations": [without("x", GOOD["annotations"][0], category_id={"a": 1})]}, ["annotation 0", "category_id"]),
        ({"categories": [{"id": [1], "name": "dog"}]}, ["category 0", "id", "[1]"]),
        ({"images": [{"id": [1], "file_name": "a.png"}]}, ["image 0", "id", "[1]"]),
        ({"annotations": [{"image_id": [1], "caption": "a dog"}, *GOOD["annotations"]]}, ["annotation 0", "image_id"]),
        ({"images": [{"id": True, "file_name": "a.png"}]}, ["image 0", "id", "True"]),
        ({"annotations": [without("x", GOOD["annotations"][0], image_id=None)]}, ["annotation 0", "image_id"]),
        ({"categories": [{"id": 1, "name": "dog"}, {"id": 1, "name": "cat"}]}, ["category 1", "repeats id 1"]),
        ({"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "a.png"}]}, ["image 1", "repeats id 1"]),
    ],
)
def test_boxes_ids_of_the_wrong_kind_name_the_field_and_record(tmp_path, change, needles):
    one_line(lambda: read(tmp_path, {**GOOD, **change}), "boxes.json", *needles)


def test_boxes_bbox_beyond_any_float_and_huge_numbers(tmp_path):
    text = json.dumps(GOOD).replace("[0, 0, 4, 4]", "[" + "1" + "0" * 400 + ", 0, 4, 4]")  # 10**400
    one_line(lambda: read(tmp_path, text), "annotation 0", "bbox", "width and height > 0")
    text = json.dumps(GOOD).replace("[0, 0, 4, 4]", "[" + "9" * 5000 + ", 0, 4, 4]")  # beyond Python's int parsing limit
    one_line(lambda: read(tmp_path, text), "not a JSON boxes file")


def test_boxes_image_that_is_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    folder, path = boxes_file(tmp_path, {**GOOD, "images": [{"id": 1, "file_name": "bomb.png"}]})
    png_header(folder / "bomb.png", 60000, 60000)  # 3.6 gigapixels: PIL's DecompressionBombError
    from attnlab.explain.boxes import read_boxes

    one_line(lambda: read_boxes(folder, path), "bomb.png", "image 1", "downscale")
    png_header(folder / "bomb.png", 12000, 12000)  # 144 MP: within attnlab's limit (PIL only warns), read from the header
    items, _ = read_boxes(folder, path)
    assert items[0].source_size == (12000, 12000)


def _without_blocking(fn, fifo: Path, seconds: float = 20.0):
    """Run ``fn`` in a thread; if it is still blocked on ``fifo`` after ``seconds``, unblock it and fail."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    blocked = thread.is_alive()
    if blocked:  # today's code: open() waits for a writer; give it one that writes nothing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
    assert not blocked, f"reading blocked on the FIFO {fifo}"
    return result


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_boxes_file_name_or_boxes_file_that_is_a_fifo_does_not_block(tmp_path):
    from attnlab.explain.boxes import read_boxes

    folder, path = boxes_file(tmp_path, {**GOOD, "images": [{"id": 1, "file_name": "pipe.png"}]})
    os.mkfifo(folder / "pipe.png")
    result = _without_blocking(lambda: read_boxes(folder, path), folder / "pipe.png")
    error = result.get("error")
    assert isinstance(error, AttnlabError), result
    assert "pipe.png" in str(error) and "not a regular file" in str(error) and "\n" not in str(error)
    os.mkfifo(tmp_path / "boxes-pipe.json")
    result = _without_blocking(lambda: read_boxes(folder, tmp_path / "boxes-pipe.json"), tmp_path / "boxes-pipe.json")
    assert isinstance(result.get("error"), AttnlabError) and "not a regular file" in str(result["error"]), result
    from attnlab.explain.boxes import read_synonyms

    result = _without_blocking(lambda: read_synonyms(tmp_path / "boxes-pipe.json"), tmp_path / "boxes-pipe.json")
    assert isinstance(result.get("error"), AttnlabError) and "not a regular file" in str(result["error"]), result


def test_boxes_duplicate_annotations_are_dropped_and_said(tmp_path):
    """100,000 copies of one object (the 4 GB case) become one object, with a warning that says so."""
    data = {**GOOD, "annotations": GOOD["annotations"] * 100_000}
    with pytest.warns(UserWarning, match="99,999 annotations repeat an earlier one"):
        items, _ = read(tmp_path, data)
    assert len(items) == 1 and len(items[0].objects) == 1
    assert items[0].objects[0].box == (0.0, 0.0, 4.0, 4.0) and items[0].objects[0].phrase == ["dog"]
    # distinct boxes are kept, up to the per-image bound
    from attnlab.explain import boxes

    many = [{"image_id": 1, "bbox": [0, 0, 4, 1 + k], "category_id": 1} for k in range(boxes.MAX_OBJECTS)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items, _ = read(tmp_path, {**GOOD, "annotations": many})
    assert len(items[0].objects) == boxes.MAX_OBJECTS
    extra = [*many, {"image_id": 1, "bbox": [1, 0, 4, 4], "category_id": 1}]
    one_line(lambda: read(tmp_path, {**GOOD, "annotations": extra}), f"more than {boxes.MAX_OBJECTS:,} distinct boxes", "image 1")


def test_boxes_json_objects_are_counted_while_parsing(tmp_path, monkeypatch):
    from attnlab.explain import boxes

    monkeypatch.setattr(boxes, "MAX_JSON_OBJECTS", 50)
    data = {**GOOD, "annotations": [{"image_id": 1, "caption": f"a dog {k}"} for k in range(60)] + GOOD["annotations"]}
    one_line(lambda: read(tmp_path, data), "more than 50 JSON objects", "split it")


@pytest.mark.parametrize(
    "name, needle", [("a\x00.png", "cannot open"), ("sub", "not a regular file"), ("x" * 5000 + ".png", "cannot open"), ("", "file_name ''")]
)
def test_boxes_file_names_that_cannot_be_opened_are_one_line(tmp_path, name, needle):
    from attnlab.explain.boxes import read_boxes

    folder, path = boxes_file(tmp_path, {**GOOD, "images": [{"id": 1, "file_name": name}]})
    (folder / "sub").mkdir()
    one_line(lambda: read_boxes(folder, path), "image 1", needle)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_boxes_file_name_swapped_for_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    """The type is checked again on the opened file: a FIFO put in place after the first check cannot block."""
    from attnlab.explain.boxes import read_boxes

    folder, path = boxes_file(tmp_path, {**GOOD, "images": [{"id": 1, "file_name": "pipe.png"}]})
    os.mkfifo(folder / "pipe.png")
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: real_stat(folder / "a.png" if self.name == "pipe.png" else self, **kw))
    result = _without_blocking(lambda: read_boxes(folder, path), folder / "pipe.png")
    error = result.get("error")
    assert isinstance(error, AttnlabError) and "pipe.png" in str(error) and "not a regular file" in str(error), result


# ------------------------------------------------------------------------ train shapes --resume
TRAIN = dict(steps=4, batch_size=2, warmup=1, seed=3)


@pytest.fixture(scope="module")
def train_state(tmp_path_factory) -> dict:
    """A real resume state (``PATH.train``) of two steps of a tiny run."""
    from attnlab.shapes.train import TrainConfig, train

    out = tmp_path_factory.mktemp("train") / "s.pt"
    train(out, cfg=TrainConfig(**TRAIN), progress=False, save_every=2, stop_after=2)
    return torch.load(out.with_name("s.pt.train"), weights_only=True)


def _bad_optimizer(state: dict, change) -> dict:
    import copy

    opt = copy.deepcopy(state["optimizer"])
    change(opt)
    return opt


def _first_moments(opt: dict) -> dict:
    return opt["state"][next(iter(opt["state"]))]


BAD_STATES = {
    "config string": (lambda s: {**s, "config": "x"}, "config"),
    "config int keys": (lambda s: {**s, "config": {1: 2}}, "config"),
    "model empty": (lambda s: {**s, "model": {}}, "does not fit"),
    "model not tensors": (lambda s: {**s, "model": {k: 1 for k in s["model"]}}, "model is not a state dict"),
    "model nan": (lambda s: {**s, "model": {k: v.float() * float("nan") for k, v in s["model"].items()}}, "NaN"),
    "optimizer string": (lambda s: {**s, "optimizer": "x"}, "optimizer"),
    "optimizer groups": (lambda s: {**s, "optimizer": _bad_optimizer(s, lambda o: o["param_groups"].pop())}, "optimizer"),
    "optimizer betas": (lambda s: {**s, "optimizer": _bad_optimizer(s, lambda o: o["param_groups"][0].update(betas=("x", 0.9)))}, "betas"),
    "optimizer eps": (lambda s: {**s, "optimizer": _bad_optimizer(s, lambda o: o["param_groups"][1].update(eps=float("nan")))}, "eps"),
    "moment shape": (lambda s: {**s, "optimizer": _bad_optimizer(s, lambda o: _first_moments(o).update(exp_avg=torch.zeros(3)))}, "exp_avg"),
    "moment nan": (lambda s: {**s, "optimizer": _bad_optimizer(s, lambda o: _first_moments(o)["exp_avg_sq"].fill_(float("nan")))}, "exp_avg_sq"),
    "moment step": (lambda s: {**s, "optimizer": _bad_optimizer(s, lambda o: _first_moments(o).update(step="abc"))}, "optimizer state"),
    "step nan": (lambda s: {**s, "step": float("nan")}, "step nan"),
    "step string": (lambda s: {**s, "step": "abc"}, "step 'abc'"),
    "step negative": (lambda s: {**s, "step": -10**12}, "step -1000000000000"),
    "step beyond": (lambda s: {**s, "step": 5}, "0..4"),
    "elapsed": (lambda s: {**s, "elapsed": float("inf")}, "elapsed"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_resume_state_with_wrong_values_is_refused_before_any_step(train_state, case, tmp_path, monkeypatch):
    from attnlab.shapes import train as train_module

    change, needle = BAD_STATES[case]
    torch.save(change(train_state), tmp_path / "s.pt.train")

    def no_work(*args):
        raise AssertionError("a training step ran on a damaged state")

    monkeypatch.setattr(train_module, "train_step", no_work)
    cfg = train_module.TrainConfig(**TRAIN)
    one_line(lambda: train_module.train(tmp_path / "s.pt", cfg=cfg, progress=False, resume=True), "s.pt.train", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt.train"]  # nothing written


def test_resume_of_a_good_state_still_works_and_bad_one_is_one_line_in_the_cli(train_state, tmp_path, capsys):
    torch.save(train_state, tmp_path / "s.pt.train")
    argv = ["train", "shapes", "--steps", "4", "--batch-size", "2", "--warmup", "1", "--seed", "3", "--out", str(tmp_path / "s.pt"), "--resume"]
    assert main(argv) == 0
    assert torch.load(tmp_path / "s.pt", weights_only=True)["meta"]["steps"] == 4
    capsys.readouterr()
    torch.save({**train_state, "step": "abc"}, tmp_path / "s.pt.train")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 'abc'" in err[0], err


# ------------------------------------------------------------------------ CPTR checkpoints
SENTINEL = "attnlab-test-sentinel-never-opened"
_opened: list[str] = []


def _audit(event: str, args) -> None:
    if event == "open" and args and SENTINEL in str(args[0]):
        _opened.append(str(args[0]))


@pytest.fixture(scope="module")
def cptr_file(tmp_path_factory) -> Path:
    import sys

    import attnlab
    from attnlab.models import CPTRConfig, build_cptr

    if _audit not in getattr(sys, "_attnlab_test_hooks", []):  # audit hooks stay for the process: add ours once
        sys.addaudithook(_audit)
        sys._attnlab_test_hooks = [*getattr(sys, "_attnlab_test_hooks", []), _audit]  # type: ignore[attr-defined]
    torch.manual_seed(0)
    config = CPTRConfig(
        encoder="vit_tiny_patch16_224", encoder_args={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        image_size=32, d_model=24, nheads=3, dec_layers=1, dim_feedforward=48, vocab_size=11, max_positions=9,
        pad_token_id=0, start_token_id=1, end_token_id=2,
    )  # fmt: skip
    from attnlab.tokenizer import Vocab

    model = build_cptr(config, vocab=Vocab([f"w{i}" for i in range(11)], wordpiece=False))
    return attnlab.save_checkpoint(model, tmp_path_factory.mktemp("cptr") / "tiny.pt")


BAD_ENCODER_ARGS = {
    "patch 0": ({"patch_size": 0}, "patch_size=0"),
    "patch beyond": ({"patch_size": 64}, "patch_size=64"),
    "act": ({"act_layer": "nope"}, "act_layer='nope'"),
    "mean in args": ({"mean": ["a", "b", "c"]}, "'mean' is not a ViT size or layout keyword"),
    "checkpoint": ({"checkpoint_path": f"/tmp/{SENTINEL}.pth"}, "'checkpoint_path' is not"),
    "cache": ({"cache_dir": f"/tmp/{SENTINEL}"}, "'cache_dir' is not"),
    "depth string": ({"depth": "2"}, "depth='2'"),
    "mlp nan": ({"mlp_ratio": float("nan")}, "mlp_ratio=nan"),
    "heads": ({"num_heads": 5}, "divisible by num_heads (5)"),
    "drop": ({"drop_path_rate": 1.5}, "drop_path_rate=1.5"),
    "img size": ({"img_size": 10**6}, "img_size is set by attnlab"),
}


@pytest.mark.parametrize("case", list(BAD_ENCODER_ARGS))
def test_cptr_checkpoint_encoder_args_are_checked_and_never_open_a_file(cptr_file, case, tmp_path):
    import attnlab

    change, needle = BAD_ENCODER_ARGS[case]
    obj = torch.load(cptr_file, weights_only=True)
    obj["config"]["encoder_args"] = {**obj["config"]["encoder_args"], **change}
    torch.save(obj, tmp_path / "bad.pt")
    _opened.clear()
    one_line(lambda: attnlab.load_model("cptr", checkpoint=tmp_path / "bad.pt"), "bad.pt", "encoder_args", needle)
    assert not _opened, _opened


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"mean": ["a", "b", "c"]}, "mean must be three numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"image_size": 10**6}, "image_size must be a whole number in 16..2048"),
        ({"max_positions": 10**9}, "max_positions"),
    ],
)
def test_cptr_checkpoint_config_values_are_bounded(cptr_file, change, needle, tmp_path):
    import attnlab

    obj = torch.load(cptr_file, weights_only=True)
    obj["config"] = {**obj["config"], **change}
    torch.save(obj, tmp_path / "bad.pt")
    one_line(lambda: attnlab.load_model("cptr", checkpoint=tmp_path / "bad.pt"), "bad.pt", needle)


def test_cptr_checkpoint_with_good_encoder_args_still_loads(cptr_file):
    import attnlab

    model = attnlab.load_model("cptr", checkpoint=cptr_file)
    assert model.spec.prefix_tokens == 1 and model.grid(32, 32) == (4, 4)


@pytest.mark.parametrize("vocab", ["abcdefghijk", {f"w{i}": i for i in range(11)}, [f"w{i}" for i in range(10)] + [7]])  # 11 of each
def test_cptr_checkpoint_vocabulary_is_checked_like_catrs(cptr_file, vocab, tmp_path):
    import attnlab

    obj = torch.load(cptr_file, weights_only=True)
    obj["vocab"] = vocab
    torch.save(obj, tmp_path / "bad.pt")
    one_line(lambda: attnlab.load_model("cptr", checkpoint=tmp_path / "bad.pt"), "bad.pt", "damaged vocabulary (not a list of strings)")


# ------------------------------------------------------------------------ attnlab.wrap
WORDS = ["[PAD]", "[CLS]", "[SEP]", "a", "red", "green", "blue", "circle", "square", "left", "of", "the", "##s"]


class TinyViTCaptioner(torch.nn.Module):
    """Patch embedding (8 px) + ``prefix`` learned tokens -> one cross-attention layer -> head."""

    def __init__(self, prefix: int = 1, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, prefix, dim))
        self.embed = torch.nn.Embedding(len(WORDS), dim)
        self.pos = torch.nn.Embedding(16, dim)
        self.cross = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = torch.nn.Linear(dim, len(WORDS))
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)  # (N, h * w, D)
        return torch.cat((self.cls.expand(len(x), -1, -1), patches), dim=1)  # (N, prefix + h * w, D)

    def decode(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        q = self.embed(ids) + self.pos.weight[: ids.shape[1]]  # (N, t, D)
        return self.head(self.cross(q, memory, memory)[0])  # (N, t, V)


def wrapped(model=None, **changes):
    import attnlab

    model = model or TinyViTCaptioner()
    args = dict(encode=model.encode, decode=model.decode, cross_attention="cross", grid=(8, 8), image_size=64,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), bos=1, eos=2, vocab=WORDS, max_len=4)  # fmt: skip
    args.update(changes)
    return attnlab.wrap(model, **args)


def ids_text(ids) -> str:
    return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize(
    "changes, needles",
    [
        ({"bos": 999}, ["bos=999", "vocab has 13", "0..12"]),
        ({"bos": -1}, ["bos=-1"]),
        ({"eos": 10**6}, ["eos=1000000", "vocab has 13"]),
        ({"pad": 13}, ["pad=13"]),
        ({"bos": 999, "vocab": ids_text}, ["decode(memory, ids) failed on the start token bos=999", "IndexError", "check bos="]),
        ({"eos": 10**6, "vocab": ids_text}, ["eos=1000000", "the model predicts 13"]),
        ({"image_size": 100_000}, ["image_size=100000", "2048"]),  # the probe image alone would be 120 GB
        ({"grid": (2.7, 3.9)}, ["whole numbers", "(2.7, 3.9)"]),
        ({"grid": lambda h, w: (h / 8.5, w / 8.5)}, ["whole numbers", "use //"]),
        ({"grid": (4, 4)}, ["leaves 49 of encode()'s 65 tokens as prefix tokens", "grid=(8, 8) would fit", "prefix_tokens=49"]),
        ({"grid": (8, 8), "prefix_tokens": 2}, ["not prefix_tokens=2 + the 8x8 = 64 patches"]),
        ({"image_size": 40}, ["encode() failed on a blank 40x40 image"]),
        ({"bos": None}, ["bos= must be an integer, not None"]),
    ],
)
def test_wrap_refuses_ids_sizes_and_grids_that_cannot_be_right(changes, needles):
    model = TinyViTCaptioner()
    if changes.get("image_size") == 40:  # a model that only takes 64 px inputs (as a ViT without dynamic size)
        encode = model.encode
        model.encode = lambda x: encode(x) if x.shape[-1] == 64 else (_ for _ in ()).throw(AssertionError("input 40 != 64"))
    one_line(lambda: wrapped(model, **changes), *needles)


def test_wrap_grid_prefix_rules_that_are_right_still_work():
    import numpy as np

    import attnlab

    assert wrapped().spec.prefix_tokens == 1
    assert wrapped(grid=(8.0, np.int64(8))).spec.prefix_tokens == 1  # whole numbers in any type
    assert wrapped(grid=(4, 4), prefix_tokens=49).spec.prefix_tokens == 49  # stated: accepted and checked
    assert wrapped(TinyViTCaptioner(prefix=8)).spec.prefix_tokens == 8  # CLS + 7 registers: within the rule
    one_line(lambda: wrapped(TinyViTCaptioner(prefix=9)), "leaves 9 of encode()'s 73 tokens", "prefix_tokens=9")
    trace = attnlab.caption(wrapped(grid=(4, 4), prefix_tokens=49), np.zeros((64, 64, 3), np.uint8))
    assert trace.grid == (4, 4) and trace.cross_attention.shape[-2:] == (4, 4)


def test_wrap_max_len_beyond_the_decoders_positions_is_one_line_that_says_so():
    import numpy as np

    import attnlab

    model = TinyViTCaptioner()  # 16 learned positions
    with torch.no_grad():
        model.head.bias[2] = -1e4  # the end token is never produced
    cap = wrapped(model, max_len=10**9)
    one_line(lambda: attnlab.caption(cap, np.zeros((64, 64, 3), np.uint8)), "prefix of 17 tokens", "RuntimeError", "max_len=1000000000")
    assert len(attnlab.caption(wrapped(model, max_len=16), np.zeros((64, 64, 3), np.uint8)).token_ids) == 16


def test_wrap_of_a_model_on_the_meta_device_is_one_line():
    with torch.device("meta"):
        model = TinyViTCaptioner()
    one_line(lambda: wrapped(model), "'meta' device", "load them first")


def test_explain_with_a_decode_that_detaches_its_logits_is_one_line():
    import numpy as np

    import attnlab

    model = TinyViTCaptioner()
    cap = wrapped(model, decode=lambda memory, ids: model.decode(memory, ids).detach())
    image = np.zeros((64, 64, 3), np.uint8)
    assert attnlab.explain(cap, image, method="raw") is not None  # no gradient needed: works
    one_line(lambda: attnlab.explain(cap, image, method="grad_attn"), "detach", "method='raw'")


# ------------------------------------------------------------------------ attnlab.from_huggingface
HF_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "on", "the", "left", "of", "##s", "."]


def _hf(tmp_path: Path, kind: str = "ved", never_ends: bool = True):
    """A tiny random DeiT + BERT VisionEncoderDecoder (or BLIP) with 32 decoder positions whose end token
    is never produced (``never_ends``), its tokenizer and image processor, built offline."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(HF_WORDS) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    text = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    if kind == "blip":
        tok.add_special_tokens({"bos_token": "[DEC]"})
        config = transformers.BlipConfig(
            text_config=dict(vocab_size=len(tok), encoder_hidden_size=32, bos_token_id=tok.bos_token_id,
                             sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, **text),
            vision_config=vision,
        )  # fmt: skip
        model = transformers.BlipForConditionalGeneration(config).eval()
        head = model.text_decoder.cls.predictions
        processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    else:
        config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            transformers.DeiTConfig(**vision),
            transformers.BertConfig(vocab_size=len(tok), is_decoder=True, add_cross_attention=True, **text),
        )
        model = transformers.VisionEncoderDecoderModel(config).eval()
        gen = model.generation_config
        gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        head = model.decoder.cls.predictions
        processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    if never_ends:
        with torch.no_grad():
            head.bias[tok.sep_token_id] = -1e4  # captions run to max_len
            head.decoder.bias = head.bias
    return model, tok, processor


@pytest.mark.parametrize("kind", ["ved", "blip"])
def test_from_huggingface_max_len_is_bounded_by_the_decoders_positions(kind, tmp_path):
    import numpy as np

    import attnlab

    model, tok, processor = _hf(tmp_path, kind)
    one_line(lambda: attnlab.from_huggingface(model, tok, processor, max_len=10**9), "max_len=1000000000", "32 positions", "max_len <= 32")
    one_line(lambda: attnlab.from_huggingface(model, tok, processor, max_len=33), "max_len=33")
    trace = attnlab.caption(attnlab.from_huggingface(model, tok, processor, max_len=32), np.zeros((20, 20, 3), np.uint8))
    assert len(trace.token_ids) == 32  # the bound is exact: all 32 positions are used, no end token


@pytest.mark.parametrize(
    "key, needles",
    [
        ("decoder_start_token_id", ["bos token id 1000000", "generation_config.decoder_start_token_id", "vocabulary has 16"]),
        ("eos_token_id", ["eos token id 1000000", "generation_config.eos_token_id"]),
    ],
)
def test_from_huggingface_token_ids_out_of_vocabulary_name_the_setting(key, needles, tmp_path):
    import attnlab

    model, tok, processor = _hf(tmp_path, never_ends=False)
    setattr(model.generation_config, key, 10**6)
    message = one_line(lambda: attnlab.from_huggingface(model, tok, processor), *needles)
    assert "add_cross_attention" not in message  # the real problem, not a guess


def test_from_huggingface_of_a_model_on_the_meta_device_is_one_line(tmp_path):
    import attnlab

    model, tok, processor = _hf(tmp_path, never_ends=False)
    one_line(lambda: attnlab.from_huggingface(model.to("meta"), tok, processor), "'meta' device", "load them first")


def test_from_huggingface_image_processor_size_is_bounded_before_it_runs(tmp_path):
    import attnlab

    transformers = pytest.importorskip("transformers")
    model, tok, _ = _hf(tmp_path, never_ends=False)
    processor = transformers.ViTImageProcessor(size={"height": 100_000, "width": 100_000})  # a 120 GB input from the probe image
    one_line(lambda: attnlab.from_huggingface(model, tok, processor), "size height=100000", "2048 px")
    processor.size = {"shortest_edge": 50_000}  # a plain dict works too
    one_line(lambda: attnlab.from_huggingface(model, tok, processor), "size shortest_edge=50000", "2048 px")


# ------------------------------------------------------------------------ student checkpoints (the same class as CPTR's)
@pytest.mark.parametrize(
    "config, needle",
    [
        ({"width": 10**6, "depth": 4, "dec_layers": 3}, "width=1000000"),
        ({"width": "96", "depth": 4, "dec_layers": 3}, "width='96'"),
        ({"width": 96, "heads": 0, "depth": 4, "dec_layers": 3}, "heads=0"),
        ({"width": 96, "heads": 5, "depth": 4, "dec_layers": 3}, "does not divide into 5 heads"),
        ({"width": 96, "depth": 4, "dec_layers": 3, "img_size": 10**5}, "'img_size' is not one of"),
        ("x", "not a dict"),
        ({"width": 96, "depth": 5, "dec_layers": 3}, "does not fit"),  # fits the rules, not the weights: checked on meta
    ],
)
def test_student_checkpoint_config_is_checked_before_anything_is_built(config, needle, tmp_path):
    from attnlab.shapes.student import BUNDLED_STUDENT, load_student

    obj = torch.load(BUNDLED_STUDENT, weights_only=True)
    torch.save({**obj, "config": config}, tmp_path / "student.pt")
    one_line(lambda: load_student(tmp_path / "student.pt"), "student.pt", needle)
    assert load_student().encoder.embed_dim == 96  # the shipped one still loads
