"""The numbers behind the encoder views of a ViT captioner (numpy/torch, no matplotlib).

A ViT encoder's self-attention of one image, as recorded with
``record="all"``, is ``(layers, heads, K, K)``: row ``q`` holds what token ``q``
(the query) takes from every token (the keys), ``K = prefix + h * w`` with the
``prefix`` class/register tokens first, then the ``h x w`` patches in row-major
order. Every row sums to 1. Grids need not be square.

* :func:`patch_row` / :func:`cls_row`: one query's row of one layer (one head or
  the head mean), split into its prefix part ``(prefix,)`` and its patch map
  ``(h, w)``: a patch's attention map, or what the class token reads (what a
  classifier built on the CLS token sees).
* :func:`rollout`: attention rollout (Abnar & Zuidema 2020, "Quantifying
  Attention Flow in Transformers"): per layer take the head mean ``A``, add the
  identity for the residual connection, renormalise the rows,
  ``A' = (A + I) / rowsum(A + I)``, and multiply through the layers,
  ``R = A'_L ... A'_2 A'_1``. Row ``q`` of ``R`` says how much of token ``q``'s
  final state came from each input token. Prefix tokens stay in the product
  (information does flow through the class token) and are reported, never
  renormalised away: split the result with :func:`split_keys`.
* :func:`cls_vs_words`: the class token's row next to the decoder's word rows
  of a trace (what a classifier reads vs what a captioner reads).

Every function takes numpy arrays or torch tensors; :func:`rollout` returns
the kind it was given (torch keeps autograd), the others return numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import AttnlabError
from .keys import KeyLayout
from .util import is_int

__all__ = ["EncoderAttention", "encoder_attention", "split_keys", "patch_row", "cls_row", "rollout", "rollout_row", "cls_vs_words", "CLSvsWords"]


@dataclass
class EncoderAttention:
    """One image's encoder self-attention with its key layout.

    Attributes:
        weights: ``(layers, heads, K, K)`` float64, ``K = prefix_tokens + h * w``.
        grid: the patch grid ``(h, w)``.
        prefix_tokens: leading non-patch tokens (class token, registers).
    """

    weights: np.ndarray
    grid: tuple[int, int]
    prefix_tokens: int

    @property
    def num_layers(self) -> int:
        return self.weights.shape[0]

    @property
    def num_heads(self) -> int:
        return self.weights.shape[1]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def encoder_attention(source: Any, grid: tuple[int, int] | None = None, prefix_tokens: int | None = None) -> EncoderAttention:
    """Check and wrap an encoder self-attention.

    ``source``: a :class:`~attnlab.trace.CaptionTrace` recorded with ``record="all"``
    (its ``encoder_self_attention``, ``grid`` and prefix tokens are used), or an
    array/tensor ``(layers, heads, K, K)`` with ``grid`` and ``prefix_tokens`` given.
    For a trace, ``prefix_tokens`` is read from the trace when it says (else
    ``K - h * w``).
    """
    if isinstance(source, EncoderAttention):
        return source
    if hasattr(source, "encoder_self_attention") and hasattr(source, "grid"):
        weights = source.encoder_self_attention
        if weights is None:
            raise AttnlabError("this trace holds no encoder self-attention: caption again with record='all'")
        grid = tuple(source.grid) if grid is None else grid
        if prefix_tokens is None:
            prefix_tokens = getattr(source, "prefix_tokens", None)
            if not is_int(prefix_tokens):
                prefix_tokens = int(np.shape(weights)[-1]) - int(grid[0]) * int(grid[1])
    if not hasattr(source, "encoder_self_attention"):
        weights = source
    if grid is None or prefix_tokens is None:
        raise AttnlabError("pass grid=(h, w) and prefix_tokens=N with an attention array (or pass a trace)")
    if len(grid) != 2 or not all(is_int(g) and g >= 1 for g in grid):
        raise AttnlabError(f"grid={grid!r} must be two positive integers (h, w)")
    if not is_int(prefix_tokens) or prefix_tokens < 0:
        raise AttnlabError(f"prefix_tokens={prefix_tokens!r} must be an integer >= 0")
    a = _numpy(weights)
    h, w = int(grid[0]), int(grid[1])
    k = int(prefix_tokens) + h * w
    if a.ndim != 4 or a.shape[-2:] != (k, k) or a.shape[0] == 0 or a.shape[1] == 0:
        raise AttnlabError(
            f"encoder attention has shape {a.shape}: expected (layers, heads, {k}, {k}) for a {h} x {w} grid "
            f"and {prefix_tokens} prefix tokens (crop padding keys first)"
        )
    if not np.isfinite(a).all():
        raise AttnlabError("encoder attention holds NaN or infinite values")
    return EncoderAttention(a, (h, w), int(prefix_tokens))


def _layer(enc: EncoderAttention, layer: Any) -> int:
    n = enc.num_layers
    if not is_int(layer) or not -n <= int(layer) < n:
        raise AttnlabError(f"layer {layer!r} does not exist: the encoder has {n} layers (use 0..{n - 1} or -1 for the last)")
    return int(layer) % n


def _heads(enc: EncoderAttention, layer: int, head: Any) -> np.ndarray:
    """Layer ``layer``'s ``(K, K)`` weights of one head or the head mean."""
    if isinstance(head, str) and head == "mean":
        return enc.weights[layer].mean(axis=0)  # (K, K)
    n = enc.num_heads
    if not is_int(head) or not -n <= int(head) < n:
        raise AttnlabError(f"head {head!r} does not exist: the layer has {n} heads (use 0..{n - 1} or 'mean')")
    return enc.weights[layer, int(head) % n]  # (K, K)


def split_keys(row: Any, grid: tuple[int, int], prefix_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows over keys ``(..., K)`` into the prefix part ``(..., prefix)`` and patch maps ``(..., h, w)``."""
    return KeyLayout(int(prefix_tokens), (int(grid[0]), int(grid[1]))).split(_numpy(row))  # (..., p), (..., h, w)


def patch_row(source: Any, patch: tuple[int, int], *, layer: int = -1, head: int | str = "mean", **layout: Any) -> tuple[np.ndarray, np.ndarray]:
    """What patch ``(row, col)`` attends to in encoder layer ``layer``.

    Returns its prefix weights ``(prefix,)`` and patch map ``(h, w)`` (together summing to 1).
    ``layout``: ``grid=`` and ``prefix_tokens=`` when ``source`` is an array.
    """
    enc = encoder_attention(source, **layout)
    h, w = enc.grid
    if len(patch) != 2 or not all(is_int(p) for p in patch) or not (0 <= patch[0] < h and 0 <= patch[1] < w):
        raise AttnlabError(f"patch={patch!r} is not on the {h} x {w} grid: pass (row, col) with 0 <= row < {h}, 0 <= col < {w}")
    query = enc.prefix_tokens + int(patch[0]) * w + int(patch[1])
    return split_keys(_heads(enc, _layer(enc, layer), head)[query], enc.grid, enc.prefix_tokens)


def cls_row(source: Any, *, layer: int = -1, head: int | str = "mean", token: int = 0, **layout: Any) -> tuple[np.ndarray, np.ndarray]:
    """What prefix token ``token`` (0: the class token) attends to in encoder layer ``layer``.

    Returns its prefix weights ``(prefix,)`` and patch map ``(h, w)``. A model
    without prefix tokens (a CNN encoder) has no class row: one clear error.
    """
    enc = encoder_attention(source, **layout)
    if enc.prefix_tokens == 0:
        raise AttnlabError("this encoder has no class token (prefix_tokens = 0): there is no CLS row to show")
    if not is_int(token) or not 0 <= token < enc.prefix_tokens:
        raise AttnlabError(f"token={token!r}: the encoder has {enc.prefix_tokens} prefix tokens (0 = the class token)")
    return split_keys(_heads(enc, _layer(enc, layer), head)[int(token)], enc.grid, enc.prefix_tokens)


def rollout(attention: Any, *, head: int | str = "mean", residual: bool = True) -> Any:
    """Attention rollout over the layers: ``(layers, heads, K, K)`` -> ``(K, K)``.

    Per layer ``A`` = the head mean (or ``head``); with ``residual`` the identity
    is added and rows renormalised, ``A' = (A + I) / rowsum(A + I)``; then
    ``R = A'_L ... A'_1``. Rows of ``R`` sum to 1. A torch tensor in gives a
    float64 tensor out (autograd kept), a numpy array a numpy array.
    """
    given_torch = isinstance(attention, torch.Tensor)
    a = attention.double() if given_torch else torch.as_tensor(np.asarray(attention, dtype=np.float64))
    if a.dim() != 4 or a.shape[-1] != a.shape[-2] or a.shape[0] == 0 or a.shape[1] == 0:
        raise AttnlabError(f"rollout takes (layers, heads, K, K) weights, not shape {tuple(a.shape)}")
    if isinstance(head, str) and head == "mean":
        per_layer = a.mean(dim=1)  # (layers, K, K)
    elif is_int(head) and -a.shape[1] <= int(head) < a.shape[1]:
        per_layer = a[:, int(head)]  # (layers, K, K)
    else:
        raise AttnlabError(f"head {head!r} does not exist: the layers have {a.shape[1]} heads (use 0..{a.shape[1] - 1} or 'mean')")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (K, K)
    result = eye
    for layer in per_layer:  # (K, K) each, first layer first
        step = layer + eye if residual else layer
        step = step / step.sum(dim=-1, keepdim=True)  # rows sum to 1
        result = step @ result  # (K, K): later layers on the left
    return result if given_torch else result.numpy()


def rollout_row(source: Any, query: str | tuple[int, int] = "cls", *, head: int | str = "mean", residual: bool = True, **layout: Any) -> tuple[np.ndarray, np.ndarray]:
    """One query's row of the rollout: ``"cls"`` (the class token) or a patch ``(row, col)``.

    Returns the prefix part ``(prefix,)`` and the patch map ``(h, w)`` (summing to 1).
    """
    enc = encoder_attention(source, **layout)
    h, w = enc.grid
    if isinstance(query, str) and query == "cls":
        if enc.prefix_tokens == 0:
            raise AttnlabError("this encoder has no class token (prefix_tokens = 0): pick a patch query=(row, col)")
        index = 0
    elif isinstance(query, (tuple, list)) and len(query) == 2 and all(is_int(q) for q in query) and 0 <= query[0] < h and 0 <= query[1] < w:
        index = enc.prefix_tokens + int(query[0]) * w + int(query[1])
    else:
        raise AttnlabError(f"query={query!r}: pass 'cls' or a patch (row, col) on the {h} x {w} grid")
    return split_keys(rollout(enc.weights, head=head, residual=residual)[index], enc.grid, enc.prefix_tokens)


@dataclass
class CLSvsWords:
    """The class token's encoder row next to the decoder's word rows of one trace.

    Attributes:
        cls_map: ``(h, w)`` the class token's weights on the patches.
        cls_prefix: ``(prefix,)`` its weights on the prefix tokens (itself, registers).
        word_maps: ``(steps, h, w)`` each word's head-mean cross-attention on the patches.
        words: the trace's words.
        overlap: ``(steps,)`` histogram intersection of each word map with the CLS map,
            both normalised to sum 1 over the patches: 1 = the same map, 0 = disjoint.
        encoder_layer, decoder_layer: which layers (non-negative indices).
    """

    cls_map: np.ndarray
    cls_prefix: np.ndarray
    word_maps: np.ndarray
    words: list[str]
    overlap: np.ndarray
    encoder_layer: int
    decoder_layer: int


def cls_vs_words(trace: Any, *, encoder_layer: int = -1, decoder_layer: int = -1) -> CLSvsWords:
    """What a classifier reads (the CLS row of the encoder) vs what a captioner reads (the word rows).

    The class token's row does not depend on the word; each word's row does.
    ``trace`` must be recorded with ``record="all"`` from a model with a class token.
    """
    enc = encoder_attention(trace)
    ca = getattr(trace, "cross_attention", None)
    if ca is None:
        raise AttnlabError("this trace holds no cross-attention: caption again with record='all'")
    n = ca.shape[0]
    if not is_int(decoder_layer) or not -n <= int(decoder_layer) < n:
        raise AttnlabError(f"decoder_layer {decoder_layer!r} does not exist: the decoder has {n} layers")
    e_layer, d_layer = _layer(enc, encoder_layer), int(decoder_layer) % n
    prefix, cls_map = cls_row(enc, layer=e_layer)
    words = np.asarray(ca[d_layer], dtype=np.float64).mean(axis=0)  # (steps, h, w)
    p = cls_map / max(cls_map.sum(), 1e-12)  # (h, w)
    q = words / np.maximum(words.sum(axis=(1, 2), keepdims=True), 1e-12)  # (steps, h, w)
    overlap = np.minimum(p[None], q).sum(axis=(1, 2))  # (steps,)
    return CLSvsWords(cls_map, prefix, words, list(trace.words), overlap, e_layer, d_layer)
