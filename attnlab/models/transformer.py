"""DETR-style pre-norm transformer of CATR, with an incremental (cached) decoder.

Sequence-first layout as in DETR and CATR: ``(L, N, E)`` with ``L`` positions,
``N`` images and ``E = d_model``. The full forward passes run through the
``torch.nn.MultiheadAttention`` modules (``self_attn``, ``multihead_attn``), so
any hook on them sees what the published model computes. :class:`DecoderCache`
and :meth:`TransformerDecoderLayer.step` run one new position at a time with
the same weights, reusing keys and values: the fast path of ``attnlab.caption``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """``(length, length)`` bool mask: True above the diagonal (a position may not
    attend to later ones). Same effect as CATR's float mask of -inf; bool matches
    the bool key padding mask, which keeps PyTorch on its fused kernels."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class TransformerEncoderLayer(nn.Module):
    """Pre-norm encoder layer: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        src: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """src, pos ``(S, N, E)``; key_padding_mask ``(N, S)`` (True = padding).

        With a ``weights`` list the self-attention runs on an explicit softmax and
        appends its per-head weights ``(N, heads, S, S)`` (the tensor multiplied with
        the values, so gradients reach it); without, on torch's fused kernel.
        """
        h = self.norm1(src)
        q = k = _with_pos(h, pos)
        if weights is None:
            out = self.self_attn(q, k, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        else:
            out, w = self._attention_with_weights(q, h, key_padding_mask)
            weights.append(w)
        src = src + self.dropout1(out)
        h = self.norm2(src)
        return src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(h)))))

    def _attention_with_weights(
        self, qk: torch.Tensor, v_in: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-attention of ``forward`` written out: qk, v_in ``(S, N, E)`` ->
        output ``(S, N, E)`` and weights ``(N, heads, S, S)``."""
        mha = self.self_attn
        e, heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        x_qk, x_v = qk.transpose(0, 1), v_in.transpose(0, 1)  # (N, S, E) each
        q = project_heads(x_qk, w[:e], b[:e], heads)  # (N, h, S, Dh)
        k = project_heads(x_qk, w[e : 2 * e], b[e : 2 * e], heads)
        v = project_heads(x_v, w[2 * e :], b[2 * e :], heads)
        bias = None
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            bias = padding_bias(key_padding_mask, q.dtype)  # (N, 1, 1, S)
        out, weights = attend(q, k, v, bias, want_weights=True)  # (N, h, S, Dh), (N, h, S, S)
        n, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(n, length, e)  # (N, S, E)
        out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias).transpose(0, 1)  # (S, N, E)
        return out, weights


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """src, pos ``(S, N, E)``; key_padding_mask ``(N, S)`` -> memory ``(S, N, E)`` (after the final norm).

        ``weights``: a list that receives each layer's self-attention ``(N, heads, S, S)``.
        """
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos, weights)
        return self.norm(src)  # (S, N, E)


@dataclass
class LayerCache:
    """What one decoder layer keeps between incremental steps (batch-first, split heads)."""

    self_k: torch.Tensor | None = None  # (N, heads, t, Dh) keys of the positions so far
    self_v: torch.Tensor | None = None  # (N, heads, t, Dh)
    cross_k: torch.Tensor | None = None  # (N, heads, S, Dh) projected image keys (memory + pos)
    cross_v: torch.Tensor | None = None  # (N, heads, S, Dh) projected image values


    def select(self, indices: torch.Tensor) -> "LayerCache":
        """The cache of batch entries ``indices`` ``(M,)``, in that order."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, indices)

        return LayerCache(pick(self.self_k), pick(self.self_v), pick(self.cross_k), pick(self.cross_v))


@dataclass
class DecoderCache:
    """State of an incremental decode: one :class:`LayerCache` per layer, the image mask.

    It is the decoding state of the captioner seam (:mod:`attnlab.captioner`):
    :meth:`select` keeps or reorders batch entries.
    """

    layers: list[LayerCache]
    memory_bias: torch.Tensor | None  # (N, 1, 1, S) additive: -inf on padded patches, 0 elsewhere
    position: int = 0  # the next position to decode

    def select(self, indices: torch.Tensor) -> "DecoderCache":
        """The state of batch entries ``indices`` ``(M,)`` long, in that order."""
        indices = indices.to(self.layers[0].cross_k.device)
        bias = None if self.memory_bias is None else self.memory_bias.index_select(0, indices)  # (M, 1, 1, S)
        return DecoderCache([lc.select(indices) for lc in self.layers], bias, self.position)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key padding mask ``(N, S)`` bool (True = padding) -> additive bias ``(N, 1, 1, S)``: -inf on padding."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))  # (N, S)
    return bias[:, None, None, :]  # (N, 1, 1, S)


def project_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """``(N, L, E)`` -> ``(N, heads, L, Dh)``: a linear map, then split into heads."""
    y = F.linear(x, weight, bias)  # (N, L, E)
    n, length, e = y.shape
    return y.view(n, length, heads, e // heads).transpose(1, 2)  # (N, heads, L, Dh)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, want_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention. q ``(N, h, L, Dh)``, k/v ``(N, h, S, Dh)``.

    Returns the output ``(N, h, L, Dh)`` and, if asked, the weights ``(N, h, L, S)``,
    or ``(N, h, S)`` for a single query (``L == 1``, an incremental step). Either
    way the returned weights are the tensor multiplied with the values, so a
    gradient with respect to them is defined (explanation methods need it).
    """
    if not want_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, h, L, S)
    if bias is not None:
        scores = scores + bias
    weights = scores.softmax(dim=-1)  # (N, h, L, S)
    if weights.shape[2] == 1:
        row = weights[:, :, 0]  # (N, h, S): the tensor handed out is the one used below
        return row[:, :, None] @ v, row
    return weights @ v, weights


class TransformerDecoderLayer(nn.Module):
    """Pre-norm decoder layer: masked self-attention, cross-attention to the image, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None,
        tgt_key_padding_mask: torch.Tensor | None,
        memory_key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        query_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, query_pos ``(T, N, E)``; memory, pos ``(S, N, E)``; masks as in nn.MultiheadAttention."""
        h = self.norm1(tgt)
        q = k = _with_pos(h, query_pos)
        # called as CATR calls it (weights returned, head-averaged), so a hook sees the
        # original bookkeeping: weights (N, T, S); the encoder skips them for speed
        out = self.self_attn(q, k, h, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout1(out)
        h = self.norm2(tgt)
        out = self.multihead_attn(
            _with_pos(h, query_pos), _with_pos(memory, pos), memory, key_padding_mask=memory_key_padding_mask
        )[0]
        tgt = tgt + self.dropout2(out)
        h = self.norm3(tgt)
        return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(h)))))

    # ----------------------------------------------------------- incremental
    def prepare(self, memory: torch.Tensor, pos: torch.Tensor) -> LayerCache:
        """Project the image once: memory, pos ``(S, N, E)`` -> cached keys/values."""
        mha = self.multihead_attn
        e = mha.embed_dim
        w, b = mha.in_proj_weight, mha.in_proj_bias
        mem = memory.transpose(0, 1)  # (N, S, E)
        key_in = (memory + pos).transpose(0, 1)  # (N, S, E)
        # contiguous (N, h, S, Dh): every step multiplies with them, and a strided copy would
        # be made at each step of each layer once N > 1 (the (N, h) axes cannot be merged)
        return LayerCache(
            cross_k=project_heads(key_in, w[e : 2 * e], b[e : 2 * e], mha.num_heads).contiguous(),  # (N, h, S, Dh)
            cross_v=project_heads(mem, w[2 * e :], b[2 * e :], mha.num_heads).contiguous(),  # (N, h, S, Dh)
        )

    def step(
        self,
        x: torch.Tensor,
        query_pos: torch.Tensor,
        cache: LayerCache,
        memory_bias: torch.Tensor | None,
        want_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Decode the next position(s) given the cached ones.

        x, query_pos ``(N, L, E)`` batch-first, ``L`` new positions (usually 1).
        Returns the output ``(N, L, E)``, and with ``want_weights`` the cross-attention
        ``(N, heads, L, S)`` and self-attention ``(N, heads, L, t)`` weights (without
        the ``L`` axis when ``L == 1``: see :func:`attend`).
        """
        sa, ca = self.self_attn, self.multihead_attn
        e, heads = sa.embed_dim, sa.num_heads
        n, length, _ = x.shape

        h = self.norm1(x)  # (N, L, E)
        qk_in = h + query_pos
        q = project_heads(qk_in, sa.in_proj_weight[:e], sa.in_proj_bias[:e], heads)  # (N, h, L, Dh)
        k = project_heads(qk_in, sa.in_proj_weight[e : 2 * e], sa.in_proj_bias[e : 2 * e], heads)
        v = project_heads(h, sa.in_proj_weight[2 * e :], sa.in_proj_bias[2 * e :], heads)
        cache.self_k = k if cache.self_k is None else torch.cat((cache.self_k, k), dim=2)  # (N, h, t, Dh)
        cache.self_v = v if cache.self_v is None else torch.cat((cache.self_v, v), dim=2)
        t = cache.self_k.shape[2]
        # new positions t-L .. t-1 see every earlier position and themselves
        self_bias = None
        if length > 1:
            self_bias = torch.zeros(length, t, device=x.device).masked_fill(causal_mask(t, x.device)[t - length :], float("-inf"))  # (L, t)
        out, self_w = attend(q, cache.self_k, cache.self_v, self_bias, want_weights)  # (N, h, L, Dh)
        out = out.transpose(1, 2).reshape(n, length, e)  # (N, L, E)
        x = x + F.linear(out, sa.out_proj.weight, sa.out_proj.bias)

        h = self.norm2(x)
        q = project_heads(h + query_pos, ca.in_proj_weight[:e], ca.in_proj_bias[:e], heads)  # (N, h, L, Dh)
        out, cross_w = attend(q, cache.cross_k, cache.cross_v, memory_bias, want_weights)
        out = out.transpose(1, 2).reshape(n, length, e)  # (N, L, E)
        x = x + F.linear(out, ca.out_proj.weight, ca.out_proj.bias)

        h = self.norm3(x)
        x = x + self.linear2(F.relu(self.linear1(h)))
        return x, cross_w, self_w


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, **kwargs) -> torch.Tensor:
        """tgt ``(T, N, E)``, memory ``(S, N, E)``, masks and positions as in the layers -> ``(T, N, E)``."""
        for layer in self.layers:
            tgt = layer(tgt, memory, **kwargs)
        return self.norm(tgt)  # (T, N, E)


class DecoderEmbeddings(nn.Module):
    """Word embedding + learned position embedding, LayerNorm, dropout (CATR's)."""

    def __init__(self, vocab_size: int, d_model: int, max_positions: int, pad_token_id: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, d_model)
        self.LayerNorm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids ``(N, L)`` at positions ``start .. start+L-1`` -> ``(N, L, E)``."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)  # (L,)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)  # (N, L, E)
        return self.dropout(self.LayerNorm(x))


class Transformer(nn.Module):
    """Encoder over image patches + caption decoder; ``embeddings`` live here as in CATR."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        max_positions: int = 128,
        pad_token_id: int = 0,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers, d_model
        )
        self.embeddings = DecoderEmbeddings(vocab_size, d_model, max_positions, pad_token_id, layer_norm_eps, dropout)
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model
        )
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model = d_model
        self.nhead = nhead

    def encode(
        self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, weights: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """src, pos ``(S, N, E)``; mask ``(N, S)`` -> memory ``(S, N, E)``.

        ``weights``: a list that receives each encoder layer's self-attention ``(N, heads, S, S)``.
        """
        return self.encoder(src, mask, pos, weights)

    def decode(
        self, memory: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, tgt: torch.Tensor, tgt_mask: torch.Tensor
    ) -> torch.Tensor:
        """The full (teacher-forced) decoder: tgt ids ``(N, T)``, tgt_mask ``(N, T)`` -> ``(T, N, E)``."""
        n, length = tgt.shape
        x = self.embeddings(tgt).transpose(0, 1)  # (T, N, E)
        query_pos = self.embeddings.position_embeddings.weight[:length, None, :].expand(length, n, -1)  # (T, N, E)
        return self.decoder(
            x,
            memory,
            tgt_mask=causal_mask(length, tgt.device),
            tgt_key_padding_mask=tgt_mask,
            memory_key_padding_mask=mask,
            pos=pos,
            query_pos=query_pos,
        )

    def forward(self, src, mask, pos, tgt, tgt_mask):  # noqa: D401 - same signature as CATR
        """src, pos ``(S, N, E)``; mask ``(N, S)``; tgt, tgt_mask ``(N, T)`` -> ``(T, N, E)``."""
        return self.decode(self.encode(src, mask, pos), mask, pos, tgt, tgt_mask)

    # ----------------------------------------------------------- incremental
    def start_decoding(self, memory: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> DecoderCache:
        """Prepare an incremental decode over memory ``(S, N, E)`` with mask ``(N, S)``."""
        bias = padding_bias(mask, memory.dtype) if bool(mask.any()) else None  # (N, 1, 1, S)
        return DecoderCache([layer.prepare(memory, pos) for layer in self.decoder.layers], bias)

    def decode_step(
        self, ids: torch.Tensor, cache: DecoderCache, want_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Feed ids ``(N, L)`` at the next ``L`` positions; returns hidden ``(N, L, E)``.

        With ``want_weights`` also the per-layer cross-attention ``(N, heads, L, S)``
        and self-attention ``(N, heads, L, t)`` weights (``(N, heads, S)`` and
        ``(N, heads, t)`` when ``L == 1``).
        """
        start, length = cache.position, ids.shape[1]
        x = self.embeddings(ids, start)  # (N, L, E)
        query_pos = self.embeddings.position_embeddings.weight[start : start + length][None]  # (1, L, E)
        cross, selfs = [], []
        for layer, lc in zip(self.decoder.layers, cache.layers):
            x, cw, sw = layer.step(x, query_pos, lc, cache.memory_bias, want_weights)
            if want_weights:
                cross.append(cw)
                selfs.append(sw)
        cache.position += length
        return self.decoder.norm(x), cross, selfs
