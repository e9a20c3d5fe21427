"""A vision-language model's teacher-forced full forward, its attention one layer at a time
(:class:`HFSequencePass`, the seam's :class:`~attnlab.captioner.SequencePass`).

The sequence is the prompt (image tokens included) followed by the caption's tokens but the
last: position ``P - 1 + i`` (``P`` the prompt's length) predicts word ``i``, and ``T = P + n - 1``.
The model runs its own attention implementation (sdpa or eager) through
:func:`~.rows.switched_attention`; beside it, the registered function recomputes
``A = softmax(q k^T * scaling + mask)`` ``(heads, T, T)`` from the query/key states the layer
already has (the mask the model built; none: causal), float32:

* :meth:`HFSequencePass.attention` (no gradients) hands ``A`` to the caller as each layer runs
  and drops it: at most one layer's ``T x T`` exists at a time, beside what the caller keeps.
* :meth:`HFSequencePass.gradients` keeps per layer only the states ``q``, ``k``, ``v``
  ``(heads, T, d)`` and the attention output ``O = A V`` (in the graph); after the forward
  the switch is undone, and for each word one ``torch.autograd.grad`` of its logit gives
  ``dO`` for every layer at once (no ``.grad`` is written); ``A`` and ``dA = dO V^T`` are then
  rebuilt one layer at a time. Memory: ``layers x T x d`` states, the graph, one ``T x T``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import AttnlabError
from ...keys import KeyLayout, View
from ...preprocess import resized_size
from .layout import vlm_layout
from .rows import attention_modules, switched_attention


def full_probs(module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None, kwargs: dict) -> torch.Tensor:
    """``softmax(q k^T * scaling + mask)`` of every query: ``(B, heads, T, K)`` float32 (GQA: kv head = head // groups)."""
    if kwargs.get("s_aux") is not None:
        raise AttnlabError("attention sinks (s_aux) are not supported by the explanation methods; use a model without them")
    b, heads, q_len, d = query.shape  # (B, heads, T, d)
    kv_heads, k_len = key.shape[1], key.shape[2]
    q = query.float().reshape(b, kv_heads, heads // kv_heads, q_len, d)  # (B, kv heads, groups, T, d)
    scale = scaling if scaling is not None else d**-0.5
    # in place after the product: one (heads, T, K) buffer for the scores, one for the softmax
    scores = torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)).mul_(scale)  # (B, kv heads, groups, T, K)
    scores = scores.reshape(b, heads, q_len, k_len)  # (B, heads, T, K)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        m = mask[:, :, :, :k_len]  # (B, 1 or heads, T, K)
        scores = scores.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else scores.add_(m.float())
    elif q_len > 1 and (kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)):
        above = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(1)  # (T, K): keys after the query
        scores = scores.masked_fill_(above, float("-inf"))
    return torch.softmax(scores, dim=-1)  # (B, heads, T, K)


def shown_layout(engine: KeyLayout, photo: tuple[int, int], shown_side: int, length: int) -> KeyLayout:
    """The prompt's layout with its boxes on the image traces show (long side ``shown_side``) and
    the keys ``engine.length .. length - 1`` (the caption's tokens) the kind ``"generated"``."""
    (W, H) = photo
    sw, sh = resized_size(W, H, shown_side)
    fx, fy = sw / W, sh / H
    views = [View(v.name, v.grid, (v.box[0] * fx, v.box[1] * fy, v.box[2] * fx, v.box[3] * fy)) for v in engine.views]
    kinds = {**engine.kinds, "generated": np.arange(engine.length, length)}
    return KeyLayout.of_views(views, engine.view_keys, kinds, length)


def forced_inputs(inputs: dict, tokens: Sequence[int], suffix_type: int = 0) -> dict:
    """The processor's inputs for one prompt with ``tokens[:-1]`` appended (every mask 1; ``mm_token_type_ids``
    0 (text), ``token_type_ids`` ``suffix_type``: 1 for a prefix-LM's causal suffix (PaliGemma), as its
    ``generate`` extends them)."""
    extra = torch.as_tensor([int(t) for t in tokens[:-1]], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)[None]
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)  # (1, T)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for name, value in (("mm_token_type_ids", 0), ("token_type_ids", suffix_type)):
        if name in full:
            full[name] = torch.cat([inputs[name], torch.full_like(extra, value, dtype=inputs[name].dtype)], 1)
    return full


class HFSequencePass:
    """One teacher-forced pass of a Hugging Face vision-language model (see the module docstring)."""

    def __init__(self, model: Any, inputs: dict, tokens: Sequence[int], layout: KeyLayout, meta: dict) -> None:
        if len(tokens) < 1:
            raise AttnlabError("an explanation needs at least one caption token")
        self.model, self.tokens, self.layout, self.meta = model, [int(t) for t in tokens], layout, dict(meta)
        cfg = model.config
        image = getattr(cfg, "image_token_id", None)
        image = getattr(cfg, "image_token_index", None) if image is None else image
        if image is not None and int(image) in self.tokens:
            raise AttnlabError(f"tokens hold the image placeholder id {int(image)}: a caption cannot contain it (pass word ids)")
        prefix_lm = getattr(cfg, "model_type", None) == "paligemma"  # its generate marks generated tokens 1 (causal suffix)
        self.inputs = forced_inputs(inputs, tokens, 1 if prefix_lm else 0)
        prompt = int(inputs["input_ids"].shape[1])
        self.queries = prompt - 1 + np.arange(len(tokens))  # (n,)
        self.modules = attention_modules(model)
        self.layers = len(self.modules)
        self.heads = int(self.modules[0].config.num_attention_heads)
        self.logits: torch.Tensor | None = None

    def _forward(self, make: Callable[[Callable], Callable]) -> None:
        with switched_attention(self.model, make):
            out = self.model(**self.inputs, use_cache=False)
        q = torch.as_tensor(self.queries)
        self.logits = out.logits[0, q].detach().float().cpu()  # (n, V) the raw logits, before any processor
        return out

    def attention(self, visit: Callable[[int, torch.Tensor], None]) -> None:
        def make(call: Callable) -> Callable:
            def attnlab_sequence(module, query, key, value, attention_mask, *args, **kwargs):
                out = call(module, query, key, value, attention_mask, *args, **kwargs)
                a = full_probs(module, query.detach(), key.detach(), attention_mask, kwargs.get("scaling"), kwargs)
                visit(module.layer_idx, a[0])  # (heads, T, T)
                return out

            return attnlab_sequence

        with torch.no_grad():
            self._forward(make)

    def gradients(self, layers: Sequence[int]) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        kept: dict[int, tuple] = {}

        def make(call: Callable) -> Callable:
            def attnlab_sequence(module, query, key, value, attention_mask, *args, **kwargs):
                attn_output, weights = call(module, query, key, value, attention_mask, *args, **kwargs)[:2]
                if not attn_output.requires_grad:  # nothing before it is tracked: start the graph here
                    attn_output = attn_output.detach().requires_grad_(True)
                kept[module.layer_idx] = (module, query.detach(), key.detach(), value.detach(), attention_mask,
                                          kwargs.get("scaling"), dict(kwargs), attn_output)
                return attn_output, weights

            return attnlab_sequence

        with torch.enable_grad():
            out = self._forward(make)
            wanted = [int(x) for x in layers]
            outputs = [kept[x][7] for x in wanted]  # each (1, T, heads, d), in the graph
            for i, (q, token) in enumerate(zip(self.queries, self.tokens)):
                target = out.logits[0, int(q), token]
                grads = torch.autograd.grad(target, outputs, retain_graph=i + 1 < len(self.tokens), allow_unused=True)
                for x, g in zip(wanted, grads):
                    yield (i, x, *self._rebuilt(kept[x], g))

    @staticmethod
    def _rebuilt(kept: tuple, d_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's ``A`` and ``dA = dO V^T`` ``(heads, T, T)`` float32 from its kept states."""
        module, query, key, value, mask, scaling, kwargs = kept[:7]
        a = full_probs(module, query, key, mask, scaling, kwargs)[0]  # (heads, T, T)
        if d_out is None:
            return a, torch.zeros_like(a)
        heads, kv_heads = query.shape[1], value.shape[1]
        v = value[0].float().repeat_interleave(heads // kv_heads, dim=0)  # (heads, T, d)
        d_o = d_out[0].float().transpose(0, 1)  # (1, T, heads, d) -> (heads, T, d)
        return a, d_o @ v.transpose(-1, -2)  # (heads, T, T)


def sequence_pass(model: Any, processor: Any, photo: Any, tokens: Sequence[int], text: str, shown_side: int,
                  meta: dict) -> HFSequencePass:
    """The pass of ``tokens`` after the prompt ``text`` on ``photo`` (a PIL image), boxes on the image traces
    show (long side ``shown_side``); ``meta``: what the traces record (the prompt)."""
    device = next(model.parameters()).device
    inputs = processor(text=[text], images=[photo], return_tensors="pt")
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in dict(inputs).items() if k != "labels"}  # PaliGemma's labels
    engine = vlm_layout(model, processor, inputs, photo.size)
    layout = shown_layout(engine, photo.size, shown_side, engine.length + len(tokens) - 1)
    return HFSequencePass(model, inputs, tokens, layout, {**meta, "raw_prompt": text})
