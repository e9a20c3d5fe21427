"""The explanation methods as objects: one :class:`MethodKind` per method, all in :data:`KINDS`;
:class:`Method` is one of them with its settings (``layer``, ``head``).

A kind says what figures call its maps (``label``, ``quantity``), which settings
it takes (``layer``, ``head``), what it needs from the run (``record``,
``gradients``), whether its rows are rescaled, and how it makes one image's rows
``(steps, K)`` from a :class:`~attnlab.explain.graph.Recording`: ``rows`` for the
methods without gradients, ``wants`` + ``step_rows`` (one step at a time) for the
gradient methods. Adding a method is one new kind in :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import rules
from .contrast import contrast_rows
from .sequence import SeqRows, grad_attn_rows, mean_rows, raw_rows, relevance_rows, rollout_rows

if TYPE_CHECKING:
    from .graph import Recording

__all__ = ["KINDS", "Method", "MethodKind"]

Rows = Callable[["Recording", int, torch.Tensor, "Method"], np.ndarray]
Wants = Callable[["Recording", int, "Method"], list[torch.Tensor]]
StepRows = Callable[["Recording", int, list[int], "Method", dict[int, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class MethodKind:
    """One explanation method (see :mod:`attnlab.explain.methods` for what each computes)."""

    name: str
    label: Callable[["Method"], str]  # what figures call it
    quantity: str  # what a map's numbers are (the colour bar's words)
    record: str = "cross"  # what the run must record: "cross" or "all" (self-attention too)
    gradients: bool = False
    scaled: bool = False  # rows renormalised so a step's map and prefix share sum to 1
    layer: bool = False  # takes layer=
    head: bool = False  # takes head=
    rows: Rows | None = None  # no gradients: (recording, image, cross (layers, heads, T, K), method) -> (T, K)
    wants: Wants | None = None  # gradients: the tensors of step i whose gradient the method reads
    step_rows: StepRows | None = None  # gradients: row i of every image still captioning -> (B, K)
    sequence: SeqRows | None = None  # on one sequence (a vision-language model): (pass, method, again) -> (n, T)
    prompted: bool = False  # only on a captioner with a prompt (SequenceCaptioner): contrast

    table_key: Callable[["Method"], str] | None = None  # its row in the grounding table (default: the name)
    table: Callable[[int, Any], list["Method"]] | None = None  # its rows: (decoder layers, spec) -> methods

    def table_methods(self, layers: int, spec: Any) -> list["Method"]:
        """The settings the grounding table scores (default: the method as it is, one row)."""
        return [Method(self.name)] if self.table is None else self.table(layers, spec)

    def key(self, m: "Method") -> str:
        """The method's row name in the grounding table (``"raw, layer 1"``, ``"relevance"``, ...)."""
        return self.name if self.table_key is None else self.table_key(m)


# ---------------------------------------------------------------------- rows without gradients
def _one_layer(rec: "Recording", b: int, cross: torch.Tensor, m: "Method") -> np.ndarray:
    a = cross[m.layer]  # (heads, T, K)
    return (a.mean(dim=0) if m.head is None else a[m.head]).numpy()  # (T, K)


def _every_layer(rec: "Recording", b: int, cross: torch.Tensor, m: "Method") -> np.ndarray:
    return cross.mean(dim=(0, 1)).numpy()  # (T, K)


def _rollout(causal: bool) -> Rows:
    def rows(rec: "Recording", b: int, cross: torch.Tensor, m: "Method") -> np.ndarray:
        enc = rec.encoder_of([b])
        decoder = rec.self_attention([b], cross.shape[2])[:, 0]  # (layers, heads, T, T)
        return rules.decoder_rollout(decoder, cross[-1], None if enc is None else enc[:, 0], causal=causal).numpy()  # (T, K)

    return rows


# ---------------------------------------------------------------------- rows with gradients
def _grad_attn_wants(rec: "Recording", i: int, m: "Method") -> list[torch.Tensor]:
    return [rec.steps[i].cross[m.layer]]


def _grad_attn_rows(rec: "Recording", i: int, images: list[int], m: "Method", grads: dict[int, torch.Tensor]) -> torch.Tensor:
    k = rec.keys
    weights = rec.steps[i].cross[m.layer]
    a = weights.detach()[:, :, :k].double()  # (B, heads, K), in batch-row order = images
    g = grads[id(weights)][:, :, :k].double()
    return rules.head_relevance(a[:, :, None], g[:, :, None])[:, 0]  # (B, K)


def _relevance_wants(rec: "Recording", i: int, m: "Method") -> list[torch.Tensor]:
    return [t for s in rec.steps[: i + 1] for t in (*s.cross, *(s.self_attention or []))] + list(rec.encoder or [])


def _relevance_rows(rec: "Recording", i: int, images: list[int], m: "Method", grads: dict[int, torch.Tensor]) -> torch.Tensor:
    # float32, as recorded: the rules only add and multiply non-negative numbers of order 1
    a_c, g_c = rec.cross(images, i + 1), rec.cross(images, i + 1, grads)  # (layers, B, heads, Q, K)
    a_s, g_s = rec.self_attention(images, i + 1), rec.self_attention(images, i + 1, grads)  # (layers, B, heads, Q, Q)
    enc_a, enc_g = rec.encoder_of(images), rec.encoder_of(images, grads)  # (layers, B, heads, K, K) or None
    encoder = [] if enc_a is None else list(zip(enc_a, enc_g))
    return rules.relevance(encoder, list(zip(a_s, g_s)), list(zip(a_c, g_c)))[:, i].double()  # (B, K)


def _raw_label(m: "Method") -> str:
    return f"raw attention, layer {m.layer}, " + ("mean of heads" if m.head is None else f"head {m.head}")


KINDS: dict[str, MethodKind] = {
    k.name: k
    for k in (
        MethodKind("raw", _raw_label, "attention weight", layer=True, head=True, rows=_one_layer, sequence=raw_rows,
                   table_key=lambda m: f"raw, layer {m.layer}",
                   table=lambda layers, spec: [Method("raw", layer) for layer in range(layers)]),
        MethodKind("layer_mean", lambda m: "mean of every layer and head", "attention weight", rows=_every_layer,
                   sequence=mean_rows),
        MethodKind("best_head", lambda m: f"best head (layer {m.layer}, head {m.head})", "attention weight",
                   layer=True, head=True, rows=_one_layer, sequence=raw_rows, table_key=lambda m: f"best_head (L{m.layer} H{m.head})",
                   table=lambda layers, spec: [] if spec.best_head is None else [Method("best_head", *spec.best_head)]),
        MethodKind("rollout", lambda m: "rollout (causal)", "share of rollout", record="all", scaled=True,
                   rows=_rollout(causal=True), sequence=rollout_rows),
        MethodKind("chefer_rollout", lambda m: "rollout as Chefer et al. (reads later words)", "share of rollout",
                   record="all", scaled=True, rows=_rollout(causal=False)),
        MethodKind("grad_attn", lambda m: f"grad x attention (layer {m.layer})", "share of grad x attention",
                   gradients=True, scaled=True, layer=True, wants=_grad_attn_wants, step_rows=_grad_attn_rows,
                   sequence=grad_attn_rows,
                   table_key=lambda m: f"grad_attn (L{m.layer})", table=lambda layers, spec: [Method("grad_attn", layers - 1)]),
        MethodKind("relevance", lambda m: "relevance (Chefer et al. 2021)", "share of relevance", record="all",
                   gradients=True, scaled=True, wants=_relevance_wants, step_rows=_relevance_rows, sequence=relevance_rows),
        MethodKind("contrast", lambda m: "attention / attention under a neutral prompt", "share of contrast",
                   scaled=True, sequence=contrast_rows, prompted=True),
    )
}
"""Every explanation method by name, in the order :data:`attnlab.explain.METHODS` lists them."""


@dataclass(frozen=True)
class Method:
    """One explanation method with its settings (``layer``/``head`` as given: negative counts from the end)."""

    name: str
    layer: int | None = None  # raw, best_head, grad_attn
    head: int | None = None  # raw (None = mean over heads), best_head

    @property
    def kind(self) -> MethodKind:
        """What the method is and how it computes (:data:`attnlab.explain.kinds.KINDS`)."""
        return KINDS[self.name]

    @property
    def label(self) -> str:
        """What figures call it: ``"rollout"``, ``"raw attention, layer 2, mean of heads"``, ..."""
        return self.kind.label(self)

    @property
    def quantity(self) -> str:
        """What a map's numbers are (the colour bar's words)."""
        return self.kind.quantity


def kind_of(name: Any) -> MethodKind | None:
    """The kind called ``name``, or ``None``."""
    return KINDS.get(name) if isinstance(name, str) else None
