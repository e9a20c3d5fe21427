"""Explanations of captions and how well they ground words: ``explain``, the grounding benchmark.

* :mod:`attnlab.explain.methods`: :func:`explain` (raw, layer_mean, best_head,
  rollout, grad_attn, relevance) for any captioner of the seam;
  :mod:`attnlab.explain.kinds`: each method as one object in one registry (``KINDS``).
* :mod:`attnlab.explain.sequence`: the methods on a captioner whose words attend over one
  sequence (vision-language models); :mod:`attnlab.explain.contrast`: ``contrast``, the word's
  attention divided by the attention under a neutral prompt.
* :mod:`attnlab.explain.rules`: the arithmetic of rollout and relevance on matrices.
* :mod:`attnlab.explain.graph`: one teacher-forced run kept whole, with its gradients.
* :mod:`attnlab.explain.grounding`: the benchmark (pointing hit, touch, mass,
  random map) on images whose objects are known, with its parts in
  :mod:`~attnlab.explain.geometry`, :mod:`~attnlab.explain.words` and :mod:`~attnlab.explain.tables`; :mod:`attnlab.explain.boxes`:
  COCO-style boxes of your own images (``attnlab grounding`` lives in :mod:`attnlab.cli.grounding`).
  (:mod:`attnlab.shapes.grounding` runs it on shapes scenes.)
"""

from .methods import METHODS, Method, explain, resolve_method

__all__ = ["METHODS", "Method", "explain", "resolve_method"]
