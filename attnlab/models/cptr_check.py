"""Checks of a :class:`~attnlab.models.cptr.CPTRConfig`, made before timm or torch sees it.

A CPTR checkpoint stores its configuration as plain data, and ``encoder_args`` are passed
to ``timm.create_model`` as keyword arguments. timm takes keywords that open files
(``checkpoint_path``, ``pretrained_cfg``/``pretrained_cfg_overlay`` with a ``file``,
``cache_dir``) or that name code (``block_fn``, ``embed_layer``, ``mlp_layer``), and its
layers fail with raw errors on odd values (``patch_size: 0`` divides by zero,
``act_layer: "nope"`` is a ``KeyError``). So only the ViT keywords of :data:`ENCODER_ARGS`
are passed, each of a checked type and range; any other key is refused in one line. A
checkpoint never makes attnlab open another file.
"""

from __future__ import annotations

from typing import Any

from ..errors import AttnlabError
from ..util import is_int, is_real

# inclusive bounds of the whole-number fields (far beyond any real captioner; as attnlab.config_check's for CATR)
INT_RANGES: dict[str, tuple[int, int]] = {
    "image_size": (16, 2048),
    "d_model": (1, 8192),
    "nheads": (1, 256),
    "dec_layers": (1, 64),
    "dim_feedforward": (1, 65536),
    "vocab_size": (2, 1_000_000),
    "max_positions": (2, 4096),
}

_BOOL = "True or False"
_RATE = "a rate in [0, 1)"
# encoder_args attnlab passes to timm: key -> what its value must be (None always means timm's default)
ENCODER_ARGS: dict[str, str] = {
    "patch_size": "a whole number from 1 to image_size (or two of them)",
    "embed_dim": "a whole number from 1 to 8192",
    "depth": "a whole number from 1 to 64",
    "num_heads": "a whole number from 1 to 256",
    "reg_tokens": "a whole number from 0 to 64",
    "mlp_ratio": "a number in (0, 64]",
    "init_values": "a positive number",
    **dict.fromkeys(("qkv_bias", "qk_norm", "proj_bias", "class_token", "no_embed_class", "pre_norm", "final_norm", "fc_norm"), _BOOL),
    **dict.fromkeys(("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"), _RATE),
    "act_layer": "one of gelu, gelu_tanh, quick_gelu, relu, silu",
    "norm_layer": "one of layernorm, rmsnorm",
    "global_pool": "one of '', token, avg",
    "pos_embed": "one of learn, none",
}
_CHOICES = {
    "act_layer": ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu"),
    "norm_layer": ("layernorm", "rmsnorm"),
    "global_pool": ("", "token", "avg"),
    "pos_embed": ("learn", "none"),
}
_INTS = {"embed_dim": (1, 8192), "depth": (1, 64), "num_heads": (1, 256), "reg_tokens": (0, 64)}
SET_BY_ATTNLAB = {"img_size": "image_size", "num_classes": "0", "dynamic_img_size": "True", "in_chans": "3", "pretrained": "pretrained"}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fits(key: str, v: Any, image_size: int) -> bool:
    if key == "patch_size":
        sides = v if isinstance(v, (list, tuple)) and len(v) == 2 else [v]
        return all(is_int(p) and 1 <= p <= image_size for p in sides)
    if key in _INTS:
        low, high = _INTS[key]
        return is_int(v) and low <= v <= high
    if key == "mlp_ratio":
        return is_real(v) and 0 < v <= 64
    if key == "init_values":
        return is_real(v) and v > 0
    if key in _CHOICES:
        return isinstance(v, str) and v in _CHOICES[key]
    if ENCODER_ARGS[key] == _BOOL:
        return isinstance(v, bool)
    return is_real(v) and 0 <= v < 1  # a rate


def check_encoder_args(args: Any, image_size: int) -> None:
    """One line for ``encoder_args`` that attnlab would not pass to timm (see the module docstring)."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise AttnlabError(f"CPTR configuration: encoder_args must map timm keyword names to values, not {_shown(args)}")
    for key, v in args.items():
        if key in SET_BY_ATTNLAB:
            raise AttnlabError(f"CPTR configuration: encoder_args {key} is set by attnlab ({SET_BY_ATTNLAB[key]}); leave it out")
        if key not in ENCODER_ARGS:
            raise AttnlabError(
                f"CPTR configuration: encoder_args {key!r} is not a ViT size or layout keyword attnlab passes to timm "
                f"(allowed: {', '.join(ENCODER_ARGS)}); remove it"
            )
        if v is not None and not _fits(key, v, image_size):
            raise AttnlabError(f"CPTR configuration: encoder_args {key}={_shown(v)} must be {ENCODER_ARGS[key]}")
    width, heads = args.get("embed_dim"), args.get("num_heads")
    if width is not None and heads is not None and width % heads:
        raise AttnlabError(f"CPTR configuration: encoder_args embed_dim ({width}) must be divisible by num_heads ({heads})")


def check_values(config: Any) -> None:
    """One line for a whole number out of :data:`INT_RANGES`, a bad ``mean``/``std`` or ``encoder_args``."""
    for name, (low, high) in INT_RANGES.items():
        value = getattr(config, name)
        if not is_int(value) or not low <= value <= high:
            raise AttnlabError(f"CPTR configuration: {name} must be a whole number in {low}..{high}, not {_shown(value)}")
    for name in ("mean", "std"):
        value = getattr(config, name)
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(is_real(c) for c in value):
            raise AttnlabError(f"CPTR configuration: {name} must be three numbers (one per colour channel), not {_shown(value)}")
        if name == "std" and not all(c > 0 for c in value):
            raise AttnlabError(f"CPTR configuration: std must be positive, not {_shown(value)}")
    check_encoder_args(config.encoder_args, config.image_size)
