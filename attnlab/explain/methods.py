"""``attnlab.explain``: one map per generated word, by a named method, for any captioner.

Every method answers the same question, "which image patches made the model
write this word?", in its own way. Each returns, per decoding step, one map
over the image's patch grid, as a :class:`~attnlab.trace.CaptionTrace` whose
``cross_attention`` is ``(1, 1, steps, h, w)`` and whose ``meta["method"]``
names the method, so every figure and the explorer take it directly and say
"rollout" (or "relevance", ...) instead of a layer and head.

Methods (``Q`` decoding steps, ``K`` keys = prefix tokens + patches):

* ``raw``: the cross-attention of one decoder layer (``layer``, default the
  last), one head or the mean over heads (``head``, default ``"mean"``):
  today's view.
* ``layer_mean``: the mean over every decoder layer and head.
* ``best_head``: one layer's one head: the one that grounds best on held-out
  scenes, as recorded in the bundled models' checkpoints
  (``spec.best_head``); for any other model name it, ``layer=L, head=H``.
* ``rollout``: ``Roll(A^qq) . mean_h(A^qi of the last layer) . Roll(A^ii)``
  (:func:`attnlab.explain.rules.decoder_rollout`; ``Roll`` is
  :func:`attnlab.rollout.rollout`). Causal: word ``i``'s map mixes the
  cross-attention of words ``0..i`` only, what the model had when it wrote it.
  No gradients.
* ``chefer_rollout``: the same with ``Roll(A^qq)^T``, as Chefer et al.'s
  ``generate_rollout`` (written for DETR's mutually visible queries); in a
  causal decoder word ``i``'s map is then mostly made of the cross-attention
  of *later* words that read word ``i``. Kept for comparison.
* ``grad_attn``: per head of one layer (default the last) the gradient of the
  word's own score (the logit of ``token_ids[i]`` at step ``i``) with respect
  to the cross-attention weights times the weights, positive part, mean over
  heads (Grad-CAM on attention, as LAVIS does it for BLIP).
* ``relevance``: the encoder-decoder rules of Chefer, Gur & Wolf (2021)
  (:func:`attnlab.explain.rules.relevance`), with the same target.

The caption is the model's own greedy one, or ``tokens`` (teacher forcing):
step ``i``'s map explains ``token_ids[i]``. ``raw``, ``layer_mean`` and
``best_head`` maps are the attention weights themselves (a map and the step's
``prefix_share`` sum to 1); the maps of ``rollout``, ``grad_attn`` and
``relevance`` are scaled so that a step's map and its ``prefix_share`` (the
share on CLS/register keys) sum to 1 (``meta["normalised"] = True``).

Gradients are taken through the captioner seam (its autograd rule: the
attention weights a captioner returns are the tensors it multiplied with its
values), in eval mode, with ``torch.autograd.grad`` on those tensors only:
no parameter changes, no ``.grad`` is written, every hook is removed
afterwards, and parameters that were frozen are frozen again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..captioner import Captioner, CaptionerSpec, as_captioner
from ..decode import caption, check_max_len, check_tokens, model_lock
from ..diagnostics import mark_padding
from ..errors import AttnlabError
from ..preprocess import ImageInput, prepare_for
from ..trace import CaptionTrace
from ..util import is_int as _is_int
from . import rules
from .graph import Recording, record

METHODS: tuple[str, ...] = ("raw", "layer_mean", "best_head", "rollout", "chefer_rollout", "grad_attn", "relevance")
"""The names :func:`explain` takes."""
GRADIENT_METHODS = ("grad_attn", "relevance")
ROLLOUT_METHODS = ("rollout", "chefer_rollout")
SCALED_METHODS = ("rollout", "chefer_rollout", "grad_attn", "relevance")  # rows renormalised to sum 1 with the prefix

__all__ = ["METHODS", "Method", "explain", "explain_prepared", "explanation_trace", "resolve_method"]


@dataclass(frozen=True)
class Method:
    """One explanation method with its settings (``layer``/``head`` as given: negative counts from the end)."""

    name: str
    layer: int | None = None  # raw, best_head, grad_attn
    head: int | None = None  # raw (None = mean over heads), best_head

    @property
    def label(self) -> str:
        """What figures call it: ``"rollout"``, ``"raw attention, layer 2, mean of heads"``, ..."""
        if self.name == "raw":
            return f"raw attention, layer {self.layer}, " + ("mean of heads" if self.head is None else f"head {self.head}")
        if self.name == "best_head":
            return f"best head (layer {self.layer}, head {self.head})"
        if self.name == "grad_attn":
            return f"grad x attention (layer {self.layer})"
        return {"layer_mean": "mean of every layer and head", "rollout": "rollout (causal)",
                "chefer_rollout": "rollout as Chefer et al. (reads later words)",
                "relevance": "relevance (Chefer et al. 2021)"}[self.name]

    @property
    def quantity(self) -> str:
        """What a map's numbers are (the colour bar's words)."""
        return {"rollout": "share of rollout", "chefer_rollout": "share of rollout", "grad_attn": "share of grad x attention", "relevance": "share of relevance"}.get(
            self.name, "attention weight"
        )


def resolve_method(name: Any, layer: Any = None, head: Any = None, spec: CaptionerSpec | None = None) -> Method:
    """Check a method name and its settings (one line each); ``best_head`` without ``layer``/``head``
    takes the record in ``spec.best_head``."""
    if not isinstance(name, str) or name not in METHODS:
        raise AttnlabError(f"method={name!r} is not an explanation method: use one of {', '.join(METHODS)}")
    for label, value in (("layer", layer), ("head", head)):
        if value is not None and not _is_int(value) and not (label == "head" and value == "mean"):
            raise AttnlabError(f"{label}={value!r} must be an integer index" + (" or 'mean'" if label == "head" else ""))
    head = None if head == "mean" else head
    if name in ("layer_mean", *ROLLOUT_METHODS, "relevance") and (layer is not None or head is not None):
        raise AttnlabError(f"method {name!r} uses every layer and head: leave out layer= and head=")
    if name == "grad_attn" and head is not None:
        raise AttnlabError("method 'grad_attn' averages over the layer's heads: leave out head=")
    if name == "best_head":
        if layer is None and head is None:
            record_ = None if spec is None else getattr(spec, "best_head", None)
            if record_ is None:
                who = f"model {spec.name!r}" if spec is not None else "this model"
                raise AttnlabError(
                    f"{who} has no best-head record (only attnlab's bundled models carry one): name the head, "
                    "explain(model, image, 'best_head', layer=L, head=H), or find one with attnlab.explain.select_best_head"
                )
            layer, head = record_
        elif layer is None or head is None:
            raise AttnlabError("method 'best_head' with your own choice needs both layer= and head=")
    if name in ("raw", "grad_attn") and layer is None:
        layer = -1
    return Method(name, None if layer is None else int(layer), None if head is None else int(head))


def _checked(m: Method, layers: int, heads: int) -> Method:
    """``m`` with its layer and head as indices ``0..n-1`` (negative counted from the end), or one line."""
    if m.layer is not None and not -layers <= m.layer < layers:
        raise AttnlabError(f"layer {m.layer} does not exist: the decoder has {layers} layers (use 0..{layers - 1} or -1 for the last)")
    if m.head is not None and not -heads <= m.head < heads:
        raise AttnlabError(f"head {m.head} does not exist: the layers have {heads} heads (use 0..{heads - 1})")
    return Method(m.name, None if m.layer is None else m.layer % layers, None if m.head is None else m.head % heads)


# ---------------------------------------------------------------------- the run
@contextlib.contextmanager
def _evaluating(model: Any, grad: bool) -> Iterator[None]:
    """Eval mode for the block (the training flag comes back afterwards) and, for gradients,
    every parameter tracked (frozen ones are frozen again afterwards, exceptions included)."""
    was_training = getattr(model, "training", None)
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    frozen = [p for p in module.parameters() if not p.requires_grad] if grad and isinstance(module, nn.Module) else []
    if was_training is not None:
        model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        if was_training:
            model.train(True)


def explain_prepared(
    model: Any, pixels: Sequence[torch.Tensor], tokens: Sequence[Sequence[int]], methods: Sequence[Method]
) -> tuple[list[dict[Method, np.ndarray]], list[Recording], list[tuple[int, int]]]:
    """Every method's rows for images already prepared by :func:`attnlab.preprocess.prepare_for`.

    Returns per image ``{method (layers/heads as indices): rows (steps, K) float64}``
    (``K`` = prefix + patches), the recordings (one per input size) and each image's
    ``(recording, index in it)``.
    """
    cap = as_captioner(model)
    grad = any(m.name in GRADIENT_METHODS for m in methods)
    what = "all" if any(m.name in (*ROLLOUT_METHODS, "relevance") for m in methods) else "cross"
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(tuple(p.shape), []).append(i)  # one size per recording: see attnlab.explain.graph
    out: list[dict[Method, np.ndarray]] = [{} for _ in pixels]
    where: list[tuple[int, int]] = [(0, 0)] * len(pixels)
    recordings = []
    with model_lock(model), _evaluating(model, grad), torch.inference_mode(False), torch.set_grad_enabled(grad):
        for members in groups.values():
            rec = record(cap, [pixels[i] for i in members], [list(tokens[i]) for i in members], what, grad)
            layers, heads = len(rec.steps[0].cross), rec.steps[0].cross[0].shape[1]
            checked = [_checked(m, layers, heads) for m in methods]
            rows = _rows(rec, checked)
            for j, i in enumerate(members):
                out[i] = rows[j]
                where[i] = (len(recordings), j)
            recordings.append(rec)
    return out, recordings, where


def _rows(rec: Recording, methods: list[Method]) -> list[dict[Method, np.ndarray]]:
    """Per image of ``rec``: each method's rows ``(steps, K)`` float64."""
    n = len(rec.tokens)
    out: list[dict[Method, np.ndarray]] = [{} for _ in range(n)]
    for b in range(n):
        T = len(rec.tokens[b])
        cross = rec.cross([b], T)[:, 0].double()  # (layers, heads, T, K)
        for m in methods:
            if m.name in ("raw", "best_head"):
                a = cross[m.layer]  # (heads, T, K)
                out[b][m] = (a.mean(dim=0) if m.head is None else a[m.head]).numpy()  # (T, K)
            elif m.name == "layer_mean":
                out[b][m] = cross.mean(dim=(0, 1)).numpy()  # (T, K)
            elif m.name in ROLLOUT_METHODS:
                enc = rec.encoder_of([b])
                selfs = rec.selfs([b], T)[:, 0]  # (layers, heads, T, T)
                out[b][m] = rules.decoder_rollout(selfs, cross[-1], None if enc is None else enc[:, 0],
                                                  causal=m.name == "rollout").numpy()  # (T, K)
    gradient = [m for m in methods if m.name in GRADIENT_METHODS]
    if gradient:
        maps = {m: [np.zeros((len(t), rec.keys)) for t in rec.tokens] for m in gradient}  # per image (T, K)
        for i, step in enumerate(rec.steps):
            _explain_step(rec, i, gradient, maps)
        for m in gradient:
            for b in range(n):
                out[b][m] = maps[m][b]
    return out


def _explain_step(rec: Recording, i: int, methods: list[Method], maps: dict[Method, list[np.ndarray]]) -> None:
    """Row ``i`` of each gradient method's map, for every image still captioning at step ``i``."""
    step = rec.steps[i]
    wanted: list[torch.Tensor] = [step.cross[m.layer] for m in methods if m.name == "grad_attn"]
    relevance = any(m.name == "relevance" for m in methods)
    if relevance:
        wanted += [t for s in rec.steps[: i + 1] for t in (*s.cross, *(s.selfs or []))] + list(rec.encoder or [])
    grads = rec.gradients(i, wanted)
    images = list(step.rows)  # (B,)
    k = rec.keys
    for m in methods:
        if m.name == "grad_attn":
            a = step.cross[m.layer].detach()[:, :, :k].double()  # (B, heads, K), in batch-row order = images
            g = grads[id(step.cross[m.layer])][:, :, :k].double()
            rows = rules.head_relevance(a[:, :, None], g[:, :, None])[:, 0]  # (B, K)
        else:
            # float32, as recorded: the rules only add and multiply non-negative numbers of order 1
            a_c, g_c = rec.cross(images, i + 1), rec.cross(images, i + 1, grads)  # (layers, B, heads, Q, K)
            a_s, g_s = rec.selfs(images, i + 1), rec.selfs(images, i + 1, grads)  # (layers, B, heads, Q, Q)
            enc_a, enc_g = rec.encoder_of(images), rec.encoder_of(images, grads)  # (layers, B, heads, K, K) or None
            encoder = [] if enc_a is None else list(zip(enc_a, enc_g))
            rows = rules.relevance(encoder, list(zip(a_s, g_s)), list(zip(a_c, g_c)))[:, i].double()  # (B, K)
        for b, r in zip(images, rows.numpy()):
            maps[m][b][i] = r


# ---------------------------------------------------------------------- traces
def explanation_trace(
    spec: CaptionerSpec, m: Method, rows: np.ndarray, tokens: Sequence[int], grid: tuple[int, int], image: np.ndarray,
    logits: np.ndarray | None = None, meta: dict[str, Any] | None = None,
) -> CaptionTrace:
    """The trace of one image's explanation: ``rows`` ``(steps, K)`` -> maps ``(1, 1, steps, h, w)``."""
    rows = np.asarray(rows, dtype=np.float64)  # (T, K)
    scaled = m.name in SCALED_METHODS
    if scaled:
        total = rows.sum(axis=1, keepdims=True)  # (T, 1)
        rows = np.where(total > 0, rows / np.where(total > 0, total, 1.0), rows)  # a row that is all zero stays so
    p = spec.prefix_tokens
    h, w = grid
    maps = rows[:, p : p + h * w].reshape(1, 1, len(rows), h, w).astype(np.float32)  # (1, 1, T, h, w)
    share = rows[:, :p].sum(axis=1).reshape(1, 1, -1).astype(np.float32) if p else None  # (1, 1, T)
    ids = [int(t) for t in tokens]
    starts = getattr(spec.vocab, "word_starts", None)
    info = {"method": m.name, "method_label": m.label, "quantity": m.quantity, "normalised": scaled, "end_token": spec.eos}
    if m.layer is not None:
        info["layer"] = m.layer
    if m.head is not None:
        info["head"] = m.head
    return CaptionTrace(
        token_ids=np.array(ids, dtype=np.int64),
        words=[spec.vocab.token(t) for t in ids],
        logits=logits,
        cross_attention=maps,
        grid=grid,
        image=image,
        model_name=spec.name,
        caption=spec.vocab.decode(ids),
        prefix_tokens=p,
        prefix_share=share,
        word_starts=None if starts is None else np.array(starts(ids), dtype=bool),
        meta={**(meta or {}), **info},
    )


def explain(
    model: Any,
    image: ImageInput | Sequence[ImageInput],
    method: str,
    *,
    tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    layer: int | None = None,
    head: int | str | None = None,
    max_len: int | None = None,
) -> CaptionTrace | list[CaptionTrace]:
    """Per generated word, one map over the image saying where the word came from, by ``method``.

    Args:
        model: any captioner (a model from :func:`attnlab.load_model`, :func:`attnlab.wrap`,
            :func:`attnlab.from_huggingface`, or your own implementation of the seam).
        image: a path, PIL image, array or tensor, or a list of them (then a list of traces).
        method: ``"raw"``, ``"layer_mean"``, ``"best_head"``, ``"rollout"`` (causal),
            ``"chefer_rollout"``, ``"grad_attn"`` or ``"relevance"`` (see :mod:`attnlab.explain.methods`).
        tokens: explain this caption (token ids, teacher forcing) instead of the model's own.
        layer: the decoder layer of ``raw`` and ``grad_attn`` (default ``-1``, the last) and
            of ``best_head`` when you choose the head yourself.
        head: ``raw``: a head index or ``"mean"`` (default); ``best_head``: your choice.
        max_len: most tokens of the model's own caption (default: ``spec.max_len``).

    Returns a :class:`~attnlab.trace.CaptionTrace` per image whose ``cross_attention`` is
    ``(1, 1, steps, h, w)``; ``plot.word_grid(trace)``, ``attnlab.explore(trace)`` and the
    other single-map views show it under the method's name.
    """
    cap: Captioner = as_captioner(model)
    spec = cap.spec
    chosen = resolve_method(method, layer, head, spec)
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    if not images:
        raise AttnlabError("no image given")
    limit = check_max_len(max_len, spec.max_len)
    if tokens is None:
        greedy = caption(model, images, max_len=limit, record="none")
        forced = [t.token_ids.tolist() for t in greedy]
    else:
        forced = check_tokens(tokens, len(images), spec.max_len, len(spec.vocab) or None)
    content: list[tuple[int, int]] = []
    pixels, shown = prepare_for(images, spec, content=content)
    rows, recordings, where = explain_prepared(model, pixels, forced, [chosen])
    traces = []
    for i, (per_method, (r, j)) in enumerate(zip(rows, where)):
        rec = recordings[r]
        m = next(iter(per_method))  # the checked method (indices)
        logits = np.stack([rec.steps[s].logits[rec.row(s, j)].detach().float().cpu().numpy() for s in range(len(forced[i]))])
        meta = {"mode": "incremental", "teacher_forced": tokens is not None}
        trace = explanation_trace(spec, m, per_method[m], forced[i], rec.grids[j], shown[i], logits, meta)
        traces.append(trace)
    mark_padding(traces, content, spec)
    return traces if many else traces[0]
