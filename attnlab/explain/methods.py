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

* ``contrast`` (vision-language captioners only): the word's attention on the image divided by
  its attention under a neutral reference prompt (:mod:`attnlab.explain.contrast`).

On a vision-language captioner (:class:`~attnlab.captioner.SequenceCaptioner`) every method reads
one teacher-forced pass over the prompt and the caption (:mod:`attnlab.explain.sequence`; ``rollout``
and ``relevance`` through the whole sequence); ``chefer_rollout`` is for encoder-decoder captioners.

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
from typing import Any

import numpy as np
import torch
from torch import nn

from ..assemble import trace_from_rows
from ..captioner import Captioner, CaptionerSpec, SequenceCaptioner, as_captioner, size_groups
from ..keys import KeyLayout
from ..decode import caption, model_lock
from ..diagnostics import mark_padding
from ..errors import AttnlabError
from ..preprocess import ImageInput, prepare_for
from ..settings import decode_settings
from ..trace import CaptionTrace
from ..util import evaluating, is_int
from .contrast import reference_of
from .graph import Recording, record
from .kinds import KINDS, Method, kind_of
from .sequence import image_head

METHODS: tuple[str, ...] = tuple(KINDS)
"""The names :func:`explain` takes."""

__all__ = ["METHODS", "Method", "explain", "explain_prepared", "explanation_trace", "resolve_method"]


def resolve_method(name: Any, layer: Any = None, head: Any = None, spec: CaptionerSpec | None = None) -> Method:
    """Check a method name and its settings (one line each); ``best_head`` without ``layer``/``head``
    takes the record in ``spec.best_head``."""
    kind = kind_of(name)
    if kind is None:
        raise AttnlabError(f"method={name!r} is not an explanation method: use one of {', '.join(METHODS)}")
    for label, value in (("layer", layer), ("head", head)):
        if value is not None and not is_int(value) and not (label == "head" and value == "mean"):
            raise AttnlabError(f"{label}={value!r} must be an integer index" + (" or 'mean'" if label == "head" else ""))
    head = None if head == "mean" else head
    if not kind.layer and (layer is not None or head is not None):
        raise AttnlabError(f"method {name!r} uses every layer and head: leave out layer= and head=")
    if not kind.head and head is not None:
        raise AttnlabError(f"method {name!r} averages over the layer's heads: leave out head=")
    if name == "best_head":
        layer, head = _best_head(layer, head, spec)
    if kind.layer and layer is None:
        layer = -1
    return Method(name, None if layer is None else int(layer), None if head is None else int(head))


def _best_head(layer: Any, head: Any, spec: CaptionerSpec | None) -> tuple[Any, Any]:
    """``best_head``'s layer and head: the user's pair, or the record in ``spec.best_head``."""
    if layer is not None and head is not None:
        return layer, head
    if layer is not None or head is not None:
        raise AttnlabError("method 'best_head' with your own choice needs both layer= and head=")
    found = None if spec is None else getattr(spec, "best_head", None)
    if found is None:
        who = f"model {spec.name!r}" if spec is not None else "this model"
        raise AttnlabError(
            f"{who} has no best-head record (only attnlab's bundled models carry one): name the head, "
            "explain(model, image, 'best_head', layer=L, head=H), or find one with attnlab.explain.select_best_head"
        )
    return found


def _checked(m: Method, layers: int, heads: int) -> Method:
    """``m`` with its layer and head as indices ``0..n-1`` (negative counted from the end), or one line."""
    if m.layer is not None and not -layers <= m.layer < layers:
        raise AttnlabError(f"layer {m.layer} does not exist: the decoder has {layers} layers (use 0..{layers - 1} or -1 for the last)")
    if m.head is not None and not -heads <= m.head < heads:
        raise AttnlabError(f"head {m.head} does not exist: the layers have {heads} heads (use 0..{heads - 1})")
    return Method(m.name, None if m.layer is None else m.layer % layers, None if m.head is None else m.head % heads)


# ---------------------------------------------------------------------- the run
@contextlib.contextmanager
def _tracked(model: Any, grad: bool) -> Iterator[None]:
    """For gradients, every parameter tracked (frozen ones are frozen again afterwards, exceptions included)."""
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    frozen = [p for p in module.parameters() if not p.requires_grad] if grad and isinstance(module, nn.Module) else []
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def explain_prepared(
    model: Any, pixels: Sequence[torch.Tensor], tokens: Sequence[Sequence[int]], methods: Sequence[Method]
) -> tuple[list[dict[Method, np.ndarray]], list[Recording], list[tuple[int, int]]]:
    """Every method's rows for images already prepared by :func:`attnlab.preprocess.prepare_for`.

    Returns per image ``{method (layers/heads as indices): rows (steps, K) float64}``
    (``K`` = prefix + patches), the recordings (one per input size) and each image's
    ``(recording, index in it)``.
    """
    cap = as_captioner(model)
    grad = any(m.kind.gradients for m in methods)
    what = "all" if any(m.kind.record == "all" for m in methods) else "cross"
    out: list[dict[Method, np.ndarray]] = [{} for _ in pixels]
    where: list[tuple[int, int]] = [(0, 0)] * len(pixels)
    recordings = []
    with model_lock(model), evaluating(model), _tracked(model, grad), torch.inference_mode(False), torch.set_grad_enabled(grad):
        for members in size_groups(pixels):  # one size per recording: see attnlab.explain.graph
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
        cross = rec.cross([b], len(rec.tokens[b]))[:, 0].double()  # (layers, heads, T, K)
        for m in methods:
            if m.kind.rows is not None:
                out[b][m] = m.kind.rows(rec, b, cross, m)  # (T, K)
    gradient = [m for m in methods if m.kind.step_rows is not None]
    if gradient:
        maps = {m: [np.zeros((len(t), rec.keys)) for t in rec.tokens] for m in gradient}  # per image (T, K)
        for i in range(len(rec.steps)):
            _explain_step(rec, i, gradient, maps)
        for m in gradient:
            for b in range(n):
                out[b][m] = maps[m][b]
    return out


def _explain_step(rec: Recording, i: int, methods: list[Method], maps: dict[Method, list[np.ndarray]]) -> None:
    """Row ``i`` of each gradient method's map, for every image still captioning at step ``i``."""
    grads = rec.gradients(i, [t for m in methods for t in m.kind.wants(rec, i, m)])
    images = list(rec.steps[i].images)  # (B,)
    for m in methods:
        rows = m.kind.step_rows(rec, i, images, m, grads)  # (B, K)
        for b, r in zip(images, rows.numpy()):
            maps[m][b][i] = r


# ---------------------------------------------------------------------- traces
def explanation_trace(
    spec: CaptionerSpec, m: Method, rows: np.ndarray, tokens: Sequence[int], grid: tuple[int, int], image: np.ndarray,
    logits: np.ndarray | None = None, meta: dict[str, Any] | None = None, layout: KeyLayout | None = None,
) -> CaptionTrace:
    """The trace of one image's explanation: ``rows`` ``(steps, K)`` -> maps ``(1, 1, steps, h, w)``
    (``layout``: the rows' key layout, e.g. a vision-language sequence's views and kinds)."""
    rows = np.asarray(rows, dtype=np.float64)  # (T, K)
    scaled = m.kind.scaled
    if scaled:
        total = rows.sum(axis=1, keepdims=True)  # (T, 1)
        rows = np.where(total > 0, rows / np.where(total > 0, total, 1.0), rows)  # a row that is all zero stays so
    info = {"method": m.name, "method_label": m.label, "quantity": m.quantity, "normalised": scaled, "end_token": spec.eos}
    if m.layer is not None:
        info["layer"] = m.layer
    if m.head is not None:
        info["head"] = m.head
    return trace_from_rows(spec, tokens, rows[None, None], grid, image, logits=logits, meta={**(meta or {}), **info},
                           layout=layout)  # (1, 1, T, K)


def explain(
    model: Any,
    image: ImageInput | Sequence[ImageInput],
    method: str,
    *,
    tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    layer: int | None = None,
    head: int | str | None = None,
    max_len: int | None = None,
    reference: str | None = None,
) -> CaptionTrace | list[CaptionTrace]:
    """Per generated word, one map over the image saying where the word came from, by ``method``.

    Args:
        model: any captioner (a model from :func:`attnlab.load_model`, :func:`attnlab.wrap`,
            :func:`attnlab.from_huggingface`, or your own implementation of the seam).
        image: a path, PIL image, array or tensor, or a list of them (then a list of traces).
        method: ``"raw"``, ``"layer_mean"``, ``"best_head"``, ``"rollout"`` (causal),
            ``"chefer_rollout"``, ``"grad_attn"``, ``"relevance"`` or ``"contrast"`` (vision-language
            captioners) (see :mod:`attnlab.explain.methods`).
        tokens: explain this caption (token ids, teacher forcing) instead of the model's own.
        layer: the decoder layer of ``raw`` and ``grad_attn`` (default ``-1``, the last) and
            of ``best_head`` when you choose the head yourself.
        head: ``raw``: a head index or ``"mean"`` (default); ``best_head``: your choice.
        max_len: most tokens of the model's own caption (default: ``spec.max_len``).
        reference: ``contrast`` only: the neutral prompt it divides by (default
            :data:`attnlab.explain.contrast.REFERENCE`, "Write a general description of the image.").

    On a captioner whose words attend over one sequence (a vision-language model,
    :class:`~attnlab.captioner.SequenceCaptioner`) every method reads one teacher-forced
    pass over the prompt and the caption (:mod:`attnlab.explain.sequence`), and the trace has
    the prompt's views and key shares; ``contrast`` exists only there.

    Returns a :class:`~attnlab.trace.CaptionTrace` per image whose ``cross_attention`` is
    ``(1, 1, steps, h, w)``; ``plot.word_grid(trace)``, ``attnlab.explore(trace)`` and the
    other single-map views show it under the method's name.
    """
    cap: Captioner = as_captioner(model)
    spec = cap.spec
    one_sequence = isinstance(cap, SequenceCaptioner)
    if one_sequence and method == "best_head" and layer is None and head is None and getattr(spec, "best_head", None) is None:
        chosen = Method("best_head", None, None)  # no record: the head with the most image weight (explain_sequence)
    else:
        chosen = resolve_method(method, layer, head, spec)
    reference = _reference(chosen, reference, one_sequence)
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    if not images:
        raise AttnlabError("no image given")
    settings = decode_settings(spec, max_len=max_len, tokens=tokens, record="none", n_images=len(images))
    if settings.tokens is None:
        greedy = caption(model, images, max_len=settings.max_len, record="none")
        forced = [t.token_ids.tolist() for t in greedy]
    else:
        forced = settings.forced
    content: list[tuple[int, int]] = []
    pixels, shown = prepare_for(images, spec, content=content)
    if one_sequence:
        traces = explain_sequence(cap, chosen, pixels, shown, forced, reference, tokens is not None)
        return traces if many else traces[0]
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


# ---------------------------------------------------------------------- one sequence (vision-language models)
def _reference(m: Method, reference: Any, one_sequence: bool) -> str | None:
    """``contrast``'s reference prompt, or one line where the method or the captioner does not fit."""
    kind = m.kind
    if one_sequence and kind.sequence is None:
        usable = [k.name for k in KINDS.values() if k.sequence is not None]
        raise AttnlabError(f"method {m.name!r} is for encoder-decoder captioners: on a vision-language model use one of {', '.join(usable)}")
    if kind.prompted and not one_sequence:
        raise AttnlabError(f"method {m.name!r} divides by the attention under a reference prompt: it needs a vision-language captioner (attnlab.from_huggingface)")
    if not kind.prompted:
        if reference is not None:
            raise AttnlabError(f"reference= is the neutral prompt of method 'contrast'; method {m.name!r} takes none")
        return None
    return reference_of(reference)


def explain_sequence(cap: Any, chosen: Method, pixels: Sequence[torch.Tensor], shown: Sequence[np.ndarray],
                     tokens: Sequence[Sequence[int]], reference: str | None, forced: bool) -> list[CaptionTrace]:
    """One trace per image on a :class:`~attnlab.captioner.SequenceCaptioner` (its teacher-forced pass).

    Args:
        cap: the vision-language captioner.
        chosen: the method (``best_head`` with ``layer=None``: the head with the most image weight, :func:`image_head`).
        pixels: per image, the processor's input tensors; ``shown``: per image, the photo as drawn ``(H, W, 3)``.
        tokens: per image, the caption's token ids (step ``i``'s map explains ``tokens[k][i]``).
        reference: ``contrast``'s neutral prompt (``None`` for every other method).
        forced: recorded as ``meta["teacher_forced"]`` (the caption was given, not generated).

    Returns:
        per image, a trace with one map per token (the rows ``(n, T)`` split into views and key shares).
    """
    traces = []
    with model_lock(cap), evaluating(cap), torch.inference_mode(False):
        for px, image, ids in zip(pixels, shown, tokens):
            seq = cap.sequence(px, ids)
            m, picked = _checked(chosen, seq.layers, seq.heads), None
            if m.name == "best_head" and m.layer is None:  # no record: chosen by its weight on the image
                layer, head, mass = image_head(seq)
                m, picked = Method("best_head", layer, head), f"head with the most image attention (layer {layer}, head {head}: {mass:.0%})"
            rows = m.kind.sequence(seq, m, lambda px=px, ids=ids: cap.sequence(px, ids, prompt=reference))  # (n, T)
            finish = getattr(seq, "finish", None)  # a pass whose maps are composed (BLIP-2: through the queries)
            rows, layout = finish(rows) if finish is not None else (rows, seq.layout)
            meta = {"mode": "sequence", "teacher_forced": forced, **seq.meta}
            if reference is not None:
                meta["reference_prompt"] = reference
            logits = None if seq.logits is None else seq.logits.numpy()
            traces.append(explanation_trace(cap.spec, m, rows, ids, layout.grid, image, logits, meta, layout))
            if picked is not None:
                traces[-1].meta.update(method_label=picked, head_choice="image mass")
    return traces
