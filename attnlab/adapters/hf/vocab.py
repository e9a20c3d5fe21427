"""A Hugging Face tokenizer as attnlab's token table (:class:`HFVocab`)."""

from __future__ import annotations

from typing import Any

from ...tokenizer import BPEVocab, Vocab


class HFVocab:
    """A Hugging Face tokenizer as attnlab's token table.

    ``token(id)`` shows one piece (WordPiece continuations keep their ``##``;
    byte-level BPE pieces show as text without the ``Ġ`` space mark),
    ``decode(ids)`` is the tokenizer's own ``decode(ids, skip_special_tokens=True)``
    (stripped), ``word_starts(ids)`` says which pieces start a word, and
    ``len()`` is the number of ids the model predicts (it may exceed the
    tokenizer's: BLIP's head has spare rows; those ids show as ``[id]``).
    """

    def __init__(self, tokenizer: Any, size: int) -> None:
        n = len(tokenizer)
        pieces = [p if isinstance(p, str) else f"[{i}]" for i, p in enumerate(tokenizer.convert_ids_to_tokens(list(range(n))))]
        special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        self.kind = piece_kind(tokenizer, pieces)
        self.pieces: Vocab = BPEVocab(pieces, special) if self.kind == "bpe" else Vocab(pieces, wordpiece=self.kind == "wordpiece")
        self.tokenizer = tokenizer
        self.size = max(int(size), n)

    def __len__(self) -> int:
        return self.size

    def token(self, token_id: int) -> str:
        return self.pieces.token(int(token_id))

    def decode(self, ids: list[int]) -> str:
        ids = [int(t) for t in ids]
        if all(0 <= t < len(self.pieces) for t in ids):
            return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
        return self.pieces.decode(ids)  # ids beyond the tokenizer: attnlab's own joining

    def word_starts(self, ids: list[int]) -> list[bool]:
        return self.pieces.word_starts([int(t) for t in ids])


def piece_kind(tokenizer: Any, pieces: list[str]) -> str:
    """``"wordpiece"``, ``"bpe"`` (byte-level) or ``"plain"``: from the tokenizer's decoder, else from its pieces."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    name = type(decoder).__name__ if decoder is not None else ""
    if name == "WordPiece":
        return "wordpiece"
    if name == "ByteLevel":
        return "bpe"
    if any(p.startswith("Ġ") for p in pieces):
        return "bpe"
    if any(p.startswith("##") for p in pieces):
        return "wordpiece"
    return "plain"
