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
* Hand-written attention (plain tensor code): name the ``nn.Dropout`` applied
  to the softmax output (``include="h.*.attn.attn_dropout"``: the last part of
  the pattern must be literal) or insert an :class:`~attnlab.tap.AttentionTap`
  (``att = self.tap(att)``); the input is recorded, per-head ``(N, heads, L, S)``,
  single-head ``(N, L, S)`` or merged ``(N * heads, L, S)`` (``AttentionTap(num_heads=h)``).
Everything is undone when the ``with`` block ends, also on exceptions.

Handing weights back (``substitute=``, for gradients): a function
``(name, weights (N, heads, L, S)) -> weights'`` (same shape) whose answer the
module goes on with instead of its own weights, and which is what is recorded.
A tap, dropout or timm block is handed ``weights'`` as its input; an
``nn.MultiheadAttention`` (whose softmax sits inside one torch function, out of
any hook's reach) gets its output recomputed from ``weights'`` with its own
value and output projections (:func:`mha_output`). With ``substitute=lambda n, w: w``
a recorded tensor is one the model multiplied with its values, so gradients
with respect to it are defined even where the module's own weights are a view
made after use (``nn.MultiheadAttention``'s). :func:`attnlab.wrap` uses this to
let explanation methods differentiate through wrapped models.
"""

from __future__ import annotations

import fnmatch
import inspect
import reprlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AttnlabError
from .tap import AttentionTap

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
Substitute = Callable[[str, torch.Tensor], torch.Tensor]


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
    """Every module :func:`capture_attention` captures by default: qualified name -> module
    (``nn.MultiheadAttention``, timm attention blocks, :class:`~attnlab.tap.AttentionTap`)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.MultiheadAttention, AttentionTap)) or _is_timm_attention(m)
    }


def _match(name: str, include: Sequence[str] | None) -> bool:
    return include is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in include)


def _named_dropouts(model: nn.Module, include: Sequence[str] | None) -> dict[str, nn.Module]:
    """``nn.Dropout`` modules named by a pattern whose last component has no wildcard,
    e.g. ``"h.*.attn.attn_dropout"``: the dropout after a hand-written softmax, whose
    input is the attention weights. (Broad patterns never pick up dropouts.)"""
    if include is None:
        return {}
    exact_tail = [p for p in include if not any(ch in p.rsplit(".", 1)[-1] for ch in "*?[")]
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Dropout) and any(fnmatch.fnmatchcase(name, p) for p in exact_tail)
    }


def _hook_input(
    stack: ExitStack, name: str, module: nn.Module, store: list[torch.Tensor], detach: bool, heads: int | None,
    substitute: Substitute | None,
) -> None:
    """Record the input of a tap or dropout as ``(N, heads, L, S)`` (and hand the module ``substitute``'s answer)."""

    def hook(mod, args):
        given = args[0]
        if given.dim() == 3:  # (N * heads, L, S) merged, or (N, L, S) single-head
            w = given.unflatten(0, (-1, heads)) if heads else given.unsqueeze(1)  # (N, heads, L, S)
        elif given.dim() == 4:
            w = given  # (N, heads, L, S)
        else:
            raise AttnlabError(f"attention weights at a tap must be 3-D or 4-D, not {tuple(given.shape)}")
        if substitute is None:
            store.append(w.detach() if detach else w)
            return None
        new = _substituted(substitute, name, w)  # (N, heads, L, S)
        store.append(new.detach() if detach else new)
        if given.dim() == 4:
            back = new
        else:  # the caller's own layout
            back = new.flatten(0, 1) if heads else new[:, 0]  # (N * heads, L, S) or (N, L, S)
        return (back, *args[1:])

    stack.callback(module.register_forward_pre_hook(hook).remove)


def _substituted(substitute: Substitute, name: str, w: torch.Tensor) -> torch.Tensor:
    new = substitute(name, w)
    if not isinstance(new, torch.Tensor) or new.shape != w.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise AttnlabError(f"substitute() gave {got} for {name}'s weights {tuple(w.shape)}: it must keep their shape")
    return new


def mha_output(module: nn.MultiheadAttention, weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What ``module`` outputs when its per-head weights are ``weights`` ``(N, heads, L, S)``:
    the value projection of ``value`` (the module's input, in its own layout), the weighted sum
    per head, the heads joined, the output projection; ``(L, N, E)``, ``(N, L, E)`` with
    ``batch_first``, or ``(L, E)`` for an unbatched ``value`` ``(S, E)``.

    Eval-mode only (no dropout); modules with ``add_bias_kv`` or ``add_zero_attn`` (extra keys) are refused.
    """
    if module.bias_v is not None or module.add_zero_attn:
        raise AttnlabError("weights cannot be handed to an nn.MultiheadAttention with add_bias_kv or add_zero_attn (its keys are not the inputs)")
    if module.training and module.dropout > 0:
        raise AttnlabError("weights can be handed to an nn.MultiheadAttention in eval mode only (its dropout is on)")
    batched = value.dim() == 3
    v = value if batched else value.unsqueeze(1)  # (S, N, E_v) (or (N, S, E_v) batch_first)
    if not (module.batch_first and batched):
        v = v.transpose(0, 1)  # (N, S, E_v)
    e, heads = module.embed_dim, module.num_heads
    w_v = module.in_proj_weight[2 * e :] if module._qkv_same_embed_dim else module.v_proj_weight  # (E, E_v)
    b_v = None if module.in_proj_bias is None else module.in_proj_bias[2 * e :]  # (E,)
    n, s = v.shape[:2]
    vals = F.linear(v, w_v, b_v).view(n, s, heads, e // heads).transpose(1, 2)  # (N, heads, S, Dh)
    mixed = weights.to(vals.dtype) @ vals  # (N, heads, L, Dh)
    length = mixed.shape[2]
    out = F.linear(mixed.transpose(1, 2).reshape(n, length, e), module.out_proj.weight, module.out_proj.bias)  # (N, L, E)
    if not batched:
        return out[0]  # (L, E)
    return out if module.batch_first else out.transpose(0, 1)  # (N, L, E) or (L, N, E)


def _hook_mha(
    stack: ExitStack,
    name: str,
    module: nn.MultiheadAttention,
    store: list[torch.Tensor],
    shapes: list[dict[str, tuple[int, ...] | None]],
    detach: bool,
    substitute: Substitute | None,
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
        query, key, value = args
        per_head = weights if weights.dim() == 4 else weights.unsqueeze(0)  # (N, heads, L, S)
        if substitute is not None:
            per_head = _substituted(substitute, name, per_head)  # (N, heads, L, S)
            out = mha_output(mod, per_head, value)  # the output of the handed-over weights
            weights = per_head if weights.dim() == 4 else per_head[0]
        store.append(per_head.detach() if detach else per_head)
        given = None if not need_weights else (weights.mean(dim=-3) if average else weights)
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


def _hook_timm(stack: ExitStack, name: str, module: nn.Module, store: list[torch.Tensor], detach: bool, substitute: Substitute | None) -> None:
    old = module.fused_attn
    module.fused_attn = False
    stack.callback(setattr, module, "fused_attn", old)

    def hook(mod, args):
        weights = args[0]  # (B, heads, N, N) softmax output, before dropout
        if substitute is not None:
            weights = _substituted(substitute, name, weights)  # (B, heads, N, N)
        store.append(weights.detach() if detach else weights)
        return None if substitute is None else (weights, *args[1:])

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
    model: nn.Module, include: str | Sequence[str] | None = None, *, detach: bool = True, substitute: Substitute | None = None
) -> Iterator[AttentionCapture]:
    """Record per-head attention weights inside a ``with`` block.

    Args:
        model: any ``nn.Module``.
        include: glob pattern(s) over qualified module names, e.g.
            ``"transformer.decoder.layers.*.multihead_attn"``; ``None`` = all.
        detach: store detached tensors (default); ``False`` keeps the graph so
            gradients can flow through the weights.
        substitute: optional ``(name, weights (N, heads, L, S)) -> weights'``:
            the module goes on with ``weights'`` (same shape), which is also
            what is recorded (see the module docstring).

    Yields an :class:`AttentionCapture`. Raises :class:`AttnlabError` when no
    attention module matches ``include`` (the message lists some that exist).
    """
    patterns = [include] if isinstance(include, str) else include
    if patterns is not None and (
        not isinstance(patterns, Sequence) or isinstance(patterns, bytes) or not all(isinstance(p, str) for p in patterns)
    ):
        raise AttnlabError(
            f"include={reprlib.repr(include)} is not a glob pattern: pass a string such as 'transformer.decoder.layers.*.multihead_attn', a list of them, or None"
        )
    found = attention_modules(model)
    chosen = {n: m for n, m in found.items() if _match(n, patterns)}
    chosen.update(_named_dropouts(model, patterns))
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
                _hook_mha(stack, name, module, cap.weights[name], cap.shapes[name], detach, substitute)
            elif isinstance(module, (AttentionTap, nn.Dropout)):
                _hook_input(stack, name, module, cap.weights[name], detach, getattr(module, "num_heads", None), substitute)
            else:
                _hook_timm(stack, name, module, cap.weights[name], detach, substitute)
        yield cap
