"""CPTR's decoder layer (:class:`CPTRDecoderLayer`: pre-norm, masked self-attention,
cross-attention to the encoder's tokens, FFN) and the key/value cache it steps on
(:class:`LayerCache` per layer, :class:`CPTRState` for a batch of captions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import attend, project_heads


class CPTRDecoderLayer(nn.Module):
    """Pre-norm decoder layer: masked self-attention, cross-attention to the encoder's tokens, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        keys: torch.Tensor,
        causal: torch.Tensor,
        padding: torch.Tensor | None,
    ) -> torch.Tensor:
        """x ``(N, T, E)``; memory ``(N, K, E)`` (the values) and keys ``(N, K, E)`` (memory,
        plus positions with ``key_positions``); causal ``(T, T)`` and padding ``(N, T)`` bool
        (True = masked) -> ``(N, T, E)``."""
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, h, attn_mask=causal, key_padding_mask=padding, need_weights=False)[0])
        h = self.norm2(x)
        x = x + self.dropout(self.cross_attn(h, keys, memory, need_weights=False)[0])
        h = self.norm3(x)
        return x + self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(h)))))

    def project_memory(self, memory: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention keys of ``keys`` and values of ``memory`` (both ``(N, K, E)``),
        each ``(N, heads, K, Dh)``."""
        mha = self.cross_attn
        e, heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        return project_heads(keys, w[e : 2 * e], b[e : 2 * e], heads), project_heads(memory, w[2 * e :], b[2 * e :], heads)

    def step(
        self, x: torch.Tensor, cache: "LayerCache", memory_bias: torch.Tensor | None, want_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One new position: x ``(N, 1, E)`` -> output ``(N, 1, E)``, cross-attention
        ``(N, heads, K)`` and self-attention ``(N, heads, t)`` (``None`` unless ``want_weights``)."""
        sa, ca = self.self_attn, self.cross_attn
        e, heads = sa.embed_dim, sa.num_heads
        n = x.shape[0]

        h = self.norm1(x)  # (N, 1, E)
        w, b = sa.in_proj_weight, sa.in_proj_bias
        q = project_heads(h, w[:e], b[:e], heads)  # (N, h, 1, Dh)
        k = project_heads(h, w[e : 2 * e], b[e : 2 * e], heads)  # (N, h, 1, Dh)
        v = project_heads(h, w[2 * e :], b[2 * e :], heads)  # (N, h, 1, Dh)
        cache.self_k = k if cache.self_k is None else torch.cat((cache.self_k, k), dim=2)  # (N, h, t, Dh)
        cache.self_v = v if cache.self_v is None else torch.cat((cache.self_v, v), dim=2)  # (N, h, t, Dh)
        out, self_w = attend(q, cache.self_k, cache.self_v, None, want_weights)  # (N, h, 1, Dh), (N, h, t)
        x = x + sa.out_proj(out.transpose(1, 2).reshape(n, 1, e))  # (N, 1, E)

        h = self.norm2(x)
        q = project_heads(h, ca.in_proj_weight[:e], ca.in_proj_bias[:e], heads)  # (N, h, 1, Dh)
        out, cross_w = attend(q, cache.cross_k, cache.cross_v, memory_bias, want_weights)  # (N, h, 1, Dh), (N, h, K)
        x = x + ca.out_proj(out.transpose(1, 2).reshape(n, 1, e))  # (N, 1, E)

        h = self.norm3(x)
        return x + self.linear2(F.gelu(self.linear1(h))), cross_w, self_w


@dataclass
class LayerCache:
    """One decoder layer's cached keys and values (batch-first, split into heads)."""

    cross_k: torch.Tensor  # (N, heads, K, Dh) the encoder tokens' keys, projected once
    cross_v: torch.Tensor  # (N, heads, K, Dh)
    self_k: torch.Tensor | None = None  # (N, heads, t, Dh) the positions decoded so far
    self_v: torch.Tensor | None = None  # (N, heads, t, Dh)


@dataclass
class CPTRState:
    """Decoding state of ``N`` captions: per-layer caches, the key mask, the next position."""

    layers: list[LayerCache]
    memory_bias: torch.Tensor | None  # (N, 1, 1, K): -inf on padding keys, 0 elsewhere; None without padding
    position: int = 0

    def select(self, indices: torch.Tensor) -> "CPTRState":
        """Keep and reorder captions: ``indices`` ``(M,)`` long -> the state of those ``M``."""
        indices = torch.as_tensor(indices, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, indices.to(t.device))

        layers = [LayerCache(pick(c.cross_k), pick(c.cross_v), pick(c.self_k), pick(c.self_v)) for c in self.layers]
        return CPTRState(layers, pick(self.memory_bias), self.position)
