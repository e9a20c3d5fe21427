"""The part every captioner backed by one ``torch.nn.Module`` shares (:func:`~attnlab.wrap`,
:func:`~attnlab.from_huggingface`): the training flag ``caption()`` switches and puts back,
the device, the scope of the one-time probe run when the captioner is built, and the check
that the weights have values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import AttnlabError
from ..util import evaluating


def refuse_meta(model: nn.Module, how: str) -> None:
    """One line when a weight of ``model`` is on the ``meta`` device (shapes without values)."""
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise AttnlabError(f"the model's weights are on the 'meta' device ({meta} has no values): load them first ({how})")


class ModuleCaptioner:
    """Base of the captioners that run ``self.model`` (an ``nn.Module``).

    ``caption()`` puts a captioner in eval mode for the call and back afterwards through
    :attr:`training`, :meth:`train` and :meth:`eval`, which act on the module. A subclass
    checks itself once in ``_probe``, inside :meth:`_probing`.
    """

    model: Any

    @property
    def training(self) -> bool:
        return bool(self.model.training)

    def train(self, mode: bool = True) -> "ModuleCaptioner":
        self.model.train(mode)
        return self

    def eval(self) -> "ModuleCaptioner":
        return self.train(False)

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        """The probe's scope: eval mode without autograd; every training flag comes back after."""
        with evaluating(self.model), torch.inference_mode():
            yield
