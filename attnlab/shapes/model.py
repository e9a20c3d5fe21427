"""The bundled shapes captioners: CATR's classes and a CPTR (timm ViT), both in small configurations.

``MODELS`` is the registry ``attnlab train shapes --model NAME`` builds from:
``"catr"`` (small CNN + transformer, the bundled ``shapes`` model) and
``"cptr"`` (a small ViT from timm + transformer decoder, the bundled
``shapes-cptr`` model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import AttnlabError
from ..models.catr import CATR, CATRConfig
from ..models.cptr import CPTR, CPTRConfig, sincos_positions
from ..tokenizer import Vocab
from .scenes import CLS_ID, IMAGE_SIZE, MAX_CAPTION_WORDS, PAD_ID, SEP_ID, VOCAB


# what both bundled models share: the decoder's size, the vocabulary, the input size
SHAPES_DECODER = dict(
    d_model=128,
    nheads=4,
    dec_layers=3,
    dim_feedforward=512,
    dropout=0.0,  # every training scene is new: nothing to over-fit
    vocab_size=len(VOCAB),
    max_positions=MAX_CAPTION_WORDS + 2,  # start + 14 words + end
    pad_token_id=PAD_ID,
    start_token_id=CLS_ID,
    end_token_id=SEP_ID,
    image_size=IMAGE_SIZE,
)


def shapes_config() -> CATRConfig:
    """Small CNN (stride 16: 128 px -> 8 x 8 patches), d_model 128, 4 heads,
    2 encoder and 3 decoder layers, the 24-word shapes vocabulary."""
    return CATRConfig(
        backbone="small",
        backbone_channels=(16, 32, 64, 96, 128),
        enc_layers=2,
        layer_norm_eps=1e-5,
        mlp_hidden=256,
        **SHAPES_DECODER,
    )


def build_shapes_model(seed: int = 0) -> CATR:
    """A randomly initialised shapes captioner (deterministic for ``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CATR(shapes_config(), vocab=Vocab(VOCAB, wordpiece=False), name="shapes")
    return model


def shapes_cptr_config() -> CPTRConfig:
    """A small ViT from timm trained from scratch: patch 16 (128 px -> 8 x 8 patches
    + 1 class token, the grid of the CNN model), width 128, 4 blocks of 4 heads; a
    decoder of width 128, 4 heads, 3 layers; the 24-word shapes vocabulary.

    (Patch 8, a 16 x 16 grid, was tried first and did not come near the accuracy
    target in over an hour of training on a 2-core CPU: ``attnlab/weights/README.md``.)"""
    return CPTRConfig(
        encoder="vit_small_patch16_224",  # timm's ViT-S/16 layout, resized by encoder_args
        encoder_args={"patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0},
        pretrained=False,
        key_positions=True,  # the decoder finds objects by position too: needed for "left of", "above", ...
        **SHAPES_DECODER,
    )


def build_shapes_cptr(seed: int = 0) -> CPTR:
    """A randomly initialised shapes CPTR (deterministic for ``seed``), named ``shapes-cptr``;
    its position embedding starts as 2-D sine-cosine values (:func:`~attnlab.models.cptr.sincos_positions`)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CPTR(shapes_cptr_config(), vocab=Vocab(VOCAB, wordpiece=False), name="shapes-cptr")
    sincos_positions(model)
    return model


MODELS: dict[str, Callable[[int], nn.Module]] = {"catr": build_shapes_model, "cptr": build_shapes_cptr}
"""Model kind -> builder ``(seed) -> model with random weights`` for ``attnlab train shapes --model``."""


def build_model(kind: str, seed: int = 0) -> nn.Module:
    """A randomly initialised shapes captioner of ``kind`` (a key of :data:`MODELS`)."""
    if kind not in MODELS:
        raise AttnlabError(f"unknown shapes model {kind!r}: choose one of {', '.join(MODELS)}")
    return MODELS[kind](seed)
