"""One teacher-forced run through the captioner seam, kept whole for the explanation methods.

:func:`record` feeds each image's token ids through ``begin``/``step`` exactly
as :func:`attnlab.caption` does with ``tokens=`` (finished captions leave the
batch through ``state.select``), but keeps what the seam returned: the
encoder's self-attention, and per step the logits and every decoder layer's
cross- and self-attention rows. With ``grad=True`` it runs with autograd on,
so those rows are nodes of one graph (the seam's rule: they are the tensors
the model multiplied with its values) and :meth:`Recording.gradients` gives
the gradient of each caption's own step-``i`` logit (the score of
``token_ids[i]``) with respect to any of them.

The images of one recording are one batch and must have one input size (the
seam encodes each size on its own and pads across sizes; padded copies are not
the tensors the model used). The gradient of the *sum* of the images' step-``i``
scores is taken once: images of a batch do not interact, so each image's share
of it is the gradient of its own score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..captioner import Captioner, Record, pad_to
from ..decode import Step, greedy_steps
from ..errors import AttnlabError
from ..keys import KeyLayout


@dataclass
class Recording:
    """A teacher-forced run of ``N`` same-size images (see the module docstring).

    Matrices come stacked over a list of images (``B`` of them), layers first:
    :meth:`cross` ``(layers, B, heads, Q, K)``, :meth:`self_attention` ``(layers, B, heads, Q, Q)``,
    :meth:`encoder_of` ``(layers, B, heads, K, K)``, for steps ``0 .. Q - 1`` (every image
    listed must have that many steps); with ``grads`` the gradients in their place.
    """

    tokens: list[list[int]]  # per image, its ids (step i's target is tokens[b][i])
    grids: list[tuple[int, int]]  # per image (h, w)
    prefix: int  # leading non-patch keys of every row
    encoder: list[torch.Tensor] | None  # per encoder layer (N, heads, K, K), or None
    steps: list[Step]  # per step, what the seam returned for the captions still in the batch

    def __post_init__(self) -> None:
        if len(set(self.grids)) != 1:
            raise AttnlabError("one recording holds images of one input size")
        self.positions = [{b: j for j, b in enumerate(s.images)} for s in self.steps]  # per step: image -> its batch row

    @property
    def keys(self) -> int:
        """The keys of a row: prefix + patches (batch padding dropped)."""
        return KeyLayout(self.prefix, self.grids[0]).keys

    def row(self, step: int, image: int) -> int:
        """Where ``image`` sits in the batch at ``step``."""
        return self.positions[step][image]

    def _per_step(self, step: int, images: list[int], tensors: list[torch.Tensor], grads) -> torch.Tensor:
        """``tensors`` (per layer ``(M, heads, X)``) of one step, rows of ``images``: ``(layers, B, heads, X)``."""
        idx = torch.tensor([self.positions[step][b] for b in images], device=tensors[0].device)  # (B,)
        return torch.stack([_pick(grads, t).index_select(0, idx) for t in tensors])

    def cross(self, images: list[int], queries: int, grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Cross-attention ``(layers, B, heads, Q, K)`` of ``images`` over steps ``0 .. queries - 1``."""
        parts = [self._per_step(s, images, self.steps[s].cross, grads)[..., : self.keys] for s in range(queries)]
        return torch.stack(parts, dim=3)  # (layers, B, heads, Q, K)

    def self_attention(self, images: list[int], queries: int, grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder self-attention ``(layers, B, heads, Q, Q)``: row ``s`` over steps ``0 .. s``, zeros after."""
        if self.steps[0].self_attention is None:
            raise AttnlabError("this run recorded no decoder self-attention")
        parts = [pad_to(self._per_step(s, images, self.steps[s].self_attention, grads), queries, 3) for s in range(queries)]
        return torch.stack(parts, dim=3)  # (layers, B, heads, Q, Q)

    def encoder_of(self, images: list[int], grads: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Encoder self-attention ``(layers, B, heads, K, K)`` of ``images``, or ``None`` when there is none."""
        if not self.encoder:
            return None
        idx = torch.tensor(images, device=self.encoder[0].device)  # (B,)
        k = self.keys
        return torch.stack([_pick(grads, t).index_select(0, idx)[..., :k, :k] for t in self.encoder])

    # ------------------------------------------------------------- gradients
    def targets(self, step: int) -> torch.Tensor:
        """The sum over the batch rows of ``step`` of each caption's own score: the logit of its token there."""
        s = self.steps[step]
        want = torch.tensor([self.tokens[b][step] for b in s.images], device=s.logits.device)  # (M,)
        return s.logits.gather(1, want[:, None]).sum()

    def gradients(self, step: int, tensors: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """``id(tensor) -> gradient`` of :meth:`targets` (zeros where the score does not depend on it)."""
        tensors = list(tensors)
        need = [t for t in tensors if t.requires_grad]
        found = torch.autograd.grad(self.targets(step), need, retain_graph=True, allow_unused=True) if need else []
        grads = {id(t): torch.zeros_like(t) for t in tensors}
        for t, g in zip(need, found):
            if g is not None:
                grads[id(t)] = g
        return grads


def _pick(grads: dict[int, torch.Tensor] | None, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself (detached), or its gradient from ``grads``."""
    return t.detach() if grads is None else grads[id(t)]


def record(cap: Captioner, pixels: list[torch.Tensor], tokens: list[list[int]], what: Record, grad: bool) -> Recording:
    """Feed ``tokens`` (one list per image, start token added here) through ``cap`` and keep every row.

    The loop is decoding's own teacher-forced one (:func:`attnlab.decode.greedy_steps`).
    ``what``: ``"cross"`` or ``"all"`` (encoder and decoder self-attention too).
    ``grad``: run with autograd on (else under ``torch.no_grad``).
    """
    with torch.inference_mode(False), torch.set_grad_enabled(grad):  # also when called inside inference_mode
        if grad:  # every attention tensor then hangs off the pixels, even in a frozen model
            pixels = [p.detach().clone().requires_grad_(True) for p in pixels]
        enc = cap.begin(pixels, what)
        if len(enc.grids) != len(pixels):
            raise AttnlabError(f"the captioner's begin() returned {len(enc.grids)} grids for {len(pixels)} images")
        steps, _ = greedy_steps(cap, enc.state, len(pixels), tokens, max(len(t) for t in tokens), what)
    _check_steps(steps, what, grad)
    encoder = list(enc.encoder_attention) if what == "all" and enc.encoder_attention else None
    return Recording([list(t) for t in tokens], list(enc.grids), cap.spec.prefix_tokens, encoder, steps)


def _check_steps(steps: list[Step], what: Record, grad: bool) -> None:
    """One line when the captioner did not return what the explanation methods need."""
    for step in steps:
        if not step.cross:
            raise AttnlabError("the captioner's step() returned no cross-attention: explanations need it")
        if what == "all" and step.self_attention is None:
            raise AttnlabError(
                "the captioner gives no decoder self-attention (record='all'): rollout and relevance need it "
                "(a wrapped model: pass self_attention='...' to attnlab.wrap)"
            )
        if grad and not step.logits.requires_grad:
            raise AttnlabError(
                "the captioner's logits do not depend on its attention with autograd on (its decode detaches them or runs "
                "under torch.no_grad): return the logits without .detach() for gradient methods, or use method='raw' or 'rollout'"
            )
