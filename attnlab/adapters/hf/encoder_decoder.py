"""``VisionEncoderDecoderModel``: a ViT-style encoder (ViT, DeiT, BEiT) and a text decoder
with cross-attention (GPT-2, BERT, ...), e.g. ``nlpconnect/vit-gpt2-image-captioning``."""

from __future__ import annotations

from typing import Any

import torch

from .base import HFState, HuggingFaceCaptioner, KindParts
from .generation import first_id, setting, transformers_module


class EncoderDecoderCaptioner(HuggingFaceCaptioner):
    """A ``VisionEncoderDecoderModel`` behind the seam: the model's own forward at every step."""

    model_class = "VisionEncoderDecoderModel"
    described = "a VisionEncoderDecoderModel (ViT/DeiT/BEiT encoder + GPT-2/BERT decoder)"

    def _parts(self) -> KindParts:
        m = self.model
        return KindParts(m.encoder, m.config.encoder, m.config.decoder, m.generation_config, m.forward)

    def _token_ids(self) -> tuple[dict[str, int | None], tuple[str, str, str]]:
        # what generate uses: the generation config's start (else bos), end and pad (else end) ids
        generation, config = self.model.generation_config, self.model.config
        eos = first_id(setting(generation, config, "eos_token_id"))
        ids = {
            "bos": first_id(setting(generation, config, "decoder_start_token_id"), setting(generation, config, "bos_token_id")),
            "eos": eos,
            "pad": first_id(setting(generation, config, "pad_token_id"), eos),
        }
        return ids, ("generation_config.decoder_start_token_id", "generation_config.eos_token_id", "generation_config.pad_token_id")

    def _forward(self, state: HFState, ids: torch.Tensor, want: bool) -> tuple[Any, Any]:
        output_class = transformers_module().modeling_outputs.BaseModelOutput
        out = self.model(
            encoder_outputs=output_class(last_hidden_state=state.memory),
            decoder_input_ids=ids, use_cache=True, output_attentions=want, return_dict=True,
            **{self._cache_kw: state.cache},
        )  # fmt: skip
        return out, out.decoder_attentions
