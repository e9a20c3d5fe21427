"""``caption()``: greedy or teacher-forced decoding on any captioner, recording attention.

Decoding speaks only to the captioner seam (:mod:`attnlab.captioner`): it
prepares the images by the captioner's ``spec``, calls ``begin`` once and
``step`` once per token, and assembles one :class:`CaptionTrace` per image.
Captions that have finished leave the batch (``state.select``), so a batch
costs what its longest caption costs and every image gets exactly what it
would get alone.

``mode="template"`` runs CATR's reference loop instead (the original
write-up's: the whole model on a 128-position template at every step;
:mod:`attnlab.models.reference`); both modes give the same tokens and
attention rows (tests check to 1e-5).

Calls on one model are serialised by a lock held for the whole call
(attention capture installs hooks on the model's modules): several threads may
share a model and get what sequential calls would give, one after the other.
"""

from __future__ import annotations

import numbers
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .captioner import Captioner, CaptionerSpec, Record, as_captioner, check_record
from .diagnostics import mark_padding
from .errors import AttnlabError
from .preprocess import ImageInput, prepare_for
from .trace import CaptionTrace

_LOCKS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that serialises decoding calls on ``model`` (created on first use, freed with the model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


# ---------------------------------------------------------------------- arguments
def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_max_len(max_len: Any, limit: int) -> int:
    """``None`` -> ``limit``; else an integer (NumPy's too) from 1 to ``limit``."""
    if max_len is None:
        return limit
    if not _is_int(max_len) or not 1 <= int(max_len) <= limit:
        raise AttnlabError(f"max_len must be an integer from 1 to {limit}, not {max_len!r}")
    return int(max_len)


def _as_ids(seq: Any) -> list[int]:
    """One caption's ids: a list/tuple/array/tensor of integers (no strings, floats, None)."""
    if isinstance(seq, str):
        raise AttnlabError(
            f"tokens={seq!r} is text: pass token ids (e.g. model.spec.vocab.encode(...) for a word-level vocabulary)"
        )
    if isinstance(seq, (np.ndarray, torch.Tensor)):
        if seq.dtype in (torch.bool, np.bool_) or (
            seq.dtype.is_floating_point if isinstance(seq, torch.Tensor) else not np.issubdtype(seq.dtype, np.integer)
        ):
            raise AttnlabError(f"tokens must hold integer ids, not {seq.dtype}")
        seq = seq.tolist()
    ids = []
    for t in seq:
        if not _is_int(t):
            raise AttnlabError(f"tokens must hold integer ids, not {t!r} ({type(t).__name__})")
        ids.append(int(t))
    return ids


def check_tokens(tokens: Any, n_images: int, limit: int, vocab_size: int | None) -> list[list[int]] | None:
    """Teacher-forcing ids: one list for all images or one per image -> ``n_images`` lists."""
    if tokens is None:
        return None
    if isinstance(tokens, str):
        _as_ids(tokens)
    if isinstance(tokens, (np.ndarray, torch.Tensor)) and tokens.ndim == 0:
        tokens = [tokens.item()]
    if isinstance(tokens, (np.ndarray, torch.Tensor)) and tokens.ndim == 2:
        tokens = list(tokens)
    if not isinstance(tokens, (list, tuple, np.ndarray, torch.Tensor)):
        raise AttnlabError(f"tokens must be a list of token ids (or one list per image), not {type(tokens).__name__}")
    nested = len(tokens) > 0 and (
        isinstance(tokens[0], (list, tuple)) or (isinstance(tokens[0], (np.ndarray, torch.Tensor)) and tokens[0].ndim >= 1)
    )
    per_image = list(tokens) if nested else [tokens] * n_images
    if len(per_image) != n_images:
        raise AttnlabError(f"tokens gives {len(per_image)} captions for {n_images} images")
    out = []
    for seq in per_image:
        ids = _as_ids(seq)
        if not ids:
            raise AttnlabError("tokens is empty: give the ids of the caption to trace")
        if len(ids) > limit:
            raise AttnlabError(f"tokens has {len(ids)} ids; this model decodes at most {limit}")
        top = vocab_size - 1 if vocab_size else None
        if min(ids) < 0 or (top is not None and max(ids) > top):
            raise AttnlabError(f"token ids must lie in 0..{top}" if top is not None else "token ids must be >= 0")
        out.append(ids)
    return out


# ---------------------------------------------------------------------- the loop
@dataclass
class _Step:
    """One decoding step of the rows still in the batch (``M`` of the ``N`` images)."""

    rows: torch.Tensor  # (M,) which images the state's rows belong to
    logits: torch.Tensor  # (M, V)
    tokens: torch.Tensor  # (M,)
    cross: torch.Tensor | None  # (layers, M, heads, K)
    selfs: list[torch.Tensor] | None  # per layer (M, heads, t)


def _decode(cap: Captioner, pixels: list[torch.Tensor], forced, max_len: int, record: Record):
    """Run the greedy (or forced) loop; returns the steps, grids and encoder attention."""
    spec = cap.spec
    enc = cap.begin(pixels, record)
    n = len(pixels)
    if len(enc.grids) != n:
        raise AttnlabError(f"the captioner's begin() returned {len(enc.grids)} grids for {n} images")
    state = enc.state
    rows = torch.arange(n)  # (M,) image of each state row
    ids = torch.full((n,), spec.bos, dtype=torch.long)  # (M,)
    lengths = None if forced is None else torch.tensor([len(f) for f in forced])  # (N,)
    steps: list[_Step] = []
    for i in range(max_len):
        out = cap.step(state, ids, record)
        logits = out.logits  # (M, V)
        if forced is None:
            nxt = logits.argmax(dim=-1).cpu()  # (M,)
            done = nxt == spec.eos
        else:
            nxt = torch.tensor([forced[r][i] for r in rows.tolist()])  # (M,)
            done = lengths[rows] == i + 1
        cross = torch.stack(out.cross_attention) if out.cross_attention is not None else None  # (layers, M, heads, K)
        steps.append(_Step(rows, logits, nxt, cross, out.self_attention))
        keep = (~done).nonzero()[:, 0]  # (M',)
        if len(keep) == 0:
            break
        if len(keep) < len(rows):
            state = state.select(keep)
            rows, nxt = rows[keep], nxt[keep]
        ids = nxt
    return steps, enc


def _assemble(
    spec: CaptionerSpec, steps: list[_Step], enc, shown: list[np.ndarray], record: Record, mode: str
) -> list[CaptionTrace]:
    n = len(shown)
    prefix = spec.prefix_tokens
    where = []  # per step: (N,) position of each image among the step's rows, -1 when finished
    for s in steps:
        pos = torch.full((n,), -1, dtype=torch.long)
        pos[s.rows] = torch.arange(len(s.rows))
        where.append(pos)
    logits_all = [s.logits.detach().float().cpu() for s in steps]  # per step (M, V)
    cross_all = [None if s.cross is None else s.cross.detach().float().cpu() for s in steps]  # (layers, M, heads, K)
    traces = []
    for b in range(n):
        count = sum(1 for pos in where if pos[b] >= 0)  # this image's steps (always 0..count-1)
        at = [int(where[s][b]) for s in range(count)]  # its row at each step
        ids = [int(steps[s].tokens[at[s]]) for s in range(count)]
        logits = torch.stack([logits_all[s][at[s]] for s in range(count)])  # (steps, V)
        gh, gw = enc.grids[b]
        ca = share = None
        if record != "none":
            rows = torch.stack([cross_all[s][:, at[s]] for s in range(count)], dim=2)  # (layers, heads, steps, K)
            ca = rows[..., prefix : prefix + gh * gw].reshape(*rows.shape[:3], gh, gw)  # (layers, heads, steps, gh, gw)
            ca = np.ascontiguousarray(ca.numpy())
            if prefix:
                share = np.ascontiguousarray(rows[..., :prefix].sum(-1).numpy())  # (layers, heads, steps)
        enc_attn = dec_attn = None
        if record == "all":
            keys = prefix + gh * gw
            if enc.encoder_attention:
                e = torch.stack([layer[b, :, :keys, :keys] for layer in enc.encoder_attention])  # (layers, heads, K_b, K_b)
                enc_attn = np.ascontiguousarray(e.detach().float().cpu().numpy())
            per_layer = steps[0].selfs or []
            dec_attn = np.zeros((len(per_layer), per_layer[0].shape[1] if per_layer else 0, count, count), np.float32)
            for s in range(count):  # row s: step s over steps 0..s
                for layer, w in enumerate(steps[s].selfs):
                    dec_attn[layer, :, s, : s + 1] = w[at[s]].detach().float().cpu().numpy()  # (heads, s+1)
        starts = getattr(spec.vocab, "word_starts", None)
        traces.append(
            CaptionTrace(
                token_ids=np.array(ids, dtype=np.int64),
                words=[spec.vocab.token(t) for t in ids],
                logits=np.ascontiguousarray(logits.numpy()),
                cross_attention=ca,
                grid=(gh, gw),
                image=shown[b],
                model_name=spec.name,
                caption=spec.vocab.decode(ids),
                encoder_self_attention=enc_attn,
                decoder_self_attention=dec_attn,
                prefix_tokens=prefix,
                prefix_share=share,
                word_starts=None if starts is None else np.array(starts(ids), dtype=bool),
                meta={"mode": mode, "end_token": spec.eos},
            )
        )
    return traces


def caption(
    model: Any,
    image: ImageInput | Sequence[ImageInput],
    *,
    max_len: int | None = None,
    tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    mode: Literal["incremental", "template"] = "incremental",
    record: Record = "cross",
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
    """
    if mode not in ("incremental", "template"):
        raise AttnlabError(f"mode must be 'incremental' or 'template', not {mode!r}")
    record = check_record(record)
    cap = as_captioner(model)
    spec = cap.spec
    max_len = check_max_len(max_len, spec.max_len)
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    if not images:
        raise AttnlabError("no image given")
    forced = check_tokens(tokens, len(images), spec.max_len, len(spec.vocab) or None)
    if forced is not None:
        max_len = max(len(f) for f in forced)
    if mode == "template":
        reference = getattr(cap, "reference_captioner", None)
        if reference is None:
            raise AttnlabError(f"mode='template' is CATR's reference loop; {spec.name!r} has none: use mode='incremental'")
        runner = reference()
    else:
        runner = cap
    content: list[tuple[int, int]] = []  # each image within its shown one (padding lies outside)
    pixels, shown = prepare_for(images, spec, content=content)
    with model_lock(model):
        was_training = getattr(model, "training", None)
        if was_training is not None:
            model.eval()
        try:
            with torch.inference_mode():
                steps, enc = _decode(runner, pixels, forced, max_len, record)
                traces = _assemble(spec, steps, enc, shown, record, mode)
        finally:
            if was_training:
                model.train(True)
    mark_padding(traces, content, spec)
    return traces if many else traces[0]
