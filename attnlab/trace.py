"""`CaptionTrace`: everything one captioning run produced, ready to plot or save."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AttnlabError
from .fileio import atomic_write

TRACE_FORMAT = "attnlab-trace"
TRACE_VERSION = 1


@dataclass
class CaptionTrace:
    """The caption of one image and the attention behind every decoded token.

    Attributes:
        token_ids: ``(steps,)`` int64, the token emitted at each decoding step
            (greedy) or the given token (teacher forcing). The end token is kept
            when it was emitted.
        words: ``steps`` strings, the display form of each token (WordPiece
            continuations keep their ``##`` prefix, ``[SEP]`` marks the end).
        logits: ``(steps, vocab)`` float32, the scores that produced each token
            (``None`` for traces built from weights alone: then no probabilities).
        cross_attention: ``(layers, heads, steps, H, W)`` float32, the raw
            words-to-patches weights of every decoder layer and head, on the
            patch keys only. Each ``[l, h, t]`` map sums to ``1 - prefix_share[l, h, t]``
            (to 1 when the model has no prefix keys): nothing is renormalised.
            ``None`` when the run recorded nothing.
        grid: ``(H, W)`` the image's feature grid (H rows, W columns, S = H * W).
        image: ``(height, width, 3)`` uint8, the resized RGB image the model saw.
        model_name: which model made the trace.
        caption: the decoded text (special tokens dropped, WordPiece merged).
        encoder_self_attention: ``(layers, heads, P + S, P + S)`` over the
            ``P = prefix_tokens`` prefix keys then the ``S = H * W`` patches
            (``record="all"`` only).
        decoder_self_attention: ``(layers, heads, steps, steps)``: row t is the
            attention of step t over steps 0..t (``record="all"`` only).
        prefix_tokens: how many leading keys of the model's cross-attention are
            not image patches (a ViT's CLS token, registers); 0 for CNN encoders.
        prefix_share: ``(layers, heads, steps)`` float32, each step's weight on
            those prefix keys (``None`` when there are none).
    """

    token_ids: np.ndarray
    words: list[str]
    logits: np.ndarray | None
    cross_attention: np.ndarray | None
    grid: tuple[int, int]
    image: np.ndarray
    model_name: str = "unknown"
    caption: str = ""
    encoder_self_attention: np.ndarray | None = None
    decoder_self_attention: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    prefix_tokens: int = 0
    prefix_share: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        self.words = [str(w) for w in self.words]
        steps = len(self.token_ids)
        if len(self.words) != steps:
            raise ValueError(f"{len(self.words)} words for {steps} tokens")
        if self.cross_attention is not None:
            ca = self.cross_attention
            if ca.ndim != 5 or ca.shape[2] != steps or tuple(ca.shape[3:]) != self.grid:
                raise ValueError(
                    f"cross_attention has shape {tuple(ca.shape)}, expected "
                    f"(layers, heads, {steps}, {self.grid[0]}, {self.grid[1]})"
                )

    # ------------------------------------------------------------------ views
    @property
    def steps(self) -> int:
        """Number of decoding steps (one per token, the end token included)."""
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        """Decoder layers in ``cross_attention`` (0 when nothing was recorded)."""
        return 0 if self.cross_attention is None else self.cross_attention.shape[0]

    @property
    def num_heads(self) -> int:
        """Attention heads per layer in ``cross_attention`` (0 when nothing was recorded)."""
        return 0 if self.cross_attention is None else self.cross_attention.shape[1]

    def _require_attention(self) -> np.ndarray:
        if self.cross_attention is None:
            raise AttnlabError("this trace holds no attention: caption again with record='cross' or 'all'")
        return self.cross_attention

    def layer(self, i: int) -> np.ndarray:
        """Cross-attention of decoder layer ``i`` (negative counts from the end): ``(heads, steps, H, W)``."""
        ca = self._require_attention()
        if not -ca.shape[0] <= i < ca.shape[0]:
            raise AttnlabError(f"layer {i} does not exist: the decoder has {ca.shape[0]} layers")
        return ca[i]

    def mean_heads(self) -> np.ndarray:
        """Cross-attention averaged over heads: ``(layers, steps, H, W)``."""
        return self._require_attention().mean(axis=1)

    def probabilities(self) -> np.ndarray | None:
        """Softmax probability of each step's token: ``(steps,)`` float32 (``None`` without logits)."""
        if self.logits is None:
            return None
        z = self.logits.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return p[np.arange(self.steps), self.token_ids].astype(np.float32)

    def __repr__(self) -> str:
        shape = None if self.cross_attention is None else tuple(self.cross_attention.shape)
        return (
            f"CaptionTrace(caption={self.caption!r}, steps={self.steps}, grid={self.grid}, "
            f"cross_attention={shape}, model={self.model_name!r})"
        )

    # ----------------------------------------------------------- construction
    @classmethod
    def from_attention(
        cls,
        words: Sequence[str],
        token_ids: Sequence[int] | np.ndarray,
        cross_attention: Any,
        grid: tuple[int, int],
        image: Any,
        *,
        logits: Any = None,
        prefix_tokens: int = 0,
        model_name: str = "unknown",
        caption: str | None = None,
        atol: float = 1e-3,
    ) -> "CaptionTrace":
        """A trace from weights you already hold (your own decoding loop, a saved run).

        Args:
            words, token_ids: one per decoding step (``steps``).
            cross_attention: array or tensor, one row per step over the keys
                ``K = prefix_tokens + H * W`` (prefix first, then the patches in
                row-major order): ``(layers, heads, steps, K)``, ``(heads, steps, K)``
                or ``(steps, K)``; or ``(layers, heads, steps, H, W)`` without prefix.
                Row ``i`` must be the query that predicted ``token_ids[i]``.
            grid: ``(H, W)`` patch rows and columns.
            image: the image the grid covers (path, PIL image or ``(h, w, 3)`` array).
            logits: optional ``(steps, vocab)`` scores (for probabilities in figures).
            prefix_tokens: leading non-patch keys (CLS, registers): split off, their
                weight kept as ``prefix_share``; nothing is renormalised.
            atol: rows summing to 1 within ``atol`` pass silently; others are kept
                as given with a warning that says how far off they are.
        """
        from .preprocess import load_image  # floor-1 neighbour; only this constructor needs it

        ids = np.asarray(token_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise AttnlabError(f"token_ids must be a 1-D list of integer ids, not {ids.dtype} of shape {ids.shape}")
        steps = len(ids)
        if len(words) != steps:
            raise AttnlabError(f"{len(words)} words for {steps} token ids: give one word per decoding step")
        try:
            gh, gw = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise AttnlabError(f"grid={grid!r} is not (rows, columns)") from None
        if gh < 1 or gw < 1:
            raise AttnlabError(f"grid={grid!r} must have at least one row and one column")
        if not isinstance(prefix_tokens, (int, np.integer)) or isinstance(prefix_tokens, bool) or prefix_tokens < 0:
            raise AttnlabError(f"prefix_tokens={prefix_tokens!r} must be an integer >= 0")
        ca = np.asarray(cross_attention.detach().cpu() if hasattr(cross_attention, "detach") else cross_attention, dtype=np.float32)
        keys = prefix_tokens + gh * gw
        if ca.ndim == 5:
            if prefix_tokens or tuple(ca.shape[3:]) != (gh, gw):
                raise AttnlabError(
                    f"cross_attention {ca.shape}: a 5-D array must be (layers, heads, steps, {gh}, {gw}) with prefix_tokens=0"
                )
            ca = ca.reshape(*ca.shape[:3], gh * gw)  # (layers, heads, steps, S)
        elif 2 <= ca.ndim <= 4:
            ca = ca.reshape((1,) * (4 - ca.ndim) + ca.shape)  # (layers, heads, steps, K)
        else:
            raise AttnlabError(f"cross_attention has shape {ca.shape}: expected (layers, heads, steps, K) or (steps, K)")
        if ca.shape[2] != steps or ca.shape[3] != keys:
            raise AttnlabError(
                f"cross_attention has shape {ca.shape} but {steps} steps and {prefix_tokens} prefix + "
                f"{gh}x{gw} patches = {keys} keys were given: row i must be step i's weights over all keys"
            )
        if not np.isfinite(ca).all() or (ca < 0).any():
            raise AttnlabError("cross_attention holds negative, NaN or infinite values: pass softmax weights")
        sums = ca.sum(axis=-1)  # (layers, heads, steps)
        if np.abs(sums - 1).max() > atol:
            warnings.warn(
                f"cross_attention rows sum to {sums.min():.3g}..{sums.max():.3g}, not 1: kept as given "
                "(did you drop prefix or padding keys, or pass pre-softmax scores?)",
                stacklevel=2,
            )
        share = ca[..., :prefix_tokens].sum(-1) if prefix_tokens else None  # (layers, heads, steps)
        patches = ca[..., prefix_tokens:].reshape(*ca.shape[:3], gh, gw)  # (layers, heads, steps, H, W)
        arr = logits
        if arr is not None:
            arr = np.asarray(arr.detach().cpu() if hasattr(arr, "detach") else arr, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != steps:
                raise AttnlabError(f"logits has shape {arr.shape}: expected ({steps}, vocab)")
        img = np.asarray(load_image(image))  # (h, w, 3) uint8
        return cls(
            token_ids=ids.astype(np.int64),
            words=list(words),
            logits=arr,
            cross_attention=np.ascontiguousarray(patches),
            grid=(gh, gw),
            image=img,
            model_name=model_name,
            caption=" ".join(words) if caption is None else caption,
            prefix_tokens=int(prefix_tokens),
            prefix_share=None if share is None else np.ascontiguousarray(share),
            meta={"mode": "from_attention"},
        )

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to a versioned ``.npz`` file (atomically); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        header = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "words": self.words,
            "grid": list(self.grid),
            "model_name": self.model_name,
            "caption": self.caption,
            "meta": self.meta,
            "prefix_tokens": self.prefix_tokens,
        }
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps(header)),
            "token_ids": self.token_ids,
            "image": self.image,
        }
        for name in ("logits", "cross_attention", "encoder_self_attention", "decoder_self_attention", "prefix_share"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CaptionTrace":
        """Read a trace written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise AttnlabError(f"no trace file at {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            header = json.loads(str(arrays.pop("header")))
        except Exception as exc:  # zipfile, json and numpy all raise their own types
            raise AttnlabError(f"{path} is not an attnlab trace file ({type(exc).__name__}); save one with CaptionTrace.save") from None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            raise AttnlabError(f"{path} is not an attnlab trace file")
        if header.get("version", 0) > TRACE_VERSION:
            raise AttnlabError(
                f"{path} was written by a newer attnlab (trace version {header['version']}); upgrade attnlab"
            )
        try:
            return cls(
                token_ids=arrays["token_ids"],
                words=header["words"],
                logits=arrays.get("logits"),
                cross_attention=arrays.get("cross_attention"),
                grid=tuple(header["grid"]),
                image=arrays["image"],
                model_name=header["model_name"],
                caption=header["caption"],
                encoder_self_attention=arrays.get("encoder_self_attention"),
                decoder_self_attention=arrays.get("decoder_self_attention"),
                meta=header.get("meta", {}),
                prefix_tokens=int(header.get("prefix_tokens", 0)),
                prefix_share=arrays.get("prefix_share"),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise AttnlabError(f"{path} is a damaged attnlab trace ({type(exc).__name__}: {exc}); save it again") from None
