"""The relevance rules of Chefer, Gur & Wolf (2021), written out plainly in numpy for the tests,
as the issue states them: the reference the library's batched torch version is checked against."""

from __future__ import annotations

import numpy as np


def plain_norm(r: np.ndarray) -> np.ndarray:
    """(R - I) / rowsum(R - I) + I, row by row; a row whose R - I is all zero stays as it is."""
    out = r.copy()
    for row in range(r.shape[0]):
        extra = r[row] - np.eye(r.shape[0])[row]
        if extra.sum() > 0:
            out[row] = extra / extra.sum() + np.eye(r.shape[0])[row]
    return out


def plain_bar(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """mean over heads of the positive part of gradient times attention: (heads, R, C) -> (R, C)."""
    return np.maximum(a * g, 0).mean(axis=0)


def plain_relevance(encoder: list, selfs: list, crosses: list, queries: int, keys: int) -> np.ndarray:
    """R^qi (queries, keys) from per-layer (A, G) numpy pairs: encoder (heads, K, K), decoder
    self-attention (heads, Q, Q) and cross-attention (heads, Q, K), first layer first."""
    r_ii, r_qq, r_qi = np.eye(keys), np.eye(queries), np.zeros((queries, keys))
    for a, g in encoder:
        r_ii = r_ii + plain_bar(a, g) @ r_ii
    for (a_s, g_s), (a_c, g_c) in zip(selfs, crosses):
        bar = plain_bar(a_s, g_s)
        r_qq = r_qq + bar @ r_qq
        r_qi = r_qi + bar @ r_qi
        r_qi = r_qi + plain_norm(r_qq).T @ plain_bar(a_c, g_c) @ plain_norm(r_ii)
    return r_qi
