"""attnlab.rollout: encoder rows and attention rollout against loops written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab import AttnlabError
from attnlab.rollout import cls_row, encoder_attention, patch_row, rollout, rollout_row, split_keys

GRID = (2, 3)  # non-square: 2 rows, 3 columns
PREFIX = 2  # class token + one register
K = PREFIX + GRID[0] * GRID[1]


def random_attention(layers: int = 3, heads: int = 2, k: int = K, seed: int = 0) -> np.ndarray:
    """Row-stochastic weights ``(layers, heads, K, K)`` (each row a softmax of random scores)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(layers, heads, k, k)) * 2
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def loop_rollout(a: np.ndarray, residual: bool = True) -> list[list[float]]:
    """Abnar & Zuidema written with plain Python loops: head mean, + I, row-normalise, multiply."""
    layers, heads, k, _ = a.shape
    result = [[1.0 if i == j else 0.0 for j in range(k)] for i in range(k)]
    for layer in range(layers):
        step = [[sum(a[layer, h, i, j] for h in range(heads)) / heads + (1.0 if residual and i == j else 0.0) for j in range(k)] for i in range(k)]
        for i in range(k):
            total = sum(step[i])
            step[i] = [x / total for x in step[i]]
        result = [[sum(step[i][m] * result[m][j] for m in range(k)) for j in range(k)] for i in range(k)]
    return result


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_equals_the_loop(residual):
    a = random_attention()
    got = rollout(a, residual=residual)
    assert isinstance(got, np.ndarray) and got.shape == (K, K)
    np.testing.assert_allclose(got, np.array(loop_rollout(a, residual)), atol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def test_rollout_of_one_head_and_of_torch_input():
    a = random_attention(seed=1)
    single = a[:, 1:2]  # only head 1
    np.testing.assert_allclose(rollout(a, head=1), np.array(loop_rollout(single)), atol=1e-12)
    t = torch.tensor(a, requires_grad=True)
    r = rollout(t)
    assert isinstance(r, torch.Tensor) and r.dtype == torch.float64
    np.testing.assert_allclose(r.detach().numpy(), rollout(a), atol=1e-12)
    r[0, PREFIX:].sum().backward()  # the CLS row's mass on the patches is differentiable
    assert t.grad is not None and float(t.grad.abs().sum()) > 0


def test_rollout_with_identity_attention_is_identity():
    """Tokens that only attend to themselves keep their own state: R = I."""
    eye = np.broadcast_to(np.eye(K), (4, 2, K, K)).copy()
    np.testing.assert_allclose(rollout(eye), np.eye(K), atol=1e-12)
    np.testing.assert_allclose(rollout(eye, residual=False), np.eye(K), atol=1e-12)


def test_rollout_row_splits_prefix_and_non_square_patches():
    a = random_attention(seed=2)
    full = np.array(loop_rollout(a))
    prefix, patches = rollout_row(a, "cls", grid=GRID, prefix_tokens=PREFIX)
    assert prefix.shape == (PREFIX,) and patches.shape == GRID
    np.testing.assert_allclose(prefix, full[0, :PREFIX], atol=1e-12)
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            assert patches[r, c] == pytest.approx(full[0, PREFIX + r * GRID[1] + c], abs=1e-12)
    assert prefix.sum() + patches.sum() == pytest.approx(1.0, abs=1e-12)
    prefix, patches = rollout_row(a, (1, 2), grid=GRID, prefix_tokens=PREFIX)  # the last patch
    np.testing.assert_allclose(patches.reshape(-1), full[K - 1, PREFIX:], atol=1e-12)


def test_patch_row_and_cls_row_read_the_right_query():
    """Hand-placed weights: patch (1, 0) looks only at patch (0, 2); the CLS token at the register."""
    a = np.zeros((2, 2, K, K))
    a[..., np.arange(K), np.arange(K)] = 1.0  # every token attends to itself...
    q = PREFIX + 1 * GRID[1] + 0  # ...except patch (1, 0),
    a[1, :, q] = 0.0
    a[1, :, q, PREFIX + 0 * GRID[1] + 2] = 1.0  # which looks at patch (0, 2) in layer 1
    a[1, 0, 0] = 0.0
    a[1, 0, 0, 1] = 1.0  # head 0 of layer 1: the CLS token looks at the register
    prefix, patches = patch_row(a, (1, 0), layer=-1, grid=GRID, prefix_tokens=PREFIX)
    want = np.zeros(GRID)
    want[0, 2] = 1.0
    np.testing.assert_array_equal(patches, want)
    assert prefix.tolist() == [0.0, 0.0]
    prefix, patches = cls_row(a, layer=1, head=0, grid=GRID, prefix_tokens=PREFIX)
    assert prefix.tolist() == [0.0, 1.0] and patches.sum() == 0.0
    prefix, patches = cls_row(a, layer=1, head="mean", grid=GRID, prefix_tokens=PREFIX)
    assert prefix.tolist() == [0.5, 0.5]
    prefix, patches = cls_row(a, layer=0, grid=GRID, prefix_tokens=PREFIX)
    assert prefix.tolist() == [1.0, 0.0]


def test_split_keys_keeps_leading_dims():
    rows = np.arange(3 * K, dtype=float).reshape(3, K)
    prefix, maps = split_keys(rows, GRID, PREFIX)
    assert prefix.shape == (3, PREFIX) and maps.shape == (3, *GRID)
    assert maps[2, 1, 0] == rows[2, PREFIX + 3]


def test_clear_errors():
    a = random_attention()
    with pytest.raises(AttnlabError, match="expected"):
        encoder_attention(a, grid=(3, 3), prefix_tokens=PREFIX)
    with pytest.raises(AttnlabError, match="pass grid"):
        encoder_attention(a)
    with pytest.raises(AttnlabError, match="not on the 2 x 3 grid"):
        patch_row(a, (2, 0), grid=GRID, prefix_tokens=PREFIX)
    with pytest.raises(AttnlabError, match="layer 3 does not exist"):
        patch_row(a, (0, 0), layer=3, grid=GRID, prefix_tokens=PREFIX)
    with pytest.raises(AttnlabError, match="head 2 does not exist"):
        cls_row(a, head=2, grid=GRID, prefix_tokens=PREFIX)
    no_cls = random_attention(k=6)
    with pytest.raises(AttnlabError, match="no class token"):
        cls_row(no_cls, grid=GRID, prefix_tokens=0)
    with pytest.raises(AttnlabError, match="no class token"):
        rollout_row(no_cls, "cls", grid=GRID, prefix_tokens=0)
    with pytest.raises(AttnlabError, match=r"\(layers, heads, K, K\)"):
        rollout(a[0])
    bad = a.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(AttnlabError, match="NaN"):
        encoder_attention(bad, grid=GRID, prefix_tokens=PREFIX)
