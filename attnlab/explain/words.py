"""Grounding words: which caption words name which objects.

Matching words to objects (:func:`match_words`): words and phrases are
lowercased, stripped of punctuation and of :data:`STOP_WORDS`. A word names an
object when it equals a word of the object's phrase (or its category), when it
does so after dropping a plural ``s``/``es``, or when the user's synonym list
maps it to one (``{"puppy": ["dog"]}``). Consecutive naming words form a span
("small red circle"); the span names the object(s) whose phrase shares the most
of its words, and every word of the span is scored against that object (ties:
against the union of the tied objects, as a word such as "dogs" names every dog).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["STOP_WORDS", "match_words", "normal_words"]

STOP_WORDS = frozenset(
    {"a", "an", "the", "of", "and", "or", "with", "in", "on", "at", "to", "is", "are", "its", "his", "her", "their",
     "this", "that", "there", "some", "two", "three", "one", "it", "by", "for", "from", "near", "next"}
)  # fmt: skip
"""Words never matched to an object (articles, prepositions, numbers, ...)."""

_PUNCT = re.compile(r"[^\w\s-]+")


def normal_words(text: str) -> list[str]:
    """Lowercase words of ``text`` without punctuation."""
    return _PUNCT.sub(" ", text.lower()).split()


def _forms(word: str, synonyms: Mapping[str, Iterable[str]]) -> set[str]:
    """``word``, without a plural ending, and its synonyms (each lowercased)."""
    found = {word}
    if len(word) > 3 and word.endswith("es"):
        found.add(word[:-2])
    if len(word) > 2 and word.endswith("s"):
        found.add(word[:-1])
    for w in list(found):
        found.update(str(s).lower() for s in synonyms.get(w, ()))
    return found


def match_words(
    words: Sequence[str], phrases: Sequence[Iterable[str]], synonyms: Mapping[str, Iterable[str]] | None = None
) -> list[tuple[int, ...]]:
    """For each caption word, the objects it names (empty: not scored). See the module docstring for the rule.

    ``phrases``: per object the words naming it (its phrase and category, any case).
    """
    syn = {str(k).lower(): v for k, v in (synonyms or {}).items()}
    names = [{w for p in phrase for w in normal_words(str(p))} - STOP_WORDS for phrase in phrases]
    named: list[set[int]] = []
    for word in words:
        parts = normal_words(word)
        key = parts[0] if len(parts) == 1 else ""
        if not key or key in STOP_WORDS:
            named.append(set())
            continue
        forms = _forms(key, syn)
        named.append({k for k, n in enumerate(names) if forms & n})
    out: list[tuple[int, ...]] = [()] * len(words)
    i = 0
    while i < len(words):
        if not named[i]:
            i += 1
            continue
        j = i
        while j < len(words) and named[j]:
            j += 1
        counts: dict[int, int] = {}
        for t in range(i, j):
            for k in named[t]:
                counts[k] = counts.get(k, 0) + 1
        best = max(counts.values())
        chosen = tuple(sorted(k for k, c in counts.items() if c == best))
        for t in range(i, j):
            out[t] = chosen
        i = j
    return out
