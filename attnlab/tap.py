"""``AttentionTap``: an identity module that marks hand-written attention weights for capture.

Attention written as plain tensor code (``att = softmax(q @ k.T / sqrt(d))``)
has no module a hook could attach to. Insert one line where the weights are
made, ``att = self.tap(att)``, and :func:`attnlab.capture_attention` records
them under the tap's qualified name. Outside a capture block the tap returns
its input unchanged (no copy, no cost), so a model keeps working without attnlab.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionTap(nn.Module):
    """Identity on attention weights, visible to :func:`attnlab.capture_attention`.

    Args:
        num_heads: for weights in the merged-head layout ``(N * heads, L, S)``
            (as ``torch.bmm`` code often has them), the number of heads, so a
            capture can present them as ``(N, heads, L, S)``. Leave ``None`` for
            per-head ``(N, heads, L, S)`` or single-head ``(N, L, S)`` weights.
    """

    def __init__(self, num_heads: int | None = None) -> None:
        super().__init__()
        if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"num_heads must be a positive integer or None, not {num_heads!r}")
        self.num_heads = num_heads

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def extra_repr(self) -> str:
        return "" if self.num_heads is None else f"num_heads={self.num_heads}"
