"""Token ids -> words: WordPiece (CATR's bert-base-uncased vocabulary) or word-level.

Decoding only; attnlab never needs ``transformers``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import AttnlabError

SPECIAL_TOKENS = frozenset({"[PAD]", "[CLS]", "[SEP]", "[MASK]"})
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,!?;:)'])")


class Vocab:
    """An id -> token table.

    ``wordpiece=True``: tokens starting with ``##`` continue the previous word
    and a space before punctuation is dropped (as ``BertTokenizer.decode``
    does); otherwise tokens are joined with single spaces.
    """

    def __init__(self, tokens: list[str], wordpiece: bool = True) -> None:
        self.tokens = list(tokens)
        self.wordpiece = wordpiece
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_file(cls, path: str | os.PathLike, wordpiece: bool = True) -> "Vocab":
        """Read a ``vocab.txt`` (one token per line, line number = id)."""
        path = Path(path)
        if not path.is_file():
            raise AttnlabError(f"no vocabulary file at {path}: pass the path of a vocab.txt (one token per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AttnlabError(f"cannot read vocabulary {path} ({exc.__class__.__name__}): it must be a UTF-8 vocab.txt") from None
        tokens = text.splitlines()
        if not tokens:
            raise AttnlabError(f"vocabulary {path} is empty: it must be a vocab.txt with one token per line")
        return cls(tokens, wordpiece=wordpiece)

    def id_of(self, token: str) -> int:
        return self._ids[token]

    def token(self, token_id: int) -> str:
        """The token of ``token_id``, or ``[id]`` when the id is outside the table."""
        if 0 <= token_id < len(self.tokens):
            return self.tokens[token_id]
        return f"[{token_id}]"

    def encode(self, words: str | list[str]) -> list[int]:
        """Word-level encoding of whitespace-separated words (for word-level vocabularies)."""
        parts = words.split() if isinstance(words, str) else words
        missing = [w for w in parts if w not in self._ids]
        if missing:
            raise AttnlabError(f"words not in the vocabulary: {', '.join(missing[:5])}")
        return [self._ids[w] for w in parts]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: special tokens dropped, WordPiece pieces merged."""
        words: list[str] = []
        for token_id in ids:
            tok = self.token(int(token_id))
            if tok in SPECIAL_TOKENS:
                continue
            if self.wordpiece and tok.startswith("##") and words:
                words[-1] += tok[2:]
            else:
                words.append(tok)
        text = " ".join(words)
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text) if self.wordpiece else text


class IdVocab(Vocab):
    """Stand-in when no vocabulary is known: every id shows as ``[id]``."""

    def __init__(self, special: dict[int, str] | None = None) -> None:
        super().__init__([], wordpiece=False)
        self.special = special or {}

    def token(self, token_id: int) -> str:
        return self.special.get(token_id, f"[{token_id}]")
