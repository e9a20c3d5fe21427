"""What the model's own ``generate`` would do, read from its configs: the start, end and
padding ids, the caption length, the patch grid, and whether it decodes greedily."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

from ...errors import AttnlabError

GENERATE_NEW_TOKENS = 20  # what generate makes when no length is set

# generation settings under which the model's own generate() is not plain greedy decoding
_NOT_GREEDY = (
    ("num_beams", lambda v: v > 1),
    ("do_sample", bool),
    ("repetition_penalty", lambda v: v != 1.0),
    ("no_repeat_ngram_size", lambda v: v > 0),
    ("min_new_tokens", lambda v: v > 0),
    ("min_length", lambda v: v > 0),
)


def transformers_module() -> Any:
    """``transformers``, imported now (one line when it is not installed)."""
    try:
        import transformers
    except ImportError:
        raise AttnlabError(
            "from_huggingface needs the transformers package: pip install \"attnlab[hf]\" (or pip install transformers)"
        ) from None
    return transformers


def warn_if_not_greedy(generation: Any, stacklevel: int) -> None:
    """attnlab decodes greedily; say so when the model's generate() would do something else by default."""
    found = []
    for key, odd in _NOT_GREEDY:
        value = getattr(generation, key, None)
        if value is not None and odd(value):
            found.append(f"{key}={value!r}")
    if found:
        warnings.warn(
            f"attnlab decodes greedily, but this model's generation config sets {', '.join(found)}: its captions may differ "
            "from model.generate(...) with those settings (they match generate(num_beams=1, do_sample=False, ...))",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def generate_length(generation: Any, unset: int | None) -> int:
    """How many tokens ``generate`` makes after the start token: ``max_new_tokens``; else
    20 when ``max_length`` keeps its default (``unset``: None in transformers 5, 20 in 4);
    else ``max_length - 1`` (it counts the start token)."""
    new_tokens = getattr(generation, "max_new_tokens", None)
    if new_tokens:
        return int(new_tokens)
    max_length = getattr(generation, "max_length", None)
    if max_length is None or max_length == unset:
        return GENERATE_NEW_TOKENS
    return max(1, int(max_length) - 1)


def setting(generation: Any, config: Any, key: str) -> Any:
    """``generation_config.<key>``, else the model config's (older checkpoints keep ids there)."""
    value = getattr(generation, key, None)
    return value if value is not None else getattr(config, key, None)


def first_id(*candidates: Any) -> int | None:
    """The first candidate that is set; a list of ids gives its first."""
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None


def positions(decoder_config: Any) -> int | None:
    """The most positions the text decoder has (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(decoder_config, key, None)
        if isinstance(value, numbers.Integral) and value > 0:
            return int(value)
    return None


def check_ids(ids: dict[str, int], fields: dict[str, str], size: Any, where: str) -> None:
    """The start, end and padding ids must be token ids ``0 .. size - 1`` (one line naming the setting)."""
    if not isinstance(size, numbers.Integral) or size < 1:
        return
    for key, value in ids.items():
        if not 0 <= value < size:
            raise AttnlabError(f"the {key} token id {value} ({fields[key]}) is not a token id: {where} {size} (0..{size - 1}); set {fields[key]} to the model's own")


def grid_of(encoder_config: Any, side: int) -> tuple[int, int]:
    """The encoder's patch grid for a ``side`` x ``side`` input (from its patch size)."""
    patch = getattr(encoder_config, "patch_size", None)
    if patch is None:
        kind = getattr(encoder_config, "model_type", "this")
        raise AttnlabError(f"the {kind} encoder has no patch size, so no fixed patch grid: attnlab needs a ViT-style encoder (ViT, DeiT, BEiT, BLIP's)")
    ph, pw = (patch, patch) if isinstance(patch, numbers.Integral) else tuple(int(p) for p in patch)
    if side < ph or side < pw:
        raise AttnlabError(f"the image processor's {side}px input is smaller than one {ph}x{pw} patch")
    return side // ph, side // pw
