"""Scoped capture of per-head attention weights from any PyTorch model.

``with capture_attention(model) as cap: model(x)`` records, for every
``torch.nn.MultiheadAttention`` and every timm attention block whose qualified
name matches ``include``, the weights of each call as ``(N, heads, L, S)``:
``cap.weights[name]`` is a list with one tensor per call.

How it sees what plain hooks miss:
* ``nn.MultiheadAttention`` called with ``need_weights=False`` or with the
  default head-averaged weights: a forward pre-hook asks for per-head weights,
  a forward hook stores them and hands the caller exactly what it asked for.
* ``nn.TransformerEncoderLayer`` in eval mode runs a fused kernel that never
  calls its attention module: the fast path is switched off while capturing
  (``torch.backends.mha.set_fastpath_enabled``) and switched back on exit.
* timm blocks built with fused attention (``F.scaled_dot_product_attention``):
  ``fused_attn`` is set to False inside the block, and a hook on its
  ``attn_drop`` reads the softmax weights.
Everything is undone when the ``with`` block ends, also on exceptions.
"""

from __future__ import annotations

import fnmatch
import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import AttnlabError

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class AttentionCapture:
    """What a :func:`capture_attention` block recorded.

    ``weights[name]``: one tensor ``(N, heads, L, S)`` per call of the module
    ``name`` (``L`` queries, ``S`` keys; unbatched calls get ``N = 1``).
    """

    weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, list[dict[str, tuple[int, ...]]]] = field(default_factory=dict)
    """``shapes[name]``: per call of an ``nn.MultiheadAttention``, the shapes the
    caller passed and got back: ``query``, ``key``, ``value``, ``output`` and
    ``weights`` (the weights as the caller received them; ``None`` if it asked
    for none). The bookkeeping of the notebooks reads these."""

    @property
    def names(self) -> list[str]:
        """Qualified names of the captured modules, in model order."""
        return list(self.weights)

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        return self.weights[name]

    def last(self, name: str) -> torch.Tensor:
        """The weights of the most recent call of ``name``: ``(N, heads, L, S)``."""
        calls = self.weights[name]
        if not calls:
            raise AttnlabError(f"{name} was not called inside the capture block")
        return calls[-1]

    def clear(self) -> None:
        for calls in (*self.weights.values(), *self.shapes.values()):
            calls.clear()


def _is_timm_attention(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module :func:`capture_attention` can capture: qualified name -> module."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) or _is_timm_attention(m)
    }


def _match(name: str, include: Sequence[str] | None) -> bool:
    return include is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in include)


def _hook_mha(
    stack: ExitStack,
    module: nn.MultiheadAttention,
    store: list[torch.Tensor],
    shapes: list[dict[str, tuple[int, ...] | None]],
    detach: bool,
) -> None:
    asked: list[tuple[bool, bool]] = []  # what each pending caller asked for: (need_weights, average)

    def pre_hook(mod, args, kwargs):
        bound = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        asked.append((bool(call["need_weights"]), bool(call["average_attn_weights"])))
        call["need_weights"] = True
        call["average_attn_weights"] = False
        query, key, value = call.pop("query"), call.pop("key"), call.pop("value")
        return (query, key, value), call

    def hook(mod, args, kwargs, output):
        need_weights, average = asked.pop()
        out, weights = output
        per_head = weights if weights.dim() == 4 else weights.unsqueeze(0)  # (N, heads, L, S)
        store.append(per_head.detach() if detach else per_head)
        given = None if not need_weights else (weights.mean(dim=-3) if average else weights)
        query, key, value = args
        shapes.append(
            {
                "query": tuple(query.shape),
                "key": tuple(key.shape),
                "value": tuple(value.shape),
                "output": tuple(out.shape),
                "weights": None if given is None else tuple(given.shape),
            }
        )
        return out, given

    stack.callback(module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
    # prepend: forward hooks run in the reverse order of the pre-hooks, so in nested
    # captures the inner one sees the per-head output its pre-hook asked for and the
    # outer one (whose pre-hook saw the caller's arguments) restores what the caller asked
    stack.callback(module.register_forward_hook(hook, with_kwargs=True, prepend=True).remove)


def _hook_timm(stack: ExitStack, module: nn.Module, store: list[torch.Tensor], detach: bool) -> None:
    old = module.fused_attn
    module.fused_attn = False
    stack.callback(setattr, module, "fused_attn", old)

    def hook(mod, args):
        weights = args[0]  # (B, heads, N, N) softmax output, before dropout
        store.append(weights.detach() if detach else weights)

    stack.callback(module.attn_drop.register_forward_pre_hook(hook).remove)


_FASTPATH_LOCK = threading.Lock()
_fastpath_users = 0  # open capture blocks, in every thread
_fastpath_before: bool | None = None  # the setting before the first of them


@contextmanager
def _fastpath_off() -> Iterator[None]:
    """Switch torch's fused MHA fast path off while any capture block is open.

    The flag is process-wide: blocks in several threads share it, counted, so it
    comes back to what it was only when the last block closes.
    """
    global _fastpath_users, _fastpath_before
    with _FASTPATH_LOCK:
        if _fastpath_users == 0:
            _fastpath_before = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _fastpath_users += 1
    try:
        yield
    finally:
        with _FASTPATH_LOCK:
            _fastpath_users -= 1
            if _fastpath_users == 0:
                torch.backends.mha.set_fastpath_enabled(bool(_fastpath_before))


@contextmanager
def capture_attention(
    model: nn.Module, include: str | Sequence[str] | None = None, *, detach: bool = True
) -> Iterator[AttentionCapture]:
    """Record per-head attention weights inside a ``with`` block.

    Args:
        model: any ``nn.Module``.
        include: glob pattern(s) over qualified module names, e.g.
            ``"transformer.decoder.layers.*.multihead_attn"``; ``None`` = all.
        detach: store detached tensors (default); ``False`` keeps the graph so
            gradients can flow through the weights.

    Yields an :class:`AttentionCapture`. Raises :class:`AttnlabError` when no
    attention module matches ``include`` (the message lists some that exist).
    """
    patterns = [include] if isinstance(include, str) else include
    found = attention_modules(model)
    chosen = {n: m for n, m in found.items() if _match(n, patterns)}
    if not chosen:
        if not found:
            raise AttnlabError(
                f"{type(model).__name__} has no nn.MultiheadAttention or timm attention module to capture"
            )
        examples = ", ".join(list(found)[:4])
        raise AttnlabError(f"no attention module matches {include!r}; modules that exist: {examples}, ...")
    cap = AttentionCapture({name: [] for name in chosen}, {name: [] for name in chosen})
    with ExitStack() as stack:
        stack.enter_context(_fastpath_off())
        for name, module in chosen.items():
            if isinstance(module, nn.MultiheadAttention):
                _hook_mha(stack, module, cap.weights[name], cap.shapes[name], detach)
            else:
                _hook_timm(stack, module, cap.weights[name], detach)
        yield cap
