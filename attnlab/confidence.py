"""How sure a caption is and how it ended, as ``attnlab caption`` prints it (line and ``--json``).

* ``stopped``: ``"end"`` (the model wrote its end token), ``"max_len"`` (cut at the
  length limit: the caption is unfinished), ``"given"`` (teacher forcing), or ``None``
  (:attr:`attnlab.trace.CaptionTrace.stopped`).
* Unsure words: a token whose probability is below :data:`UNSURE_P` (0.5), that is,
  the model gave the other tokens together more weight than the one it wrote. A
  caption with at least one such token is flagged ``unsure`` in the CLI line.
  (Greedy decoding writes the most likely token, so p < 0.5 means no token had a
  majority; beam search may also keep a less likely token.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

UNSURE_P = 0.5  # a token written with a probability below this is "unsure"

__all__ = ["UNSURE_P", "caption_notes", "caption_summary"]


def caption_summary(trace: Any) -> dict[str, Any]:
    """JSON-ready facts of one caption: ``stopped``, per-token ``probabilities`` (4 decimals, ``None``
    without scores), ``log_probability`` (sum of natural logs), ``beam_score`` (``meta["score"]``:
    sum(log p) / length**length_penalty; ``None`` for greedy decoding) and ``unsure`` tokens
    (``[{"step", "word", "p"}]``, p < :data:`UNSURE_P`)."""
    probs = trace.probabilities()  # (steps,) or None
    score = trace.meta.get("score")
    out: dict[str, Any] = {
        "stopped": trace.stopped,
        "probabilities": None if probs is None else [round(float(p), 4) for p in probs],
        "log_probability": None if probs is None else float(np.log(np.maximum(probs.astype(np.float64), 1e-300)).sum()),
        "beam_score": None if score is None or not math.isfinite(float(score)) else float(score),
        "unsure": [],
    }
    if probs is not None:
        out["unsure"] = [{"step": t, "word": trace.words[t], "p": round(float(p), 4)} for t, p in enumerate(probs) if p < UNSURE_P]
    return out


def caption_notes(summary: dict[str, Any], steps: int) -> str:
    """What the CLI line adds after a caption: ``""`` for a finished, sure caption; else e.g.
    ``" [cut at the length limit: 15 tokens, no end token] [unsure: 3 of 15 tokens below p=0.5, lowest 'star' p=0.21]"``."""
    notes = []
    if summary["stopped"] == "max_len":
        notes.append(f"[cut at the length limit: {steps} tokens, no end token]")
    unsure = summary["unsure"]
    if unsure:
        low = min(unsure, key=lambda u: u["p"])
        notes.append(f"[unsure: {len(unsure)} of {steps} tokens below p={UNSURE_P:g}, lowest {low['word']!r} p={low['p']:.2f}]")
    return "".join(" " + n for n in notes)
