"""``attnlab.from_huggingface``: Hugging Face captioners through the seam.

Two kinds of ``transformers`` models caption images and have a decoder whose
cross-attention looks at image patches:

* ``VisionEncoderDecoderModel``: a ViT-style encoder (ViT, DeiT, BEiT: a fixed
  patch grid after one CLS token, DeiT's distillation token too) and a text
  decoder with cross-attention (GPT-2, BERT, ...), e.g.
  ``nlpconnect/vit-gpt2-image-captioning``;
* ``BlipForConditionalGeneration``, e.g. ``Salesforce/blip-image-captioning-base``.

:func:`from_huggingface` wraps one in a captioner of the seam
(:mod:`attnlab.captioner`) that decodes exactly as the model's own greedy
``generate`` does: the same start token, the model's own key/value cache
(``step`` feeds one token; ``state.select`` reorders the cache), the same end
token. Hugging Face only returns attention weights from its "eager" attention,
so every ``begin``/``step`` switches the model to eager attention and puts the
previous setting back afterwards, exceptions included.

The image processor makes the model input (``spec.transform``); attnlab checks
once, on a synthetic image, that it stretches the photo to a square (what ViT
and BLIP processors do), so that the figures put every patch on the part of the
photo it saw. A processor that crops or pads gets a one-line error instead.

``transformers`` is an optional extra (``pip install "attnlab[hf]"``); this
module imports it only when :func:`from_huggingface` is called.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from ..captioner import CaptionerSpec, Encoded, Record, StepOutput, check_record
from ..errors import AttnlabError
from ..tokenizer import BPEVocab, Vocab
from ..util import evaluating, one_line
from .wrap import refuse_meta

KINDS = "a VisionEncoderDecoderModel (ViT/DeiT/BEiT encoder + GPT-2/BERT decoder) or a BlipForConditionalGeneration"
MAX_PREFIX = 8  # encoders with more leading non-patch tokens than this are not ViT-style
STRETCH_TOLERANCE = 0.03  # largest difference (pixel values in [0, 1]) from a plain resize to a square
MAX_SIDE = 2048  # the largest input side an image processor may ask for (checked before it runs)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise AttnlabError(
            "from_huggingface needs the transformers package: pip install \"attnlab[hf]\" (or pip install transformers)"
        ) from None
    return transformers


# ---------------------------------------------------------------------- tokens
class HFVocab:
    """A Hugging Face tokenizer as attnlab's token table.

    ``token(id)`` shows one piece (WordPiece continuations keep their ``##``;
    byte-level BPE pieces show as text without the ``Ġ`` space mark),
    ``decode(ids)`` is the tokenizer's own ``decode(ids, skip_special_tokens=True)``
    (stripped), ``word_starts(ids)`` says which pieces start a word, and
    ``len()`` is the number of ids the model predicts (it may exceed the
    tokenizer's: BLIP's head has spare rows; those ids show as ``[id]``).
    """

    def __init__(self, tokenizer: Any, size: int) -> None:
        n = len(tokenizer)
        pieces = [p if isinstance(p, str) else f"[{i}]" for i, p in enumerate(tokenizer.convert_ids_to_tokens(list(range(n))))]
        special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        self.kind = _piece_kind(tokenizer, pieces)
        self.pieces: Vocab = BPEVocab(pieces, special) if self.kind == "bpe" else Vocab(pieces, wordpiece=self.kind == "wordpiece")
        self.tokenizer = tokenizer
        self.size = max(int(size), n)

    def __len__(self) -> int:
        return self.size

    def token(self, token_id: int) -> str:
        return self.pieces.token(int(token_id))

    def decode(self, ids: list[int]) -> str:
        ids = [int(t) for t in ids]
        if all(0 <= t < len(self.pieces) for t in ids):
            return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
        return self.pieces.decode(ids)  # ids beyond the tokenizer: attnlab's own joining

    def word_starts(self, ids: list[int]) -> list[bool]:
        return self.pieces.word_starts([int(t) for t in ids])


def _piece_kind(tokenizer: Any, pieces: list[str]) -> str:
    """``"wordpiece"``, ``"bpe"`` (byte-level) or ``"plain"``: from the tokenizer's decoder, else from its pieces."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    name = type(decoder).__name__ if decoder is not None else ""
    if name == "WordPiece":
        return "wordpiece"
    if name == "ByteLevel":
        return "bpe"
    if any(p.startswith("Ġ") for p in pieces):
        return "bpe"
    if any(p.startswith("##") for p in pieces):
        return "wordpiece"
    return "plain"


# ---------------------------------------------------------------------- eager attention, scoped
def _configs(model: Any, config_type: type) -> list[Any]:
    """Every configuration object of ``model`` and its sub-models (each once)."""
    found: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), config_type)]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, config_type):
                stack.append(sub)
    return list(found.values())


@contextlib.contextmanager
def eager_attention(configs: list[Any]) -> Iterator[None]:
    """Run the block with every config's attention implementation set to ``"eager"``
    (the only one that returns weights); the previous settings come back afterwards,
    also when the block raises."""
    saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value


# ---------------------------------------------------------------------- the autograd rule
_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.special.softmax}


class RowTap(TorchFunctionMode):
    """While active (one decoding step with autograd on): every softmax over one query row,
    ``(N, heads, 1, K)``, is handed on as a view of its row ``(N, heads, K)``, kept in ``rows``.

    Hugging Face returns the ``(N, heads, 1, K)`` weights; a row sliced from them afterwards
    would not be the tensor the model multiplied with its values (no gradient reaches it).
    With the tap the model itself goes on from the row, so :meth:`row_of` can hand out a row
    that is (the seam's autograd rule). Values are unchanged; scoped to the ``with`` block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] == 1:
            row = out[:, :, 0]  # (N, heads, K)
            self.rows.append(row)
            return row[:, :, None]  # (N, heads, 1, K): what the model goes on with
        return out

    def row_of(self, weights: torch.Tensor) -> torch.Tensor:
        """The tapped row behind Hugging Face's ``(N, heads, 1, K)`` weights (else a slice of them)."""
        for row in self.rows:
            if row.data_ptr() == weights.data_ptr() and row.shape == weights[:, :, -1].shape:
                return row  # (N, heads, K)
        return weights[:, :, -1]  # (N, heads, K)


# ---------------------------------------------------------------------- the image processor
@dataclass(frozen=True)
class _Pixels:
    """What the image processor does, as the spec needs it."""

    transform: Callable[[Image.Image], torch.Tensor]
    side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _triple(value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3  # type: ignore[return-value]
    if isinstance(value, numbers.Real):
        return (float(value),) * 3  # type: ignore[return-value]
    out = tuple(float(v) for v in value)
    return out if len(out) == 3 else (out[0],) * 3  # type: ignore[return-value]


_SIDE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


def _sides(sizes: Any) -> dict[str, float]:
    """The pixel sides an image processor's ``size`` asks for: a number, a dict or transformers' ``SizeDict``."""
    if isinstance(sizes, numbers.Real):
        return {"side": sizes}
    items = sizes.items() if isinstance(sizes, dict) else vars(sizes).items() if hasattr(sizes, "__dict__") else ()
    return {k: v for k, v in items if k in _SIDE_KEYS and isinstance(v, numbers.Real)}


def _pixels_of(image_processor: Any) -> _Pixels:
    """The processor as ``spec.transform``, checked on a synthetic wide image to stretch it to a square."""
    processor = getattr(image_processor, "image_processor", image_processor)  # a combined processor works too
    if not callable(processor):
        raise AttnlabError(
            f"image_processor must be the model's Hugging Face image processor (AutoImageProcessor.from_pretrained(...)), "
            f"not a {type(image_processor).__name__}"
        )
    normalize = getattr(processor, "do_normalize", True)
    mean = _triple(getattr(processor, "image_mean", None) if normalize else None, 0.0)
    std = _triple(getattr(processor, "image_std", None) if normalize else None, 1.0)
    scale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    for key in ("size", "crop_size"):
        for side, value in _sides(getattr(processor, key, None)).items():
            if value > MAX_SIDE:
                raise AttnlabError(
                    f"the image processor's {key} {side}={value} is larger than attnlab's limit of {MAX_SIDE} px: set it to the model's input size"
                )

    def transform(img: Image.Image) -> torch.Tensor:
        out = processor(images=img, return_tensors="pt")
        x = out["pixel_values"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return torch.as_tensor(x)[0].float()  # (3, S, S)

    # a wide ramp: red grows left to right, green top to bottom; a crop or padding moves them
    side = 64
    xs = np.linspace(0.0, 1.0, 2 * side)
    ys = np.linspace(0.0, 1.0, side)
    ramp = np.stack(
        [np.broadcast_to(xs, (side, 2 * side)), np.broadcast_to(ys[:, None], (side, 2 * side)), np.full((side, 2 * side), 0.5)],
        axis=-1,
    )  # (64, 128, 3) in [0, 1]
    probe = Image.fromarray((ramp * 255).round().astype(np.uint8))
    try:
        x = transform(probe)  # (3, S, S)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign processor becomes one line
        raise AttnlabError(f"the image processor failed on a test image ({one_line(exc, with_type=True)}): pass the model's own image processor") from None
    if x.dim() != 3 or x.shape[0] != 3 or x.shape[1] != x.shape[2]:
        raise AttnlabError(
            f"the image processor gives {tuple(x.shape)} pixels; attnlab needs a square (3, S, S) input: set its size to a square"
        )
    s = int(x.shape[-1])
    unit = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) / (scale * 255.0)  # (3, S, S) in [0, 1]
    expected = torch.from_numpy(np.asarray(probe.resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0).permute(2, 0, 1)
    gap = float((unit - expected)[:, 1:-1, 1:-1].abs().max()) if s > 2 else 0.0
    if gap > STRETCH_TOLERANCE:
        raise AttnlabError(
            f"the image processor crops or pads the image (off by {gap:.2f} from a plain resize to {s}x{s}), so attnlab's "
            "figures could not place the patches: use one that only resizes to a square (e.g. do_center_crop=False and "
            "size=crop_size; the model then sees the whole image, not its centre)"
        )
    return _Pixels(transform, s, mean, std)


# ---------------------------------------------------------------------- decoding state
@dataclass
class HFState:
    """The decoding state: the encoder's tokens and the model's own key/value cache."""

    memory: torch.Tensor  # (N, T, D) encoder output, CLS/prefix first
    memory_mask: torch.Tensor  # (N, T) long, all ones (BLIP's generate passes it)
    cache: Any = None  # transformers Cache (None before the first step)
    length: int = 0  # tokens fed so far

    def select(self, indices: torch.Tensor) -> "HFState":
        """Keep/reorder captions: the encoder tokens and, in place, the model's cache (its ``reorder_cache``)."""
        idx = indices.to(self.memory.device)
        self.memory = self.memory.index_select(0, idx)  # (M, T, D)
        self.memory_mask = self.memory_mask.index_select(0, idx)  # (M, T)
        if self.cache is not None:
            self.cache.reorder_cache(idx)
        return self


class HuggingFaceCaptioner:
    """A Hugging Face captioning model behind the captioner seam (built by :func:`from_huggingface`)."""

    def __init__(self, model: Any, kind: str, tokenizer: Any, pixels: _Pixels, max_len: int | None, name: str | None) -> None:
        tf = _transformers()
        self.model = model
        self.kind = kind  # "ved" | "blip"
        self._configs = _configs(model, tf.PretrainedConfig)
        self._output_class = tf.modeling_outputs.BaseModelOutput
        self._pixels = pixels
        if kind == "ved":
            self._encoder, self._decoder_call = model.encoder, model.forward
            encoder_config, generation = model.config.encoder, model.generation_config
            # what generate uses: the generation config's start (else bos), end and pad (else end) ids
            bos = _first_id(_ids(generation, model.config, "decoder_start_token_id"), _ids(generation, model.config, "bos_token_id"))
            eos = _first_id(_ids(generation, model.config, "eos_token_id"))
            pad = _first_id(_ids(generation, model.config, "pad_token_id"), eos)
            fields = ("generation_config.decoder_start_token_id", "generation_config.eos_token_id", "generation_config.pad_token_id")
            decoder_config = model.config.decoder
        else:
            self._encoder, self._decoder_call = model.vision_model, model.text_decoder.forward
            encoder_config, generation = model.config.vision_config, model.text_decoder.generation_config
            text = model.config.text_config
            # BlipForConditionalGeneration.generate: start at the text config's bos ([DEC]), end at [SEP]
            bos, eos = _first_id(getattr(text, "bos_token_id", None)), _first_id(getattr(text, "sep_token_id", None))
            pad = _first_id(getattr(text, "pad_token_id", None), 0)
            fields = ("config.text_config.bos_token_id", "config.text_config.sep_token_id", "config.text_config.pad_token_id")
            decoder_config = text
        if bos is None or eos is None:
            raise AttnlabError(
                "the model names no start or end token: set model.generation_config.decoder_start_token_id and eos_token_id"
            )
        self._id_fields = dict(zip(("bos", "eos", "pad"), fields))
        _check_ids(dict(bos=bos, eos=eos, pad=pad), self._id_fields, getattr(decoder_config, "vocab_size", None), "the decoder's vocabulary has")
        _warn_if_not_greedy(generation)
        self._cache_kw = "cache" if "cache" in inspect.signature(self._decoder_call).parameters else "past_key_values"
        self._grid = _grid_of(encoder_config, pixels.side)
        positions = _positions(decoder_config)
        if max_len is None:  # what generate would make, within the decoder's positions
            max_len = min(_generate_length(generation, tf.GenerationConfig().max_length), positions or GENERATE_NEW_TOKENS)
        elif positions is not None and max_len > positions:
            raise AttnlabError(
                f"max_len={max_len} is more than the decoder's {positions} positions (start token included): pass max_len <= {positions}"
            )
        self._spec_args = dict(
            name=name or getattr(model, "name_or_path", "") or type(model).__name__,
            bos=int(bos), eos=int(eos), pad=int(pad), max_len=int(max_len), image_size=pixels.side, resize="stretch",
            mean=pixels.mean, std=pixels.std, transform=pixels.transform,
        )  # fmt: skip
        self._tokenizer = tokenizer
        self._prefix = 0
        self._vocab: HFVocab | None = None
        self._probe()

    # ------------------------------------------------------------ checks
    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        p = next(self._encoder.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _probe(self) -> None:
        """Encode a grey image and take one step: the patch grid, the prefix and the cross-attention are checked here."""
        side = self._pixels.side
        x = self._pixels.transform(Image.new("RGB", (side, side), (128, 128, 128)))  # (3, S, S)
        h, w = self._grid
        with evaluating(self.model):
            with torch.inference_mode():
                try:
                    out, _ = self._encode(x[None].to(self._device(), self._dtype()))  # (1, T, D)
                except AttnlabError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a foreign model's failure becomes one line
                    raise AttnlabError(
                        f"the model's encoder failed on the image processor's {side}x{side} output ({one_line(exc, with_type=True)}): "
                        "pass the image processor that belongs to the model"
                    ) from None
                tokens = out.shape[1] if out.dim() == 3 else -1
                if out.dim() != 3 or not 0 <= tokens - h * w <= MAX_PREFIX:
                    shape = tuple(out.shape)
                    raise AttnlabError(
                        f"the {_model_type(self.model, self.kind)} encoder has no fixed patch grid: it gives {shape} for a "
                        f"{side}x{side} image, not CLS + {h}x{w} patches (Swin and CNN encoders merge or pool patches); "
                        "attnlab needs a ViT-style encoder (ViT, DeiT, BEiT, BLIP's)"
                    )
                self._prefix = tokens - h * w
                state = HFState(out, torch.ones(out.shape[:2], dtype=torch.long, device=out.device))  # (1, T, D), (1, T)
                bos = self._spec_args["bos"]
                try:
                    step = self.step(state, torch.tensor([bos]), "cross")
                except Exception as exc:  # noqa: BLE001 - a foreign model's failure becomes one line
                    raise AttnlabError(
                        f"the model's decoder failed on its start token {bos} ({self._id_fields['bos']}; {one_line(exc, with_type=True)}): "
                        "check that id, and that the decoder has cross-attention over the encoder's tokens (add_cross_attention=True)"
                    ) from None
        if not step.cross_attention or any(a is None or a.shape[-1] != tokens for a in step.cross_attention):
            raise AttnlabError("the decoder returned no cross-attention over the image tokens: it needs add_cross_attention=True")
        ids = {k: self._spec_args[k] for k in ("bos", "eos", "pad")}
        _check_ids(ids, self._id_fields, step.logits.shape[-1], "the model predicts")
        self._vocab = HFVocab(self._tokenizer, step.logits.shape[-1])

    # caption() puts a captioner in eval mode for the call and back afterwards
    @property
    def training(self) -> bool:
        return bool(self.model.training)

    def train(self, mode: bool = True) -> "HuggingFaceCaptioner":
        self.model.train(mode)
        return self

    def eval(self) -> "HuggingFaceCaptioner":
        return self.train(False)

    # ------------------------------------------------------------ the seam
    @property
    def spec(self) -> CaptionerSpec:
        return CaptionerSpec(vocab=self._vocab, prefix_tokens=self._prefix, **self._spec_args)

    def _encode(self, x: torch.Tensor, attentions: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Pixels ``(N, 3, S, S)`` -> the encoder's tokens ``(N, T, D)`` (prefix, then the
        patches row-major) and, if asked, its self-attention per layer ``(N, heads, T, T)``."""
        with eager_attention(self._configs):
            out = self._encoder(pixel_values=x, output_attentions=attentions, return_dict=True)
        weights = list(out.attentions) if attentions and out.attentions else None
        return out.last_hidden_state, weights

    def begin(self, pixels: Sequence[torch.Tensor], record: Record = "cross") -> Encoded:
        record = check_record(record)
        sizes = {tuple(p.shape[-2:]) for p in pixels}
        if len(sizes) != 1:
            raise AttnlabError(f"a Hugging Face captioner takes the image processor's {self._pixels.side}px squares; got sizes {sorted(sizes)}")
        x = torch.stack(list(pixels)).to(self._device(), self._dtype())  # (N, 3, S, S)
        memory, encoder = self._encode(x, attentions=record == "all")  # (N, T, D); per layer (N, heads, T, T)
        mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)  # (N, T)
        return Encoded(HFState(memory, mask), [self._grid] * x.shape[0], encoder)

    def step(self, state: HFState, ids: torch.Tensor, record: Record = "cross") -> StepOutput:
        ids = ids.to(state.memory.device)[:, None]  # (N, 1): the newest token of each caption
        want = record != "none"
        tap = RowTap()
        with eager_attention(self._configs), tap if want and torch.is_grad_enabled() else contextlib.nullcontext():
            if self.kind == "ved":  # the model's own forward, as its generate calls it
                out = self.model(
                    encoder_outputs=self._output_class(last_hidden_state=state.memory),
                    decoder_input_ids=ids, use_cache=True, output_attentions=want, return_dict=True,
                    **{self._cache_kw: state.cache},
                )  # fmt: skip
                selfs = out.decoder_attentions
            else:  # BLIP: the text decoder, as BlipForConditionalGeneration.generate drives it
                seen = torch.ones(ids.shape[0], state.length + 1, dtype=torch.long, device=ids.device)  # (N, t)
                out = self.model.text_decoder(
                    input_ids=ids, attention_mask=seen, encoder_hidden_states=state.memory,
                    encoder_attention_mask=state.memory_mask, use_cache=True, output_attentions=want, return_dict=True,
                    **{self._cache_kw: state.cache},
                )  # fmt: skip
                selfs = out.attentions
        cache = getattr(out, "cache", None)
        state.cache = cache if cache is not None else out.past_key_values
        state.length += 1
        logits = out.logits[:, -1]  # (N, V)
        cross = [tap.row_of(a) for a in out.cross_attentions] if want else None  # per layer (N, heads, T)
        selfs = [tap.row_of(a) for a in selfs] if record == "all" and selfs else None  # per layer (N, heads, t)
        return StepOutput(logits, cross, selfs)


# generation settings under which the model's own generate() is not plain greedy decoding
_NOT_GREEDY = (
    ("num_beams", lambda v: v > 1),
    ("do_sample", bool),
    ("repetition_penalty", lambda v: v != 1.0),
    ("no_repeat_ngram_size", lambda v: v > 0),
    ("min_new_tokens", lambda v: v > 0),
    ("min_length", lambda v: v > 0),
)


def _warn_if_not_greedy(generation: Any) -> None:
    """attnlab decodes greedily; say so when the model's generate() would do something else by default."""
    found = []
    for key, odd in _NOT_GREEDY:
        value = getattr(generation, key, None)
        if value is not None and odd(value):
            found.append(f"{key}={value!r}")
    if found:
        warnings.warn(
            f"attnlab decodes greedily, but this model's generation config sets {', '.join(found)}: its captions may differ "
            "from model.generate(...) with those settings (they match generate(num_beams=1, do_sample=False, ...))",
            UserWarning,
            stacklevel=4,  # the line that called from_huggingface
        )


GENERATE_NEW_TOKENS = 20  # what generate makes when no length is set


def _generate_length(generation: Any, unset: int | None) -> int:
    """How many tokens ``generate`` makes after the start token: ``max_new_tokens``; else
    20 when ``max_length`` keeps its default (``unset``: None in transformers 5, 20 in 4);
    else ``max_length - 1`` (it counts the start token)."""
    new_tokens = getattr(generation, "max_new_tokens", None)
    if new_tokens:
        return int(new_tokens)
    max_length = getattr(generation, "max_length", None)
    if max_length is None or max_length == unset:
        return GENERATE_NEW_TOKENS
    return max(1, int(max_length) - 1)


def _ids(generation: Any, config: Any, key: str) -> Any:
    """``generation_config.<key>``, else the model config's (older checkpoints keep ids there)."""
    value = getattr(generation, key, None)
    return value if value is not None else getattr(config, key, None)


def _first_id(*candidates: Any) -> int | None:
    """The first candidate that is set; a list of ids gives its first."""
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None


def _positions(decoder_config: Any) -> int | None:
    """The most positions the text decoder has (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(decoder_config, key, None)
        if isinstance(value, numbers.Integral) and value > 0:
            return int(value)
    return None


def _check_ids(ids: dict[str, int], fields: dict[str, str], size: Any, where: str) -> None:
    """The start, end and padding ids must be token ids ``0 .. size - 1`` (one line naming the setting)."""
    if not isinstance(size, numbers.Integral) or size < 1:
        return
    for key, value in ids.items():
        if not 0 <= value < size:
            raise AttnlabError(f"the {key} token id {value} ({fields[key]}) is not a token id: {where} {size} (0..{size - 1}); set {fields[key]} to the model's own")


def _model_type(model: Any, kind: str) -> str:
    config = model.config.encoder if kind == "ved" else model.config.vision_config
    return str(getattr(config, "model_type", type(model).__name__))


def _grid_of(encoder_config: Any, side: int) -> tuple[int, int]:
    """The encoder's patch grid for a ``side`` x ``side`` input (from its patch size)."""
    patch = getattr(encoder_config, "patch_size", None)
    if patch is None:
        kind = getattr(encoder_config, "model_type", "this")
        raise AttnlabError(f"the {kind} encoder has no patch size, so no fixed patch grid: attnlab needs a ViT-style encoder (ViT, DeiT, BEiT, BLIP's)")
    ph, pw = (patch, patch) if isinstance(patch, numbers.Integral) else tuple(int(p) for p in patch)
    if side < ph or side < pw:
        raise AttnlabError(f"the image processor's {side}px input is smaller than one {ph}x{pw} patch")
    return side // ph, side // pw


def from_huggingface(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    *,
    max_len: int | None = None,
    name: str | None = None,
) -> HuggingFaceCaptioner:
    """Make a Hugging Face captioning model a captioner of the seam.

    Args:
        model: a ``VisionEncoderDecoderModel`` whose encoder is ViT-style (ViT,
            DeiT, BEiT: one CLS token, DeiT's distillation token too, then a fixed
            patch grid) and whose decoder has cross-attention (GPT-2, BERT, ...),
            or a ``BlipForConditionalGeneration``.
        tokenizer: the model's tokenizer (or its processor, which holds one).
        image_processor: the model's image processor (or its processor). It
            makes the model input; it must resize to a square (checked here).
        max_len: most tokens to generate, the end token included (default: what
            the model's ``generate`` would allow: ``max_new_tokens``, else
            ``max_length - 1``, at most the decoder's positions). More than the
            decoder's positions (``max_position_embeddings``) is refused.
        name: shown in figures (default: the model's hub name or class).

    Decoding is greedy (``generate(do_sample=False, num_beams=1)``), from the
    start token ``generate`` uses (``decoder_start_token_id``; BLIP: its
    ``[DEC]`` token, ending at ``[SEP]``), on the model's own key/value cache.
    """
    tf = _transformers()
    if isinstance(model, tf.VisionEncoderDecoderModel):
        kind = "ved"
    elif isinstance(model, tf.BlipForConditionalGeneration):
        kind = "blip"
    else:
        hint = " (load it first, e.g. VisionEncoderDecoderModel.from_pretrained(name))" if isinstance(model, str) else ""
        raise AttnlabError(f"from_huggingface takes {KINDS}, not a {type(model).__name__}{hint}")
    refuse_meta(model, "from_pretrained(name) without device_map='meta', or to_empty(device='cpu') then load_state_dict")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a combined processor works too
    if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)) or not callable(getattr(tokenizer, "decode", None)):
        raise AttnlabError(f"tokenizer must be the model's Hugging Face tokenizer (AutoTokenizer.from_pretrained(...)), not a {type(tokenizer).__name__}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1):
        raise AttnlabError(f"max_len must be a positive integer, not {max_len!r}")
    if name is not None and not isinstance(name, str):
        raise AttnlabError(f"name must be a string, not {type(name).__name__}")
    return HuggingFaceCaptioner(model, kind, tokenizer, _pixels_of(image_processor), None if max_len is None else int(max_len), name)
