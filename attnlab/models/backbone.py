"""CNN backbones: the image goes in, a feature map and its padding mask come out.

`backbone.0` of a CATR state dict is a :class:`Backbone` (its ``body`` holds the
ResNet stages), `backbone.1` the parameter-free sine position embedding; the
:class:`Joiner` keeps that layout so published checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .position import PositionEmbeddingSine


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers).

    ``y = (x - running_mean) * weight / sqrt(running_var + eps) + bias``, with
    ``eps = 1e-5`` added before the reciprocal square root (as DETR and CATR do).
    ``num_batches_tracked`` entries of a checkpoint are ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map this layer applies: ``(C,)`` scale and ``(C,)`` shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def resnet101_body(dilation: bool = True) -> nn.Sequential:
    """torchvision's ResNet-101 without pooling and classifier, frozen batch norms.

    With ``dilation`` the last stage keeps stride 16 (dilated convolutions), so a
    299 x 299 image gives a 19 x 19 map of 2048 channels. Builds random weights;
    never downloads anything.
    """
    import torchvision

    net = torchvision.models.resnet101(
        weights=None,
        replace_stride_with_dilation=[False, False, dilation],
        norm_layer=FrozenBatchNorm2d,
    )
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))


def small_cnn_body(channels: tuple[int, ...] = (32, 64, 128, 192)) -> nn.Sequential:
    """A small from-scratch CNN: stages ``stage0..stageK`` of two (conv 3x3, batch
    norm, ReLU); every stage but the last halves the resolution, so four stages
    give stride 8 (128 px -> a 16 x 16 grid). Used by the bundled shapes model.
    """
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    c_in = 3
    for i, c in enumerate(channels):
        stride = 2 if i < len(channels) - 1 else 1
        layers[f"stage{i}"] = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False),
                bn1=nn.BatchNorm2d(c),
                relu1=nn.ReLU(inplace=True),
                conv2=nn.Conv2d(c, c, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(c),
                relu2=nn.ReLU(inplace=True),
            )
        )
        c_in = c
    return nn.Sequential(layers)


class Backbone(nn.Module):
    """Runs ``body`` and downsamples the pixel padding mask to the feature map."""

    def __init__(self, body: nn.Module, num_channels: int) -> None:
        super().__init__()
        self.body = body
        self.num_channels = num_channels

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, body: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images ``(N, 3, H, W)``, mask ``(N, H, W)`` bool (True = padding).

        Returns features ``(N, C, h, w)`` and their mask ``(N, h, w)``. ``body``
        replaces ``self.body`` (the inference copy with folded batch norms).
        """
        features = (body or self.body)(images)  # (N, C, h, w)
        feat_mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].to(torch.bool)  # (N, h, w)
        return features, feat_mask


class Joiner(nn.Sequential):
    """``[0]`` the backbone, ``[1]`` the position embedding: the DETR/CATR layout."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)

    @property
    def num_channels(self) -> int:
        return self[0].num_channels

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, mask: torch.Tensor, body: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns features ``(N, C, h, w)``, mask ``(N, h, w)``, position ``(N, d_model, h, w)``."""
        features, feat_mask = self[0](images, mask, body)
        pos = self[1](feat_mask).to(features.dtype)  # (N, d_model, h, w)
        return features, feat_mask, pos


def build_backbone(kind: str, d_model: int, channels: tuple[int, ...] = (32, 64, 128, 192)) -> Joiner:
    """``kind``: ``"resnet101"`` (CATR: dilated, 2048 channels) or ``"small"`` (the shapes
    model: ``small_cnn_body(channels)``)."""
    if kind == "resnet101":
        body, channels = resnet101_body(dilation=True), 2048
    elif kind == "small":
        body = small_cnn_body(tuple(channels))
        channels = channels[-1]
    else:
        raise ValueError(f"unknown backbone {kind!r}: use 'resnet101' or 'small'")
    return Joiner(Backbone(body, channels), PositionEmbeddingSine(d_model // 2, normalize=True))
