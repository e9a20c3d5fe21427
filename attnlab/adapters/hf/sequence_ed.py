"""An encoder-decoder vision-language model's teacher-forced pass (Florence-2: ``Family.grows=False``), the
seam's :class:`~attnlab.captioner.SequencePass` with ``encoder_decoder = True``.

The encoder reads the image tokens and the task prompt (``S`` keys, the family's layout); the decoder
reads ``[decoder_start] + tokens[:-1]``, so decoder position ``i`` predicts word ``i`` (``queries`` are
``0 .. n-1``) and a word's row is the decoder's cross-attention over the ``S`` encoder keys. One forward
under eager with ``output_attentions=True`` (the implementation of every sub-model restored afterwards,
exceptions included) gives the three kinds of matrices attnlab's encoder-decoder rules
(:mod:`attnlab.explain.rules`) take: the encoder's self-attention ``(heads, S, S)``, the decoder's
self-attention ``(heads, n, n)`` and the cross-attention ``(heads, n, S)`` per layer.

Memory: unlike the decoder-only pass, this one holds every layer's matrices at once (eager's
``output_attentions``): the encoder's ``layers x heads x S x S`` (Florence-2 base: 6 x 12 x 600^2
float32, about 100 MB) is the largest; the decoder's are ``n``-sized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import AttnlabError
from ...keys import KeyLayout
from .families.common import image_token_id_or_none

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def eager(model: Any) -> Iterator[None]:
    """The model under eager attention (``output_attentions``); every config's own setting restored on exit."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        model.set_attn_implementation("eager")
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


class EncoderDecoderPass:
    """One teacher-forced pass of an encoder-decoder vision-language model (see the module docstring)."""

    encoder_decoder = True

    def __init__(self, model: Any, inputs: dict, tokens: Sequence[int], layout: KeyLayout, meta: dict, cross: list[Any]) -> None:
        if len(tokens) < 1:
            raise AttnlabError("an explanation needs at least one caption token")
        self.model, self.inputs, self.tokens, self.layout, self.meta = model, dict(inputs), [int(t) for t in tokens], layout, dict(meta)
        image = image_token_id_or_none(model.config)
        if image is not None and image in self.tokens:
            raise AttnlabError(f"tokens hold the image placeholder id {image}: a caption cannot contain it (pass word ids)")
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        start = getattr(model.config, "decoder_start_token_id", None) if start is None else start
        if start is None:
            raise AttnlabError("the model names no decoder start token: set model.generation_config.decoder_start_token_id")
        device = inputs["input_ids"].device
        self.decoder_ids = torch.as_tensor([[int(start), *self.tokens[:-1]]], device=device)  # (1, n)
        self.queries = np.arange(len(self.tokens))  # (n,) decoder position i predicts word i
        self.layers = len(cross)
        self.heads = int(getattr(cross[0], "num_heads", None) or cross[0].config.decoder_attention_heads)
        self.logits: torch.Tensor | None = None

    def _run(self) -> Any:
        """One eager forward with every attention returned (grad as the caller's mode); keeps the raw logits."""
        with eager(self.model):
            out = self.model(**self.inputs, decoder_input_ids=self.decoder_ids, output_attentions=True, use_cache=False)
        self.logits = out.logits[0].detach().float().cpu()  # (n, V) the raw logits, before any processor
        if out.cross_attentions[0].shape[-1] != self.layout.length:
            raise AttnlabError(f"the decoder attended over {out.cross_attentions[0].shape[-1]} encoder keys where the layout "
                               f"has {self.layout.length}: pass the inputs the processor made for the photo")
        return out

    def attention(self, visit: Any) -> None:
        """``visit(layer, A)`` with each decoder layer's cross-attention ``(heads, n, S)``, first layer first."""
        with torch.no_grad():
            out = self._run()
        for layer, a in enumerate(out.cross_attentions):
            visit(layer, a[0].float())  # (heads, n, S)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder self ``(layers, heads, S, S)``, decoder self ``(layers, heads, n, n)``, cross ``(layers, heads, n, S)``."""
        with torch.no_grad():
            out = self._run()
        return tuple(torch.stack([a[0].float() for a in kind]) for kind in  # type: ignore[return-value]
                     (out.encoder_attentions, out.decoder_attentions, out.cross_attentions))

    def _tracked(self) -> tuple[Any, list[torch.Tensor]]:
        """A forward in the graph and its attentions: encoder layers, then decoder self, then cross. Frozen
        parameters are tracked for the forward only (frozen again before anything is returned)."""
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            out = self._run()
        finally:
            for p in frozen:
                p.requires_grad_(False)
        return out, [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]

    def word_gradients(self) -> Iterator[tuple[int, Pairs, Pairs, Pairs]]:
        """Per word: ``(i, encoder, decoder self, cross)``, each a list of ``(A, dA)`` per layer (first first),
        ``dA`` the gradient of the word's raw logit (its own token's) w.r.t. ``A`` (``torch.autograd.grad``, no ``.grad``)."""
        with torch.enable_grad():
            out, atts = self._tracked()
            e, d = len(out.encoder_attentions), len(out.decoder_attentions)
            for i, token in enumerate(self.tokens):
                grads = torch.autograd.grad(out.logits[0, i, token], atts, retain_graph=i + 1 < len(self.tokens), allow_unused=True)
                pairs = [(a[0].detach().double(), torch.zeros_like(a[0], dtype=torch.float64) if g is None else g[0].double())
                         for a, g in zip(atts, grads)]  # (heads, rows, columns) each
                yield i, pairs[:e], pairs[e:e + d], pairs[e + d:]

    def gradients(self, layers: Sequence[int]) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Per word, the asked decoder layers' cross-attention ``A`` ``(heads, n, S)`` and ``dA``."""
        wanted = [int(x) for x in layers]
        for i, _, _, cross in self.word_gradients():
            for x in wanted:
                yield i, x, cross[x][0], cross[x][1]
