"""The bundled shapes captioner: CATR's classes in a small configuration."""

from __future__ import annotations

import torch

from ..models.catr import CATR, CATRConfig
from ..tokenizer import Vocab
from .scenes import CLS_ID, IMAGE_SIZE, MAX_CAPTION_WORDS, PAD_ID, SEP_ID, VOCAB


def shapes_config() -> CATRConfig:
    """Small CNN (stride 16: 128 px -> 8 x 8 patches), d_model 128, 4 heads,
    2 encoder and 3 decoder layers, the 24-word shapes vocabulary."""
    return CATRConfig(
        backbone="small",
        backbone_channels=(16, 32, 64, 96, 128),
        d_model=128,
        nheads=4,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=512,
        dropout=0.0,  # every training scene is new: nothing to over-fit
        vocab_size=len(VOCAB),
        max_positions=MAX_CAPTION_WORDS + 2,  # start + 14 words + end
        pad_token_id=PAD_ID,
        start_token_id=CLS_ID,
        end_token_id=SEP_ID,
        layer_norm_eps=1e-5,
        mlp_hidden=256,
        image_size=IMAGE_SIZE,
    )


def build_shapes_model(seed: int = 0) -> CATR:
    """A randomly initialised shapes captioner (deterministic for ``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CATR(shapes_config(), vocab=Vocab(VOCAB, wordpiece=False), name="shapes")
    return model
