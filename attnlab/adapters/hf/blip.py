"""``BlipForConditionalGeneration``, e.g. ``Salesforce/blip-image-captioning-base``: its
vision model and its text decoder, driven as its ``generate`` drives them."""

from __future__ import annotations

from typing import Any

import torch

from .base import HFState, HuggingFaceCaptioner, KindParts
from .generation import first_id


class BlipCaptioner(HuggingFaceCaptioner):
    """A ``BlipForConditionalGeneration`` behind the seam: starts at ``[DEC]``, ends at ``[SEP]``."""

    model_class = "BlipForConditionalGeneration"
    described = "a BlipForConditionalGeneration"

    def _parts(self) -> KindParts:
        m = self.model
        return KindParts(m.vision_model, m.config.vision_config, m.config.text_config, m.text_decoder.generation_config, m.text_decoder.forward)

    def _token_ids(self) -> tuple[dict[str, int | None], tuple[str, str, str]]:
        # BlipForConditionalGeneration.generate: start at the text config's bos ([DEC]), end at [SEP]
        text = self.model.config.text_config
        ids = {
            "bos": first_id(getattr(text, "bos_token_id", None)),
            "eos": first_id(getattr(text, "sep_token_id", None)),
            "pad": first_id(getattr(text, "pad_token_id", None), 0),
        }
        return ids, ("config.text_config.bos_token_id", "config.text_config.sep_token_id", "config.text_config.pad_token_id")

    def _forward(self, state: HFState, ids: torch.Tensor, want: bool) -> tuple[Any, Any]:
        seen = torch.ones(ids.shape[0], state.length + 1, dtype=torch.long, device=ids.device)  # (N, t)
        out = self.model.text_decoder(
            input_ids=ids, attention_mask=seen, encoder_hidden_states=state.memory,
            encoder_attention_mask=state.memory_mask, use_cache=True, output_attentions=want, return_dict=True,
            **{self._cache_kw: state.cache},
        )  # fmt: skip
        return out, out.attentions
