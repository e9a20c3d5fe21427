"""The arithmetic of the explanation methods on one image's matrices (torch, float64, no model).

Notation (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV): ``i`` the image's
tokens (``K`` keys: prefix tokens, then the patches row-major), ``q`` the
decoder's queries (one per decoding step, ``Q`` of them). ``A`` is an attention
matrix of one layer ``(heads, rows, columns)`` and ``G`` the gradient of the
explained word's score with respect to it.

* :func:`head_relevance`: ``A-bar = mean_h[(G * A)+]`` (the positive part of
  gradient times weight, averaged over heads).
* :func:`residual_normalised`: ``norm(R) = (R - I) / rowsum(R - I) + I``; a row
  whose ``R - I`` is all zero (nothing reached it, e.g. the first step) stays as it is.
* :func:`relevance`: the encoder-decoder rules. Start ``R^ii = I``, ``R^qq = I``,
  ``R^qi = 0``; each encoder layer ``R^ii += A-bar^ii R^ii``; then each decoder
  layer, its self-attention ``R^qq += A-bar^qq R^qq`` and ``R^qi += A-bar^qq R^qi``,
  then its cross-attention ``R^qi += norm(R^qq)^T A-bar^qi norm(R^ii)``.
* :func:`decoder_rollout`: ``R^qi = Roll(A^qq) . mean_h(A^qi of the last layer) . Roll(A^ii)``
  (``causal=True``, the ``"rollout"`` method), or with ``Roll(A^qq)^T`` as Chefer et al.'s
  ``generate_rollout`` writes it (``causal=False``, the ``"chefer_rollout"`` method);
  ``Roll`` is the attention rollout of :func:`attnlab.rollout.rollout`.

The relevance rules and ``chefer_rollout`` carry the transpose of the paper and of
its reference code (written for DETR, whose object queries all see each other). In
a causal captioning decoder ``Roll(A^qq)[j, i]`` is zero for ``j < i``, so with the
transpose word ``i``'s rollout row mixes its own cross-attention with that of the
*later* words that read it, which cannot have influenced word ``i``; its row then
need not sum to 1 (the explanation traces renormalise every row). Without the
transpose row ``i`` of ``Roll(A^qq)`` is how much word ``i``'s state came from each
position ``j <= i``: the map mixes only cross-attention the model had when it wrote
the word. In the relevance rules the gradient is zero for queries after the
explained word, so there the transpose keeps only the word's own diagonal entry.
"""

from __future__ import annotations

import torch

from ..rollout import rollout as roll


def head_relevance(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``mean_h[(g * a)+]``: ``(..., heads, R, C)`` twice -> ``(..., R, C)``."""
    return (g * a).clamp(min=0).mean(dim=-3)


def residual_normalised(r: torch.Tensor) -> torch.Tensor:
    """``(R - I) / rowsum(R - I) + I`` row by row, ``(..., n, n)``; rows with ``R - I`` all zero unchanged."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)  # (n, n)
    extra = r - eye  # (..., n, n), >= 0 for relevance matrices
    total = extra.sum(dim=-1, keepdim=True)  # (..., n, 1)
    reached = total > 0  # (..., n, 1): rows that something was added to
    return torch.where(reached, extra / torch.where(reached, total, torch.ones_like(total)) + eye, r)  # (..., n, n)


def relevance(
    encoder: list[tuple[torch.Tensor, torch.Tensor]],
    decoder_self: list[tuple[torch.Tensor, torch.Tensor]],
    cross: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``R^qi`` ``(..., Q, K)`` from per-layer ``(A, G)`` pairs, first layer first.

    ``encoder``: ``(..., heads, K, K)`` each (empty: ``R^ii`` stays ``I``); ``decoder_self``:
    ``(..., heads, Q, Q)``; ``cross``: ``(..., heads, Q, K)``, one per decoder layer. Leading
    dimensions (a batch of images) are kept.
    """
    q, k = cross[0][0].shape[-2:]
    dtype, device = cross[0][0].dtype, cross[0][0].device
    r_ii = torch.eye(k, dtype=dtype, device=device)  # (K, K), (..., K, K) after a layer
    for a, g in encoder:
        r_ii = r_ii + head_relevance(a, g) @ r_ii
    r_qq = torch.eye(q, dtype=dtype, device=device)  # (Q, Q), (..., Q, Q) after a layer
    r_qi = torch.zeros(q, k, dtype=dtype, device=device)  # (Q, K), (..., Q, K) after a layer
    norm_ii = residual_normalised(r_ii)  # the encoder is done
    for (a_s, g_s), (a_c, g_c) in zip(decoder_self, cross):
        bar = head_relevance(a_s, g_s)  # (Q, Q)
        r_qq = r_qq + bar @ r_qq
        r_qi = r_qi + bar @ r_qi
        r_qi = r_qi + residual_normalised(r_qq).transpose(-2, -1) @ head_relevance(a_c, g_c) @ norm_ii  # (..., Q, K)
    return r_qi


def decoder_rollout(
    decoder_self: torch.Tensor, cross_last: torch.Tensor, encoder: torch.Tensor | None, causal: bool = True
) -> torch.Tensor:
    """``Roll(A^qq) . mean_h(A^qi) . Roll(A^ii)`` ``(Q, K)``; ``causal=False``: ``Roll(A^qq)^T`` (Chefer et al.).

    ``decoder_self`` ``(layers, heads, Q, Q)``; ``cross_last`` ``(heads, Q, K)``, the last
    decoder layer's; ``encoder`` ``(layers, heads, K, K)`` or ``None`` (then ``Roll(A^ii) = I``).
    With ``causal=True`` row ``i`` uses only rows ``j <= i`` of the cross-attention when the
    decoder's self-attention is causal; its rows then sum to 1 (each factor's rows do).
    """
    r_qq = roll(decoder_self.double())  # (Q, Q), rows sum to 1
    mixed = (r_qq if causal else r_qq.T) @ cross_last.double().mean(dim=0)  # (Q, K)
    return mixed if encoder is None else mixed @ roll(encoder.double())  # (Q, K)
