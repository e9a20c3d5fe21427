"""An interactive notebook explorer for a :class:`~attnlab.trace.CaptionTrace`.

``explore(trace)`` returns an ipywidgets ``VBox``: a slider over the decoded
words, dropdowns for layer and head, a toggle between the averaged view and a
per-head grid, sliders for opacity and smoothing, and a button that saves the
current figure.

The figure is plain matplotlib (Agg) rendered to PNG bytes in an
``ipywidgets.Image``, so it works in any browser without ipympl. The package:

* :mod:`~attnlab.explorer.canvas`: a figure redrawn by blitting (only the
  changing artists are drawn over saved pixels) and a fast PNG encoder;
* :mod:`~attnlab.explorer.views`: the averaged view and the per-head grid;
* :mod:`~attnlab.explorer.controls`: the widgets;
* :mod:`~attnlab.explorer.widget`: :class:`AttentionExplorer`, which ties them together.

The numbers come from :mod:`attnlab.plot.maps`, as in the static figures.
Colours: ``scale="shared"`` (default) uses one scale for every word of the
current layer and head, so the colours compare across the slider; the label
beside the slider gives each map's real peak weight.
"""

from __future__ import annotations

from .canvas import encode_png
from .controls import VIEW_AVERAGED, VIEW_GRID
from .widget import AttentionExplorer, default_save_name, explore

__all__ = ["AttentionExplorer", "VIEW_AVERAGED", "VIEW_GRID", "default_save_name", "encode_png", "explore"]
