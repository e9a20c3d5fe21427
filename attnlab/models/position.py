"""The 2D sine position embedding of the image features (DETR's)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine features of each cell's (row, column), computed from the mask.

    Coordinates are cumulative counts of valid (unpadded) cells along each axis;
    with ``normalize`` they are divided by the last one (plus 1e-6) and scaled to
    ``2 pi``. Each axis gets ``num_pos_feats`` features: ``sin`` at even and ``cos``
    at odd frequencies ``temperature ** (2 * (i // 2) / num_pos_feats)``,
    interleaved. Output channels are the y features, then the x features.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask ``(N, h, w)`` bool, True = padding -> ``(N, 2 * num_pos_feats, h, w)``."""
        valid = ~mask
        y = valid.cumsum(1, dtype=torch.float32)  # (N, h, w) row coordinate
        x = valid.cumsum(2, dtype=torch.float32)  # (N, h, w) column coordinate
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)  # (F,)
        px = x[..., None] / freq  # (N, h, w, F)
        py = y[..., None] / freq  # (N, h, w, F)
        # sin of even, cos of odd features, interleaved pairwise: (N, h, w, F/2, 2) -> (N, h, w, F)
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)  # (N, 2F, h, w)
