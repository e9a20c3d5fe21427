"""The captioning model: CNN backbone -> 1x1 projection -> transformer -> MLP head.

:class:`CATR` reproduces the published CATR model (``build_catr()`` with the
default :class:`CATRConfig`); a smaller configuration of the same classes is
the bundled shapes model. ``state_dict()`` keys equal CATR's checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..captioner import (
    CaptionerSpec,
    Encoded,
    Record,
    StepOutput,
    TokenTable,
    check_best_head,
    pad_to,
    scatter_groups,
    size_groups,
    spec_from_config,
)
from .backbone import Joiner, build_backbone
from .fuse import InferenceBody
from .transformer import DecoderCache, LayerCache, Transformer, padding_bias

if TYPE_CHECKING:
    from .reference import TemplateCaptioner


@dataclass
class CATRConfig:
    """Architecture and pre-processing of a CATR-style captioner (defaults: CATR v1-v3)."""

    backbone: str = "resnet101"
    backbone_channels: tuple[int, ...] = (32, 64, 128, 192)  # "small" backbone only: one stage each
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    vocab_size: int = 30522
    max_positions: int = 128
    pad_token_id: int = 0
    start_token_id: int = 101
    end_token_id: int = 102
    layer_norm_eps: float = 1e-12
    mlp_hidden: int = 512
    image_size: int = 299  # the long side of the resized image
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as stored in attnlab checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CATRConfig":
        """The inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**values)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (CATR's output head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


ENCODE_CHUNK = 8  # most images encoded together (see CATR.begin)


class CATR(nn.Module):
    """Image captioning transformer with CATR's layout; a captioner of the seam.

    ``CATR(config, vocab=None, name="catr", best_head=None)``: ``vocab`` is an id -> token table
    (:class:`attnlab.tokenizer.Vocab`; ``None`` shows words as ``[id]``); ``best_head``
    the ``(layer, head)`` of :attr:`CaptionerSpec.best_head`. Decoding
    reads everything it needs from :attr:`spec` and runs :meth:`begin` and
    :meth:`step` (a key/value-cached decoder); :meth:`reference_captioner` is the
    original write-up's 128-position template loop, for checking.
    """

    def __init__(
        self, config: CATRConfig, *, vocab: TokenTable | None = None, name: str = "catr", best_head: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self._vocab = vocab
        self._name = name
        self._best_head = None if best_head is None else check_best_head(best_head)
        self.backbone: Joiner = build_backbone(config.backbone, config.d_model, config.backbone_channels)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.transformer = Transformer(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            max_positions=config.max_positions,
            pad_token_id=config.pad_token_id,
            layer_norm_eps=config.layer_norm_eps,
        )
        self.mlp = MLP(config.d_model, config.mlp_hidden, config.vocab_size, 3)
        # not a submodule: keeps state_dict() equal to CATR's
        self._inference_body = InferenceBody(self.backbone[0].body)

    def encode(
        self, images: torch.Tensor, mask: torch.Tensor, weights: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Run backbone and encoder once.

        images ``(N, 3, H, W)`` normalised; mask ``(N, H, W)`` bool, True = padding.
        Returns memory ``(S, N, E)``, patch mask ``(N, S)``, position ``(S, N, E)``
        and the feature grid ``(h, w)`` with ``S = h * w``. A ``weights`` list
        receives each encoder layer's self-attention ``(N, heads, S, S)``.
        """
        body = None if (self.training or torch.is_grad_enabled()) else self._inference_body.get(images)
        if body is not None and images.device.type == "cpu":
            # channels-last input: the CPU convolutions run 10-40% faster (both backbones, any batch size)
            images = images.contiguous(memory_format=torch.channels_last)  # (N, 3, H, W), NHWC in memory
        features, feat_mask, pos = self.backbone(images, mask, body)  # (N, C, h, w), (N, h, w), (N, E, h, w)
        src = self.input_proj(features)  # (N, E, h, w)
        h, w = src.shape[-2:]
        src = src.flatten(2).permute(2, 0, 1)  # (S, N, E)
        pos = pos.flatten(2).permute(2, 0, 1)  # (S, N, E)
        feat_mask = feat_mask.flatten(1)  # (N, S)
        memory = self.transformer.encode(src, feat_mask, pos, weights)  # (S, N, E)
        return memory, feat_mask, pos, (int(h), int(w))

    # ------------------------------------------------------------ the seam
    @property
    def spec(self) -> CaptionerSpec:
        """What decoding needs to know: sizes, special ids, vocabulary, name."""
        return spec_from_config(self.config, name=self._name, vocab=self._vocab, resize="long", best_head=self._best_head)

    def begin(self, pixels: Sequence[torch.Tensor], record: Record = "cross") -> Encoded:
        """Encode ``pixels`` (``N`` tensors ``(3, h_i, w_i)``) for :meth:`step`.

        Images of one size are encoded together (on a CPU at most
        :data:`ENCODE_CHUNK` at a time), each size on its own, so an image's
        features never see another's padding; the projected image keys
        and values of every decoder layer are then padded to the longest grid
        ``K = max(h_i * w_i)`` and masked. Returns the :class:`DecoderCache`,
        the grids and, with ``record="all"``, the encoder self-attention per
        layer ``(N, heads, K, K)``.
        """
        device = self.input_proj.weight.device
        # each size on its own; on a CPU in chunks of ENCODE_CHUNK images (a CPU convolution is
        # no faster per image in bigger batches, often slower, and the activations stay small)
        chunk = ENCODE_CHUNK if device.type == "cpu" else max(1, len(pixels))
        groups = [g[i : i + chunk] for g in size_groups(pixels) for i in range(0, len(g), chunk)]
        caches: list[list[LayerCache]] = []  # per group, per decoder layer
        enc_parts: list[list[torch.Tensor]] = []  # per group, per encoder layer (n_g, heads, S_g, S_g)
        grids: dict[int, tuple[int, int]] = {}
        for group in groups:
            x = torch.stack([pixels[i] for i in group]).to(device)  # (n_g, 3, h, w)
            mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=device)  # (n_g, h, w): no padding
            weights: list[torch.Tensor] | None = [] if record == "all" else None
            memory, _, pos, grid = self.encode(x, mask, weights)  # (S_g, n_g, E), _, (S_g, n_g, E)
            caches.append([layer.prepare(memory, pos) for layer in self.transformer.decoder.layers])
            enc_parts.append(weights or [])
            grids.update({i: grid for i in group})
        keys = max(h * w for h, w in grids.values())  # K

        def merge(parts: list[torch.Tensor], *dims: int) -> torch.Tensor:
            # per group (n_g, ...), zero-padded to K along dims -> (N, ...) in image order
            # (one group: the tensor itself, so gradients with respect to it stay defined)
            padded = [pad_to(p, keys, *dims) for p in parts]
            return scatter_groups(groups, padded[0] if len(padded) == 1 else torch.cat(padded))

        layers = [
            LayerCache(
                cross_k=merge([g[i].cross_k for g in caches], 2),  # (N, heads, K, Dh)
                cross_v=merge([g[i].cross_v for g in caches], 2),  # (N, heads, K, Dh)
            )
            for i in range(len(self.transformer.decoder.layers))
        ]
        sizes = torch.tensor([h * w for h, w in (grids[i] for i in range(len(pixels)))], device=device)  # (N,)
        padded = torch.arange(keys, device=device)[None, :] >= sizes[:, None]  # (N, K) True = padding key
        bias = padding_bias(padded, layers[0].cross_k.dtype) if bool(padded.any()) else None  # (N, 1, 1, K)
        encoder = None
        if record == "all":
            encoder = [merge([g[i] for g in enc_parts], 2, 3) for i in range(len(enc_parts[0]))]  # (N, heads, K, K)
        return Encoded(DecoderCache(layers, bias), [grids[i] for i in range(len(pixels))], encoder)

    def step(self, state: DecoderCache, ids: torch.Tensor, record: Record = "cross") -> StepOutput:
        """Feed one token per caption, ids ``(N,)``; returns logits ``(N, V)`` and the
        new position's attention per decoder layer (cross ``(N, heads, K)``, self ``(N, heads, t)``)."""
        ids = ids.to(self.input_proj.weight.device)
        hidden, cross, selfs = self.transformer.decode_step(ids[:, None], state, want_weights=record != "none")
        logits = self.mlp(hidden[:, -1])  # (N, V)
        return StepOutput(
            logits=logits,
            cross_attention=cross if record != "none" else None,  # per layer (N, heads, K)
            self_attention=selfs if record == "all" else None,  # per layer (N, heads, t)
        )

    def reference_captioner(self) -> "TemplateCaptioner":
        """The original write-up's decoding loop as a captioner (slow; for checking)."""
        from .reference import TemplateCaptioner

        return TemplateCaptioner(self)

    def forward(
        self, images: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CATR's forward: images ``(N, 3, H, W)``, target ids and mask ``(N, T)`` -> logits ``(N, T, V)``.

        ``mask`` ``(N, H, W)`` marks padded pixels (default: none).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        memory, feat_mask, pos, _ = self.encode(images, mask)
        hs = self.transformer.decode(memory, feat_mask, pos, target, target_mask)  # (T, N, E)
        return self.mlp(hs.transpose(0, 1))  # (N, T, V)


def build_catr(config: CATRConfig | None = None, *, vocab: TokenTable | None = None, name: str = "catr") -> CATR:
    """A CATR with random weights (nothing is downloaded)."""
    model = CATR(config or CATRConfig(), vocab=vocab, name=name)
    model.eval()
    return model
