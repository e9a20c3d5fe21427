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

:func:`sequence_pass` asks the family (:mod:`.families`) which pass: the one above over the family's
``modules`` (PaliGemma's ``prefix_lm``: the caption's ``token_type_ids`` are 1, as its ``generate``);
:class:`HookSequencePass` for a family whose attention bypasses the registry (``capture``: GIT, its
probabilities read by forward hooks); :class:`.sequence_ed.EncoderDecoderPass` for ``grows=False``
(Florence-2); and ``Family.compose_rows`` (BLIP-2) gives the pass ``finish(rows) -> (rows, layout)``,
the rows composed through the queries onto the patches (what ``explain`` draws).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import AttnlabError
from ...keys import KeyLayout, View
from ...preprocess import resized_size
from .families import family_of, model_inputs
from .families.common import image_token_id_or_none
from .rows import attention_modules, probabilities, switched_attention


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
            full[name] = torch.cat([inputs[name], torch.full_like(extra, value, dtype=inputs[name].dtype)], 1)  # (1, T)
    return full


class HFSequencePass:
    """One teacher-forced pass of a Hugging Face vision-language model (see the module docstring).

    In: the model, the processor's ``inputs`` for the prompt (``input_ids`` ``(1, P)``), the caption's
    ``tokens`` (``n`` word ids), the ``layout`` of the ``T = P + n - 1`` keys, the trace's ``meta``;
    ``modules`` (default: the language model's ``self_attn``) the layers read, ``prefix_lm`` (PaliGemma).
    Out: ``queries`` ``(n,)`` the positions predicting each word, ``layers`` and ``heads``, and after a pass
    ``logits`` ``(n, V)`` (raw, CPU); :meth:`attention` and :meth:`gradients` hand over the matrices."""

    def __init__(self, model: Any, inputs: dict, tokens: Sequence[int], layout: KeyLayout, meta: dict, *,
                 modules: list[Any] | None = None, prefix_lm: bool = False) -> None:
        if len(tokens) < 1:
            raise AttnlabError("an explanation needs at least one caption token")
        self.model, self.tokens, self.layout, self.meta = model, [int(t) for t in tokens], layout, dict(meta)
        image = image_token_id_or_none(model.config)
        if image is not None and image in self.tokens:
            raise AttnlabError(f"tokens hold the image placeholder id {image}: a caption cannot contain it (pass word ids)")
        self.inputs = forced_inputs(inputs, tokens, 1 if prefix_lm else 0)  # a prefix-LM's generate marks its suffix 1
        prompt = layout.length - (len(tokens) - 1)  # the prompt's keys (GIT: its image keys are not in input_ids)
        self.queries = prompt - 1 + np.arange(len(tokens))  # (n,)
        self.given = modules
        self.modules = attention_modules(model) if modules is None else list(modules)
        self.index = {id(m): i for i, m in enumerate(self.modules)}  # a module's layer (other modules pass through)
        self.layers = len(self.modules)
        self.heads = int(getattr(self.modules[0], "num_attention_heads", None) or self.modules[0].config.num_attention_heads)
        self.logits: torch.Tensor | None = None

    def _forward(self, make: Callable[[Callable], Callable]) -> Any:
        with switched_attention(self.model, make, self.given):
            return self._run()

    def _run(self) -> Any:
        """The model's forward over the whole sequence; keeps the words' raw logits."""
        out = self.model(**self.inputs, use_cache=False)
        q = torch.as_tensor(self.queries)
        self.logits = out.logits[0, q].detach().float().cpu()  # (n, V) the raw logits, before any processor
        return out

    def attention(self, visit: Callable[[int, torch.Tensor], None]) -> None:
        """One forward without gradients: ``visit(layer, A)`` with each layer's ``A`` ``(heads, T, T)`` float32 as
        the layer runs (first layer first); ``A`` is dropped after the call unless ``visit`` keeps it."""

        def make(call: Callable) -> Callable:
            def attnlab_sequence(module, query, key, value, attention_mask, *args, **kwargs):
                out = call(module, query, key, value, attention_mask, *args, **kwargs)
                if id(module) in self.index:
                    a = probabilities(module, query.detach(), key.detach(), attention_mask, kwargs.get("scaling"), kwargs)
                    visit(self.index[id(module)], a[0])  # (heads, T, T)
                return out

            return attnlab_sequence

        with torch.no_grad():
            self._forward(make)

    def gradients(self, layers: Sequence[int]) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yields ``(word i, layer, A, dA)`` for every word and each of ``layers``: ``A`` ``(heads, T, T)`` and
        ``dA`` ``(heads, T, T)`` the gradient of word ``i``'s raw logit (its own token's) w.r.t. ``A``, float32
        (zeros where the logit does not depend on the layer). Words in order; within a word, ``layers`` in order."""
        kept: dict[int, tuple] = {}

        def make(call: Callable) -> Callable:
            def attnlab_sequence(module, query, key, value, attention_mask, *args, **kwargs):
                attn_output, weights = call(module, query, key, value, attention_mask, *args, **kwargs)[:2]
                if id(module) not in self.index:
                    return attn_output, weights
                if not attn_output.requires_grad:  # nothing before it is tracked: start the graph here
                    attn_output = attn_output.detach().requires_grad_(True)
                kept[self.index[id(module)]] = (module, query.detach(), key.detach(), value.detach(), attention_mask,
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
        a = probabilities(module, query, key, mask, scaling, kwargs)[0]  # (heads, T, T)
        if d_out is None:
            return a, torch.zeros_like(a)
        heads, kv_heads = query.shape[1], value.shape[1]
        v = value[0].float().repeat_interleave(heads // kv_heads, dim=0)  # (heads, T, d)
        d_o = d_out[0].float().transpose(0, 1)  # (1, T, heads, d) -> (heads, T, d)
        return a, d_o @ v.transpose(-1, -2)  # (heads, T, T)


class HookSequencePass(HFSequencePass):
    """The pass of a family whose attention bypasses transformers' attention registry (GIT): each module
    returns its probabilities ``(B, heads, T, T)`` as its second output, and forward hooks (removed on exit,
    exceptions included) read them. :meth:`attention`: under no-grad, each layer's is handed over and
    dropped as the layer runs. :meth:`gradients`: the probabilities stay in the graph (the module's own
    eager backward keeps them anyway); one ``torch.autograd.grad`` per word w.r.t. the asked layers'."""

    @contextlib.contextmanager
    def _hooked(self, record: Callable[[int, torch.Tensor], None], track: bool = False) -> Iterator[None]:
        def start(module, args, kwargs):  # nothing tracked before the first layer: start the graph at its input
            if args and not args[0].requires_grad:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            return None

        handles = [m.register_forward_hook(lambda mod, args, out, i=i: record(i, out[1])) for i, m in enumerate(self.modules)]
        if track:
            handles.append(self.modules[0].register_forward_pre_hook(start, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def attention(self, visit: Callable[[int, torch.Tensor], None]) -> None:
        with torch.no_grad(), self._hooked(lambda i, probs: visit(i, probs[0].float())):  # (heads, T, T)
            self._run()

    def gradients(self, layers: Sequence[int]) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        kept: dict[int, torch.Tensor] = {}
        with torch.enable_grad():
            with self._hooked(kept.__setitem__, track=True):
                out = self._run()
            wanted = [int(x) for x in layers]
            for i, (q, token) in enumerate(zip(self.queries, self.tokens)):
                target = out.logits[0, int(q), token]
                grads = torch.autograd.grad(target, [kept[x] for x in wanted], retain_graph=i + 1 < len(self.tokens), allow_unused=True)
                for x, g in zip(wanted, grads):
                    a = kept[x][0].detach().float()  # (heads, T, T)
                    yield i, x, a, (torch.zeros_like(a) if g is None else g[0].float())


def sequence_pass(model: Any, processor: Any, photo: Any, tokens: Sequence[int], text: str, shown_side: int,
                  meta: dict) -> Any:
    """The pass of ``tokens`` after the prompt ``text`` on ``photo`` (a PIL image), boxes on the image traces
    show (long side ``shown_side``); ``meta``: what the traces record (the prompt). The family says which pass:
    an encoder-decoder's (``grows=False``, :mod:`.sequence_ed`), hooks (``capture``: GIT), or the registry's; a
    family with ``compose_rows`` (BLIP-2) gets ``finish`` (rows -> composed rows and layout)."""
    family = family_of(model)
    inputs = model_inputs(family, processor, text, photo, next(model.parameters()).device)
    engine = family.layout(model.config, processor, inputs, photo.size)
    meta = {**meta, "raw_prompt": text}
    if not family.grows:
        from .sequence_ed import EncoderDecoderPass

        return EncoderDecoderPass(model, inputs, tokens, shown_layout(engine, photo.size, shown_side, engine.length), meta,
                                  family.modules(model))
    layout = shown_layout(engine, photo.size, shown_side, engine.length + len(tokens) - 1)
    given = None if family.modules is attention_modules else family.modules(model)
    kind = HFSequencePass if family.capture is None else HookSequencePass
    seq = kind(model, inputs, tokens, layout, meta, modules=given, prefix_lm=family.prefix_lm)
    if family.compose_rows is not None:
        compose, composed = family.compose_rows(model, inputs, layout)
        seq.finish = lambda rows: (compose(rows), composed)  # type: ignore[attr-defined]
    return seq
