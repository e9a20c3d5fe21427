"""``caption()``: greedy, beam-search or teacher-forced decoding on any captioner, recording attention.

Decoding speaks only to the captioner seam (:mod:`attnlab.captioner`): it
prepares the images by the captioner's ``spec``, calls ``begin`` once and
``step`` once per token, and assembles one :class:`CaptionTrace` per image.
Captions that have finished leave the batch (``state.select``), so a batch
costs what its longest caption costs and every image gets exactly what it
would get alone. Beam search keeps ``k`` hypotheses per image as rows of the
same batch and reorders them with ``state.select`` after every step.
:func:`decode_batch` is the engine for images that are already prepared (the
batch runner, :mod:`attnlab.batch`, prepares them in worker processes).

``mode="template"`` runs CATR's reference loop instead (the original
write-up's: the whole model on a 128-position template at every step;
:mod:`attnlab.models.reference`); both modes give the same tokens and
attention rows (tests check to 1e-5).

Calls on one model are serialised by a lock held for the whole call
(attention capture installs hooks on the model's modules): several threads may
share a model and get what sequential calls would give, one after the other.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .assemble import trace_from_rows
from .captioner import Captioner, CaptionerSpec, Encoded, Record, as_captioner
from .diagnostics import mark_padding
from .errors import AttnlabError
from .preprocess import ImageInput, prepare_for
from .settings import DecodeSettings, decode_settings
from .trace import CaptionTrace
from .util import evaluating

_LOCKS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that serialises decoding calls on ``model`` (created on first use, freed with the model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


# ---------------------------------------------------------------------- the loops
@dataclass
class Step:
    """What one decoding step returned for the ``M`` rows still in the batch (captions or beam hypotheses)."""

    images: list[int]  # (M,) the image of each batch row
    logits: torch.Tensor  # (M, V)
    cross: list[torch.Tensor] | None  # per layer (M, heads, K), as the captioner returned them
    self_attention: list[torch.Tensor] | None  # per layer (M, heads, t)


@dataclass
class _Hypothesis:
    """The caption (or beam hypothesis) an image ends with: the batch row that held it and the token it emitted at each step."""

    rows: list[int] = field(default_factory=list)  # (steps,) row of that step's batch
    ids: list[int] = field(default_factory=list)  # (steps,) emitted (or given) token
    meta: dict[str, Any] = field(default_factory=dict)


def _run_step(cap: Captioner, state: Any, ids: torch.Tensor, record: Record, images: list[int]) -> Step:
    out = cap.step(state, ids, record)
    return Step(images, out.logits, None if out.cross_attention is None else list(out.cross_attention), out.self_attention)


def greedy_steps(cap: Captioner, state: Any, n: int, forced: list[list[int]] | None, max_len: int, record: Record):
    """The greedy (or, with ``forced`` ids per image, teacher-forced) loop over ``n`` images.

    Finished captions leave the batch (``state.select``). Returns every :class:`Step`
    and each image's :class:`_Hypothesis` (its batch row and token at each step). The
    explanation methods run the teacher-forced loop with autograd on
    (:func:`attnlab.explain.graph.record`): the steps keep the tensors the captioner returned.
    """
    spec = cap.spec
    rows = torch.arange(n)  # (M,) image of each state row
    ids = torch.full((n,), spec.bos, dtype=torch.long)  # (M,)
    lengths = None if forced is None else torch.tensor([len(f) for f in forced])  # (N,)
    steps: list[Step] = []
    paths = [_Hypothesis() for _ in range(n)]
    for i in range(max_len):
        step = _run_step(cap, state, ids, record, rows.tolist())
        steps.append(step)
        if forced is None:
            nxt = step.logits.argmax(dim=-1).cpu()  # (M,)
            done = nxt == spec.eos
        else:
            nxt = torch.tensor([forced[r][i] for r in rows.tolist()])  # (M,)
            done = lengths[rows] == i + 1
        for row, (b, token) in enumerate(zip(rows.tolist(), nxt.tolist())):
            paths[b].rows.append(row)
            paths[b].ids.append(token)
        keep = (~done).nonzero()[:, 0]  # (M',)
        if len(keep) == 0:
            break
        if len(keep) < len(rows):
            state = state.select(keep)
            rows, nxt = rows[keep], nxt[keep]
        ids = nxt
    if forced is not None:
        for path in paths:
            path.meta["stopped"] = "given"  # teacher forcing: the caption ends where the given tokens end
    return steps, paths


@dataclass
class _Ended:
    """A finished beam hypothesis: its score, the step and row of its last token, that token."""

    score: float  # summed log-probability / length ** length_penalty
    step: int
    row: int
    token: int


def _beam_choices(cand: torch.Tensor, beams: int, eos: int, penalty: float, step: int, first_row: int):
    """One image's next hypotheses from its candidate scores ``cand`` ``(m, V)``.

    Candidates are taken best first; one ending with ``eos`` becomes a finished
    hypothesis, the others live on until ``beams`` are found. Returns the
    finished ones and the live ``(row, token, score)`` (rows offset by ``first_row``).
    """
    vocab = cand.shape[1]
    flat = cand.reshape(-1)  # (m * V,)
    top = torch.topk(flat, min(2 * beams, flat.numel()))  # at most m <= beams candidates end the caption
    order = sorted(zip(top.values.tolist(), top.indices.tolist()), key=lambda c: (-c[0], c[1]))  # ties: lowest index
    ended: list[_Ended] = []
    live: list[tuple[int, int, float]] = []
    for value, index in order:
        if value == float("-inf"):
            break
        row, token = first_row + index // vocab, index % vocab
        if token == eos:
            ended.append(_Ended(value / penalty, step, row, token))
        else:
            live.append((row, token, value))
            if len(live) == beams:
                break
    return ended, live


def _beam(cap: Captioner, state: Any, n: int, max_len: int, record: Record, beams: int, alpha: float):
    """Beam search over ``n`` images with ``beams`` hypotheses each (the rules: :func:`caption`).

    The state's rows are hypotheses, an image's rows next to each other. After
    each step ``state.select`` copies every surviving continuation's parent row
    into place (a parent may be copied several times or dropped), so row ``r``
    of step ``t`` continues the hypothesis of row ``parents[t][r]`` of step
    ``t - 1``. Following those origins back from the winner gives, at every
    step, the row whose attention produced the winner's token: the maps stay
    aligned with the hypothesis that survived, not with whichever hypothesis
    happened to sit in that row.
    """
    spec = cap.spec
    owner = list(range(n))  # (M,) image of each row
    scores = torch.zeros(n, dtype=torch.float64)  # (M,) summed log-probabilities of each row's tokens
    ids = torch.full((n,), spec.bos, dtype=torch.long)  # (M,)
    parent = [-1] * n  # (M,) each row's row at the step before
    steps: list[Step] = []
    parents: list[list[int]] = []  # per step: the parent of each row
    fed: list[list[int]] = []  # per step: the token each row was fed (what its parent emitted)
    finished: list[list[_Ended]] = [[] for _ in range(n)]
    for t in range(max_len):
        step = _run_step(cap, state, ids, record, list(owner))
        steps.append(step)
        parents.append(parent)
        fed.append(ids.tolist())
        logp = torch.log_softmax(step.logits.detach().double(), dim=-1).cpu()  # (M, V)
        cand = scores[:, None] + logp  # (M, V) the score of every one-token continuation
        penalty = float(t + 1) ** alpha  # length of a hypothesis that ends at this step
        keep: list[tuple[int, int, float, int]] = []  # (row, token, score, image)
        start = 0
        while start < len(owner):
            b = owner[start]
            end = start + 1
            while end < len(owner) and owner[end] == b:
                end += 1
            ended, live = _beam_choices(cand[start:end], beams, spec.eos, penalty, t, start)
            finished[b] += ended
            if t + 1 == max_len:  # out of steps: the live hypotheses end here, without an end token
                finished[b] += [_Ended(value / penalty, t, row, token) for row, token, value in live]
            elif len(finished[b]) < beams:
                keep += [(row, token, value, b) for row, token, value in live]
            start = end
        if not keep:
            break
        rows = [k[0] for k in keep]
        state = state.select(torch.tensor(rows, dtype=torch.long))
        parent = rows
        ids = torch.tensor([k[1] for k in keep], dtype=torch.long)  # (M',)
        scores = torch.tensor([k[2] for k in keep], dtype=torch.float64)  # (M',)
        owner = [k[3] for k in keep]
    paths = []
    for b in range(n):
        if not finished[b]:
            raise AttnlabError("beam search found no caption (every continuation had probability 0)")
        best = max(finished[b], key=lambda e: e.score)  # the first of equals
        rows = [0] * (best.step + 1)
        toks = [0] * (best.step + 1)
        rows[-1], toks[-1] = best.row, best.token
        for s in range(best.step, 0, -1):  # back through the origins
            toks[s - 1] = fed[s][rows[s]]
            rows[s - 1] = parents[s][rows[s]]
        paths.append(_Hypothesis(rows, toks, {"beams": beams, "length_penalty": alpha, "score": best.score}))
    return steps, paths


def _assemble(
    spec: CaptionerSpec, steps: list[Step], enc: Encoded, paths: list[_Hypothesis], shown: list[np.ndarray], record: Record, mode: str
) -> list[CaptionTrace]:
    """One trace per image from the steps its caption went through (rows: :func:`attnlab.assemble.trace_from_rows`)."""
    logits_all = [s.logits.detach().float().cpu() for s in steps]  # per step (M, V)
    cross_all = [None if s.cross is None else torch.stack(s.cross).detach().float().cpu() for s in steps]  # (layers, M, heads, K)
    traces = []
    for b, path in enumerate(paths):
        count, at, ids = len(path.ids), path.rows, path.ids  # this image's steps, its row at each, its tokens
        logits = torch.stack([logits_all[s][at[s]] for s in range(count)])  # (steps, V)
        rows = None
        if record != "none":
            rows = torch.stack([cross_all[s][:, at[s]] for s in range(count)], dim=2)  # (layers, heads, steps, K)
        enc_attn = dec_attn = None
        if record == "all":
            keys = enc.layout(b, spec, shown[b]).keys
            if enc.encoder_attention:
                enc_attn = torch.stack([layer[b, :, :keys, :keys] for layer in enc.encoder_attention])  # (layers, heads, K_b, K_b)
            dec_attn = _decoder_rows(steps, at)
        meta = {"mode": mode, "end_token": spec.eos, "stopped": "end" if ids and ids[-1] == spec.eos else "max_len", **path.meta}
        traces.append(trace_from_rows(spec, ids, rows, enc.grids[b], shown[b], logits=logits, meta=meta,
                                      encoder=enc_attn, decoder=dec_attn, layout=enc.layout(b, spec, shown[b])))
    return traces


def _decoder_rows(steps: list[Step], at: list[int]) -> np.ndarray | None:
    """One caption's decoder self-attention ``(layers, heads, steps, steps)``: row ``s`` over steps ``0..s``."""
    per_layer = steps[0].self_attention or []  # a captioner without decoder self-attention gives none
    if not per_layer:
        return None
    count = len(at)
    out = np.zeros((len(per_layer), per_layer[0].shape[1], count, count), np.float32)
    for s in range(count):  # row s: step s over steps 0..s (of this caption's own history)
        for layer, w in enumerate(steps[s].self_attention):
            out[layer, :, s, : s + 1] = w[at[s]].detach().float().cpu().numpy()  # (heads, s+1)
    return out


# ---------------------------------------------------------------------- public
def _runner(cap: Captioner, mode: str) -> Captioner:
    """The captioner that runs ``mode`` (checked by :func:`attnlab.settings.decode_settings`)."""
    if mode == "incremental":
        return cap
    reference = getattr(cap, "reference_captioner", None)
    if reference is None:
        raise AttnlabError(f"mode='template' is CATR's reference loop; {cap.spec.name!r} has none: use mode='incremental'")
    return reference()


def decode_batch(
    model: Any,
    pixels: Sequence[torch.Tensor],
    shown: Sequence[np.ndarray],
    *,
    max_len: int | None = None,
    tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    mode: Literal["incremental", "template"] = "incremental",
    record: Record = "cross",
    beams: int = 1,
    length_penalty: float = 1.0,
    settings: DecodeSettings | None = None,
) -> list[CaptionTrace]:
    """Caption a batch of images that were already prepared: the engine under :func:`caption`.

    ``pixels, shown = attnlab.preprocess.prepare_for(images, model.spec)`` makes
    the inputs (the batch runner does that in worker processes); every other
    argument is :func:`caption`'s, or ``settings`` (from
    :func:`attnlab.settings.decode_settings`) instead of them. Returns one trace
    per image, each exactly what that image gives alone.
    """
    cap = as_captioner(model)
    given = tokens is not None or (max_len, mode, record, beams, length_penalty) != (None, "incremental", "cross", 1, 1.0)
    if settings is not None and given:
        raise AttnlabError("decode_batch takes settings= or the separate arguments (max_len=, beams=, ...), not both")
    if settings is None:
        settings = decode_settings(cap.spec, max_len=max_len, tokens=tokens, mode=mode, record=record, beams=beams,
                                   length_penalty=length_penalty, n_images=len(pixels))
    runner = _runner(cap, settings.mode)
    if len(pixels) != len(shown) or not pixels:
        raise AttnlabError(f"decode_batch needs one shown image per input and at least one input ({len(pixels)} and {len(shown)} given)")
    if settings.tokens is not None and len(settings.tokens) != len(pixels):
        raise AttnlabError(f"tokens gives {len(settings.tokens)} captions for {len(pixels)} images")
    with model_lock(model), evaluating(model), torch.inference_mode():
        enc = runner.begin(list(pixels), settings.record)
        if len(enc.grids) != len(pixels):
            raise AttnlabError(f"the captioner's begin() returned {len(enc.grids)} grids for {len(pixels)} images")
        if enc.layouts is not None and len(enc.layouts) != len(pixels):
            raise AttnlabError(f"the captioner's begin() returned {len(enc.layouts)} key layouts for {len(pixels)} images")
        if settings.beams == 1:
            steps, paths = greedy_steps(runner, enc.state, len(pixels), settings.forced, settings.steps, settings.record)
        else:
            steps, paths = _beam(runner, enc.state, len(pixels), settings.max_len, settings.record, settings.beams,
                                 settings.length_penalty)
        return _assemble(cap.spec, steps, enc, paths, list(shown), settings.record, settings.mode)


def caption(
    model: Any,
    image: ImageInput | Sequence[ImageInput],
    *,
    max_len: int | None = None,
    tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    mode: Literal["incremental", "template"] = "incremental",
    record: Record = "cross",
    beams: int = 1,
    length_penalty: float = 1.0,
) -> CaptionTrace | list[CaptionTrace]:
    """Caption ``image`` and record the decoder's words-to-patches attention.

    Args:
        model: any captioner (:mod:`attnlab.captioner`): a model from
            :func:`attnlab.load_model`, :func:`attnlab.wrap` or
            :func:`attnlab.from_huggingface`.
        image: a path, PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor, or a
            list of them (then a list of traces). Sizes may differ: each image
            gets exactly what it gets alone.
        max_len: most tokens to generate, the end token included (default: the
            captioner's ``spec.max_len``, 127 for CATR). NumPy integers work.
        tokens: teacher forcing: the token ids of a given caption (for a list of
            images, one list for all or one per image). Step ``i`` is the query
            that predicts ``tokens[i]``; the start token is added here.
        mode: ``"incremental"`` (the captioner's own cached decoder, fast) or
            ``"template"`` (CATR's original 128-position loop, slow, for checking).
        record: ``"cross"`` (default), ``"all"`` (also encoder and decoder
            self-attention) or ``"none"`` (tokens and logits only).
        beams: ``1`` (default) is greedy decoding; ``k > 1`` is beam search
            with ``k`` hypotheses per image. Each step extends every live
            hypothesis by every token; the best continuations (by summed
            log-probability) are taken in order: one that ends with the end
            token is a finished caption, the others live on until ``k`` are
            found. An image stops when it has ``k`` finished captions (or at
            ``max_len``, where the live ones end as they are), and its caption
            is the finished one with the highest
            ``sum(log p) / length ** length_penalty`` (``length`` counts the
            tokens, the end token included). The trace's maps, logits and
            words at every step are those of the winning hypothesis;
            ``trace.meta`` records ``beams``, ``length_penalty`` and ``score``.
        length_penalty: the exponent above: ``0`` ranks by total
            log-probability (favours short captions), ``1`` (default) by the
            mean log-probability per token.
    """
    cap = as_captioner(model)
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    settings = decode_settings(cap.spec, max_len=max_len, tokens=tokens, mode=mode, record=record, beams=beams,
                               length_penalty=length_penalty, n_images=max(len(images), 1))
    _runner(cap, settings.mode)  # a captioner without the template loop: one line before the images are read
    if not images:
        raise AttnlabError("no image given")
    content: list[tuple[int, int]] = []  # each image within its shown one (padding lies outside)
    pixels, shown = prepare_for(images, cap.spec, content=content)
    traces = decode_batch(model, pixels, shown, settings=settings)
    mark_padding(traces, content, cap.spec)
    return traces if many else traces[0]
