"""A full-transformer captioner (CPTR-style): a timm ViT encoder + a transformer decoder.

CPTR (Liu et al., 2021, "CPTR: Full Transformer Network for Image Captioning")
replaces the CNN of a captioner by a vision transformer over image patches, so
every layer, encoder and decoder, is attention. :class:`CPTR` builds that from

* any ViT that ``timm.create_model`` knows (``CPTRConfig.encoder``, with
  ``encoder_args`` overriding its size: ``embed_dim``, ``depth``,
  ``patch_size``, ...; random weights unless ``pretrained=True``), created
  with ``dynamic_img_size=True`` so other input sizes work through timm's
  position-embedding interpolation;
* a pre-norm transformer decoder on ``nn.MultiheadAttention`` (token and
  learned position embeddings, masked self-attention, cross-attention to ALL
  the encoder's tokens: the class/register tokens first, then the patches in
  row-major order), and a linear head over the vocabulary.

It implements the captioner seam (:mod:`attnlab.captioner`) directly:
``spec`` (``prefix_tokens`` = the ViT's class + register tokens, reported,
never hidden), ``begin`` (images of the same size encoded together, a padded
key mask across sizes; the cross-attention keys/values projected once) and
``step`` (one new position per call, a key/value cache). The recorded weights
are the tensors that multiply the values, so gradients through them work when
autograd is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..capture import capture_attention
from ..captioner import (
    CaptionerSpec,
    Encoded,
    Record,
    StepOutput,
    TokenTable,
    check_record,
    pad_to,
    scatter_groups,
    size_groups,
    spec_from_config,
)
from ..errors import AttnlabError
from ..util import one_line
from .cptr_check import check_values
from .cptr_decoder import CPTRDecoderLayer, CPTRState, LayerCache
from .transformer import padding_bias


@dataclass
class CPTRConfig:
    """Architecture and pre-processing of a CPTR-style captioner.

    Defaults: CPTR's layout (ViT-B/16 at 384 px, a 4-layer decoder of width 768)
    with BERT's ``bert-base-uncased`` token ids.

    Attributes:
        encoder: a ``timm.create_model`` name of a ViT (``"vit_base_patch16_384"``, ...).
        encoder_args: keyword overrides for that model (``embed_dim``, ``depth``,
            ``num_heads``, ``patch_size``, ``reg_tokens``, ...): only the ViT keywords of
            :data:`attnlab.models.cptr_check.ENCODER_ARGS`, each checked (none opens a file).
        pretrained: load timm's pretrained encoder weights (needs the network).
        image_size: side of the square input in pixels (images are stretched to it).
        d_model, nheads, dec_layers, dim_feedforward, dropout: the decoder.
        vocab_size, max_positions: vocabulary size; the most decoder positions
            (the start token included).
        pad_token_id, start_token_id, end_token_id: special ids.
        mean, std: per-channel normalisation of pixels in [0, 1].
        key_positions: add fixed 2-D sine-cosine positions of the patches to the
            decoder's cross-attention keys (as DETR and CATR add positions to their
            image keys; prefix tokens get none, values none). Off in CPTR's layout.
    """

    encoder: str = "vit_base_patch16_384"
    encoder_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    image_size: int = 384
    d_model: int = 768
    nheads: int = 12
    dec_layers: int = 4
    dim_feedforward: int = 3072
    dropout: float = 0.1
    vocab_size: int = 30522
    max_positions: int = 128
    pad_token_id: int = 0
    start_token_id: int = 101
    end_token_id: int = 102
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    key_positions: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as stored in attnlab checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CPTRConfig":
        """The inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take defaults.

        Raises :class:`AttnlabError` for values of the wrong kind (a damaged or
        hostile checkpoint), before anything is built.
        """
        if not isinstance(d, dict):
            raise AttnlabError(f"a CPTR configuration must be a dict, not {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """One clear line for a configuration that cannot describe a CPTR."""
        ints = ("image_size", "d_model", "nheads", "dec_layers", "dim_feedforward", "vocab_size", "max_positions")
        for name in (*ints, "pad_token_id", "start_token_id", "end_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in ints else 0):
                raise AttnlabError(f"CPTR configuration: {name} must be a {'positive' if name in ints else 'non-negative'} integer, not {value!r}")
        if not isinstance(self.encoder, str) or not self.encoder:
            raise AttnlabError(f"CPTR configuration: encoder must be a timm model name, not {self.encoder!r}")
        plain = (bool, int, float, str, type(None))
        if not isinstance(self.encoder_args, dict) or not all(
            isinstance(k, str) and (isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v)))
            for k, v in self.encoder_args.items()
        ):
            raise AttnlabError("CPTR configuration: encoder_args must map names to plain values (numbers, strings, lists of them)")
        if self.d_model % self.nheads:
            raise AttnlabError(f"CPTR configuration: d_model ({self.d_model}) must be divisible by nheads ({self.nheads})")
        if max(self.pad_token_id, self.start_token_id, self.end_token_id) >= self.vocab_size:
            raise AttnlabError(f"CPTR configuration: special token ids must be < vocab_size ({self.vocab_size})")
        if not isinstance(self.key_positions, bool) or (self.key_positions and self.d_model % 4):
            raise AttnlabError("CPTR configuration: key_positions must be True or False (True needs d_model divisible by 4)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise AttnlabError(f"CPTR configuration: dropout must lie in [0, 1), not {self.dropout!r}")
        check_values(self)  # ranges, mean/std, and only the encoder_args of a plain ViT (nothing that opens a file)


def build_vit(config: CPTRConfig) -> nn.Module:
    """The timm ViT encoder of ``config`` (no classifier head, ``dynamic_img_size=True``)."""
    import timm

    if not timm.is_model(config.encoder):
        raise AttnlabError(f"timm has no model {config.encoder!r}: pick a ViT from timm.list_models('vit_*')")
    args = {**config.encoder_args, "num_classes": 0, "img_size": config.image_size, "dynamic_img_size": True}
    try:
        vit = timm.create_model(config.encoder, pretrained=config.pretrained, **args)
    except TypeError as exc:  # an encoder_args name the model does not take
        raise AttnlabError(
            f"timm model {config.encoder!r} does not accept these arguments ({exc}): CPTR needs a ViT "
            "from timm.list_models('vit_*') and encoder_args it takes"
        ) from None
    except (OSError, RuntimeError) as exc:
        if config.pretrained:
            raise AttnlabError(
                f"cannot load timm's pretrained weights for {config.encoder!r} ({one_line(exc, 100)}): "
                "check the network, or build with pretrained=False"
            ) from None
        raise
    missing = [a for a in ("patch_embed", "blocks", "num_prefix_tokens") if not hasattr(vit, a)]
    if missing or not hasattr(vit.patch_embed, "dynamic_feat_size"):
        raise AttnlabError(
            f"timm model {config.encoder!r} is not a plain ViT (no {', '.join(missing) or 'patch grid'}): CPTR needs a ViT "
            "from timm.list_models('vit_*')"
        )
    return vit


class CPTR(nn.Module):
    """A ViT encoder (timm) + a transformer decoder + a linear head; a captioner of the seam.

    Args:
        config: the architecture (:class:`CPTRConfig`).
        vocab: id -> token table (:class:`attnlab.tokenizer.Vocab`); ``None`` shows ids as ``[id]``.
        name: shown in figures and traces.
        best_head: the ``(layer, head)`` of :attr:`CaptionerSpec.best_head` (a checkpoint's record).
    """

    def __init__(
        self, config: CPTRConfig, *, vocab: TokenTable | None = None, name: str = "cptr", best_head: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        config.check()
        if vocab is not None and len(vocab) != config.vocab_size:
            raise AttnlabError(f"the vocabulary has {len(vocab)} tokens but the model predicts {config.vocab_size}")
        self.config = config
        self.encoder = build_vit(config)
        width = int(self.encoder.num_features)
        self.proj = nn.Linear(width, config.d_model) if width != config.d_model else nn.Identity()
        self.token_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embed = nn.Embedding(config.max_positions, config.d_model)
        self.layers = nn.ModuleList(
            CPTRDecoderLayer(config.d_model, config.nheads, config.dim_feedforward, config.dropout) for _ in range(config.dec_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.dropout = nn.Dropout(config.dropout)
        for m in (self.token_embed, self.position_embed):
            nn.init.normal_(m.weight, std=0.02)
        self._spec = spec_from_config(
            config, name=name, vocab=vocab, resize="stretch", prefix_tokens=int(self.encoder.num_prefix_tokens), best_head=best_head
        )

    # ------------------------------------------------------------------ seam
    @property
    def spec(self) -> CaptionerSpec:
        """What decoding needs to know: name, vocabulary, special ids, input size, ``prefix_tokens``."""
        return self._spec

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def vocab(self) -> TokenTable:
        return self._spec.vocab

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of an input of ``height x width`` pixels."""
        gh, gw = self.encoder.patch_embed.dynamic_feat_size((height, width))
        return int(gh), int(gw)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels ``(B, 3, H, W)`` normalised -> memory ``(B, K, d_model)``, K = prefix + h * w."""
        return self.proj(self.encoder.forward_features(pixels))  # (B, K, E)

    def cross_keys(self, memory: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """What the decoder's cross-attention keys are made from, for memory ``(B, K, E)`` of
        one ``grid``: the memory itself, or with ``key_positions`` the memory plus 2-D
        sine-cosine positions of the patches (zero on the prefix tokens)."""
        if not self.config.key_positions:
            return memory
        from timm.layers import build_sincos2d_pos_embed

        table = build_sincos2d_pos_embed(list(grid), dim=memory.shape[-1], device=memory.device, dtype=memory.dtype)  # (h * w, E)
        prefix = memory.shape[1] - table.shape[0]
        return memory + torch.cat((table.new_zeros(prefix, table.shape[1]), table))[None]  # (B, K, E)

    def begin(self, pixels: Sequence[torch.Tensor], record: Record = "cross") -> Encoded:
        """Encode images (each ``(3, h, w)``, normalised) for decoding; see :mod:`attnlab.captioner`.

        Images of one size are encoded together; across sizes the encoder
        tokens are zero-padded to the longest ``K`` and masked. Rows and columns
        beyond the last whole patch are dropped (as a stride-``patch`` convolution
        would); with the spec's resize rule every input is a whole number of patches. With
        ``record="all"``, ``encoder_attention`` holds per ViT block
        ``(N, heads, K, K)`` (prefix tokens first, then patches, then padding).
        When all images have one size (always, after the spec's resize) these
        are the blocks' own softmax outputs, so gradients reach them; a batch of
        several sizes returns padded copies (differentiate per size instead).
        """
        check_record(record)
        if len(pixels) == 0:
            raise AttnlabError("no image given")
        for p in pixels:
            if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[0] != 3:
                raise AttnlabError(f"begin() takes (3, h, w) image tensors, got {getattr(p, 'shape', type(p).__name__)}")
        device = self.head.weight.device
        groups = size_groups(pixels)
        memories, keys, attentions, grids = [], [], [], {}
        for group in groups:
            x = torch.stack([pixels[i] for i in group]).to(device)  # (n, 3, H, W)
            gh, gw = self.grid(*x.shape[-2:])
            if gh < 1 or gw < 1:
                raise AttnlabError(f"an image of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than one patch")
            ph, pw = self.encoder.patch_embed.patch_size
            x = x[..., : gh * ph, : gw * pw]  # (n, 3, gh * ph, gw * pw): the remainder no patch covers
            if record == "all":
                with capture_attention(self.encoder, "blocks.*", detach=False) as cap:
                    memories.append(self.encode(x))  # (n, K_g, E)
                attentions.append([cap.last(name) for name in cap.names])  # per block (n, heads, K_g, K_g)
            else:
                memories.append(self.encode(x))  # (n, K_g, E)
            keys.append(self.cross_keys(memories[-1], (gh, gw)))  # (n, K_g, E)
            for i in group:
                grids[i] = (gh, gw)
        length = max(m.shape[1] for m in memories)
        if len(groups) == 1:  # one size: the encoder's own tensors, in the images' order already
            return self._decoding_state(memories[0], keys[0], None, [grids[i] for i in range(len(pixels))], attentions[0] if attentions else None)
        memory = scatter_groups(groups, torch.cat([pad_to(m, length, 1) for m in memories]))  # (N, K, E)
        key_in = scatter_groups(groups, torch.cat([pad_to(k, length, 1) for k in keys]))  # (N, K, E)
        sizes = scatter_groups(groups, torch.tensor([m.shape[1] for m, g in zip(memories, groups) for _ in g]))  # (N,)
        padding = torch.arange(length)[None, :] >= sizes[:, None]  # (N, K) True on padding keys
        bias = padding_bias(padding.to(device), memory.dtype) if bool(padding.any()) else None  # (N, 1, 1, K)
        encoder_attention = None
        if record == "all":
            encoder_attention = [  # per block (N, heads, K, K)
                scatter_groups(groups, torch.cat([pad_to(a[block], length, 2, 3) for a in attentions]))
                for block in range(len(attentions[0]))
            ]
        return self._decoding_state(memory, key_in, bias, [grids[i] for i in range(len(pixels))], encoder_attention)

    def _decoding_state(
        self,
        memory: torch.Tensor,
        keys: torch.Tensor,
        bias: torch.Tensor | None,
        grids: list[tuple[int, int]],
        encoder_attention: list[torch.Tensor] | None,
    ) -> Encoded:
        """memory and keys ``(N, K, E)`` -> the decoding state with every layer's cross keys/values projected once."""
        caches = [LayerCache(*layer.project_memory(memory, keys)) for layer in self.layers]
        return Encoded(CPTRState(caches, bias), grids, encoder_attention)

    def step(self, state: CPTRState, ids: torch.Tensor, record: Record = "cross") -> StepOutput:
        """Feed one token per caption, ids ``(N,)``, at the state's next position; see :mod:`attnlab.captioner`."""
        check_record(record)
        if state.position >= self.config.max_positions:
            raise AttnlabError(f"this model decodes at most {self.config.max_positions} positions")
        ids = torch.as_tensor(ids, device=self.head.weight.device).reshape(-1, 1)  # (N, 1)
        x = self.embed(ids, state.position)  # (N, 1, E)
        want = record != "none"
        cross, selfs = [], []
        for layer, cache in zip(self.layers, state.layers):
            x, cw, sw = layer.step(x, cache, state.memory_bias, want)
            if want:
                cross.append(cw)  # (N, heads, K)
                selfs.append(sw)  # (N, heads, t)
        state.position += 1
        logits = self.head(self.norm(x[:, 0]))  # (N, V)
        return StepOutput(logits, cross if want else None, selfs if record == "all" else None)

    # --------------------------------------------------------- full forward
    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids ``(N, L)`` at positions ``start .. start + L - 1`` -> ``(N, L, E)``."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)  # (L,)
        return self.dropout(self.token_embed(ids) + self.position_embed(positions))  # (N, L, E)

    def forward(self, images: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced forward (training): images ``(N, 3, H, W)``, target ids ``(N, T)``,
        target_mask ``(N, T)`` (True = padding) -> logits ``(N, T, V)``.

        Every attention runs through the ``nn.MultiheadAttention`` modules and the
        timm blocks, so :func:`attnlab.capture_attention` sees all of it.
        """
        memory = self.encode(images)  # (N, K, E)
        keys = self.cross_keys(memory, self.grid(*images.shape[-2:]))  # (N, K, E)
        length = target.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=target.device).triu(1)  # (T, T) True = future
        x = self.embed(target)  # (N, T, E)
        for layer in self.layers:
            x = layer(x, memory, keys, causal, target_mask)
        return self.head(self.norm(x))  # (N, T, V)


def sincos_positions(model: CPTR) -> None:
    """Set the ViT's learned position embedding to fixed 2-D sine-cosine values (as MAE does).

    An initialisation for training from scratch: patch ``(r, c)`` gets the
    sin/cos features of its row and column, so neighbouring patches start
    with similar positions and the decoder can tell where a token is from the
    first step (learned embeddings start as small random vectors). Prefix
    tokens' entries are set to zero. The embedding stays trainable.
    """
    from timm.layers import build_sincos2d_pos_embed

    vit = model.encoder
    pos = getattr(vit, "pos_embed", None)  # (1, prefix + h * w, E), or (1, h * w, E) with no_embed_class
    if pos is None:
        raise AttnlabError("this ViT has no learned position embedding to initialise")
    h, w = vit.patch_embed.grid_size
    table = build_sincos2d_pos_embed([h, w], dim=pos.shape[-1])  # (h * w, E)
    prefix = pos.shape[1] - h * w
    with torch.no_grad():
        pos[0, :prefix].zero_()
        pos[0, prefix:].copy_(table)


def build_cptr(config: CPTRConfig | None = None, *, vocab: TokenTable | None = None, name: str = "cptr") -> CPTR:
    """A CPTR in eval mode: random weights, or timm's pretrained encoder with ``config.pretrained``."""
    model = CPTR(config or CPTRConfig(), vocab=vocab, name=name)
    model.eval()
    return model
