"""`CaptionTrace`: everything one captioning run produced, ready to plot or save."""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AttnlabError
from .fileio import atomic_write

TRACE_FORMAT = "attnlab-trace"
TRACE_VERSION = 1


def _is_index(x: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


@dataclass
class CaptionTrace:
    """The caption of one image and the attention behind every decoded token.

    Attributes:
        token_ids: ``(steps,)`` int64, the token emitted at each decoding step
            (greedy) or the given token (teacher forcing). The end token is kept
            when it was emitted.
        words: ``steps`` strings, the display form of each token (WordPiece
            continuations keep their ``##`` prefix, ``[SEP]`` marks the end).
        logits: ``(steps, vocab)`` float32, the scores that produced each token.
        cross_attention: ``(layers, heads, steps, H, W)`` float32, the
            words-to-patches weights of every decoder layer and head. Each
            ``[l, h, t]`` map sums to 1 over the image's patches. ``None`` when
            the run recorded nothing.
        grid: ``(H, W)`` the image's feature grid (H rows, W columns, S = H * W).
        image: ``(height, width, 3)`` uint8, the resized RGB image the model saw.
        model_name: which model made the trace.
        caption: the decoded text (special tokens dropped, WordPiece merged).
        encoder_self_attention: ``(layers, heads, S, S)`` (``record="all"`` only).
        decoder_self_attention: ``(layers, heads, steps, steps)``: row t is the
            attention of step t over steps 0..t (``record="all"`` only).
    """

    token_ids: np.ndarray
    words: list[str]
    logits: np.ndarray
    cross_attention: np.ndarray | None
    grid: tuple[int, int]
    image: np.ndarray
    model_name: str = "unknown"
    caption: str = ""
    encoder_self_attention: np.ndarray | None = None
    decoder_self_attention: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

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

    # ------------------------------------------ checks shared by every view
    def require_attention(self) -> np.ndarray:
        """``cross_attention`` ``(layers, heads, steps, H, W)``, or a one-line error when nothing was recorded."""
        if self.cross_attention is None:
            raise AttnlabError("this trace holds no attention: caption again with record='cross' or 'all'")
        return self.cross_attention

    def check_layer(self, i: Any) -> int:
        """Decoder layer ``i`` (negative counts from the end) as an index ``0..layers-1``, or a one-line error."""
        n = self.require_attention().shape[0]
        if not _is_index(i) or not -n <= int(i) < n:
            raise AttnlabError(f"layer {i!r} does not exist: the decoder has {n} layers (use 0..{n - 1} or -1 for the last)")
        return int(i) % n

    def check_head(self, h: Any) -> int | None:
        """Head ``h`` as an index ``0..heads-1``; ``"mean"`` (the average over heads) gives ``None``."""
        n = self.require_attention().shape[1]
        if isinstance(h, str) and h == "mean":
            return None
        if not _is_index(h) or not -n <= int(h) < n:
            raise AttnlabError(f"head {h!r} does not exist: the layer has {n} heads (use 0..{n - 1} or 'mean')")
        return int(h) % n

    def check_step(self, t: Any) -> int:
        """Decoding step ``t`` (negative counts from the end) as an index ``0..steps-1``, or a one-line error."""
        n = self.steps
        if not _is_index(t) or not -n <= int(t) < n:
            raise AttnlabError(f"step {t!r} does not exist: the trace has {n} steps (use 0..{n - 1})")
        return int(t) % n

    def layer(self, i: int) -> np.ndarray:
        """Cross-attention of decoder layer ``i`` (negative counts from the end): ``(heads, steps, H, W)``."""
        return self.require_attention()[self.check_layer(i)]

    def mean_heads(self) -> np.ndarray:
        """Cross-attention averaged over heads: ``(layers, steps, H, W)``."""
        return self.require_attention().mean(axis=1)

    def probabilities(self) -> np.ndarray:
        """Softmax probability of each step's token: ``(steps,)`` float32."""
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
        }
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps(header)),
            "token_ids": self.token_ids,
            "logits": self.logits,
            "image": self.image,
        }
        for name in ("cross_attention", "encoder_self_attention", "decoder_self_attention"):
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
                logits=arrays["logits"],
                cross_attention=arrays.get("cross_attention"),
                grid=tuple(header["grid"]),
                image=arrays["image"],
                model_name=header["model_name"],
                caption=header["caption"],
                encoder_self_attention=arrays.get("encoder_self_attention"),
                decoder_self_attention=arrays.get("decoder_self_attention"),
                meta=header.get("meta", {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise AttnlabError(f"{path} is a damaged attnlab trace ({type(exc).__name__}: {exc}); save it again") from None
