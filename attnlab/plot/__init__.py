"""Pictures of a :class:`~attnlab.trace.CaptionTrace`: where the model looked for each word.

The package, by concept:

* :mod:`attnlab.plot.maps`: the numbers (numpy only): patch maps, resizing,
  colour scales, entropy and peaks, the words-to-patches matrix.
* :mod:`attnlab.plot.resolve`: one check of every view's arguments.
* :mod:`attnlab.plot.draw`: layout and drawing pieces shared by the figures and the explorer.
* :mod:`attnlab.plot.views`: the figures, one function per view.
* :mod:`attnlab.plot.encoder`: a ViT encoder's self-attention (CLS row vs word rows, one patch's row, rollout).
* :mod:`attnlab.plot.export`: PNG, SVG, PDF and GIF files; :mod:`attnlab.plot.html`: the static HTML explorer.

Every view takes a trace plus keyword options, checks them (raising
:class:`~attnlab.errors.AttnlabError` with one line that says what to do),
then draws and returns a :class:`matplotlib.figure.Figure`. See
:mod:`attnlab.plot.views` for the options they share (``scale``, ``interp``,
``grid_lines``, ``font_scale``, ...).
"""

from __future__ import annotations

from .encoder import cls_vs_words, patch_attention, rollout_map
from .export import save_figure, save_gif
from .html import export_html
from .maps import attention_map, default_steps, head_entropy, head_peak, word_matrix
from .resolve import DEFAULT_ALPHA, DEFAULT_CMAP
from .views import (
    attention_matrix,
    attention_row,
    head_grid,
    head_stats,
    layer_head_grid,
    matrix_row,
    overlay,
    word_grid,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_CMAP",
    "attention_map",
    "attention_matrix",
    "attention_row",
    "cls_vs_words",
    "default_steps",
    "export_html",
    "head_entropy",
    "head_grid",
    "head_peak",
    "head_stats",
    "layer_head_grid",
    "matrix_row",
    "overlay",
    "patch_attention",
    "rollout_map",
    "save_figure",
    "save_gif",
    "word_grid",
    "word_matrix",
]
