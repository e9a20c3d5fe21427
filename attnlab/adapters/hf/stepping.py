"""The model's own greedy decoding, with the attention rows of every step split by the layout.

:func:`generate_rows` runs ``model.generate(**inputs, do_sample=False, num_beams=1,
max_new_tokens=n)`` itself (prefill, then one cached step per token, the rest of the
model's ``generation_config`` as it is: forced tokens, a list of end tokens, ...) inside
:func:`~.rows.capture_rows`, so the tokens are the model's own by construction. Forward
call ``i`` predicts token ``i``; its row of each layer is split into the views' maps and
the kinds' shares, nothing renormalised: at every layer, head and step the maps plus the
shares sum to 1. Keys after the prompt (tokens generated earlier) are the
``"generated"`` share. A sliding-window layer's cache keeps only its window on cached steps
(Gemma 2 / 3): the keys it dropped get weight 0 in its rows, as its mask gives them. The family
(:mod:`.families`) says which attention modules give the rows and whether the keys grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import AttnlabError
from ...keys import KeyLayout
from .rows import attention_modules, capture_rows

if TYPE_CHECKING:
    from .families import Family


@dataclass
class VLMRun:
    """One caption: ``tokens`` ``(n,)``, raw ``logits`` ``(n, V)``, ``maps[i]`` ``(layers, heads, n, h, w)``
    for view ``layout.views[i]``, ``shares[kind]`` ``(layers, heads, n)`` (kinds of the layout plus
    ``"generated"``)."""

    tokens: np.ndarray
    logits: np.ndarray
    maps: list[np.ndarray]
    shares: dict[str, np.ndarray]
    layout: KeyLayout
    scores: np.ndarray | None = None  # (n, V) what greedy chose from: the logits after generation_config's processors
    rows: np.ndarray | None = None  # with keep_rows: (layers, heads, n, length + n), step s zero beyond length + s


def split_row(row: np.ndarray, layout: KeyLayout) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """One layer's row ``(heads, K)`` (``K >= layout.length``) -> per-view ``(heads, h, w)`` and per-kind ``(heads,)``."""
    maps = [row[:, keys].reshape(row.shape[0], *v.grid) for v, keys in zip(layout.views, layout.view_keys)]
    shares = {kind: row[:, keys].sum(axis=1) for kind, keys in layout.kinds.items()}
    shares["generated"] = row[:, layout.length:].sum(axis=1)
    return maps, shares


def _family(model: Any, family: "Family | None") -> "Family | None":
    """The given family, else the registered family of ``model`` (``None``: the defaults, decoder self-attention)."""
    if family is not None:
        return family
    from .families import FAMILIES

    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def generate_rows(model: Any, inputs: Any, layout: KeyLayout, max_new_tokens: int, *, keep_rows: bool = False,
                  family: "Family | None" = None) -> VLMRun:
    """Greedy ``generate`` of up to ``max_new_tokens`` generated tokens with every step's rows split by ``layout``.

    ``keep_rows``: also keep the rows themselves (``VLMRun.rows``) for a caller that splits them again.
    ``family`` (default: the model's registered family): whose ``modules`` (or its own ``capture``) give the rows, whether
    the keys grow by one per step (``grows``; else every step attends over the layout's keys only)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AttnlabError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    T = inputs["input_ids"].shape[1]  # the layout may count keys before the ids (GIT's image embeddings)
    if inputs["input_ids"].shape[0] != 1 or layout.length < T:
        raise AttnlabError("generate_rows takes one prompt (batch size 1) whose length matches its layout")
    family = _family(model, family)
    attn = (attention_modules if family is None else family.modules)(model)
    modules = None if family is None or family.modules is attention_modules else attn
    grows = family is None or family.grows
    windows = [getattr(m, "sliding_window", None) for m in attn]  # a sliding layer's cache drops keys left of its window
    custom = family is not None and family.capture is not None  # a family that records its rows itself (GIT)
    with (family.capture(model) if custom else capture_rows(model, modules)) as capture, torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             output_logits=True, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, out.sequences.shape[1] - len(out.logits):].cpu().numpy()  # after the prompt (decoder-only) or the start token (encoder-decoder)
    n = len(tokens)
    if capture.calls < n:
        raise AttnlabError(f"{type(model).__name__}.generate made {capture.calls} forward calls for {n} tokens; cannot record its rows")
    layers, heads = len(capture.rows), capture.rows[0][0].shape[1]
    maps = [np.zeros((layers, heads, n, *v.grid), np.float32) for v in layout.views]
    shares = {k: np.zeros((layers, heads, n), np.float32) for k in [*layout.kinds, "generated"]}
    kept = np.zeros((layers, heads, n, layout.length + n), np.float32) if keep_rows else None
    for layer, calls in enumerate(capture.rows):
        for step in range(n):
            row = calls[step][0].numpy()  # (heads, K)
            calls[step] = None  # the maps replace the rows: never both whole in memory
            expected = layout.length + step * grows
            if windows[layer] and row.shape[1] < expected:  # the keys that slid out of the window: weight 0, as under its mask
                row = np.concatenate([np.zeros((row.shape[0], expected - row.shape[1]), row.dtype), row], axis=1)  # (heads, expected)
            if row.shape[1] != expected:
                raise AttnlabError(f"step {step} attended over {row.shape[1]} keys where {expected} were expected")
            if kept is not None:
                kept[layer, :, step, : row.shape[1]] = row
            view_maps, kind_shares = split_row(row, layout)
            for i, m in enumerate(view_maps):
                maps[i][layer, :, step] = m
            for k, s in kind_shares.items():
                shares[k][layer, :, step] = s
    logits = torch.stack([lg[0] for lg in out.logits[:n]]).float().cpu().numpy()  # (n, V)
    scores = torch.stack([sc[0] for sc in out.scores[:n]]).float().cpu().numpy()  # (n, V)
    return VLMRun(tokens, logits, maps, shares, layout, scores, kept)
