"""The plan of a batch run (its images, their outputs, the run lists) and the settings its traces record."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import outputs, runlist
from ..captioner import as_captioner
from ..settings import decode_settings
from ..trace import CaptionTrace
from .inputs import find_images, shard_items, sidecar_names


@dataclass
class RunPlan:
    """What a batch run will do, decided before the model is loaded (see :func:`plan_run`)."""

    plans: list[outputs.Planned]  # this shard's images in order; sources without SHA-256 yet
    total: int  # images in all shards together
    shard: tuple[int, int]
    out: Path
    captions: Path
    errors: Path
    figures: bool
    overwrite: bool
    html: bool = False


def plan_run(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    shard: tuple[int, int] = (1, 1),
    figures: bool = False,
    overwrite: bool = False,
    html: bool = False,
) -> RunPlan:
    """Find the images, name their outputs and check the output folder (no model needed, nothing written)."""
    out_dir = Path(out)
    outputs.check_out_dir(out_dir)
    items = find_images(inputs, out=out_dir)
    sources = [outputs.Source(item.name, str(item.path.resolve()), None, item.path) for item in items]
    plans = shard_items(outputs.plan_mirrored(sources, out_dir), shard)  # named over all shards, then sliced
    captions, errors = (out_dir / name for name in sidecar_names(shard))
    for path, kind in ((captions, "captions"), (errors, "errors")):
        runlist.check_replaceable(path, kind, overwrite)
    return RunPlan(plans, len(items), shard, out_dir, captions, errors, figures, overwrite, html)


# ====================================================================== settings
def weights_digest(model: Any) -> str | None:
    """A short SHA-256 of a torch model's weights (names, dtypes, shapes, bytes); ``None`` for other captioners."""
    if not isinstance(model, torch.nn.Module):
        return None
    state = model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # (bytes,)
    return digest.hexdigest()[:16]


def run_settings(
    model: Any, *, max_len: int | None = None, beams: int = 1, length_penalty: float = 1.0, half: bool = False, mode: str = "incremental"
) -> dict[str, Any]:
    """What a trace of a batch run depends on besides its image (stored as ``meta["run"]``):
    a rerun skips an image only when these are equal."""
    spec = as_captioner(model).spec
    settings = decode_settings(spec, max_len=max_len, beams=beams, length_penalty=length_penalty, mode=mode)
    return {"model": spec.name, "weights": weights_digest(model), **settings.as_dict(), "half": bool(half)}


def as_half(trace: CaptionTrace) -> CaptionTrace:
    """The trace with its attention arrays as float16 (half the size; values within ~5e-4 of float32).

    Logits stay float32 (the probabilities shown in figures come from them).
    """
    def half(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a.astype(np.float16)

    several = len(trace.views) > 1  # then cross_attention is an error: every view's maps are in view_maps
    return replace(
        trace,
        cross_attention=None if several else half(trace.cross_attention),
        prefix_share=half(trace.prefix_share),
        encoder_self_attention=half(trace.encoder_self_attention),
        decoder_self_attention=half(trace.decoder_self_attention),
        view_maps=None if trace.view_maps is None else tuple(half(m) for m in trace.view_maps),
        key_shares={k: half(v) for k, v in trace.key_shares.items()},
    )
