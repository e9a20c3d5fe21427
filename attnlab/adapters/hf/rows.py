"""Attention rows under the model's own attention implementation, without eager.

:func:`capture_rows` switches the language model's attention implementation to a
function registered, for the duration of the ``with`` block, in transformers'
attention-function registry (``AttentionInterface``) and its mask registry
(``AttentionMaskInterface``). That function calls the original implementation (sdpa or
eager) with exactly the arguments it was given, so the layer's output is the one the
user's model computes, bit for bit, and the mask is built by the original mask function.
Beside it, it computes ``softmax(q k^T * scaling + mask)`` for the LAST query position
only (the prefill's last prompt position, or the one new token of a cached step), from the
query/key states the layer already has: ``(B, heads, K)`` per layer and call, never
``T x T``.

Why the registry and not a patched forward: the registry is the one place every
transformers >= 5 decoder (Qwen2/2.5/3-VL, Llama under LLaVA) hands its attention to, with
the post-RoPE query, the cached keys, the layer's own ``scaling`` and the mask it built, so
one small function serves every family, the forward code (RoPE variants, q/k norms,
DeepStack) stays the model's, and undoing it is restoring one config attribute per
sub-config and deleting the registered name.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ...errors import AttnlabError

SUPPORTED = ("sdpa", "eager")
_names = itertools.count()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise AttnlabError(
            "vision-language models need transformers >= 5: pip install \"attnlab[hf]\" (or pip install -U transformers)"
        ) from None
    return transformers


def language_model(model: Any) -> Any:
    """The decoder of a vision-language model (``model.model.language_model`` in transformers 5)."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise AttnlabError(
            f"{type(model).__name__} has no model.language_model with layers: capture_rows supports transformers >= 5 "
            "vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA, LLaVA-NeXT)"
        )
    return lm


def probabilities(module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                  scaling: float | None, kwargs: dict, rows: slice = slice(None)) -> torch.Tensor:
    """``softmax(q k^T * scaling + mask)`` of the query positions ``rows``: ``(B, heads, R, K)``, float32.

    The one place attnlab recomputes an attention layer's weights from the states it was handed (the
    rows of a step, :func:`last_row`; every row of a teacher-forced pass, :mod:`.sequence`): GQA without
    repeating keys (head = kv head * groups + g), the layer's ``scaling`` and ``softcap``, the mask it built
    (or, without one, sdpa's upper-left aligned causal rule)."""
    if kwargs.get("s_aux") is not None:
        raise AttnlabError("attention sinks (s_aux) are not supported by attnlab; use a model without them")
    b, heads, q_len, d = query.shape  # (B, heads, T, d)
    kv_heads, k_len = key.shape[1], key.shape[2]
    pos = torch.arange(q_len, device=query.device)[rows]  # (R,) the query positions computed
    q = query[:, :, rows].float().reshape(b, kv_heads, heads // kv_heads, len(pos), d)  # (B, kv heads, groups, R, d)
    scale = scaling if scaling is not None else d**-0.5
    # in place after the product: one (heads, R, K) buffer for the scores, one for the softmax
    scores = torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)).mul_(scale)  # (B, kv heads, groups, R, K)
    scores = scores.reshape(b, heads, len(pos), k_len)  # (B, heads, R, K)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        m = mask[:, :, rows, :k_len]  # (B, 1 or heads, R, K)
        scores = scores.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else scores.add_(m.float())
    elif q_len > 1 and (kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)):
        above = torch.arange(k_len, device=query.device)[None, :] > pos[:, None]  # (R, K): keys after the query
        scores = scores.masked_fill_(above, float("-inf"))
    return torch.softmax(scores, dim=-1)  # (B, heads, R, K)


def last_row(module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
             scaling: float | None, kwargs: dict) -> torch.Tensor:
    """:func:`probabilities` of the last query position: ``(B, heads, K)``, float32."""
    return probabilities(module, query, key, mask, scaling, kwargs, slice(-1, None))[:, :, 0, :]  # (B, heads, K)


class RowCapture:
    """The rows recorded so far: ``rows[layer][call]`` is ``(B, heads, K)`` (float32, on the CPU)."""

    def __init__(self, layers: int) -> None:
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    @property
    def calls(self) -> int:
        """How many forward calls every layer has recorded (prefill + cached steps; the fewest over the layers)."""
        return min((len(r) for r in self.rows), default=0)

    def clear(self) -> None:
        """Forget the recorded rows (the layers stay)."""
        for r in self.rows:
            r.clear()


def _wrapper(capture: RowCapture, call: Callable, index: dict[int, int]) -> Callable:
    """The registered function: the original implementation's output, and the last row recorded for the
    modules in ``index`` (``id(module)`` -> its list of rows); other modules that share their config (an
    encoder's self-attention beside a decoder's cross-attention) pass through unrecorded."""

    def attnlab_rows(module, query, key, value, attention_mask, *args, **kwargs):
        out = call(module, query, key, value, attention_mask, *args, **kwargs)
        at = index.get(id(module))
        if at is not None:
            with torch.no_grad():
                row = last_row(module, query.detach(), key.detach(), attention_mask, kwargs.get("scaling"), kwargs)
            capture.rows[at].append(row.cpu())
        return out

    return attnlab_rows


def attention_modules(model: Any) -> list[Any]:
    """The attention modules whose rows are a word's rows over the prompt: the language model's ``self_attn``."""
    return [layer.self_attn for layer in language_model(model).layers]


@contextlib.contextmanager
def switched_attention(model: Any, make: Callable[[Callable], Callable], modules: list[Any] | None = None) -> Iterator[list[Any]]:
    """Route the attention of ``modules`` (default :func:`attention_modules`) through ``make(call)``.

    ``call(module, query, key, value, attention_mask, *args, **kwargs)`` is the original
    implementation (``sdpa`` or ``eager``), unchanged; ``make(call)`` returns the function
    registered, for the block only, under a fresh name in transformers' attention and mask
    registries (the mask is the original's). Every config's setting and both registries are
    restored on exit, exceptions included. Yields the modules, numbered 0..n-1 by ``layer_idx``.
    """
    tf = _transformers()
    from transformers.masking_utils import AttentionMaskInterface

    attn = attention_modules(model) if modules is None else list(modules)
    if not attn:
        raise AttnlabError(f"{type(model).__name__} has no attention modules to record")
    configs = {id(c): c for c in [a.config for a in attn]}
    if modules is None:
        configs.setdefault(id(language_model(model).config), language_model(model).config)
    originals = {key: c._attn_implementation for key, c in configs.items()}
    if len(set(originals.values())) != 1 or next(iter(originals.values())) not in SUPPORTED:
        found = sorted({str(v) for v in originals.values()})
        raise AttnlabError(
            f"capture_rows needs the language model's attention implementation to be one of {', '.join(SUPPORTED)} "
            f"(found {', '.join(found)}): load the model with attn_implementation=\"sdpa\""
        )
    original = next(iter(originals.values()))
    if [a.layer_idx for a in attn] != list(range(len(attn))):
        raise AttnlabError(f"{type(model).__name__}: decoder layers are not numbered 0..n-1; capture_rows cannot record them")
    modeling = sys.modules[type(attn[0]).__module__]
    eager_default = getattr(modeling, "eager_attention_forward", None)
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", tf.AttentionInterface())  # a family may override locally
    if original == "eager" and eager_default is None:
        raise AttnlabError(f"{type(attn[0]).__name__} has no eager_attention_forward; load the model with attn_implementation=\"sdpa\"")
    call = eager_default if original == "eager" else interface[original]
    name = f"attnlab_rows_{next(_names)}"
    masks = AttentionMaskInterface._global_mapping
    functions = tf.AttentionInterface._global_mapping
    functions[name] = make(call)
    masks[name] = masks[original]
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield attn
    finally:
        for key, c in configs.items():
            c._attn_implementation = originals[key]
        functions.pop(name, None)
        masks.pop(name, None)


@contextlib.contextmanager
def capture_rows(model: Any, modules: list[Any] | None = None) -> Iterator[RowCapture]:
    """Record the last query row of every layer of ``modules`` (default: the language model's) on every forward.

    The attention implementation (``sdpa`` or ``eager``) is switched by :func:`switched_attention`
    to a function that calls the original one unchanged and records the row beside it. Yields a
    :class:`RowCapture`.
    """
    capture = None

    def make(call: Callable) -> Callable:
        return _wrapper(capture, call, {id(a): i for i, a in enumerate(attn)})

    attn = attention_modules(model) if modules is None else list(modules)
    capture = RowCapture(len(attn))
    with switched_attention(model, make, modules):
        yield capture
