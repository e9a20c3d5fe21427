"""The part every Hugging Face captioner kind shares (:class:`HuggingFaceCaptioner`): the
spec, the one-time probe, ``begin`` (the encoder) and ``step`` (one token on the model's own
key/value cache, under eager attention). A kind (:mod:`.encoder_decoder`, :mod:`.blip`)
names its encoder, configs and start/end/pad ids and runs its decoder for one token.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from ...captioner import CaptionerSpec, Encoded, Record, StepOutput, check_record
from ...errors import AttnlabError
from ...util import one_line
from ..module import ModuleCaptioner
from .attention import RowTap, configs_of, eager_attention
from .generation import GENERATE_NEW_TOKENS, check_ids, generate_length, grid_of, positions, transformers_module, warn_if_not_greedy
from .processor import ProcessorInput
from .vocab import HFVocab

MAX_PREFIX = 8  # encoders with more leading non-patch tokens than this are not ViT-style
ID_NAMES = ("bos", "eos", "pad")


@dataclass(frozen=True)
class KindParts:
    """Where a model kind keeps what the shared captioner needs."""

    encoder: Any  # the vision encoder: pixel_values -> last_hidden_state (N, T, D)
    encoder_config: Any  # its config (patch_size, model_type)
    decoder_config: Any  # the text decoder's config (vocab_size, positions)
    generation: Any  # the generation config its generate reads
    decoder_forward: Callable  # the forward that takes the cache (keyword cache or past_key_values)


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


class HuggingFaceCaptioner(ModuleCaptioner):
    """A Hugging Face captioning model behind the captioner seam (built by :func:`~attnlab.from_huggingface`).

    A kind sets :attr:`model_class` and :attr:`described` and implements the three methods
    under "the kind's": :meth:`_parts`, :meth:`_token_ids` and :meth:`_forward`.
    """

    model_class: ClassVar[str]  # the transformers class this kind captions
    described: ClassVar[str]  # that class in an error message

    def __init__(self, model: Any, tokenizer: Any, pixels: ProcessorInput, max_len: int | None, name: str | None) -> None:
        tf = transformers_module()
        self.model = model
        self._configs = configs_of(model, tf.PretrainedConfig)
        self._pixels = pixels
        parts = self._parts()
        self._encoder, self._encoder_config, self._decoder_config = parts.encoder, parts.encoder_config, parts.decoder_config
        self._generation = parts.generation
        ids, fields = self._token_ids()
        if ids["bos"] is None or ids["eos"] is None:
            raise AttnlabError(
                "the model names no start or end token: set model.generation_config.decoder_start_token_id and eos_token_id"
            )
        self._id_fields = dict(zip(ID_NAMES, fields))
        check_ids(ids, self._id_fields, getattr(self._decoder_config, "vocab_size", None), "the decoder's vocabulary has")
        warn_if_not_greedy(self._generation, stacklevel=4)  # the line that called from_huggingface
        self._cache_kw = "cache" if "cache" in inspect.signature(parts.decoder_forward).parameters else "past_key_values"
        self._grid = grid_of(self._encoder_config, pixels.side)
        self._spec_args = dict(
            name=name or getattr(model, "name_or_path", "") or type(model).__name__,
            bos=int(ids["bos"]), eos=int(ids["eos"]), pad=int(ids["pad"]), max_len=self._caption_length(max_len, tf),
            image_size=pixels.side, resize="stretch", mean=pixels.mean, std=pixels.std, transform=pixels.transform,
            crop=pixels.crop,
        )  # fmt: skip
        self._tokenizer = tokenizer
        self._prefix = 0
        self._vocab: HFVocab | None = None
        self._probe()

    # ------------------------------------------------------------ the kind's
    def _parts(self) -> "KindParts":
        """Where this kind keeps its encoder, configs and the decoder forward that takes the cache."""
        raise NotImplementedError

    def _token_ids(self) -> tuple[dict[str, int | None], tuple[str, str, str]]:
        """The start, end and padding ids ``generate`` uses, and the settings that hold them."""
        raise NotImplementedError

    def _forward(self, state: HFState, ids: torch.Tensor, want: bool) -> tuple[Any, Any]:
        """One token ``ids`` (N, 1) through the decoder, as the model's ``generate`` calls it:
        its output (logits, cross_attentions, the cache) and its self-attention per layer."""
        raise NotImplementedError

    # ------------------------------------------------------------ checks
    def _caption_length(self, max_len: int | None, tf: Any) -> int:
        """``max_len``, or what ``generate`` would make, within the decoder's positions."""
        most = positions(self._decoder_config)
        if max_len is None:
            return min(generate_length(self._generation, tf.GenerationConfig().max_length), most or GENERATE_NEW_TOKENS)
        if most is not None and max_len > most:
            raise AttnlabError(
                f"max_len={max_len} is more than the decoder's {most} positions (start token included): pass max_len <= {most}"
            )
        return int(max_len)

    def _dtype(self) -> torch.dtype:
        p = next(self._encoder.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def _probe(self) -> None:
        """Encode a grey image and take one step: the patch grid, the prefix and the cross-attention are checked here."""
        side = self._pixels.side
        x = self._pixels.transform(Image.new("RGB", (side, side), (128, 128, 128)))  # (3, S, S)
        with self._probing():
            out = self._probe_encoder(x[None].to(self._device(), self._dtype()))  # (1, T, D)
            state = HFState(out, torch.ones(out.shape[:2], dtype=torch.long, device=out.device))  # (1, T, D), (1, T)
            step = self._probe_step(state)
        tokens = out.shape[1]
        if not step.cross_attention or any(a is None or a.shape[-1] != tokens for a in step.cross_attention):
            raise AttnlabError("the decoder returned no cross-attention over the image tokens: it needs add_cross_attention=True")
        ids = {k: self._spec_args[k] for k in ID_NAMES}
        check_ids(ids, self._id_fields, step.logits.shape[-1], "the model predicts")
        self._vocab = HFVocab(self._tokenizer, step.logits.shape[-1])

    def _probe_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens (1, T, D) for the probe image: a prefix, then a fixed patch grid; sets the prefix."""
        side, (h, w) = self._pixels.side, self._grid
        try:
            out, _ = self._encode(x)  # (1, T, D)
        except AttnlabError:
            raise
        except Exception as exc:  # noqa: BLE001 - a foreign model's failure becomes one line
            raise AttnlabError(
                f"the model's encoder failed on the image processor's {side}x{side} output ({one_line(exc, with_type=True)}): "
                "pass the image processor that belongs to the model"
            ) from None
        tokens = out.shape[1] if out.dim() == 3 else -1
        if out.dim() != 3 or not 0 <= tokens - h * w <= MAX_PREFIX:
            kind = str(getattr(self._encoder_config, "model_type", type(self.model).__name__))
            raise AttnlabError(
                f"the {kind} encoder has no fixed patch grid: it gives {tuple(out.shape)} for a "
                f"{side}x{side} image, not CLS + {h}x{w} patches (Swin and CNN encoders merge or pool patches); "
                "attnlab needs a ViT-style encoder (ViT, DeiT, BEiT, BLIP's)"
            )
        self._prefix = tokens - h * w
        return out

    def _probe_step(self, state: HFState) -> StepOutput:
        bos = self._spec_args["bos"]
        try:
            return self.step(state, torch.tensor([bos]), "cross")
        except Exception as exc:  # noqa: BLE001 - a foreign model's failure becomes one line
            raise AttnlabError(
                f"the model's decoder failed on its start token {bos} ({self._id_fields['bos']}; {one_line(exc, with_type=True)}): "
                "check that id, and that the decoder has cross-attention over the encoder's tokens (add_cross_attention=True)"
            ) from None

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
            out, self_weights = self._forward(state, ids, want)
        cache = getattr(out, "cache", None)
        state.cache = cache if cache is not None else out.past_key_values
        state.length += 1
        logits = out.logits[:, -1]  # (N, V)
        cross = [tap.row_of(a) for a in out.cross_attentions] if want else None  # per layer (N, heads, T)
        self_rows = [tap.row_of(a) for a in self_weights] if record == "all" and self_weights else None  # per layer (N, heads, t)
        return StepOutput(logits, cross, self_rows)
