"""``attnlab.load_model``: CATR-format checkpoints, own variants, broken files, downloads.

Every checkpoint here is made by the test itself in CATR's layout (a reduced
configuration with the small backbone, so nothing is slow); downloads are
served from a local HTTP server on 127.0.0.1 or from ``file://`` URLs.
"""

from __future__ import annotations

import http.server
import io
import re
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab import hub
from attnlab.errors import AttnlabError
from attnlab.models import CATR, CATRConfig
from attnlab.tokenizer import Vocab

# A BERT-shaped vocabulary of 120 tokens: [PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
WORDS = ["a", "young", "girl", "##s", ".", "play", "##ing", "with", "kite", "'", "s", ",", "dog", "the", "##ball", "?"]
TOKENS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
ID = {t: i for i, t in enumerate(TOKENS)}
assert len(TOKENS) == 120 and ID["[CLS]"] == 101 and ID["a"] == 104

# an own variant's word-level-ish vocabulary of 40 tokens, specials first
TOKENS40 = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] + [f"w{i}" for i in range(36)]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_config(**kw) -> CATRConfig:
    base = dict(
        backbone="small", d_model=32, enc_layers=1, dec_layers=1, dim_feedforward=64, mlp_hidden=32,
        vocab_size=120, max_positions=16,
    )
    base.update(kw)
    return CATRConfig(**base)


def random_model(seed: int = 0, vocab=None, name: str = "catr", **kw) -> CATR:
    """A reduced CATR with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = CATR(small_config(**kw), vocab=vocab, name=name).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model


def catr_state_dict(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in random_model(seed, **kw).state_dict().items()}


def save_catr(path: Path, sd: dict[str, torch.Tensor], wrapped: bool = True) -> Path:
    torch.save({"model": sd, "epoch": 1} if wrapped else sd, path)
    return path


def write_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def assert_same_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[k].cpu(), v), k
    assert {k for k in loaded if not k.endswith("num_batches_tracked")} == {
        k for k in sd if not k.endswith("num_batches_tracked")
    }


def load_error(*args, **kwargs) -> str:
    with pytest.raises(AttnlabError) as info:
        attnlab.load_model(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


def recorded(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, caught


IMAGE = np.linspace(0, 1, 48 * 64 * 3, dtype=np.float32).reshape(48, 64, 3)


# ====================================================================== Vocab.decode
class TestDecode:
    vocab = Vocab(TOKENS)

    def ids(self, *tokens: str) -> list[int]:
        return [ID[t] for t in tokens]

    def test_sentence(self):
        ids = self.ids("[CLS]", "a", "young", "girl", "##s", "play", "##ing", "with", "a", "kite", ".", "[SEP]", "[PAD]", "[PAD]")
        assert ids[:6] == [101, 104, 105, 106, 107, 109]
        assert self.vocab.decode(ids) == "a young girls playing with a kite."

    def test_punctuation_and_possessive_like_bert(self):
        assert self.vocab.decode(self.ids("a", "dog", ",", "a", "girl", "?")) == "a dog, a girl?"
        assert self.vocab.decode(self.ids("the", "girl", "'", "s", "kite", ".")) == "the girl's kite."

    def test_special_tokens_dropped_everywhere(self):
        assert self.vocab.decode(self.ids("[CLS]", "a", "[UNK]", "dog", "[MASK]", "[SEP]")) == "a dog"
        assert self.vocab.decode([101, 102, 0]) == ""
        # a continuation after a dropped special token still joins the word before it
        assert self.vocab.decode(self.ids("girl", "[SEP]", "##s")) == "girls"

    def test_edge_ids(self):
        assert self.vocab.decode(self.ids("##s", "a")) == "##s a"  # nothing to continue
        assert self.vocab.decode([104, 500, -3]) == "a [500] [-3]"
        assert self.vocab.decode(torch.tensor([104, 116])) == "a dog"
        assert self.vocab.decode(np.array([104, 116])) == "a dog"

    def test_word_level_vocab_joins_with_spaces(self):
        v = Vocab(["[PAD]", "a", "##b", ".", "dog"], wordpiece=False)
        assert v.decode([1, 2, 3, 0, 4]) == "a ##b . dog"

    def test_from_file(self, tmp_path):
        v = Vocab.from_file(write_vocab(tmp_path / "v.txt", TOKENS))
        assert len(v) == 120 and v.token(101) == "[CLS]" and v.decode(self.ids("a", "dog", ".")) == "a dog."
        with pytest.raises(AttnlabError, match="no vocabulary file"):
            Vocab.from_file(tmp_path / "missing.txt")
        (tmp_path / "empty.txt").write_text("")
        with pytest.raises(AttnlabError, match="empty"):
            Vocab.from_file(tmp_path / "empty.txt")
        # only \n, \r\n and \r end a token (as BertTokenizer reads vocab.txt): a form feed,
        # U+2028 or U+0085 inside a token must not shift the ids after it
        odd = ["[PAD]", "x\x0cy", "line\u2028sep", "nel\x85", "[CLS]", "", "[SEP]", "dog"]
        (tmp_path / "odd.txt").write_bytes("\r\n".join(odd).encode() + b"\r\n")
        v = Vocab.from_file(tmp_path / "odd.txt")
        assert v.tokens == odd and v.token(7) == "dog"
        (tmp_path / "no-final-newline.txt").write_text("[PAD]\ndog")
        assert Vocab.from_file(tmp_path / "no-final-newline.txt").tokens == ["[PAD]", "dog"]
        (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
        with pytest.raises(AttnlabError, match="UTF-8"):
            Vocab.from_file(tmp_path / "bin.txt")


# ====================================================================== good checkpoints
@pytest.mark.parametrize("wrapped", [True, False], ids=["model-dict", "bare-state-dict"])
def test_catr_checkpoint_without_vocab(tmp_path, wrapped):
    sd = catr_state_dict()
    path = save_catr(tmp_path / "mine.pth", sd, wrapped)
    model, caught = recorded(lambda: attnlab.load_model("catr", checkpoint=path))
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "vocab" in str(caught[0].message)

    assert isinstance(model, CATR) and not model.training and model.spec.name == "catr" and not getattr(model.spec.vocab, "tokens", None)
    c = model.config
    assert (c.backbone, c.d_model, c.enc_layers, c.dec_layers, c.vocab_size, c.max_positions) == ("small", 32, 1, 1, 120, 16)
    assert (c.dim_feedforward, c.mlp_hidden, c.start_token_id, c.end_token_id) == (64, 32, 101, 102)
    assert_same_weights(model, sd)

    trace = attnlab.caption(model, IMAGE, tokens=[104, 106, 102])
    assert trace.words == ["[104]", "[106]", "[SEP]"]
    assert trace.caption == "[104] [106]"
    greedy = attnlab.caption(model, IMAGE, max_len=4)
    assert all(re.fullmatch(r"\[\d+\]|\[SEP\]", w) for w in greedy.words), greedy.words


def test_catr_checkpoint_with_vocab(tmp_path):
    sd = catr_state_dict(1)
    path = save_catr(tmp_path / "mine.pth", sd)
    vocab = write_vocab(tmp_path / "vocab.txt", TOKENS)
    model, caught = recorded(lambda: attnlab.load_model(checkpoint=path, vocab=vocab))  # name defaults to catr
    assert caught == []
    assert_same_weights(model, sd)
    assert model.spec.vocab.tokens == TOKENS

    ids = [ID[t] for t in ("a", "young", "girl", "##s", "with", "a", "kite", ".", "[SEP]")]
    trace = attnlab.caption(model, IMAGE, tokens=ids)
    assert trace.words == ["a", "young", "girl", "##s", "with", "a", "kite", ".", "[SEP]"]
    assert trace.caption == "a young girls with a kite."
    assert trace.logits.shape == (9, 120)

    greedy = attnlab.caption(model, IMAGE, max_len=5)
    assert greedy.caption == model.spec.vocab.decode(greedy.token_ids.tolist())
    assert all(w in TOKENS for w in greedy.words)


def test_own_variant_config_is_inferred(tmp_path):
    sd = catr_state_dict(
        2, enc_layers=2, dec_layers=3, vocab_size=40, start_token_id=1, end_token_id=2, backbone_channels=(8, 16, 16, 24)
    )
    path = save_catr(tmp_path / "variant.pth", sd, wrapped=False)
    vocab = write_vocab(tmp_path / "vocab40.txt", TOKENS40)
    model = attnlab.load_model("catr", checkpoint=path, vocab=vocab)
    c = model.config
    assert (c.enc_layers, c.dec_layers, c.vocab_size) == (2, 3, 40)
    assert c.backbone == "small" and tuple(c.backbone_channels) == (8, 16, 16, 24)
    assert (c.start_token_id, c.end_token_id, c.pad_token_id) == (1, 2, 0)  # read off [CLS]/[SEP]/[PAD]
    assert len(model.transformer.encoder.layers) == 2 and len(model.transformer.decoder.layers) == 3
    assert_same_weights(model, sd)

    trace = attnlab.caption(model, IMAGE, max_len=4)
    assert trace.logits.shape == (trace.steps, 40)
    assert trace.cross_attention.shape[:2] == (3, 8)  # 3 decoder layers, 8 heads
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask.*")  # torch's, as in caption()
        target = torch.tensor([[1, 5, 6, 0]])
        logits = model(torch.zeros(1, 3, 64, 64), target, target == 0)
    assert logits.shape == (1, 4, 40)


def test_own_variant_without_vocab_is_a_clear_error(tmp_path):
    """101/102 do not exist in a 40-token model: say so at load time, not as an IndexError later."""
    sd = catr_state_dict(2, vocab_size=40, start_token_id=1, end_token_id=2)
    path = save_catr(tmp_path / "variant.pth", sd)
    message = load_error("catr", checkpoint=path)
    assert "40" in message and "vocab" in message and "[CLS]" in message


def test_save_checkpoint_round_trip(tmp_path):
    model = random_model(
        3, Vocab(TOKENS40, wordpiece=False), "my-captioner",
        vocab_size=40, start_token_id=1, end_token_id=2, image_size=160, mean=(0.4, 0.45, 0.5),
    )  # fmt: skip
    path = attnlab.save_checkpoint(model, tmp_path / "out" / "mine.pt")
    assert path == tmp_path / "out" / "mine.pt"
    assert [p.name for p in path.parent.iterdir()] == ["mine.pt"]  # no temp file left

    loaded, caught = recorded(lambda: attnlab.load_model(checkpoint=path))
    assert caught == []  # the vocabulary travelled with it
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.spec.vocab.tokens == TOKENS40 and loaded.spec.vocab.wordpiece is False
    assert loaded.spec.name == "my-captioner"
    assert_same_weights(loaded, model.state_dict())

    ids = [4, 9, 2]
    a = attnlab.caption(model, IMAGE, tokens=ids)
    b = attnlab.caption(loaded, IMAGE, tokens=ids)
    assert b.image.shape == (120, 160, 3)  # image_size travelled too
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert b.caption == "w0 w5" and b.model_name == "my-captioner"

    with pytest.raises(AttnlabError, match="has 120 tokens but the model predicts 40"):
        attnlab.load_model(checkpoint=path, vocab=write_vocab(tmp_path / "v.txt", TOKENS))


# ====================================================================== wrong checkpoints
def test_missing_keys_are_listed(tmp_path):
    sd = catr_state_dict()
    gone = [k for k in sd if k.startswith("transformer.decoder.layers.0.norm")]
    assert len(gone) == 6
    for k in gone:
        del sd[k]
    message = load_error("catr", checkpoint=save_catr(tmp_path / "partial.pth", sd))
    assert "6 missing" in message and "+3 more" in message
    assert sum(k in message for k in gone) == 3  # the first three by name
    assert "does not fit" in message and "CATR-style captioner" in message
    assert str(tmp_path / "partial.pth") in message


def test_unexpected_keys_are_listed(tmp_path):
    sd = catr_state_dict()
    sd["extra.weight"] = torch.zeros(2)
    sd["extra.bias"] = torch.zeros(2)
    message = load_error("catr", checkpoint=save_catr(tmp_path / "extra.pth", sd))
    assert "2 unexpected" in message and "extra.weight" in message and "extra.bias" in message
    assert "missing" not in message


def test_shape_mismatch_is_listed(tmp_path):
    sd = catr_state_dict()
    sd["input_proj.bias"] = torch.zeros(33)
    message = load_error("catr", checkpoint=save_catr(tmp_path / "bad.pth", sd))
    assert "1 shape mismatches" in message and "input_proj.bias [33] vs [32]" in message


def test_resnet_classifier_is_recognised(tmp_path):
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    for wrapped in (True, False):
        message = load_error("catr", checkpoint=save_catr(tmp_path / "resnet18.pth", sd, wrapped))
        assert "ResNet" in message and "not a CATR checkpoint" in message


def test_detr_is_recognised(tmp_path):
    sd = {
        "class_embed.weight": torch.zeros(92, 256),
        "class_embed.bias": torch.zeros(92),
        "query_embed.weight": torch.zeros(100, 256),
        "bbox_embed.layers.0.weight": torch.zeros(256, 256),
        "transformer.encoder.layers.0.self_attn.in_proj_weight": torch.zeros(768, 256),
        "transformer.decoder.layers.0.multihead_attn.in_proj_weight": torch.zeros(768, 256),
        "backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7),
    }
    message = load_error("catr", checkpoint=save_catr(tmp_path / "detr.pth", sd))
    assert "DETR" in message and "does not fit" in message


class NotAWeight:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("text", "not a PyTorch checkpoint"),
        ("truncated", "truncated"),
        ("tensor", "holds a Tensor"),
        ("python-objects", "Python objects besides tensors"),
        ("no-tensors", "no state dict of tensors"),
        ("missing", "no checkpoint file"),
        ("directory", "no checkpoint file"),
    ],
)
def test_unreadable_checkpoints(tmp_path, kind, needle):
    path = tmp_path / "ckpt.pth"
    if kind == "text":
        path.write_text("<html>Not Found</html>\n")
    elif kind == "truncated":
        save_catr(tmp_path / "full.pth", catr_state_dict())
        data = (tmp_path / "full.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "python-objects":
        torch.save({"model": catr_state_dict(), "args": NotAWeight()}, path)
    elif kind == "no-tensors":
        torch.save({"model": {"epoch": 3}}, path)
    elif kind == "directory":
        path.mkdir()
    message = load_error("catr", checkpoint=path)
    assert needle in message and str(path) in message


def test_vocab_size_mismatch(tmp_path):
    path = save_catr(tmp_path / "mine.pth", catr_state_dict())
    vocab = write_vocab(tmp_path / "small.txt", TOKENS[:50])
    message = load_error("catr", checkpoint=path, vocab=vocab)
    assert "50 tokens" in message and "120" in message and str(vocab) in message
    assert "no vocabulary file" in load_error("catr", checkpoint=path, vocab=tmp_path / "absent.txt")


def test_bad_arguments(tmp_path):
    path = save_catr(tmp_path / "mine.pth", catr_state_dict())
    message = load_error("catr-v9")
    assert "unknown model 'catr-v9'" in message
    for name in ("shapes", "catr", "catr-v1", "catr-v2", "catr-v3"):
        assert name in message
    assert "checkpoint" in load_error("catr")
    assert "not both" in load_error("catr-v1", checkpoint=path)
    vocab = write_vocab(tmp_path / "vocab.txt", TOKENS)
    assert "unknown device" in load_error("catr", checkpoint=path, vocab=vocab, device="warp-drive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(tmp_path):
    path = save_catr(tmp_path / "mine.pth", catr_state_dict())
    vocab = write_vocab(tmp_path / "vocab.txt", TOKENS)
    message = load_error("catr", checkpoint=path, vocab=vocab, device="cuda")
    assert "CUDA is not available" in message and "cpu" in message


# ====================================================================== downloads
class Server:
    """A local HTTP server; ``routes`` maps a path to bytes or to a failure mode."""

    def __init__(self, routes: dict[str, object]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner.requests.append(self.path)
                body = owner.routes.get(self.path)
                if isinstance(body, bytes):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif body == "short":  # promises 100000 bytes, sends 1000, hangs up
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"x" * 1000)
                    self.close_connection = True
                elif body == "chunked-cut":  # one chunk, then hangs up mid-body
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
                    self.close_connection = True
                elif body == "garbage":  # not HTTP at all
                    self.wfile.write(b"hello there\r\n\r\n")
                    self.close_connection = True
                else:
                    self.send_error(404)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(routes):
        servers.append(Server(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNLAB_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def published() -> tuple[dict[str, torch.Tensor], bytes, bytes]:
    """A reduced checkpoint in CATR's published layout, and the vocabulary, as bytes."""
    sd = catr_state_dict(4)
    buf = io.BytesIO()
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 29}, buf)
    return sd, buf.getvalue(), ("\n".join(TOKENS) + "\n").encode()


def point_at(monkeypatch, checkpoint_url: str, vocab_url: str) -> None:
    monkeypatch.setitem(hub.CHECKPOINT_URLS, "catr-v3", checkpoint_url)
    monkeypatch.setattr(hub, "VOCAB_URL", vocab_url)


def cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*")) if root.exists() else []


def test_download_once_then_offline(serve, cache, monkeypatch, published):
    sd, ckpt, vocab = published
    server = serve({"/w.pth": ckpt, "/vocab.txt": vocab})
    point_at(monkeypatch, server.url("/w.pth"), server.url("/vocab.txt"))

    model, caught = recorded(lambda: attnlab.load_model("catr-v3"))
    assert server.requests == ["/w.pth", "/vocab.txt"]
    assert caught == []
    assert cache_files(cache) == ["bert-base-uncased-vocab.txt", "catr-v3.pth"]
    assert (cache / "catr-v3.pth").read_bytes() == ckpt
    assert (cache / "bert-base-uncased-vocab.txt").read_bytes() == vocab
    assert model.spec.name == "catr-v3" and model.spec.vocab.tokens == TOKENS
    assert_same_weights(model, sd)
    assert attnlab.caption(model, IMAGE, tokens=[ID["a"], ID["dog"], ID["."]]).caption == "a dog."

    server.stop()  # offline from now on
    again = attnlab.load_model("catr-v3")
    assert server.requests == ["/w.pth", "/vocab.txt"]  # no new request
    assert_same_weights(again, sd)
    assert again.spec.vocab.tokens == TOKENS


def test_http_404(serve, cache, monkeypatch):
    server = serve({})
    point_at(monkeypatch, server.url("/missing.pth"), server.url("/vocab.txt"))
    message = load_error("catr-v3")
    assert server.url("/missing.pth") in message
    assert "put it at" in message and str(cache / "catr-v3.pth") in message
    assert "Not Found" in message
    assert cache_files(cache) == []  # no file, no .part


def test_vocab_404_keeps_the_complete_checkpoint_only(serve, cache, monkeypatch, published):
    _, ckpt, _ = published
    server = serve({"/w.pth": ckpt})
    point_at(monkeypatch, server.url("/w.pth"), server.url("/gone/vocab.txt"))
    message = load_error("catr-v3")
    assert server.url("/gone/vocab.txt") in message and str(cache / hub.VOCAB_FILE) in message
    assert cache_files(cache) == ["catr-v3.pth"]
    assert (cache / "catr-v3.pth").read_bytes() == ckpt


def test_connection_refused(cache, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/w.pth"
    point_at(monkeypatch, url, f"http://127.0.0.1:{port}/vocab.txt")
    message = load_error("catr-v3")
    assert url in message and "put it at" in message and str(cache / "catr-v3.pth") in message
    assert cache_files(cache) == []


@pytest.mark.parametrize("mode, needle", [("short", "stopped early"), ("chunked-cut", "could not download"), ("garbage", "could not download")])
def test_broken_transfer_leaves_nothing(serve, cache, monkeypatch, mode, needle):
    server = serve({"/w.pth": mode})
    point_at(monkeypatch, server.url("/w.pth"), server.url("/vocab.txt"))
    message = load_error("catr-v3")
    assert needle in message and server.url("/w.pth") in message
    assert cache_files(cache) == []
    assert server.requests == ["/w.pth"]


def test_file_urls(tmp_path, cache, monkeypatch, published):
    sd, ckpt, vocab = published
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "w.pth").write_bytes(ckpt)
    (src / "vocab.txt").write_bytes(vocab)
    point_at(monkeypatch, (src / "w.pth").as_uri(), (src / "vocab.txt").as_uri())
    model = attnlab.load_model("catr-v3")
    assert_same_weights(model, sd)
    assert cache_files(cache) == ["bert-base-uncased-vocab.txt", "catr-v3.pth"]
    assert (cache / "catr-v3.pth").read_bytes() == ckpt

    monkeypatch.setitem(hub.CHECKPOINT_URLS, "catr-v2", (src / "absent.pth").as_uri())
    message = load_error("catr-v2")
    assert "absent.pth" in message and str(cache / "catr-v2.pth") in message
    assert cache_files(cache) == ["bert-base-uncased-vocab.txt", "catr-v3.pth"]


def test_explicit_vocab_skips_the_vocab_download(serve, cache, monkeypatch, published, tmp_path):
    sd, ckpt, _ = published
    server = serve({"/w.pth": ckpt})
    point_at(monkeypatch, server.url("/w.pth"), server.url("/vocab.txt"))
    model = attnlab.load_model("catr-v3", vocab=write_vocab(tmp_path / "v.txt", TOKENS))
    assert server.requests == ["/w.pth"] and model.spec.vocab.tokens == TOKENS
