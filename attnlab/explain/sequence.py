"""The explanation methods on a captioner whose words attend over one sequence (a vision-language
model: :class:`~attnlab.captioner.SequenceCaptioner`): each method's rows ``(n, T)``, word ``i``'s
row over the keys ``0 .. T-1`` of the teacher-forced sequence (prompt, image, earlier words).

Word ``i`` is predicted at query position ``q_i = P - 1 + i`` (``P`` the prompt's length);
its row is zero beyond ``q_i`` (causal). ``A_l`` is layer ``l``'s attention ``(heads, T, T)``
as the pass hands it over, one layer at a time (never two layers' ``T x T`` at once):

* ``raw``: ``A_l[h or mean_h][q_i]``; ``layer_mean``: ``mean_{l,h} A_l[q_i]``; ``best_head``
  the chosen head's row (without ``layer=``/``head=`` and without a best-head record: the head with
  the most weight on the image keys, mean over the words, :func:`image_head`; the trace's label says so).
* ``rollout``: ``R = Â_L ... Â_1`` with ``Â = (mean_h A + I) / rowsum`` (the residual rule of
  :func:`attnlab.rollout.rollout`), over the WHOLE sequence: image information that reached a
  prompt token or an earlier word in layer ``l`` counts through that token in later layers.
  The running product ``R`` ``(T, T)`` is updated inside the forward as each layer runs and
  ``A_l`` is dropped. Causal: every factor is lower-triangular, so row ``q_i`` depends only on
  positions ``<= q_i``, what the model had when it wrote the word.
* ``grad_attn``: ``mean_h((dA_l ⊙ A_l)^+)[q_i]`` for one layer (default the last), ``dA`` the
  gradient of word ``i``'s logit (its own token's, raw, at ``q_i``) w.r.t. ``A_l``.
* ``relevance`` (Chefer, Gur & Wolf 2021, the self-attention rule for a decoder-only model):
  ``R = I``; per layer, first layer first, ``R += mean_h((dA_l ⊙ A_l)^+) R``; word ``i``'s row is
  ``R[q_i]``. Computed as a row vector from the last layer down, ``r = e_{q_i}``,
  ``r += r mean_h((dA_l ⊙ A_l)^+)`` (the same product read from the left: one layer's ``T x T``
  at a time and no running ``T x T``). The identity stays in: the word's own position keeps its
  weight (a ``"prompt"``/``"special"`` share for the first word, ``"generated"`` after it).

On an encoder-decoder vision-language model (Florence-2: the pass has ``encoder_decoder = True``) a
word's row is over the ``S`` encoder keys (image tokens and the task prompt); the pass hands over the
decoder's cross-attention ``(heads, n, S)`` with ``q_i = i`` (raw, layer_mean, best_head, grad_attn,
contrast as above), and ``rollout`` / ``relevance`` are attnlab's encoder-decoder rules on its three kinds
of matrices: :func:`attnlab.explain.rules.decoder_rollout` (``Roll(A^qq) . mean_h(A^qi) . Roll(A^ii)``,
the encoder's self-attention over the image and prompt tokens) and :func:`attnlab.explain.rules.relevance`.

The scaled methods (rollout, grad_attn, relevance, contrast) are renormalised by the trace
so that a word's maps and key shares sum to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import rules

if TYPE_CHECKING:
    from ..captioner import SequencePass

SeqRows = Callable[["SequencePass", Any, Callable[[], "SequencePass"]], np.ndarray]
"""A method on one sequence: ``(pass, method, again) -> (n, T)`` rows, word ``i``'s over the pass's ``T`` keys;
``again()`` gives the same image and caption's pass after another prompt (only ``contrast`` calls it)."""


def attention_rows(seq: "SequencePass", pick: Callable[[int], Any]) -> np.ndarray:
    """``(n, T)``: per word, the mean over the layers ``pick(layer)`` accepts of the rows at its query
    (``pick`` returns ``None`` to skip a layer, ``"mean"`` for the head mean, or a head index)."""
    q = torch.as_tensor(seq.queries)
    total: torch.Tensor | None = None  # (n, T) the picked rows summed over the layers so far
    count = 0

    def visit(layer: int, a: torch.Tensor) -> None:
        nonlocal total, count
        choice = pick(layer)
        if choice is None:
            return
        rows = a[:, q].double()  # (heads, n, T)
        row = rows.mean(dim=0) if choice == "mean" else rows[choice]  # (n, T)
        total = row if total is None else total + row
        count += 1

    seq.attention(visit)
    return (total / count).numpy()  # (n, T)


def image_keys(seq: "SequencePass") -> np.ndarray:
    """``(N,)`` key positions of every view's cells in the sequence, view after view (row-major in each)."""
    return np.concatenate([np.asarray(k) for k in seq.layout.view_keys])


def image_head(seq: "SequencePass") -> tuple[int, int, float]:
    """``best_head`` on a captioner without a best-head record: the ``(layer, head)`` whose rows put the most
    weight on the image keys (every view's cells; BLIP-2: its queries), averaged over the words, and that mass."""
    q = torch.as_tensor(seq.queries)
    keys = torch.as_tensor(image_keys(seq))  # (N,)
    mass: dict[int, torch.Tensor] = {}

    def visit(layer: int, a: torch.Tensor) -> None:
        mass[layer] = a[:, q][:, :, keys].double().sum(dim=-1).mean(dim=-1)  # (heads,)

    seq.attention(visit)
    table = torch.stack([mass[layer] for layer in sorted(mass)])  # (layers, heads)
    best = int(table.argmax())
    return best // table.shape[1], best % table.shape[1], float(table.max())


def raw_rows(seq: "SequencePass", m: Any, again: Any = None) -> np.ndarray:
    """``raw`` and ``best_head``: one layer, one head or the head mean."""
    return attention_rows(seq, lambda layer: ("mean" if m.head is None else m.head) if layer == m.layer else None)


def mean_rows(seq: "SequencePass", m: Any, again: Any = None) -> np.ndarray:
    """``layer_mean``: every layer and head."""
    return attention_rows(seq, lambda layer: "mean")


def rollout_rows(seq: "SequencePass", m: Any, again: Any = None) -> np.ndarray:
    """``rollout`` over the whole sequence, the running product updated as each layer runs."""
    if getattr(seq, "encoder_decoder", False):  # words attend to an encoder sequence: attnlab's encoder-decoder rollout
        encoder, decoder, cross = seq.matrices()  # type: ignore[attr-defined]
        return rules.decoder_rollout(decoder, cross[-1], encoder, causal=True).numpy()  # (n, S)
    state: dict[str, torch.Tensor] = {}

    def visit(layer: int, a: torch.Tensor) -> None:
        mixed = a.mean(dim=0, dtype=torch.float64)  # (T, T), no float64 copy of every head
        mixed.diagonal().add_(1.0)  # + I
        mixed /= mixed.sum(dim=-1, keepdim=True)  # rows sum to 1
        state["R"] = mixed if "R" not in state else mixed @ state["R"]  # (T, T): later layers on the left

    seq.attention(visit)
    return state["R"][torch.as_tensor(seq.queries)].numpy()  # (n, T)


def grad_attn_rows(seq: "SequencePass", m: Any, again: Any = None) -> np.ndarray:
    """``grad_attn``: ``mean_h((dA ⊙ A)^+)`` of one layer at the word's query."""
    out = np.zeros((len(seq.queries), seq.layout.length))  # (n, T)
    for i, _, a, da in seq.gradients([m.layer]):  # a, da: (heads, T, T), the attention and word i's gradient of it
        q = int(seq.queries[i])
        out[i] = (da[:, q].double() * a[:, q].double()).clamp(min=0).mean(dim=0).numpy()  # (T,)
    return out


def relevance_rows(seq: "SequencePass", m: Any, again: Any = None) -> np.ndarray:
    """``relevance``: row ``q_i`` of ``R = prod_l (I + mean_h((dA_l ⊙ A_l)^+))``, last layer first from the left."""
    n, length = len(seq.queries), seq.layout.length
    out = np.zeros((n, length))  # (n, T)
    if getattr(seq, "encoder_decoder", False):  # attnlab's encoder-decoder rules (Chefer et al.'s, rules.relevance)
        for i, encoder, decoder, cross in seq.word_gradients():  # type: ignore[attr-defined]
            out[i] = rules.relevance(encoder, decoder, cross)[i].numpy()  # (S,)
        return out
    r = torch.zeros(length, dtype=torch.float64)  # (T,) word i's row of R, built from the last layer down
    for i, layer, a, da in seq.gradients(list(range(seq.layers - 1, -1, -1))):
        if layer == seq.layers - 1:  # a new word: start from its own position
            r = torch.zeros(length, dtype=torch.float64)
            r[int(seq.queries[i])] = 1.0
        bar = da.mul_(a).clamp_(min=0).mean(dim=0, dtype=torch.float64)  # (T, T); dA is the pass's own buffer
        r = r + r @ bar  # (T,)
        if layer == 0:
            out[i] = r.numpy()
    return out
