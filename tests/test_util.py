"""attnlab.util.evaluating: eval mode for a block, every training flag restored after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab.util import evaluating


def _half_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    return model


def test_evaluating_sets_eval_and_restores_every_submodule() -> None:
    model = _half_frozen()
    before = [m.training for m in model.modules()]
    assert before == [True, True, False, True]
    with evaluating(model) as same:
        assert same is model
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before  # model.train(True) would unfreeze the BatchNorm


def test_evaluating_restores_on_exception() -> None:
    model = _half_frozen()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with evaluating(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_evaluating_a_wrapper_restores_its_inner_module() -> None:
    class Wrapper:  # a captioner-like object around a module, like WrappedCaptioner
        def __init__(self, model: nn.Module) -> None:
            self.model = model

        @property
        def training(self) -> bool:
            return self.model.training

        def train(self, mode: bool = True) -> "Wrapper":
            self.model.train(mode)
            return self

        def eval(self) -> "Wrapper":
            return self.train(False)

    inner = _half_frozen()
    with evaluating(Wrapper(inner)):
        assert not any(m.training for m in inner.modules())
    assert [m.training for m in inner.modules()] == [True, True, False, True]


def test_evaluating_leaves_an_object_without_a_training_flag_alone() -> None:
    class Plain:
        def eval(self) -> None:
            raise AssertionError("eval() must not be called on an object with no training flag")

    with evaluating(Plain()):
        pass
    with torch.no_grad():  # an eval-mode module stays in eval mode
        m = nn.Linear(1, 1).eval()
        with evaluating(m):
            pass
        assert not m.training


def test_is_real_takes_finite_numbers_and_refuses_bools_and_non_finite() -> None:
    import math

    import numpy as np

    from attnlab.util import is_real

    for ok in (0, 1.5, -3, np.float32(0.25), np.int64(7)):
        assert is_real(ok), ok
    for bad in (True, np.bool_(False), math.nan, math.inf, -math.inf, np.float64("nan"), "1.0", None, [1.0], 1j):
        assert not is_real(bad), bad
