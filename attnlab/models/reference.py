"""CATR's reference decoding loop (the original write-up's), as a captioner of the seam.

At every step the whole model runs on a 128-position *template*: the start
token, the tokens chosen so far, then zeros, with a key padding mask over the
empty positions. The logits and attention of step ``i`` are row ``i`` of that
forward pass; the weights come from hooks on the ``nn.MultiheadAttention``
modules (:func:`attnlab.capture_attention`), exactly as the write-up read them
(query 128 x N x 256, weights N x 128 x S).

It is slow (the image is encoded again at every step) and exists to check the
cached decoder of :class:`~attnlab.models.catr.CATR`: ``caption(model, image,
mode="template")`` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..capture import capture_attention
from ..captioner import CaptionerSpec, Encoded, Record, StepOutput, pad_to, scatter_groups, size_groups

CROSS = "transformer.decoder.layers.*.multihead_attn"
DEC_SELF = "transformer.decoder.layers.*.self_attn"
ENC_SELF = "transformer.encoder.layers.*.self_attn"


def make_template(config, prefixes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The original write-up's decoder input: one 128-position row per caption.

    Row ``n`` holds the start token, then ``prefixes[n]``, then zeros; the mask
    is True on the empty positions. Returns ids and mask, both ``(N, max_positions)``.
    """
    length = config.max_positions
    template = torch.zeros(len(prefixes), length, dtype=torch.long)  # (N, L)
    mask = torch.ones(len(prefixes), length, dtype=torch.bool)  # (N, L): True = empty
    for n, prefix in enumerate(prefixes):
        ids = [config.start_token_id, *prefix][:length]
        template[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[n, : len(ids)] = False
    return template, mask


@dataclass
class TemplateState:
    """Per caption: its image ``(1, 3, h, w)`` and its template row; the next position."""

    images: list[torch.Tensor]  # N tensors (1, 3, h_i, w_i)
    template: torch.Tensor  # (N, L) ids
    template_mask: torch.Tensor  # (N, L) True = empty position
    keys: int  # K: the longest grid's h * w
    position: int = 0

    def select(self, indices: torch.Tensor) -> "TemplateState":
        rows = indices.tolist()
        cpu = indices.to(self.template.device)
        return TemplateState(
            [self.images[r] for r in rows],
            self.template.index_select(0, cpu),
            self.template_mask.index_select(0, cpu),
            self.keys,
            self.position,
        )


class TemplateCaptioner:
    """The template loop over a :class:`~attnlab.models.catr.CATR` (see the module docstring)."""

    def __init__(self, model) -> None:
        self.model = model

    @property
    def spec(self) -> CaptionerSpec:
        return self.model.spec

    def begin(self, pixels: Sequence[torch.Tensor], record: Record = "cross") -> Encoded:
        model = self.model
        device = model.input_proj.weight.device
        images = [p[None].to(device) for p in pixels]  # N tensors (1, 3, h, w)
        groups = size_groups(pixels)
        grids: dict[int, tuple[int, int]] = {}
        enc_parts = []  # per group: per layer (n_g, heads, S_g, S_g)
        for group in groups:
            x = torch.cat([images[i] for i in group])  # (n_g, 3, h, w)
            mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=device)  # (n_g, h, w)
            with capture_attention(model, ENC_SELF) as cap:  # the encoder's weights as hooks see them
                _, _, _, grid = model.encode(x, mask)
            enc_parts.append([cap.last(name) for name in cap.names])
            grids.update({i: grid for i in group})
        keys = max(h * w for h, w in grids.values())
        encoder = None
        if record == "all":
            encoder = [
                scatter_groups(groups, torch.cat([pad_to(g[layer], keys, 2, 3) for g in enc_parts]))
                for layer in range(len(enc_parts[0]))
            ]  # per layer (N, heads, K, K)
        template, template_mask = make_template(model.config, [[] for _ in pixels])  # (N, L) each
        state = TemplateState(images, template.to(device), template_mask.to(device), keys)
        return Encoded(state, [grids[i] for i in range(len(pixels))], encoder)

    def step(self, state: TemplateState, ids: torch.Tensor, record: Record = "cross") -> StepOutput:
        model = self.model
        i = state.position
        state.template[:, i] = ids.to(state.template.device)
        state.template_mask[:, i] = False
        logits, cross, selfs = [], [], []
        groups = size_groups([im[0] for im in state.images])
        for group in groups:
            rows = torch.tensor(group, device=state.template.device)
            x = torch.cat([state.images[r] for r in group])  # (n_g, 3, h, w)
            with capture_attention(model, [CROSS, DEC_SELF]) as cap:
                out = model(x, state.template[rows], state.template_mask[rows])  # (n_g, L, V)
            logits.append(out[:, i])  # (n_g, V)
            names = cap.names
            # only row i of the L query rows matters at step i
            cross.append([pad_to(cap.last(m)[:, :, i], state.keys, 2) for m in names if m.endswith("multihead_attn")])
            selfs.append([cap.last(m)[:, :, i, : i + 1] for m in names if m.endswith("self_attn")])
        state.position += 1
        n_layers = len(cross[0])
        return StepOutput(
            logits=scatter_groups(groups, torch.cat(logits)),  # (N, V)
            cross_attention=None
            if record == "none"
            else [scatter_groups(groups, torch.cat([g[layer] for g in cross])) for layer in range(n_layers)],
            self_attention=None
            if record != "all"
            else [scatter_groups(groups, torch.cat([g[layer] for g in selfs])) for layer in range(n_layers)],
        )
