"""The captioning model: CNN backbone -> 1x1 projection -> transformer -> MLP head.

:class:`CATR` reproduces the published CATR model (``build_catr()`` with the
default :class:`CATRConfig`); a smaller configuration of the same classes is
the bundled shapes model. ``state_dict()`` keys equal CATR's checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Joiner, build_backbone
from .fuse import InferenceBody
from .transformer import Transformer


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


class CATR(nn.Module):
    """Image captioning transformer with CATR's layout.

    Attributes set by :func:`attnlab.load_model`: ``config`` (:class:`CATRConfig`),
    ``vocab`` (:class:`attnlab.tokenizer.Vocab` or ``None``) and ``name``.
    """

    def __init__(self, config: CATRConfig) -> None:
        super().__init__()
        self.config = config
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
        self.vocab = None
        self.name = "catr"
        # not a submodule: keeps state_dict() equal to CATR's
        self._inference_body = InferenceBody(self.backbone[0].body)

    def encode(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Run backbone and encoder once.

        images ``(N, 3, H, W)`` normalised; mask ``(N, H, W)`` bool, True = padding.
        Returns memory ``(S, N, E)``, patch mask ``(N, S)``, position ``(S, N, E)``
        and the feature grid ``(h, w)`` with ``S = h * w``.
        """
        body = None if (self.training or torch.is_grad_enabled()) else self._inference_body.get(images)
        features, feat_mask, pos = self.backbone(images, mask, body)  # (N, C, h, w), (N, h, w), (N, E, h, w)
        src = self.input_proj(features)  # (N, E, h, w)
        h, w = src.shape[-2:]
        src = src.flatten(2).permute(2, 0, 1)  # (S, N, E)
        pos = pos.flatten(2).permute(2, 0, 1)  # (S, N, E)
        feat_mask = feat_mask.flatten(1)  # (N, S)
        memory = self.transformer.encode(src, feat_mask, pos)  # (S, N, E)
        return memory, feat_mask, pos, (int(h), int(w))

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


def build_catr(config: CATRConfig | None = None) -> CATR:
    """A CATR with random weights (nothing is downloaded)."""
    model = CATR(config or CATRConfig())
    model.eval()
    return model
