"""Attention statistics over many traces: where a model looks, word by word, across a data set.

:func:`aggregate` reads the traces below a folder (for example the merged
output folder of several ``--shard`` runs), one at a time so memory stays
flat, and returns :class:`FolderStats`:

* ``maps``: per word (or per word class, with ``group=``) the mean attention
  map of one decoder layer, averaged over heads, in **normalised image
  coordinates**: each map is spread over the image (its patch grid covers the
  image the model saw) and summed by area onto one ``R x C`` grid running from
  0 to 1 across and down, so images of any size and grid can be averaged. The
  values are a density: 1 is what uniform attention over the image gives a
  cell, 2 twice that. (Weight on prefix keys such as a CLS token is not on the
  image: with prefix keys a map averages below 1.)
* ``entropy`` ``(layers, heads)``: the mean over all steps of each map's
  entropy divided by ``log(S)`` (``S`` patches): 0 = all weight on one patch,
  1 = uniform over the image. The map is renormalised over the patches first.
* ``border`` ``(layers, heads)``: how often each head's peak (its heaviest
  patch) lies on the image border (first or last row or column of the grid),
  next to ``border_share``: how often a peak on a random patch would.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AttnlabError
from .trace import CaptionTrace


@dataclass
class WordMap:
    """The mean map of one word (or word class) over every step that wrote it."""

    key: str
    count: int  # steps averaged
    density: np.ndarray  # (R, C) mean attention density over the image, 1 = uniform


@dataclass
class FolderStats:
    """What :func:`aggregate` found (see the module docstring)."""

    traces: int
    steps: int
    layer: int  # the decoder layer of ``maps`` (non-negative)
    size: tuple[int, int]  # (R, C) of every map
    maps: dict[str, WordMap] = field(default_factory=dict)
    entropy: np.ndarray | None = None  # (layers, heads) mean normalised entropy, 0..1
    border: np.ndarray | None = None  # (layers, heads) share of steps whose peak is on the border
    border_share: float = 0.0  # share of patches on the border (a random peak's chance), mean over steps

    def top(self, n: int = 10) -> list[WordMap]:
        """The ``n`` most frequent words (or classes), most frequent first."""
        return sorted(self.maps.values(), key=lambda m: (-m.count, m.key))[:n]

    def summary(self) -> str:
        """A few lines of text: counts, and per layer the heads' entropy and border rate."""
        lines = [
            f"{self.traces} traces, {self.steps} steps; maps of layer {self.layer} (mean of heads) on a "
            f"{self.size[0]} x {self.size[1]} grid over the image (density: 1 = uniform)"
        ]
        if self.entropy is not None and self.border is not None:
            heads = self.entropy.shape[1]
            lines.append("entropy / log(S) per head (0 = one patch, 1 = uniform):")
            lines += [f"  layer {li}: " + " ".join(f"{v:.2f}" for v in row) for li, row in enumerate(self.entropy)]
            lines.append(f"peak on the border, share of steps per head (random patch: {self.border_share:.2f}):")
            lines += [f"  layer {li}: " + " ".join(f"{v:.2f}" for v in row) for li, row in enumerate(self.border)]
            lines.append(f"({heads} heads per layer, head 0 first)")
        return "\n".join(lines)


# ---------------------------------------------------------------------- maps on a common grid
@functools.lru_cache(maxsize=128)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)``: the share of input cell ``i`` lying in output cell ``o`` (cells split [0, 1] evenly)."""
    edges_in = np.arange(n_in + 1) / n_in  # (n_in + 1,)
    edges_out = np.arange(n_out + 1) / n_out  # (n_out + 1,)
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])  # (n_out, n_in)
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])  # (n_out, n_in)
    m = np.clip(hi - lo, 0.0, None) * n_in  # (n_out, n_in); each column sums to 1
    m.setflags(write=False)
    return m


def normalised_map(grid_map: np.ndarray, size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A patch map ``(H, W)`` as a density ``(R, C)`` over the image in normalised coordinates.

    Patch ``(i, j)`` covers ``[j / W, (j + 1) / W]`` across and ``[i / H, (i + 1) / H]``
    down; its weight is spread evenly over that area and summed into the output
    cells, then divided by a cell's share of the image (so uniform weight summing
    to 1 gives 1 everywhere).
    """
    g = np.asarray(grid_map, dtype=np.float64)
    if g.ndim != 2:
        raise AttnlabError(f"a patch map is (H, W), not {g.shape}")
    rows, cols = size
    mass = _area_matrix(g.shape[0], rows) @ g @ _area_matrix(g.shape[1], cols).T  # (R, C) weight per cell
    return mass * (rows * cols)  # (R, C) density: weight / cell area


# ---------------------------------------------------------------------- reading
def trace_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.npz`` files below ``folder`` (subfolders too), sorted; hidden ones left out."""
    root = Path(folder)
    if not root.is_dir():
        raise AttnlabError(f"no folder at {root}: give the --out folder of attnlab caption")
    files = sorted(p for p in root.rglob("*.npz") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise AttnlabError(f"no traces (.npz) below {root}: caption a folder into it first (attnlab caption DIR --out {root})")
    return files


def iter_traces(folder: str | os.PathLike) -> Iterator[CaptionTrace]:
    """The traces below ``folder``, loaded one at a time."""
    for path in trace_files(folder):
        yield CaptionTrace.load(path)


# ---------------------------------------------------------------------- aggregation
def _check_size(size: Any) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in size)
    except (TypeError, ValueError):
        raise AttnlabError(f"size must be (rows, columns), not {size!r}") from None
    if not (1 <= rows <= 1024 and 1 <= cols <= 1024):
        raise AttnlabError(f"size must be (rows, columns) from 1 to 1024, not {size!r}")
    return rows, cols


def aggregate(
    source: str | os.PathLike | Iterable[CaptionTrace],
    *,
    layer: int = -1,
    size: tuple[int, int] = (16, 16),
    group: Callable[[str], str | None] | None = None,
) -> FolderStats:
    """Attention statistics over a folder of traces (or any iterable of traces).

    Args:
        source: a folder (read recursively: merge shards by captioning them into
            one ``--out`` folder) or an iterable of :class:`CaptionTrace`.
        layer: the decoder layer whose head-averaged maps are averaged per word.
        size: ``(rows, columns)`` of the common grid of ``maps``.
        group: maps a word to the key it is averaged under (e.g.
            :func:`attnlab.shapes.word_class`: "colour", "shape", ...); ``None``
            keys by the word itself; a key of ``None`` leaves the word out.

    Every trace must come from one model (same layers and heads); one without
    attention is refused.
    """
    size = _check_size(size)
    traces = iter_traces(source) if isinstance(source, (str, os.PathLike)) else source
    acc = _Totals(layer, size, group)
    for trace in traces:
        acc.add(trace)
    return acc.result()


def _map_statistics(ca: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Of every map of ``ca`` ``(layers, heads, steps, H, W)``: summed over steps, its entropy over
    log(S) and whether its peak patch is on the grid's border; and the border's share of the grid times steps."""
    layers, heads, steps, h, w = ca.shape
    # entropy of every map, renormalised over its S patches, over log(S)
    p = ca.reshape(layers, heads, steps, h * w)  # (layers, heads, steps, S)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # (layers, heads, steps, S)
    entropy = (-plogp.sum(-1) / np.log(h * w)).sum(-1) if h * w > 1 else np.zeros((layers, heads))  # (layers, heads)
    # the peak patch of every map, and whether it is on the border of the grid
    peak = p.argmax(-1)  # (layers, heads, steps)
    row, col = peak // w, peak % w
    on_border = (row == 0) | (row == h - 1) | (col == 0) | (col == w - 1)  # (layers, heads, steps)
    inner = max(h - 2, 0) * max(w - 2, 0)
    return entropy, on_border.sum(-1), steps * (1.0 - inner / (h * w))


class _Totals:
    """The running sums of :func:`aggregate`, one trace at a time."""

    def __init__(self, layer: int, size: tuple[int, int], group: Callable[[str], str | None] | None) -> None:
        self.layer, self.size, self.group = layer, size, group
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.entropy = self.border = None  # (layers, heads) sums over steps
        self.border_share = 0.0
        self.n_traces = self.n_steps = 0
        self.shape: tuple[int, int] | None = None
        self.chosen = 0

    def _check_model(self, trace: CaptionTrace, layers: int, heads: int) -> None:
        if self.shape is None:
            self.shape = (layers, heads)
            if not -layers <= self.layer < layers:
                raise AttnlabError(f"layer {self.layer} does not exist: the decoder has {layers} layers")
            self.chosen = self.layer % layers
            self.entropy, self.border = np.zeros(self.shape), np.zeros(self.shape)
        elif self.shape != (layers, heads):
            raise AttnlabError(
                f"the traces mix models: {trace.model_name!r} ({trace.caption!r}) has {layers} layers x {heads} heads, "
                f"earlier ones {self.shape[0]} x {self.shape[1]}; aggregate one model's traces at a time"
            )

    def add(self, trace: CaptionTrace) -> None:
        if trace.cross_attention is None:
            raise AttnlabError(f"a trace of {trace.model_name!r} ({trace.caption!r}) holds no attention: caption with record='cross'")
        ca = trace.cross_attention.astype(np.float64)  # (layers, heads, steps, H, W)
        layers, heads, steps = ca.shape[:3]
        self._check_model(trace, layers, heads)
        self.n_traces += 1
        self.n_steps += steps
        entropy, border, border_share = _map_statistics(ca)
        self.entropy += entropy
        self.border += border
        self.border_share += border_share
        # per word: this layer's head mean on the common grid
        mean = ca[self.chosen].mean(axis=0)  # (steps, H, W)
        for t, word in enumerate(trace.words):
            key = word if self.group is None else self.group(word)
            if key is None:
                continue
            d = normalised_map(mean[t], self.size)  # (R, C)
            if key in self.sums:
                self.sums[key] += d
                self.counts[key] += 1
            else:
                self.sums[key], self.counts[key] = d.copy(), 1

    def result(self) -> FolderStats:
        if self.shape is None:
            raise AttnlabError("no traces to aggregate")
        maps = {k: WordMap(k, self.counts[k], self.sums[k] / self.counts[k]) for k in self.sums}
        n = self.n_steps
        return FolderStats(traces=self.n_traces, steps=n, layer=self.chosen, size=self.size, maps=maps,
                           entropy=self.entropy / n, border=self.border / n, border_share=self.border_share / n)


# ---------------------------------------------------------------------- the figure
def word_maps(stats: FolderStats, keys: Sequence[str] | None = None, *, columns: int = 6, cmap: str = "magma"):
    """One panel per word (or class): its mean attention density over the normalised image.

    ``keys``: which words, in order (default: the 12 most frequent). All panels
    share one colour scale from 0, labelled on the colour bar (1 = uniform
    attention); each title gives the number of steps averaged.
    """
    import matplotlib.pyplot as plt

    if not isinstance(stats, FolderStats):
        raise AttnlabError(f"word_maps draws what attnlab.stats.aggregate returns, not a {type(stats).__name__}")
    keys = [m.key for m in stats.top(12)] if keys is None else list(keys)
    missing = [k for k in keys if k not in stats.maps]
    if missing or not keys:
        raise AttnlabError(f"no map for {missing or 'any word'}: the traces have {', '.join(sorted(stats.maps)) or 'none'}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise AttnlabError(f"columns must be a whole number >= 1, not {columns!r}")
    columns = min(columns, len(keys))
    rows = -(-len(keys) // columns)
    top = max(float(stats.maps[k].density.max()) for k in keys)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns + 1.6, 2.7 * rows + 0.6), squeeze=False, constrained_layout=True)
    for ax, key in zip(axes.flat, keys):
        m = stats.maps[key]
        im = ax.imshow(m.density, cmap=cmap, vmin=0.0, vmax=top, extent=(0, 1, 1, 0), interpolation="nearest")
        ax.set_title(f"{key}  (n={m.count})", fontsize=12)
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        ax.tick_params(labelsize=9)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(keys)]):
        if i + columns >= len(keys):  # the lowest panel of its column
            ax.set_xlabel("x / image width", fontsize=10)
    for ax in axes[:, 0]:
        ax.set_ylabel("y / image height", fontsize=10)
    bar = fig.colorbar(im, ax=axes, shrink=0.9 if rows > 1 else 1.0)
    bar.set_label("mean attention density\n(1 = uniform over the image)", fontsize=11)
    fig.suptitle(f"Where layer {stats.layer} looks per word (mean of heads, {stats.traces} images)", fontsize=13)
    return fig
