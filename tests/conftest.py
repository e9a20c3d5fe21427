"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models (the machine has 2 shared cores);
    the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(family)``: a tiny offline vision-language model and its processor (``tests/vlm_tiny.py``), made once per module."""
    import vlm_tiny

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = vlm_tiny.build(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get
