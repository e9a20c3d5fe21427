"""What the families' layouts share: the image tokens' run, the special-token set, the layout assembled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ....errors import AttnlabError
from ....keys import KeyLayout, View


def runs(mask: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the maximal runs of True."""
    idx = np.flatnonzero(mask)
    return [r for r in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(r)] if len(idx) else []


def ids_and_mask(inputs: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The first sequence's ids ``(T,)`` and attention mask ``(T,)`` (all ones when there is none)."""
    ids = np.asarray(inputs["input_ids"])[0]
    mask = np.asarray(inputs["attention_mask"])[0] if inputs.get("attention_mask") is not None else np.ones_like(ids)
    return ids, mask


def image_token_id_or_none(config: Any) -> int | None:
    """The id of the image placeholder (``image_token_id``, else ``image_token_index``), ``None`` if the config names none."""
    found = getattr(config, "image_token_id", None)
    found = getattr(config, "image_token_index", None) if found is None else found
    return None if found is None else int(found)


def image_token_id(config: Any) -> int:
    """The id of the image placeholder (``image_token_id``, else ``image_token_index``); one line if there is none."""
    found = image_token_id_or_none(config)
    if found is None:
        raise AttnlabError(f"the {type(config).__name__} names no image token (image_token_id): cannot find the image in the prompt")
    return int(found)


def image_positions(ids: np.ndarray, image_id: int) -> np.ndarray:
    """The positions of the one run of image tokens (one line if the prompt holds none or several)."""
    found = runs(ids == image_id)
    if len(found) != 1:
        raise AttnlabError(f"the prompt holds {len(found)} images: vision-language captions take exactly one image per prompt")
    return found[0]


def extra_tokens(found: int, grid_tokens: int) -> int:
    """Leading image tokens that are not patches: 0, or 1 (CLS, ``vision_feature_select_strategy="full"``)."""
    if found - grid_tokens not in (0, 1):
        raise AttnlabError(f"the prompt has {found} image tokens where the processor's layout gives {grid_tokens}: "
                           "pass the photo and the inputs the processor made from it")
    return found - grid_tokens


def special_ids(config: Any, processor: Any, *attrs: str) -> set[int]:
    """The tokenizer's special ids (its special tokens and added tokens marked special) and the config's ``attrs`` ids."""
    tokenizer = getattr(processor, "tokenizer", None)
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or []}
    special |= {int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    for attr in attrs:
        if getattr(config, attr, None) is not None:
            special.add(int(getattr(config, attr)))
    return special


def assemble(ids: np.ndarray, mask: np.ndarray, views: Sequence[View], view_keys: Sequence[np.ndarray],
             kinds: Mapping[str, np.ndarray], special: set[int]) -> KeyLayout:
    """The layout: ``views`` on ``view_keys``, the given ``kinds`` (prefix, newline, ...), and every other key
    ``"padding"`` (mask 0), ``"special"`` (an id in ``special``) or ``"prompt"``. One line unless every key is placed once."""
    for v, k in zip(views, view_keys):
        if len(k) != v.grid[0] * v.grid[1]:
            raise AttnlabError(f"the prompt has {len(k)} tokens for view {v.name!r} where its grid {v.grid} needs {v.grid[0] * v.grid[1]}")
    rest = np.ones(len(ids), bool)
    for k in [*view_keys, *kinds.values()]:
        rest[np.asarray(k, dtype=int)] = False
    padding = rest & (mask == 0)
    specials = rest & ~padding & np.isin(ids, sorted(special))
    prompt = rest & ~padding & ~specials
    out = {"prompt": np.flatnonzero(prompt), "special": np.flatnonzero(specials), "padding": np.flatnonzero(padding)}
    out.update({k: np.asarray(v, dtype=int) for k, v in kinds.items()})
    for kind in ("prefix", "newline"):
        out.setdefault(kind, np.zeros(0, dtype=int))
    return KeyLayout.of_views(list(views), [np.asarray(k, dtype=int) for k in view_keys], out, len(ids))
