"""Token ids -> words: WordPiece (CATR's bert-base-uncased vocabulary) or word-level.

Decoding only; attnlab never needs ``transformers``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AttnlabError

# what BertTokenizer.decode(..., skip_special_tokens=True) (CATR's predict.py) drops
SPECIAL_TOKENS = frozenset({"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"})
# BertTokenizer's clean_up_tokenization (clean_up_tokenization_spaces=True), in its order
_CLEAN_UP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Drop the spaces WordPiece decoding leaves before punctuation and contractions."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


class Vocab:
    """An id -> token table.

    ``wordpiece=True``: tokens starting with ``##`` continue the previous word
    and the spaces before ``. ? ! ,`` and in ``' n't 'm 's 've 're`` are dropped,
    exactly as ``BertTokenizer.decode(ids, skip_special_tokens=True)`` does (CATR's
    decoding); otherwise tokens are joined with single spaces.
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
        # line breaks are \n, \r\n or \r only, as in BertTokenizer's load_vocab: str.splitlines()
        # would also split inside tokens holding \x0c, \x1c-\x1e, \x85 or \u2028 and shift every later id
        tokens = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()  # the final newline ends the last token; it starts none
        if not tokens:
            raise AttnlabError(f"vocabulary {path} is empty: it must be a vocab.txt with one token per line")
        return cls(tokens, wordpiece=wordpiece)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def id_of(self, token: str) -> int:
        """The id of ``token`` (KeyError when it is not in the table)."""
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
        return clean_up_tokenization(text) if self.wordpiece else text


class IdVocab(Vocab):
    """Stand-in when no vocabulary is known: every id shows as ``[id]``.

    ``size``: how many ids the model predicts (``len()``; 0 = unknown).
    """

    def __init__(self, special: dict[int, str] | None = None, size: int = 0) -> None:
        super().__init__([], wordpiece=False)
        self.special = special or {}
        self.size = size

    def __len__(self) -> int:
        return self.size

    def token(self, token_id: int) -> str:
        return self.special.get(token_id, f"[{token_id}]")
