"""An inference copy of a CNN body with every batch norm folded into its convolution.

``conv -> bn`` computes ``s * (W * x + c) + t`` per output channel; folding stores
``W' = s W`` and ``c' = s c + t`` so the batch norm costs nothing at run time. The
copy is rebuilt whenever a weight of the original changes (``load_state_dict``,
``.to()``), and it is not a submodule, so the model's ``state_dict()`` is untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backbone import FrozenBatchNorm2d


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C,)`` scale and ``(C,)`` shift of a frozen or eval-mode batch norm."""
    if isinstance(bn, FrozenBatchNorm2d):
        return bn.scale_and_shift()
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C,)
    return scale, bn.bias - bn.running_mean * scale


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))


def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    scale, shift = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1), requires_grad=False)  # (O, I, kh, kw)
    bias = shift if conv.bias is None else conv.bias.detach() * scale + shift  # (O,)
    fused.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return fused


def fold_batch_norms(body: nn.Module) -> nn.Module:
    """A deep copy of ``body`` where each ``convK``/``bnK`` pair (or a Sequential's
    consecutive conv, bn) is one convolution and the batch norm is ``Identity``."""
    fused = copy.deepcopy(body)
    for parent in fused.modules():
        children = dict(parent.named_children())
        names = list(children)
        for i, name in enumerate(names):
            conv = children[name]
            if not isinstance(conv, nn.Conv2d):
                continue
            if name.startswith("conv"):
                bn_name = "bn" + name[len("conv"):]
            elif isinstance(parent, nn.Sequential) and i + 1 < len(names):
                bn_name = names[i + 1]
            else:
                continue
            bn = children.get(bn_name)
            if bn is not None and _is_bn(bn):
                setattr(parent, name, _fold(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return fused.eval().requires_grad_(False)


class InferenceBody:
    """Holds the folded copy of ``body`` and rebuilds it when ``body`` changes."""

    def __init__(self, body: nn.Module) -> None:
        self._body = body
        self._key: tuple | None = None
        self._fused: nn.Module | None = None

    def _state_key(self) -> tuple:
        tensors = list(self._body.parameters()) + list(self._body.buffers())
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def get(self, images: torch.Tensor) -> nn.Module | None:
        """The folded body, or ``None`` when a batch norm is in training mode."""
        if any(m.training for m in self._body.modules() if _is_bn(m)):
            return None
        key = self._state_key()
        if key != self._key:
            with torch.no_grad():
                self._fused = fold_batch_norms(self._body)
            self._key = key
        return self._fused

    def __deepcopy__(self, memo):  # a copied model gets its own cache of its own body
        return InferenceBody(copy.deepcopy(self._body, memo))
