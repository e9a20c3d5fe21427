"""BLIP-2 (an OPT-style decoder-only language model): the language model sees ``num_query_tokens`` query
tokens (32 in the released checkpoints) before the prompt, not patches. The queries are the Q-Former's
output: each query cross-attends over the vision tower's CLS token and its ``h x w`` patches.

A word's map is the COMPOSITION of two attentions. For every language-model layer and head, the word's
row over the queries ``a`` ``(queries,)`` times the Q-Former's cross-attention ``C`` ``(queries, 1 + h * w)``
gives ``a @ C``: the patches' part is the map, the CLS part is the share ``"queries -> vision CLS"`` (not
drawn as a patch). ``C`` is the mean over the Q-Former's cross-attention layers and heads: every
cross-attention layer writes into the queries the language model reads, no single one is "the" layer,
and the mean of rows that each sum to 1 sums to 1, so the composition only redistributes the weight the
word put on the queries: the map plus ``"queries -> vision CLS"`` is exactly the queries' share of the
row, and maps plus shares still sum to 1. (The Q-Former's self-attention among the queries is not
followed: a query's map is its own cross-attention.) The view's name says that the map is composed
(:data:`attnlab.keys.COMPOSED`): ``"composed: language model -> 32 queries -> patches"``.

The Q-Former's cross-attention is returned by neither ``generate`` nor ``forward``: :func:`qformer_attention`
runs the vision tower and the Q-Former once more on the same pixels, the Q-Former under eager attention
with ``output_attentions=True`` (its setting restored afterwards, also on errors).

:func:`blip2_layout` is the language model's own layout (the queries as one ``1 x queries`` view, the
prompt's kinds); :func:`compose` (the family's ``after``) turns a run over it into the composed run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ....errors import AttnlabError
from ....keys import COMPOSED, KeyLayout, View
from . import Family, register
from .common import assemble, ids_and_mask, image_positions, image_token_id, special_ids

CLS_SHARE = "queries -> vision CLS"  # the part of the queries' weight the Q-Former put on the vision CLS token


def composed_name(queries: int) -> str:
    """The composed view's name (it says the path in every figure)."""
    return f"{COMPOSED}language model -> {queries} queries -> patches"


def blip2_layout(config: Any, processor: Any, inputs: Mapping, photo: tuple[int, int]) -> KeyLayout:
    """The language model's keys: the queries (one ``1 x queries`` view over the whole photo), then the prompt."""
    ids, mask = ids_and_mask(inputs)
    pos = image_positions(ids, image_token_id(config))
    queries = int(config.num_query_tokens)
    if len(pos) != queries:
        raise AttnlabError(f"the prompt has {len(pos)} image tokens where the model has {queries} queries: "
                           "pass the inputs the processor made (Blip2Processor with num_query_tokens)")
    view = View("queries", (1, queries), (0.0, 0.0, float(photo[0]), float(photo[1])))
    return assemble(ids, mask, [view], [pos], {}, special_ids(config, processor))


def decoder_attention(model: Any) -> list[Any]:
    """The language model's self-attention modules (OPT: ``language_model.model.decoder.layers``)."""
    if not getattr(model.config, "use_decoder_only_language_model", True):
        raise AttnlabError("BLIP-2 with an encoder-decoder language model (Flan-T5) is not supported: use a BLIP-2 OPT model")
    inner = getattr(getattr(model, "language_model", None), "model", None)
    layers = getattr(getattr(inner, "decoder", inner), "layers", None)
    if layers is None:
        raise AttnlabError(f"{type(model).__name__}'s language model has no decoder layers that attnlab can find")
    return [layer.self_attn for layer in layers]


def qformer_attention(model: Any, pixel_values: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
    """The Q-Former's cross-attention of the first image, mean over its cross-attention layers and heads:
    ``(queries, 1 + h * w)`` float64 (key 0 the vision CLS token), and the patch grid ``(h, w)``."""
    config = model.qformer.config
    before = config._attn_implementation
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values[:1]).last_hidden_state  # (1, 1 + h * w, D)
        config._attn_implementation = "eager"
        try:
            out = model.qformer(query_embeds=model.query_tokens.expand(1, -1, -1), encoder_hidden_states=vision,
                                encoder_attention_mask=torch.ones(vision.shape[:2], dtype=torch.long, device=vision.device),
                                output_attentions=True, return_dict=True)
        finally:
            config._attn_implementation = before
    cross = [a for a in (out.cross_attentions or ()) if a is not None]
    if not cross:
        raise AttnlabError("the Q-Former returned no cross-attention weights: cannot compose BLIP-2's maps")
    mean = torch.stack([a[0].double() for a in cross]).mean(dim=(0, 1))  # (layers, heads, queries, 1 + h * w) -> (queries, 1 + h * w)
    patch = model.config.vision_config.patch_size
    grid = (int(pixel_values.shape[-2]) // patch, int(pixel_values.shape[-1]) // patch)
    if mean.shape[1] != 1 + grid[0] * grid[1]:
        raise AttnlabError(f"the Q-Former attended over {mean.shape[1]} vision tokens where CLS + a {grid[0]} x {grid[1]} grid was expected")
    return mean.cpu().numpy(), grid


def composed_layout(layout: KeyLayout, grid: tuple[int, int]) -> tuple[KeyLayout, np.ndarray]:
    """The composed keys: the vision CLS, the ``h * w`` patches, then the prompt's other keys in their order;
    and those other keys' positions in the language model's prompt."""
    queries = layout.view_keys[0]
    rest = np.setdiff1d(np.arange(layout.length), queries)  # (T - queries,) sorted
    moved = np.full(layout.length, -1)
    first = 1 + grid[0] * grid[1]
    moved[rest] = first + np.arange(len(rest))
    kinds = {kind: moved[keys] for kind, keys in layout.kinds.items()}
    kinds[CLS_SHARE] = np.array([0])
    name = composed_name(len(queries))
    view = View(name, grid, layout.views[0].box)
    return KeyLayout.of_views([view], [np.arange(1, first)], kinds, first + len(rest)), rest


def through_queries(to_queries: np.ndarray, attn: np.ndarray) -> np.ndarray:
    """Rows over the queries ``(..., queries)`` times the Q-Former's ``C`` ``(queries, 1 + h * w)``: ``(..., 1 + h * w)``
    float64, key 0 the vision CLS (the composition of the module docstring, for the caption runs and the explanations)."""
    return np.asarray(to_queries, dtype=np.float64) @ attn  # (..., queries) @ (queries, 1 + h * w) -> (..., 1 + h * w)


def compose_rows(model: Any, inputs: Mapping, layout: KeyLayout) -> tuple[Any, KeyLayout]:
    """The explanations' composition (``Family.compose_rows``): a function taking a method's rows ``(n, T)`` over
    ``layout`` (the language model's keys, the caption's earlier tokens included) to rows over the composed keys
    ``[vision CLS, patches, the other keys]``, and that composed layout."""
    attn, grid = qformer_attention(model, inputs["pixel_values"])
    composed, rest = composed_layout(layout, grid)
    queries = np.asarray(layout.view_keys[0])

    def rows(r: np.ndarray) -> np.ndarray:
        return np.concatenate([through_queries(r[:, queries], attn), r[:, rest]], axis=1)  # (n, 1 + h * w + T - queries)

    return rows, composed


def compose(model: Any, inputs: Mapping, run: Any) -> Any:
    """The run (a :class:`~..stepping.VLMRun`) with the word maps composed through the queries (see the module
    docstring); tokens, logits and scores unchanged; ``rows`` (when kept) over the composed keys for the captioner's replay."""
    attn, grid = qformer_attention(model, inputs["pixel_values"])
    layout, rest = composed_layout(run.layout, grid)
    to_queries = run.maps[0][..., 0, :]  # (layers, heads, n, 1, queries) -> (layers, heads, n, queries)
    composed = through_queries(to_queries, attn).astype(np.float32)  # (layers, heads, n, 1 + h * w)
    lead = composed.shape[:3]
    maps = [composed[..., 1:].reshape(*lead, *grid)]  # (layers, heads, n, h, w)
    shares = {kind: s for kind, s in run.shares.items()}
    shares[CLS_SHARE] = composed[..., 0]
    rows = None
    if run.rows is not None:  # (layers, heads, n, T + n) -> (layers, heads, n, 1 + h * w + T - queries + n)
        T = run.layout.length
        rows = np.concatenate([composed, run.rows[..., rest], run.rows[..., T:]], axis=-1)
    return replace(run, maps=maps, shares=shares, layout=layout, rows=rows)


def plain_text(processor: Any, prompt: str) -> str:
    """BLIP-2 has no chat template: the prompt goes to the processor as it is (``""`` captions)."""
    return prompt


BLIP2 = register(Family(
    name="blip2", model_types=("blip-2",), classes=("Blip2ForConditionalGeneration",), layout=blip2_layout,
    modules=decoder_attention, prompt_text=plain_text, default_prompt="", after=compose, compose_rows=compose_rows,
))
