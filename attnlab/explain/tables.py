"""The grounding tables as text: :func:`format_grounding`, and :func:`best_row` for a summary line."""

from __future__ import annotations

from typing import Any

from ..errors import AttnlabError

METRICS = ("hit", "touch", "mass")
RANDOM = "random map"

__all__ = ["METRICS", "RANDOM", "best_row", "format_grounding"]

CONDITION_TITLES = {
    "generated": "the model's own captions (greedy)",
    "true": "the true captions (teacher forcing)",
}
KIND_TITLES = {"mask": "object masks", "box": "object boxes"}


def format_grounding(result: dict[str, Any], kind: str | None = None) -> str:
    """The tables of :func:`ground` as text: per condition, rows = methods, then the random map;
    columns = hit / touch / mass (%) per word class."""
    kinds = [kind] if kind else result["kinds"]
    classes = result["classes"]
    lines = [f"attnlab grounding \u00b7 model {result['model']} \u00b7 {result['images']} images{result.get('source', '')}"]
    lines.append("hit: the peak patch's centre lies in the named object; touch: the peak patch overlaps it;")
    lines.append("mass: share of the map on the object; random map: a random peak patch / the uniform map (chance)")
    width = max(len(r) for r in [*result["methods"], RANDOM]) + 2
    for condition, per_kind in result["conditions"].items():
        for k in kinds:
            table = per_kind.get(k)
            if not table:
                continue
            first = next(iter(table.values()))
            counts = " \u00b7 ".join(f"{c} {first.get(c, {}).get('words', 0)}" for c in classes)
            lines += ["", f"{CONDITION_TITLES.get(condition, condition)}, {KIND_TITLES.get(k, k)} (words: {counts})"]
            lines.append(" " * width + "".join(f"{c + ' words' if c != 'all' else 'all words':<20}" for c in classes))
            lines.append(f"{'method':<{width}}" + "hit   touch mass    " * len(classes))
            for row in [*result["methods"], RANDOM]:
                cells = table.get(row)
                if cells is None:
                    continue
                text = ""
                for c in classes:
                    v = cells.get(c)
                    text += "-" * 3 + " " * 17 if v is None else f"{v['hit']:>4.0%}  {v['touch']:>4.0%}  {v['mass']:>4.0%}    "
                lines.append(f"{row:<{width}}{text.rstrip()}")
    if result.get("unmatched"):
        lines.append("")
        lines.append("words not matched to any object (not scored): " + ", ".join(f"{c} {n}" for c, n in result["unmatched"].items()))
    return "\n".join(lines)


def best_row(result: dict[str, Any], condition: str = "true", kind: str = "mask", cls: str = "shape", metric: str = "hit") -> tuple[str, float, float]:
    """The method with the highest ``metric`` for ``cls`` words, its score and the random map's."""
    table = result["conditions"][condition][kind]
    rows = [r for r in result["methods"] if r in table and cls in table[r]]
    if not rows:
        raise AttnlabError(f"no {cls} words were scored in the {condition} condition")
    best = max(rows, key=lambda r: table[r][cls][metric])
    return best, table[best][cls][metric], table[RANDOM][cls][metric]
