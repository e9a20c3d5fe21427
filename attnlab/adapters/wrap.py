"""``attnlab.wrap``: your own captioner through the seam, in three lines.

A student's model rarely has a cached decoder or a method that returns
attention. ``wrap`` asks for two functions and the names of the attention
modules, and builds a captioner of the seam (:mod:`attnlab.captioner`):

* ``encode(pixels (N, 3, H, W)) -> memory (N, T, D)``: the encoder's tokens,
  ``T = P + h * w`` with ``P`` leading prefix tokens (CLS, registers);
* ``decode(memory, ids (N, t)) -> logits (N, t, V)``: the model's own forward
  on a caption prefix (re-run at every step; nothing else is asked of it);
* ``cross_attention``: glob pattern(s) of the decoder's cross-attention
  modules, as :func:`attnlab.capture_attention` takes them
  (``nn.MultiheadAttention``, timm attention, an :class:`~attnlab.tap.AttentionTap`,
  or the dropout after a hand-written softmax).

At step ``i`` the captured weights are ``(N, heads, t, T)`` with ``t = i + 1``
query rows; the row that predicts the next token is the last one, row ``i``
(not ``i - 1``: tested, since it is the mistake students make most).

Gradients (the seam's autograd rule). ``caption()`` runs under
``torch.inference_mode`` and reads the rows as they are. With autograd on
(explanation methods), every recorded module is handed back the weights it
goes on with (``capture_attention(substitute=...)``): its query rows
``0 .. i - 1`` are the very row tensors this captioner returned at steps
``0 .. i - 1`` and row ``i`` is the one it returns now. So, as with a
key/value-cached model, a step's logits are a function of the rows returned
at that step and before, and gradients with respect to them are those of one
full forward pass. The values are unchanged for a causal decoder; a decoder
whose earlier rows change when later tokens are added gets a one-line error.

``wrap`` runs both functions once on a blank image when it is called, so a
wrong shape or a pattern that matches nothing is reported there, in one line.
"""

from __future__ import annotations

import numbers
import os
from contextlib import ExitStack
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import capture_attention
from ..captioner import CaptionerSpec, Encoded, Record, StepOutput, check_record, pad_to
from ..errors import AttnlabError
from ..tokenizer import make_vocab
from ..util import is_int, one_line
from .module import ModuleCaptioner, refuse_meta

Patterns = str | Sequence[str]
GridArg = tuple[int, int] | Callable[[int, int], tuple[int, int]]


CAUSAL_TOLERANCE = 1e-4  # largest change of an earlier query row allowed when the prefix grows
MAX_IMAGE_SIZE = 2048  # the largest input side (a 100,000 px probe image alone would be 120 GB)
MAX_PREFIX = 8  # most leading non-patch tokens (CLS, registers) inferred from grid= without prefix_tokens=


@dataclass
class WrapState:
    """The decoding state of a wrapped model: the memory, the ids fed so far and, with
    autograd on, the rows handed out at earlier steps (per module name, per step)."""

    memory: torch.Tensor  # (N, T, D)
    ids: torch.Tensor  # (N, t) long
    history: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> t rows (N, heads, S_j)

    def select(self, indices: torch.Tensor) -> "WrapState":
        idx = indices.to(self.memory.device)
        history = {name: [r.index_select(0, idx) for r in rows] for name, rows in self.history.items()}
        return WrapState(self.memory.index_select(0, idx), self.ids.index_select(0, idx), history)


def _history_substitute(history: dict[str, list[torch.Tensor]], this_step: dict[str, torch.Tensor]):
    """The ``substitute`` of one step with autograd on: a module's weights ``(N, heads, t, S)``
    become the rows returned at the earlier steps (zero-padded to ``S``) and this step's
    last row, which is kept in ``this_step`` (the row :meth:`WrappedCaptioner.step` returns)."""

    def substitute(name: str, w: torch.Tensor) -> torch.Tensor:
        row = w[:, :, -1]  # (N, heads, S): this step's query
        past = history.get(name, [])
        if len(past) != w.shape[2] - 1:
            raise AttnlabError(
                f"{name} gave {w.shape[2]} query rows at a step after {len(past)} recorded ones: call it once per "
                "decode() and keep one record setting through a decoding run"
            )
        this_step[name] = row
        if not past:
            return row[:, :, None]  # (N, heads, 1, S)
        earlier = torch.stack([pad_to(r, w.shape[-1], 2) for r in past], dim=2)  # (N, heads, t - 1, S)
        with torch.no_grad():
            moved = float((earlier - w[:, :, :-1]).abs().max())
        if moved > CAUSAL_TOLERANCE:
            raise AttnlabError(
                f"{name}: an earlier position's attention changed by {moved:.2g} when a token was added, so decode() is "
                "not causal (pass a causal mask, as in training); its maps would depend on later words"
            )
        return torch.cat((earlier, row[:, :, None]), dim=2)  # (N, heads, t, S)

    return substitute


def _patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) and p for p in items):
        raise AttnlabError(f"{name}= must be a module name pattern or a list of them (e.g. 'decoder.layers.*.multihead_attn'), not {value!r}")
    return list(items)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise AttnlabError(f"{name}= must be three numbers (one per RGB channel), not {value!r}") from None
    if len(out) != 3:
        raise AttnlabError(f"{name}= must be three numbers (one per RGB channel), not {value!r}")
    return out  # type: ignore[return-value]


def _check_numbers(**values: Any) -> None:
    """wrap()'s whole-number arguments: integers (``max_len``, ``prefix_tokens``: or None); ``image_size``
    in ``1 .. MAX_IMAGE_SIZE`` (checked before the probe image is made); ``prefix_tokens`` >= 0."""
    for label, value in values.items():
        optional = value is None and label in ("max_len", "prefix_tokens")
        if not optional and not is_int(value):
            raise AttnlabError(f"{label}= must be an integer, not {value!r}")
    size = values["image_size"]
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise AttnlabError(f"image_size={size} is outside 1..{MAX_IMAGE_SIZE} px: pass the side your model takes (e.g. 224 or 384)")
    if values["prefix_tokens"] is not None and values["prefix_tokens"] < 0:
        raise AttnlabError(f"prefix_tokens= must be 0 or more, not {values['prefix_tokens']}")


def _whole(v: Any) -> int:
    """A whole number (``3``, ``np.int64(3)``, ``3.0``); ``ValueError`` for ``2.7``, ``True`` or text."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and float(v).is_integer():
        return int(v)
    raise ValueError(v)


def _prefix(tokens: int, h: int, w: int, grid: Any, stated: int | None) -> int:
    """The prefix tokens of ``tokens`` encoder tokens on an ``h`` x ``w`` grid: ``stated`` must fit
    exactly; an inferred count above :data:`MAX_PREFIX` is a wrong grid, not a prefix."""
    prefix = tokens - h * w
    if stated is not None and prefix != stated:
        raise AttnlabError(f"encode() gave {tokens} tokens, not prefix_tokens={stated} + the {h}x{w} = {h * w} patches of grid={grid!r}: check grid and prefix_tokens")
    if prefix < 0:
        raise AttnlabError(f"encode() gave {tokens} tokens, fewer than the {h}x{w} = {h * w} patches of grid={grid!r}: check grid")
    if stated is None and prefix > MAX_PREFIX:
        fits = [f"({r}, {r})" for p in range(MAX_PREFIX + 1) for r in [round((tokens - p) ** 0.5)] if r > 0 and r * r == tokens - p]
        hint = f" (grid={fits[0]} would fit)" if fits else ""
        raise AttnlabError(
            f"grid={grid!r} leaves {prefix} of encode()'s {tokens} tokens as prefix tokens (a ViT has at most {MAX_PREFIX}: CLS, registers): "
            f"check grid{hint}, or pass prefix_tokens={prefix} if that many are not patches"
        )
    return prefix


def _run(what: str, on: str, hint: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``: the probe's call of the user's function; its failure becomes one line (the cause chained)."""
    try:
        return fn(*args)
    except AttnlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code may fail any way; the cause stays chained
        raise AttnlabError(f"{what} failed on {on} ({one_line(exc, 120, with_type=True)}): {hint}") from exc


def _check_ids(spec_args: dict[str, Any], size: int, where: str) -> None:
    """bos, eos and pad must be token ids ``0 .. size - 1``."""
    for key in ("bos", "eos", "pad"):
        value = spec_args[key]
        if not 0 <= value < size:
            raise AttnlabError(f"{key}={value} is not a token id: {where} {size} (0..{size - 1}); pass your model's {key} id")


class WrappedCaptioner(ModuleCaptioner):
    """A user's model behind the captioner seam (built by :func:`wrap`)."""

    def __init__(
        self,
        model: nn.Module,
        encode: Callable[[torch.Tensor], torch.Tensor],
        decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        cross: list[str],
        grid: GridArg,
        spec_args: dict[str, Any],
        self_attention: list[str] | None,
        encoder_attention: list[str] | None,
        prefix_tokens: int | None = None,
    ) -> None:
        self.model = model
        self._encode = encode
        self._decode = decode
        self._cross = cross
        self._self = self_attention
        self._enc = encoder_attention
        self._grid = grid
        self._spec_args = spec_args
        self._stated_prefix = prefix_tokens
        self._prefix = 0
        self._probe()

    # ------------------------------------------------------------ checks
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        g = self._grid(height, width) if callable(self._grid) else self._grid
        try:
            h, w = (_whole(v) for v in g)
        except (TypeError, ValueError):
            raise AttnlabError(
                f"grid must be (rows, columns), two whole numbers, or a function of the input size giving them, not {g!r} "
                "(a function: use // to divide)"
            ) from None
        if h < 1 or w < 1:
            raise AttnlabError(f"grid {g!r} must have at least one row and one column")
        return h, w

    def _memory(self, x: torch.Tensor) -> torch.Tensor:
        memory = self._encode(x)
        if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or memory.shape[0] != x.shape[0]:
            shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            raise AttnlabError(
                f"encode() returned {shape}; it must return the encoder's tokens (N, T, D) for pixels (N, 3, H, W)"
            )
        return memory

    def _probe(self) -> None:
        """Run encode and decode once on a blank image: wrong shapes fail here, in one line."""
        side = self._spec_args["image_size"]
        x = torch.zeros(1, 3, side, side, device=self._device())
        with self._probing():
            memory = _run("encode()", f"a blank {side}x{side} image", "check image_size=", self._memory, x)  # (1, T, D)
            h, w = self.grid_for(side, side)
            self._prefix = _prefix(memory.shape[1], h, w, self._grid, self._stated_prefix)
            bos = self._spec_args["bos"]
            ids = torch.full((1, 1), bos, dtype=torch.long, device=x.device)
            with capture_attention(self.model, self._cross) as cap:
                logits = _run("decode(memory, ids)", f"the start token bos={bos}", "check bos= (your model's start id)", self._decode, memory, ids)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, 1):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise AttnlabError(f"decode(memory, ids (1, 1)) returned {shape}; it must return logits (N, t, V)")
            called = [n for n in cap.names if cap.weights[n]]
            if not called:
                raise AttnlabError(
                    f"no module matching cross_attention={self._cross!r} was called by decode(): name the decoder's cross-attention modules"
                )
            for name in called:
                keys = cap.last(name).shape[-1]
                if keys != memory.shape[1]:
                    raise AttnlabError(
                        f"{name} attends over {keys} keys, not the encoder's {memory.shape[1]} tokens: is it a self-attention module?"
                    )
        vocab_size = len(self._spec_args["vocab"])
        if vocab_size and logits.shape[-1] != vocab_size:
            raise AttnlabError(f"the model predicts {logits.shape[-1]} tokens but vocab has {vocab_size}: pass the model's own vocabulary")
        _check_ids(self._spec_args, logits.shape[-1], "the model predicts")

    # ------------------------------------------------------------ the seam
    @property
    def spec(self) -> CaptionerSpec:
        return CaptionerSpec(prefix_tokens=self._prefix, **self._spec_args)

    def begin(self, pixels: Sequence[torch.Tensor], record: Record = "cross") -> Encoded:
        record = check_record(record)
        sizes = {tuple(p.shape[-2:]) for p in pixels}
        if len(sizes) != 1:
            raise AttnlabError(f"a wrapped model takes images of one size; got {sorted(sizes)}")
        x = torch.stack(list(pixels)).to(self._device())  # (N, 3, H, W)
        encoder = None
        if record == "all" and self._enc:
            grad = torch.is_grad_enabled()  # then hand each module its weights back: they are what it multiplies
            with capture_attention(self.model, self._enc, detach=not grad, substitute=(lambda _, w: w) if grad else None) as cap:
                memory = self._memory(x)  # (N, T, D)
            encoder = [cap.last(n) for n in cap.names if cap.weights[n]]  # per layer (N, heads, T, T)
        else:
            memory = self._memory(x)  # (N, T, D)
        grid = self.grid_for(*x.shape[-2:])
        if memory.shape[1] != self._prefix + grid[0] * grid[1]:
            raise AttnlabError(f"encode() gave {memory.shape[1]} tokens for a {grid[0]}x{grid[1]} grid and {self._prefix} prefix tokens")
        empty = torch.empty(x.shape[0], 0, dtype=torch.long, device=x.device)  # (N, 0)
        return Encoded(WrapState(memory, empty), [grid] * x.shape[0], encoder)

    def step(self, state: WrapState, ids: torch.Tensor, record: Record = "cross") -> StepOutput:
        state.ids = torch.cat((state.ids, ids.to(state.ids.device)[:, None]), dim=1)  # (N, t)
        grad = torch.is_grad_enabled() and record != "none"
        this_step: dict[str, torch.Tensor] = {}  # with autograd on: name -> the row handed to the model (N, heads, S)
        substitute = _history_substitute(state.history, this_step) if grad else None
        with ExitStack() as stack:
            cross_cap = stack.enter_context(capture_attention(self.model, self._cross, detach=not grad, substitute=substitute))
            self_cap = None
            if record == "all" and self._self:
                self_cap = stack.enter_context(capture_attention(self.model, self._self, detach=not grad, substitute=substitute))
            t, most = state.ids.shape[1], self._spec_args["max_len"]
            hint = f"if your decoder has fewer than max_len={most} positions, pass a smaller max_len="
            logits = _run("decode(memory, ids)", f"a caption prefix of {t} tokens", hint, self._decode, state.memory, state.ids)  # (N, t, V)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != state.ids.shape[1]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise AttnlabError(f"decode() returned {shape} for ids {tuple(state.ids.shape)}; it must return (N, t, V)")
        for name, row in this_step.items():
            state.history.setdefault(name, []).append(row)

        def rows(cap) -> list[torch.Tensor]:
            # the last of the t query rows predicts the next token: row i at step i
            return [this_step[n] if grad else cap.last(n)[:, :, -1] for n in cap.names if cap.weights[n]]

        cross = rows(cross_cap) if record != "none" else None  # per layer (N, heads, T)
        self_rows = rows(self_cap) if self_cap else None  # per layer (N, heads, t)
        return StepOutput(logits[:, -1], cross, self_rows)  # (N, V)


def _spec_args(name: str, vocab: Any, bos: int, eos: int, pad: int, max_len: int, image_size: int, resize: str, mean: Any, std: Any) -> dict[str, Any]:
    """wrap()'s spec values, checked (one line each): what :class:`CaptionerSpec` takes but the prefix."""
    spec_args = dict(
        name=name, vocab=make_vocab(vocab), bos=int(bos), eos=int(eos), pad=int(pad), max_len=int(max_len),
        image_size=int(image_size), resize=resize, mean=_triple("mean", mean), std=_triple("std", std),
    )  # fmt: skip
    CaptionerSpec(**spec_args)  # checks the values, one line each
    if len(spec_args["vocab"]):
        _check_ids(spec_args, len(spec_args["vocab"]), "vocab has")
    return spec_args


def wrap(
    model: nn.Module,
    *,
    encode: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cross_attention: Patterns,
    grid: GridArg,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    bos: int,
    eos: int,
    vocab: Sequence[str] | str | os.PathLike | Callable[[list[int]], str],
    max_len: int | None = None,
    name: str | None = None,
    self_attention: Patterns | None = None,
    encoder_attention: Patterns | None = None,
    resize: str = "stretch",
    pad: int = 0,
    prefix_tokens: int | None = None,
) -> WrappedCaptioner:
    """Make your own encoder-decoder captioner a captioner of the seam.

    Args:
        model: the ``nn.Module`` holding every attention module named below.
        encode: ``pixels (N, 3, H, W) -> memory (N, T, D)`` (e.g. a timm ViT's
            ``forward_features``: CLS + patch tokens).
        decode: ``(memory, ids (N, t)) -> logits (N, t, V)``, your teacher-forced forward.
        cross_attention: module name glob(s) of the decoder's cross-attention.
        grid: the patch grid ``(rows, columns)`` (whole numbers), or a function of the
            input ``(height, width)`` returning it. ``T - rows * columns`` leading tokens
            are prefix tokens (CLS, registers): reported, never hidden. More than
            :data:`MAX_PREFIX` (8) is refused as a wrong grid unless ``prefix_tokens`` says so.
        prefix_tokens: the number of leading non-patch tokens, when you want it checked
            (``encode`` must then give exactly ``prefix_tokens + rows * columns``).
        image_size: the side of the square input (at most :data:`MAX_IMAGE_SIZE`).
        mean, std: per-channel normalisation of pixels in [0, 1].
        bos, eos: start and end token ids. ``pad``: padding id (default 0).
        vocab: a list of tokens, a ``vocab.txt`` path, or a function ``ids -> text``.
            WordPiece (``##``) and byte-level BPE (``Ġ``) pieces are recognised.
        max_len: most tokens to generate, the end token included (default 30).
        name: shown in figures (default: the model's class name).
        self_attention, encoder_attention: optional globs of the decoder's
            self-attention and the encoder's attention, recorded with ``record="all"``.
        resize: ``"stretch"`` (resize to a square, as ViT processors do) or
            ``"pad"`` (long side to ``image_size``, then pad to a square).
    """
    if not isinstance(model, nn.Module):
        raise AttnlabError(f"wrap() takes the nn.Module that holds the attention modules, not a {type(model).__name__}")
    if not callable(encode) or not callable(decode):
        raise AttnlabError("encode= and decode= must be functions: encode(pixels) -> memory, decode(memory, ids) -> logits")
    if resize not in ("stretch", "pad"):
        raise AttnlabError(f"resize must be 'stretch' or 'pad' for a wrapped model, not {resize!r}")
    _check_numbers(bos=bos, eos=eos, pad=pad, image_size=image_size, max_len=max_len, prefix_tokens=prefix_tokens)
    refuse_meta(model, "model.to_empty(device='cpu') then load_state_dict")
    spec_args = _spec_args(
        name or type(model).__name__, vocab, bos, eos, pad, 30 if max_len is None else max_len, image_size, resize, mean, std
    )
    return WrappedCaptioner(
        model,
        encode,
        decode,
        _patterns("cross_attention", cross_attention),
        grid,
        spec_args,
        _patterns("self_attention", self_attention),
        _patterns("encoder_attention", encoder_attention),
        None if prefix_tokens is None else int(prefix_tokens),
    )
