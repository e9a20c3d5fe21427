"""Checkpoint files: read them safely (tensors only), say what a state dict holds, check it fits a model.

Shared by :mod:`attnlab.hub` (loading by name) and :mod:`attnlab.config_check`
(a stored configuration against its weights), so neither imports the other.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import AttnlabError
from .util import one_line

__all__ = ["check_state_dict", "count_layers", "describe_state_dict", "read_checkpoint", "state_dict_of"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a checkpoint safely (tensors only); clear errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise AttnlabError(f"no checkpoint file at {path}: check the path")
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a pipe or a device)"
        raise AttnlabError(f"no checkpoint file at {path}: it is {what}; pass a .pth/.pt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch >= 2.6 words every weights-only failure "Weights only load failed", garbage bytes
        # ("Unsupported operand") included; a GLOBAL it refuses means Python objects or code
        text = str(exc)
        blocked = re.search(r"GLOBAL ([\w.]+)", text)
        if blocked and "is blocked" in text:
            raise AttnlabError(
                f"{path} was refused: loading it would import {blocked.group(1)}, which no file of weights needs "
                "(attnlab loads tensors only and never runs a checkpoint's code); if you trust the file, "
                "re-save its weights with torch.save({'model': model.state_dict()})"
            ) from None
        if blocked:
            raise AttnlabError(
                f"{path} holds Python objects besides tensors ({blocked.group(1)}); re-save it as torch.save({{'model': model.state_dict()}})"
            ) from None
        if _is_plain_pickle(path):
            raise AttnlabError(
                f"{path} is a plain Python pickle, not a torch.save file, and was refused (unpickling it could run code); "
                "save the weights with torch.save({'model': model.state_dict()})"
            ) from None
        raise AttnlabError(f"{path} is not a PyTorch checkpoint: pass a .pth/.pt file saved with torch.save") from None
    except Exception as exc:  # torch.load fails on garbage with any exception type
        raise AttnlabError(f"{path} is not a PyTorch checkpoint or is truncated ({one_line(exc, 80)}): pass a file saved with torch.save") from None
    if not isinstance(obj, dict):
        raise AttnlabError(f"{path} holds a {type(obj).__name__}, not a state dict: save {{'model': model.state_dict()}}")
    return obj


def _is_plain_pickle(path: Path) -> bool:
    """Written by ``pickle.dump`` (protocol 2 or newer starts with 0x80), not by ``torch.save``."""
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and not zipfile.is_zipfile(path)
    except OSError:
        return False


def state_dict_of(obj: dict[str, Any], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``obj['model']`` or ``obj`` itself."""
    sd = obj.get("model", obj)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AttnlabError(f"{source} holds no state dict of tensors (expected {{'model': state_dict}} or a state dict)")
    return sd


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """A short guess of which model a state dict belongs to, from its keys and shapes."""
    keys = set(sd)
    if "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in keys and "mlp.layers.2.weight" in keys:
        vocab = sd["mlp.layers.2.weight"].shape[0]
        enc = len({k.split(".")[3] for k in keys if k.startswith("transformer.encoder.layers.")})
        dec = len({k.split(".")[3] for k in keys if k.startswith("transformer.decoder.layers.")})
        backbone = "ResNet" if "backbone.0.body.layer1.0.conv1.weight" in keys else "small-CNN"
        return f"a CATR-style captioner ({backbone} backbone, {enc} encoder / {dec} decoder layers, vocabulary {vocab})"
    if "encoder.patch_embed.proj.weight" in keys and "layers.0.cross_attn.in_proj_weight" in keys and "head.weight" in keys:
        dec = count_layers(sd, "layers.")
        return f"a CPTR-style captioner (timm ViT encoder, {dec} decoder layers, vocabulary {sd['head.weight'].shape[0]})"
    if "class_embed.weight" in keys and "query_embed.weight" in keys:
        return "a DETR object detector, not a captioner"
    if "fc.weight" in keys and "conv1.weight" in keys:
        return "a torchvision ResNet classifier, not a captioner"
    if any(k.startswith("patch_embed.") for k in keys):
        return "a vision transformer (timm), not a captioner"
    if any("word_embeddings" in k for k in keys) and not any(k.startswith("backbone.") for k in keys):
        return "a text model (BERT-like), not a captioner"
    first = ", ".join(list(sd)[:3])
    return f"an unknown model (first keys: {first})"


def count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks ``<prefix><i>.`` a state dict holds (highest index + 1; 0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise one clear line when ``sd`` does not fit ``model`` exactly."""
    # batch-norm step counters are bookkeeping, not weights: ignored on both sides
    # (CATR's FrozenBatchNorm2d has none, the small backbone's BatchNorm2d has them)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k} {list(given[k])} vs {list(expected[k])}" for k in expected if k in given and given[k] != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f", +{len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
    raise AttnlabError(
        f"{source} does not fit this model: {'; '.join(parts)}; the file looks like {describe_state_dict(sd)}"
    )
