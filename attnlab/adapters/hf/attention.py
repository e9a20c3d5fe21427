"""Hugging Face attention weights, scoped: eager attention for a block (:func:`eager_attention`)
and the autograd rule's row tap (:class:`RowTap`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def configs_of(model: Any, config_type: type) -> list[Any]:
    """Every configuration object of ``model`` and its sub-models (each once)."""
    found: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), config_type)]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, config_type):
                stack.append(sub)
    return list(found.values())


@contextlib.contextmanager
def eager_attention(configs: list[Any]) -> Iterator[None]:
    """Run the block with every config's attention implementation set to ``"eager"``
    (the only one that returns weights); the previous settings come back afterwards,
    also when the block raises."""
    saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value


_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.special.softmax}


class RowTap(TorchFunctionMode):
    """While active (one decoding step with autograd on): every softmax over one query row,
    ``(N, heads, 1, K)``, is handed on as a view of its row ``(N, heads, K)``, kept in ``rows``.

    Hugging Face returns the ``(N, heads, 1, K)`` weights; a row sliced from them afterwards
    would not be the tensor the model multiplied with its values (no gradient reaches it).
    With the tap the model itself goes on from the row, so :meth:`row_of` can hand out a row
    that is (the seam's autograd rule). Values are unchanged; scoped to the ``with`` block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] == 1:
            row = out[:, :, 0]  # (N, heads, K)
            self.rows.append(row)
            return row[:, :, None]  # (N, heads, 1, K): what the model goes on with
        return out

    def row_of(self, weights: torch.Tensor) -> torch.Tensor:
        """The tapped row behind Hugging Face's ``(N, heads, 1, K)`` weights (else a slice of them)."""
        for row in self.rows:
            if row.data_ptr() == weights.data_ptr() and row.shape == weights[:, :, -1].shape:
                return row  # (N, heads, K)
        return weights[:, :, -1]  # (N, heads, K)
