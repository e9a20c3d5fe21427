"""The captioner seam: the one protocol between decoding and models.

Everything above this module (``caption()``, the plots, the explorer, the
explanation methods, batch runs, the CLI) talks to a model only through a
:class:`Captioner`; nothing above it reads a model's internals. CATR, the
bundled models, wrapped user models (:func:`attnlab.wrap`) and Hugging Face
models all implement it.

A captioner has three parts:

* ``spec`` (:class:`CaptionerSpec`): how images become input (size, resize
  rule, mean/std), the special token ids, the longest caption, the vocabulary,
  the name, and how many leading keys of every cross-attention row are not
  image patches (``prefix_tokens``: a ViT's CLS token, registers).
* ``begin(pixels, record)`` -> :class:`Encoded`: encode a list of images (each
  ``(3, h, w)``, normalised, on the CPU; sizes may differ) and return the
  decoding state, each image's patch grid and, with ``record="all"``, the
  encoder's self-attention.
* ``step(state, ids, record)`` -> :class:`StepOutput`: feed one new token per
  caption ``(N,)`` and get the next-token logits ``(N, V)`` and, per decoder
  layer, the cross-attention of the new position ``(N, heads, K)`` (and with
  ``record="all"`` its self-attention ``(N, heads, t)``).

Key layout of a cross-attention row ``(K,)`` for image ``b`` with grid
``(h, w)``: ``prefix_tokens`` prefix keys, then the ``h * w`` patches in
row-major order, then zero-weight padding up to ``K`` (images of a batch may
have different grids; padding keys are masked). The same layout indexes both
axes of the encoder's self-attention ``(N, heads, K, K)``. A captioner whose rows
are laid out otherwise (a vision-language model: several views of the photo among
prompt, special and newline keys) gives each image's layout in ``Encoded.layouts``
(:meth:`attnlab.keys.KeyLayout.of_views`: which keys are each view's cells, which
keys are of which kind); a layout of one view also carries that view's box on the
photo (a processor's centre crop).

``state.select(indices)`` keeps or reorders the batch entries of a decoding
state (finished captions leave the batch; beam search reorders hypotheses).

``begin``/``step`` never switch gradients off themselves: ``caption()`` runs
them under ``torch.inference_mode()`` (fast), explanation methods run them
with autograd on and differentiate through the returned attention weights,
which are the very tensors the model multiplied with its values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import AttnlabError
from .keys import KeyLayout, View

Record = Literal["none", "cross", "all"]
RECORDS: tuple[str, ...] = ("none", "cross", "all")
RESIZE_RULES: tuple[str, ...] = ("long", "stretch", "pad")


class TokenTable(Protocol):
    """What a spec's vocabulary offers: id -> display token, ids -> text."""

    def __len__(self) -> int: ...

    def token(self, token_id: int) -> str: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class CaptionerSpec:
    """What decoding needs to know about a captioner (everything but its weights).

    Attributes:
        name: shown in figures and stored in traces (``"shapes"``, ``"catr-v3"``, ...).
        vocab: id -> token table with ``token(id)``, ``decode(ids)`` and ``len()``
            (:class:`attnlab.tokenizer.Vocab` or anything with those methods).
        bos, eos, pad: start, end and padding token ids.
        max_len: the most decoding steps (tokens generated, the end token included).
        image_size: ``resize="long"``: the long side in pixels; ``"stretch"`` and
            ``"pad"``: the side of the square input.
        resize: ``"long"`` (CATR: long side to ``image_size``, aspect kept, no
            padding), ``"stretch"`` (ViT processors: resize to a square, aspect
            not kept) or ``"pad"`` (long side to ``image_size``, then pad right
            and bottom to a square with the mean colour).
        mean, std: per-channel normalisation of pixels in [0, 1].
        prefix_tokens: leading keys of every cross-attention row that are not
            image patches (CLS, registers); 0 for CNN encoders.
        transform: optional ``PIL.Image (RGB) -> (3, h, w) float tensor`` used
            instead of the resize rule and mean/std to make the model input
            (e.g. a Hugging Face image processor). The figures still follow
            ``resize``: it must describe how the transform maps the image.
        crop: optional ``(width, height) -> (x0, y0, x1, y1)``: the box of a photo of that
            size that ``transform`` keeps (a processor that cuts out the centre); traces
            then have one view with that box on the shown image (``trace.views``).
        best_head: optional ``(layer, head)``: the decoder cross-attention head
            that grounds words best, chosen on held-out data (attnlab's bundled
            models carry their record; ``attnlab.explain(..., "best_head")`` uses it).
        end_tokens: further token ids that end a caption as ``eos`` does (a model whose
            ``generate`` stops at any of a list of end tokens); ``()`` by default.
    """

    name: str
    vocab: TokenTable
    bos: int
    eos: int
    pad: int
    max_len: int
    image_size: int
    resize: str = "long"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    prefix_tokens: int = 0
    transform: Callable[[Any], torch.Tensor] | None = field(default=None, compare=False)
    best_head: tuple[int, int] | None = None
    crop: Callable[[int, int], tuple[float, float, float, float]] | None = field(default=None, compare=False)
    end_tokens: tuple[int, ...] = ()

    def ends(self, token: int) -> bool:
        """True for a token that ends a caption: ``eos`` or one of ``end_tokens``."""
        return token == self.eos or token in self.end_tokens

    def __post_init__(self) -> None:
        for attr in ("bos", "eos", "pad", "max_len", "image_size", "prefix_tokens"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int):
                raise AttnlabError(f"captioner spec: {attr} must be an integer, not {value!r}")
        if self.max_len < 1 or self.image_size < 1 or self.prefix_tokens < 0:
            raise AttnlabError(
                f"captioner spec: max_len ({self.max_len}) and image_size ({self.image_size}) must be >= 1, "
                f"prefix_tokens ({self.prefix_tokens}) >= 0"
            )
        if not isinstance(self.end_tokens, tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.end_tokens):
            raise AttnlabError(f"captioner spec: end_tokens must be a tuple of integers, not {self.end_tokens!r}")
        if self.resize not in RESIZE_RULES:
            raise AttnlabError(f"captioner spec: resize must be one of {', '.join(RESIZE_RULES)}, not {self.resize!r}")
        for attr in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, attr))
            if len(value) != 3 or (attr == "std" and min(value) <= 0):
                raise AttnlabError(f"captioner spec: {attr} must be three numbers (std > 0), not {getattr(self, attr)!r}")
            object.__setattr__(self, attr, value)
        if self.best_head is not None:
            object.__setattr__(self, "best_head", check_best_head(self.best_head))

    def layout(self, grid: tuple[int, int], shown: np.ndarray) -> KeyLayout:
        """The key layout of an image with patch ``grid`` shown as ``shown`` ``(h, w, 3)``: ``prefix_tokens``
        + the grid; with ``crop``, one view whose box is the crop on the shown image."""
        layout = KeyLayout(self.prefix_tokens, (int(grid[0]), int(grid[1])))
        if self.crop is None:
            return layout
        height, width = shown.shape[:2]
        return layout.boxed(View.checked("image", layout.grid, self.crop(width, height)))


def spec_from_config(
    config: Any,
    *,
    name: str,
    vocab: TokenTable | None,
    resize: Literal["long", "stretch", "pad"],
    prefix_tokens: int = 0,
    best_head: tuple[int, int] | None = None,
) -> CaptionerSpec:
    """The spec of a model built from a config with CATR's field names (``start_token_id``,
    ``end_token_id``, ``pad_token_id``, ``max_positions``, ``image_size``, ``mean``, ``std``,
    ``vocab_size``). Without ``vocab``, words show as ``[id]`` (the special tokens by name)."""
    if vocab is None:
        from .tokenizer import IdVocab

        specials = {config.pad_token_id: "[PAD]", config.start_token_id: "[CLS]", config.end_token_id: "[SEP]"}
        vocab = IdVocab(specials, config.vocab_size)
    return CaptionerSpec(
        name=name,
        vocab=vocab,
        bos=config.start_token_id,
        eos=config.end_token_id,
        pad=config.pad_token_id,
        max_len=config.max_positions - 1,  # the start token takes one position
        image_size=config.image_size,
        resize=resize,
        mean=config.mean,
        std=config.std,
        prefix_tokens=prefix_tokens,
        best_head=best_head,
    )


def check_best_head(value: Any) -> tuple[int, int]:
    """A ``(layer, head)`` pair of integers >= 0 (from a list or a ``{"layer": .., "head": ..}`` record), or one line."""
    if isinstance(value, dict):
        value = (value.get("layer"), value.get("head"))
    try:
        layer, head = value
    except (TypeError, ValueError):
        raise AttnlabError(f"best_head must be (layer, head), not {value!r}") from None
    for v in (layer, head):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AttnlabError(f"best_head must be two integers >= 0 (layer, head), not {value!r}")
    return int(layer), int(head)


@runtime_checkable
class DecodeState(Protocol):
    """A captioner's decoding state for a batch of ``N`` captions."""

    def select(self, indices: torch.Tensor) -> "DecodeState":
        """Keep (and reorder) batch entries: ``indices`` ``(M,)`` long, into ``0..N-1``.

        Returns the state of the ``M`` selected captions (the old state may be reused).
        """
        ...


@dataclass
class Encoded:
    """What :meth:`Captioner.begin` returns.

    Attributes:
        state: the decoding state of the ``N`` images.
        grids: ``N`` patch grids ``(h, w)``, one per image.
        encoder_attention: with ``record="all"`` (when the encoder has
            attention), per encoder layer ``(N, heads, K, K)`` over the key
            layout of the module docstring; else ``None``.
        layouts: ``N`` key layouts (:class:`attnlab.keys.KeyLayout`), one per image,
            for rows not laid out as prefix + grid (or a view with a box); ``None``:
            every image's row is ``prefix_tokens`` + its grid.
        meta: ``N`` dicts of JSON values that each image's trace records in its ``meta``
            (a vision-language captioner's prompt); ``None``: nothing.
    """

    state: DecodeState
    grids: list[tuple[int, int]]
    encoder_attention: list[torch.Tensor] | None = None
    layouts: list[KeyLayout] | None = None
    meta: list[dict[str, Any]] | None = None

    def layout(self, b: int, spec: CaptionerSpec, shown: np.ndarray) -> KeyLayout:
        """Image ``b``'s key layout: ``layouts[b]``, or ``spec.prefix_tokens`` + its grid (with
        ``spec.crop``: one view whose box is the crop on the ``shown`` image ``(h, w, 3)``)."""
        return self.layouts[b] if self.layouts is not None else spec.layout(self.grids[b], shown)


@dataclass
class StepOutput:
    """What :meth:`Captioner.step` returns for the ``N`` captions of the state.

    Attributes:
        logits: ``(N, V)`` next-token scores.
        cross_attention: per decoder layer ``(N, heads, K)``, the new position's
            weights over the keys (prefix, patches, padding); ``None`` with ``record="none"``.
        self_attention: per decoder layer ``(N, heads, t)`` over the ``t``
            positions so far (this one included); only with ``record="all"``.
    """

    logits: torch.Tensor
    cross_attention: list[torch.Tensor] | None = None
    self_attention: list[torch.Tensor] | None = None


@runtime_checkable
class Captioner(Protocol):
    """The protocol every captioning model implements (see the module docstring)."""

    @property
    def spec(self) -> CaptionerSpec: ...

    def begin(self, pixels: Sequence[torch.Tensor], record: Record) -> Encoded: ...

    def step(self, state: Any, ids: torch.Tensor, record: Record) -> StepOutput: ...


# ---------------------------------------------------------------------- optional: one sequence
@runtime_checkable
class SequencePass(Protocol):
    """A teacher-forced full forward over the prompt and a caption's tokens (see :class:`SequenceCaptioner`).

    ``layout``: the keys ``0 .. T-1`` of the sequence (the prompt's views and kinds, the caption's
    tokens the kind ``"generated"``), boxes on the image the traces show; ``queries`` ``(n,)``: the
    position whose output predicts word ``i``; ``layers``, ``heads``: the decoder's;
    ``meta``: what the word's trace records (the prompt). ``logits`` ``(n, V)`` after a pass.
    """

    layout: KeyLayout
    queries: np.ndarray
    layers: int
    heads: int
    meta: dict[str, Any]
    logits: torch.Tensor | None

    def attention(self, visit: Callable[[int, torch.Tensor], None]) -> None:
        """One forward without gradients; ``visit(layer, A)`` with ``A`` ``(heads, T, T)`` float32
        as each layer runs, first layer first (``A`` is dropped after the call)."""
        ...

    def gradients(self, layers: Sequence[int]) -> Any:
        """One forward with autograd, then per word ``i`` (in order) and per layer of ``layers`` (in
        that order) yields ``(i, layer, A, dA)``: ``A`` ``(heads, T, T)`` and the gradient of word
        ``i``'s logit (of its own token at ``queries[i]``) with respect to ``A``, one layer at a time
        (both fresh buffers that the caller may overwrite)."""
        ...


@runtime_checkable
class SequenceCaptioner(Protocol):
    """Optional capability: a captioner whose words attend over one sequence (a vision-language
    model: image, prompt and earlier words are keys of the same self-attention)."""

    def sequence(self, pixels: torch.Tensor, tokens: Sequence[int], *, prompt: str | None = None) -> SequencePass:
        """The teacher-forced pass of ``tokens`` on one image (``(3, h, w)`` as ``begin`` takes it),
        after the captioner's own prompt or ``prompt`` (the user words of another one)."""
        ...


def as_captioner(model: Any) -> Captioner:
    """``model`` itself when it implements the seam, else one clear line naming :func:`attnlab.wrap`."""
    if isinstance(model, Captioner) and isinstance(getattr(model, "spec", None), CaptionerSpec):
        return model
    raise AttnlabError(
        f"a {type(model).__name__} is not an attnlab captioner (it has no spec/begin/step): "
        "wrap your model with attnlab.wrap(model, encode=..., decode=..., cross_attention=..., ...) "
        "or load one with attnlab.load_model"
    )


def check_record(record: Any) -> str:
    if record not in RECORDS:
        raise AttnlabError(f"record must be 'none', 'cross' or 'all', not {record!r}")
    return record


# ----------------------------------------------------------------------
# helpers for implementations: same-size groups and padded keys
# ----------------------------------------------------------------------
def size_groups(pixels: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``pixels`` grouped by image size ``(h, w)``, in order of first appearance.

    Encoding each group as one batch keeps every image's result exactly what it
    would be alone (no padding reaches a receptive field).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(tuple(p.shape[-2:]), []).append(i)
    return list(groups.values())


def pad_to(t: torch.Tensor, length: int, *dims: int) -> torch.Tensor:
    """Zero-pad ``t`` at the end of each of ``dims`` to ``length`` (padding keys get zero weight)."""
    for dim in dims:
        extra = length - t.shape[dim]
        if extra > 0:
            shape = list(t.shape)
            shape[dim] = extra
            t = torch.cat((t, t.new_zeros(shape)), dim=dim)
    return t


def scatter_groups(groups: list[list[int]], stacked: torch.Tensor) -> torch.Tensor:
    """Rows of ``stacked`` ``(N, ...)``, the groups' batches concatenated in group order,
    put back in the images' order: row ``i`` of the result belongs to image ``i``."""
    order = torch.tensor([i for g in groups for i in g], dtype=torch.long)  # row r of stacked is image order[r]
    if bool((order == torch.arange(len(order))).all()):
        return stacked  # already in order (e.g. one size): the tensor itself, no copy
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return stacked.index_select(0, inverse.to(stacked.device))
