"""The ``attnlab caption`` command: in-process through ``attnlab.cli.main`` and once as a real process.

A reduced random CATR-format checkpoint (small backbone, 120-token BERT-shaped
vocabulary) stands in for the published ones. Its output head is biased towards
the real words and away from ``[SEP]`` so captions are words and always
``--max-len`` long.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnlab
from attnlab.cli import main
from attnlab.models import CATR, CATRConfig

WORDS = ["a", "young", "girl", "##s", ".", "play", "##ing", "with", "kite", "'", "s", ",", "dog", "the", "##ball", "?"]
TOKENS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
MAX_LEN = "3"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = CATRConfig(
        backbone="small", d_model=32, enc_layers=1, dec_layers=1, dim_feedforward=64, mlp_hidden=32,
        vocab_size=len(TOKENS), max_positions=16,
    )
    model = CATR(config).eval()
    with torch.no_grad():
        model.mlp.layers[2].bias[: TOKENS.index("a")] = -1e4  # specials and [unused*] never win
    ckpt = root / "mine.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, ckpt)  # CATR's own format
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(TOKENS) + "\n")

    images = root / "images"
    images.mkdir()
    y, x = np.mgrid[0:48, 0:64]
    Image.fromarray(np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)).save(images / "beach.png")
    Image.new("RGB", (40, 80), (30, 120, 200)).save(images / "street.jpg")
    (images / "notes.png").write_text("not an image\n")
    return {"ckpt": ckpt, "vocab": vocab, "beach": images / "beach.png", "street": images / "street.jpg", "bad": images / "notes.png"}


@pytest.fixture(scope="module")
def expected(files) -> dict[str, attnlab.CaptionTrace]:
    """What the library itself says for the two good images."""
    model = attnlab.load_model("catr", checkpoint=files["ckpt"], vocab=files["vocab"])
    return {k: attnlab.caption(model, files[k], max_len=int(MAX_LEN)) for k in ("beach", "street")}


def caption_args(files, *extra: str) -> list[str]:
    return [
        "caption", str(files["beach"]), str(files["bad"]), str(files["street"]),
        "--checkpoint", str(files["ckpt"]), "--vocab", str(files["vocab"]), "--max-len", MAX_LEN, *extra,
    ]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attnlab: error: ") and "Traceback" not in err
    return lines[0]


def test_expected_captions_are_words(expected):
    for trace in expected.values():
        assert trace.steps == int(MAX_LEN) and all(w in WORDS for w in trace.words)
        assert trace.caption and "[" not in trace.caption


def softmax_p(trace) -> np.ndarray:
    """Each written token's probability, from the logits, written out here."""
    z = trace.logits.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True))[np.arange(trace.steps), trace.token_ids]


def notes(trace) -> str:
    """What the CLI line must add: these captions run to --max-len (no end token); tokens below p = 0.5 are unsure."""
    p = softmax_p(trace)
    line = f" [cut at the length limit: {trace.steps} tokens, no end token]"
    low = np.flatnonzero(p < 0.5)
    if len(low):
        k = int(np.argmin(p))
        line += f" [unsure: {len(low)} of {trace.steps} tokens below p=0.5, lowest {trace.words[k]!r} p={p[k]:.2f}]"
    return line


def test_caption_two_good_one_bad(files, expected, capsys):
    rc = main(caption_args(files))
    out, err = capsys.readouterr()
    assert rc != 0
    assert out.splitlines() == [
        f"{files['beach']}: {expected['beach'].caption}{notes(expected['beach'])}",
        f"{files['street']}: {expected['street'].caption}{notes(expected['street'])}",
    ]
    assert all("[cut at the length limit" in line for line in out.splitlines())
    line = one_error_line(err)
    assert str(files["bad"]) in line and "not an image" in line


def test_out_writes_both_files_for_good_images_only(files, expected, capsys, tmp_path):
    out_dir = tmp_path / "results"  # does not exist yet
    rc = main(caption_args(files, "--out", str(out_dir)))
    out, err = capsys.readouterr()
    assert rc != 0
    one_error_line(err)
    assert sorted(os.listdir(out_dir)) == ["beach.attn.png", "beach.npz", "street.attn.png", "street.npz"]  # no temp files

    printed = dict(line.split(": ", 1) for line in out.splitlines())
    for key in ("beach", "street"):
        trace = attnlab.CaptionTrace.load(out_dir / f"{key}.npz")
        assert trace.caption + notes(trace) == printed[str(files[key])] == expected[key].caption + notes(expected[key])
        assert trace.stopped == "max_len"
        np.testing.assert_array_equal(trace.token_ids, expected[key].token_ids)
        np.testing.assert_array_equal(trace.image, expected[key].image)
        assert trace.cross_attention.shape == expected[key].cross_attention.shape
        # both files name their input, so a later run knows them as its own
        sha = hashlib.sha256(files[key].read_bytes()).hexdigest()
        assert trace.meta["source"] == str(files[key].resolve()) and trace.meta["source_sha256"] == sha
        with Image.open(out_dir / f"{key}.attn.png") as png:
            assert png.format == "PNG"
            assert json.loads(png.info["attnlab"]) == {"source": str(files[key].resolve()), "source_sha256": sha}
            width, height = png.size
        assert 200 <= width <= 5000 and 100 <= height <= 5000, (width, height)
        assert width > height  # image + 3 word panels side by side


def test_json(files, expected, capsys):
    rc = main(caption_args(files, "--json"))
    out, err = capsys.readouterr()
    assert rc != 0
    one_error_line(err)
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(files["beach"]), str(files["bad"]), str(files["street"])]
    good = {"beach": results[0], "street": results[2]}
    for key, r in good.items():
        trace = expected[key]
        assert r["caption"] == trace.caption
        assert r["tokens"] == trace.token_ids.tolist() and all(isinstance(t, int) for t in r["tokens"])
        assert r["words"] == trace.words
        assert r["grid"] == list(trace.grid) and len(r["grid"]) == 2
        assert r["files"] == []
        p = softmax_p(trace)
        assert r["stopped"] == "max_len" and r["beam_score"] is None  # greedy: no beam score
        np.testing.assert_allclose(r["probabilities"], p, atol=1e-4)
        assert r["log_probability"] == pytest.approx(np.log(p).sum(), abs=1e-4)
        assert [u["step"] for u in r["unsure"]] == np.flatnonzero(p < 0.5).tolist()
    assert set(results[1]) == {"image", "error"} and str(files["bad"]) in results[1]["error"]


def test_all_good_exits_zero(files, expected, capsys):
    rc = main(["caption", str(files["street"]), "--checkpoint", str(files["ckpt"]), "--vocab", str(files["vocab"]), "--max-len", MAX_LEN])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out == f"{files['street']}: {expected['street'].caption}{notes(expected['street'])}\n"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "catr-v1", "--checkpoint", "x.pth"], "not both"),
        (["--checkpoint", "/nonexistent/ckpt.pth"], "no checkpoint file"),
    ],
    ids=["unknown-model", "model-and-checkpoint", "missing-checkpoint"],
)
def test_command_errors_are_one_line(files, capsys, argv, needle):
    rc = main(["caption", str(files["beach"]), *argv])
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    line = one_error_line(err)
    assert needle in line
    if "unknown model" in needle:
        assert all(n in line for n in ("shapes", "catr-v1", "catr-v2", "catr-v3"))


@pytest.mark.parametrize("sub", ["", "inside/deeper"], ids=["the-file", "below-the-file"])
def test_out_that_is_a_file(files, capsys, tmp_path, sub):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    rc = main(caption_args(files, "--out", str(target / sub) if sub else str(target)))
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    line = one_error_line(err)
    assert "is a file" in line and str(target) in line
    assert sorted(os.listdir(tmp_path)) == ["taken.txt"] and target.read_text() == "x"


def test_real_process_exit_code_and_stderr(files, expected, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab", *caption_args(files)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{files['beach']}: {expected['beach'].caption}{notes(expected['beach'])}",
        f"{files['street']}: {expected['street'].caption}{notes(expected['street'])}",
    ]
    line = one_error_line(proc.stderr)  # the whole of stderr: no traceback, no warning noise
    assert str(files["bad"]) in line
    assert os.listdir(tmp_path) == []  # nothing written where it ran


def test_write_failure_leaves_older_files_as_they_were(files, capsys, tmp_path, monkeypatch):
    """A figure that cannot be written (disk full) leaves the older trace and figure byte for byte."""
    import errno

    from matplotlib.figure import Figure

    args = ["caption", str(files["beach"]), "--checkpoint", str(files["ckpt"]), "--vocab", str(files["vocab"]),
            "--max-len", MAX_LEN, "--out", str(tmp_path / "o")]
    assert main(args) == 0
    capsys.readouterr()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "o").iterdir()}
    assert sorted(before) == ["beach.attn.png", "beach.npz"]

    def full_disk(fig, fname, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(fname, "name", fname)))

    monkeypatch.setattr(Figure, "savefig", full_disk)  # the figure's bytes cannot be written
    rc = main(args[:-4] + ["--max-len", "2", "--out", str(tmp_path / "o")])  # a different trace would replace the old
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    line = one_error_line(err)
    assert "No space left on device" in line and "beach.npz" in line and "unchanged" in line
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "o").iterdir()}
    assert after == before  # same names (no temp files), same bytes


def test_beam_json_has_its_score_and_help_lists_every_model(files, capsys):
    rc = main(["caption", str(files["street"]), "--checkpoint", str(files["ckpt"]), "--vocab", str(files["vocab"]),
               "--max-len", MAX_LEN, "--beams", "3", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    (r,) = json.loads(out)
    n = len(r["tokens"])
    assert r["beam_score"] == pytest.approx(r["log_probability"] / n, abs=1e-4)  # sum(log p) / length**1
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from attnlab.hub import NAMES

    assert f"one of {', '.join(NAMES)}" in text  # the names the error lists
    assert "a CATR checkpoint of your own" not in text and "CPTR" in text
    with pytest.raises(attnlab.AttnlabError) as err:
        attnlab.load_model("no-such-model")
    assert all(repr(n) in str(err.value) or f"{n}," in str(err.value) for n in NAMES)  # the error lists them all too


def test_demo_captions_the_samples_offline_and_a_rerun_keeps_them(capsys, tmp_path):
    """The README's main job: ``attnlab demo`` writes a trace and a word grid per shipped sample,
    each trace the caption ``attnlab.caption`` gives that sample with the bundled model."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    model = attnlab.load_model()
    samples = sorted(p for p in attnlab.sample_path("scene-0.png").parent.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(samples) == 6
    for sample in samples:
        trace = attnlab.CaptionTrace.load(next(out.glob(f"{sample.stem}*.npz")))
        want = attnlab.caption(model, sample)
        assert trace.token_ids.tolist() == want.token_ids.tolist() and f"{sample.stem}: {want.caption}" in printed
        assert next(out.glob(f"{sample.stem}*.attn.png")).stat().st_size > 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["demo", "--out", str(out)]) == 0  # its own files: replaced by the same content
    assert {p.name for p in out.iterdir()} == set(before)
