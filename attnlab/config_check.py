"""Checks of a checkpoint's stored CATR configuration, made before anything is built.

An attnlab-format checkpoint carries its :class:`~attnlab.models.catr.CATRConfig`
as a plain dict. A damaged or hostile one (``vocab_size: 3000000`` in a 2 KB file,
``nheads: 3`` with ``d_model: 256``, ``dropout: 5``, a string instead of a dict)
must give one clear line, not a traceback or gigabytes of allocations. So:

* :func:`check_config` checks every value's type and range (and that ``d_model``
  divides into ``nheads`` heads) and returns the config;
* :func:`check_config_fits` compares the config with the shapes of the weights
  stored beside it, first the main sizes by name, then every tensor against a
  model built on PyTorch's ``meta`` device (shapes only, no memory). Only a
  config that passes is built for real, and then the model is exactly as big as
  the weights in the file.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from .checkpoints import check_state_dict
from .errors import AttnlabError
from .models.catr import CATR, CATRConfig
from .util import is_int, is_real

BACKBONES = ("resnet101", "small")
# inclusive bounds of the whole-number fields (far beyond any real captioner)
INT_RANGES: dict[str, tuple[int, int]] = {
    "d_model": (1, 8192),
    "nheads": (1, 256),
    "enc_layers": (1, 64),
    "dec_layers": (1, 64),
    "dim_feedforward": (1, 65536),
    "vocab_size": (2, 1_000_000),
    "max_positions": (2, 4096),
    "mlp_hidden": (1, 65536),
    "image_size": (16, 2048),
}
TOKEN_IDS = ("pad_token_id", "start_token_id", "end_token_id")


def _fail(source: str, key: str, value: Any, reason: str, stored: bool) -> AttnlabError:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    if stored:
        return AttnlabError(f"{source} has a damaged config: {key}={shown} {reason}; re-save the model with attnlab.save_checkpoint")
    return AttnlabError(f"{source} holds weights attnlab cannot build a CATR from: {key}={shown} (read off the weights) {reason}")


def check_config(raw: Any, source: str, *, stored: bool = True) -> CATRConfig:
    """The :class:`CATRConfig` stored as ``raw`` (a dict), every value checked; one-line errors.

    Unknown keys are ignored and missing ones take :class:`CATRConfig`'s defaults
    (as :meth:`CATRConfig.from_dict` does). ``stored=False``: the values were read
    off the weights (CATR's own format), and the message says so.
    """
    if not isinstance(raw, dict):
        raise AttnlabError(
            f"{source} has no usable config (found {type(raw).__name__}, expected a dict); re-save the model with attnlab.save_checkpoint"
        )
    defaults = CATRConfig().to_dict()
    known = {f.name for f in fields(CATRConfig)}
    values = {**defaults, **{k: v for k, v in raw.items() if k in known}}
    for key, (low, high) in INT_RANGES.items():
        v = values[key]
        if not is_int(v):
            raise _fail(source, key, v, "is not a whole number", stored)
        if not low <= v <= high:
            raise _fail(source, key, v, f"is outside {low}..{high}", stored)
    if values["d_model"] % values["nheads"]:
        raise _fail(source, "nheads", values["nheads"], f"does not divide d_model={values['d_model']} into equal heads", stored)
    if values["d_model"] % 2:
        raise _fail(source, "d_model", values["d_model"], "is odd (the sine position embedding needs an even size)", stored)
    for key in TOKEN_IDS:
        v = values[key]
        if not is_int(v) or not 0 <= v < values["vocab_size"]:
            raise _fail(source, key, v, f"is not a token id in 0..{values['vocab_size'] - 1}", stored)
    v = values["backbone"]
    if v not in BACKBONES:
        raise _fail(source, "backbone", v, f"is not one of {', '.join(BACKBONES)}", stored)
    v = values["backbone_channels"]
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 8 or not all(is_int(c) and 1 <= c <= 4096 for c in v):
        raise _fail(source, "backbone_channels", v, "is not a list of 1 to 8 widths from 1 to 4096", stored)
    v = values["dropout"]
    if not is_real(v) or not 0 <= v < 1:
        raise _fail(source, "dropout", v, "is not a probability in [0, 1)", stored)
    v = values["layer_norm_eps"]
    if not is_real(v) or not 0 < v < 1:
        raise _fail(source, "layer_norm_eps", v, "is not a small positive number", stored)
    for key in ("mean", "std"):
        v = values[key]
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(is_real(c) for c in v):
            raise _fail(source, key, v, "is not three numbers (one per colour channel)", stored)
        if key == "std" and not all(c > 0 for c in v):
            raise _fail(source, key, v, "holds a value that is not positive", stored)
    return CATRConfig.from_dict(values)


def _size(sd: dict[str, torch.Tensor], key: str, dim: int) -> int | None:
    t = sd.get(key)
    return int(t.shape[dim]) if t is not None and t.dim() > dim else None


def check_config_fits(config: CATRConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise one line when the weights ``sd`` are not the ones ``config`` describes (nothing is allocated)."""
    named = [
        ("vocab_size", "transformer.embeddings.word_embeddings.weight", 0),
        ("vocab_size", "mlp.layers.2.weight", 0),
        ("d_model", "transformer.embeddings.word_embeddings.weight", 1),
        ("max_positions", "transformer.embeddings.position_embeddings.weight", 0),
        ("dim_feedforward", "transformer.encoder.layers.0.linear1.weight", 0),
        ("mlp_hidden", "mlp.layers.0.weight", 0),
    ]
    for key, weight, dim in named:
        found = _size(sd, weight, dim)
        if found is not None and found != getattr(config, key):
            raise AttnlabError(
                f"{source} does not fit its own config: {key}={getattr(config, key)} but {weight} has {found}; the file is damaged"
            )
    with torch.device("meta"):  # shapes only: no memory, whatever the config says
        skeleton = CATR(config)
    check_state_dict(skeleton, sd, source)
