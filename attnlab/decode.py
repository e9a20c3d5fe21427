"""``caption()``: greedy or teacher-forced decoding that records attention.

Two ways to run the same model:

* ``mode="incremental"`` (default): the image is encoded once; each step feeds
  only the newest token through the decoder, reusing the cached keys and values
  of earlier positions and of the image.
* ``mode="template"``: the reference loop of the original CATR write-up. Every
  step runs the whole model on a 128-position template (start token, the tokens
  so far, zeros) with a key padding mask, and reads position ``i``; the weights
  come from hooks on the ``nn.MultiheadAttention`` modules (query length 128).

Both give the same tokens and the same attention rows (tests check to 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .capture import capture_attention
from .errors import AttnlabError
from .models.catr import CATR
from .preprocess import Batch, ImageInput, prepare
from .tokenizer import IdVocab, Vocab
from .trace import CaptionTrace

Record = Literal["none", "cross", "all"]
CROSS = "transformer.decoder.layers.*.multihead_attn"
DEC_SELF = "transformer.decoder.layers.*.self_attn"
ENC_SELF = "transformer.encoder.layers.*.self_attn"


def model_vocab(model: CATR) -> Vocab:
    """The model's vocabulary, or ``[id]`` placeholders when it has none."""
    vocab = getattr(model, "vocab", None)
    if vocab is not None:
        return vocab
    c = model.config
    return IdVocab({c.pad_token_id: "[PAD]", c.start_token_id: "[CLS]", c.end_token_id: "[SEP]"})


def _check_tokens(tokens, n_images: int, limit: int, vocab_size: int) -> list[list[int]] | None:
    if tokens is None:
        return None
    if isinstance(tokens, (np.ndarray, torch.Tensor)):  # e.g. a trace's token_ids; 2-D: one row per image
        tokens = tokens.tolist()
        if not isinstance(tokens, list):  # a 0-d array holds one id
            tokens = [tokens]
    nested = len(tokens) > 0 and (
        isinstance(tokens[0], (list, tuple))
        or (isinstance(tokens[0], (np.ndarray, torch.Tensor)) and tokens[0].ndim >= 1)
    )
    per_image = list(tokens) if nested else [tokens] * n_images
    if len(per_image) != n_images:
        raise AttnlabError(f"tokens gives {len(per_image)} captions for {n_images} images")
    out = []
    for seq in per_image:
        ids = [int(t) for t in (seq.tolist() if hasattr(seq, "tolist") else seq)]
        if not ids:
            raise AttnlabError("tokens is empty: give the ids of the caption to trace")
        if len(ids) > limit:
            raise AttnlabError(f"tokens has {len(ids)} ids; this model decodes at most {limit}")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise AttnlabError(f"token ids must lie in 0..{vocab_size - 1}")
        out.append(ids)
    return out


def _valid_grid(feat_mask: torch.Tensor, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Rows and columns of each image's unpadded patches. feat_mask ``(N, S)``."""
    valid = ~feat_mask.view(-1, *grid)  # (N, h, w)
    rows = valid.any(dim=2).sum(dim=1)  # (N,)
    cols = valid.any(dim=1).sum(dim=1)  # (N,)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def make_template(config, prefixes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The original write-up's decoder input: one 128-position row per caption.

    Row ``n`` holds the start token, then ``prefixes[n]``, then zeros; the mask
    is True on the empty positions. Returns ids and mask, both ``(N, max_positions)``.
    """
    length = config.max_positions
    template = torch.zeros(len(prefixes), length, dtype=torch.long)  # (N, L)
    mask = torch.ones(len(prefixes), length, dtype=torch.bool)  # (N, L): True = empty
    for n, prefix in enumerate(prefixes):
        ids = [config.start_token_id, *prefix][:length]
        template[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[n, : len(ids)] = False
    return template, mask


def _next_tokens(logits: torch.Tensor, forced: list[list[int]] | None, i: int, pad: int) -> torch.Tensor:
    """Step ``i``'s tokens ``(N,)``: greedy argmax of logits ``(N, V)``, or the forced ones."""
    if forced is None:
        return logits.argmax(dim=-1)
    return torch.tensor([f[i] if i < len(f) else pad for f in forced], device=logits.device)


def _finished(done: torch.Tensor, forced: list[list[int]] | None, i: int) -> bool:
    """Greedy: every caption has emitted its end token. Forced: the longest caption is done."""
    if forced is None:
        return bool(done.all())
    return i + 1 >= max(len(f) for f in forced)


class _Recorder:
    """Per-step outputs of a batched decode, assembled into traces at the end."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []  # per step (N, V)
        self.tokens: list[torch.Tensor] = []  # per step (N,)
        self.cross: list[torch.Tensor] = []  # per step (layers, N, heads, S)
        self.dec_self: list[list[torch.Tensor]] = []  # per step, per layer (N, heads, t)
        self.enc_self: torch.Tensor | None = None  # (layers, N, heads, S, S)


def _incremental(model: CATR, batch: Batch, forced, max_len: int, record: Record):
    c = model.config
    rec = _Recorder()
    if record == "all":
        with capture_attention(model, ENC_SELF) as cap:
            memory, feat_mask, pos, grid = model.encode(batch.pixels, batch.mask)
        rec.enc_self = torch.stack([cap.last(n) for n in cap.names])  # (layers, N, heads, S, S)
    else:
        memory, feat_mask, pos, grid = model.encode(batch.pixels, batch.mask)  # (S, N, E), (N, S), (S, N, E)
    n = memory.shape[1]
    cache = model.transformer.start_decoding(memory, feat_mask, pos)
    ids = torch.full((n, 1), c.start_token_id, dtype=torch.long, device=memory.device)  # (N, 1)
    done = torch.zeros(n, dtype=torch.bool, device=memory.device)
    for i in range(max_len):
        hidden, cross, selfs = model.transformer.decode_step(ids, cache, want_weights=record != "none")
        logits = model.mlp(hidden[:, -1])  # (N, V)
        nxt = _next_tokens(logits, forced, i, c.pad_token_id)  # (N,)
        rec.logits.append(logits)
        rec.tokens.append(nxt)
        if record != "none":
            rec.cross.append(torch.stack(cross)[:, :, :, 0])  # (layers, N, heads, S)
        if record == "all":
            rec.dec_self.append([s[:, :, 0] for s in selfs])  # per layer (N, heads, i+1)
        done |= nxt == c.end_token_id
        if _finished(done, forced, i):
            break
        ids = nxt[:, None]  # (N, 1)
    return rec, feat_mask, grid


def _template(model: CATR, batch: Batch, forced, max_len: int, record: Record):
    c = model.config
    rec = _Recorder()
    n = batch.pixels.shape[0]
    length = c.max_positions
    template, template_mask = make_template(c, [[] for _ in range(n)])  # (N, 128) each
    template, template_mask = template.to(batch.pixels.device), template_mask.to(batch.pixels.device)
    done = torch.zeros(n, dtype=torch.bool, device=batch.pixels.device)
    patterns = {"none": [CROSS], "cross": [CROSS], "all": [CROSS, DEC_SELF, ENC_SELF]}[record]
    patch_mask: list[torch.Tensor] = []  # the backbone's (N, h, w) patch mask, read by a hook
    for i in range(max_len):
        hook = None
        if i == 0:
            hook = model.backbone[0].register_forward_hook(lambda mod, args, out: patch_mask.append(out[1]))
        try:
            with capture_attention(model, patterns) as cap:
                logits_all = model(batch.pixels, template, template_mask, mask=batch.mask)  # (N, 128, V)
        finally:
            if hook is not None:
                hook.remove()
        logits = logits_all[:, i]  # (N, V)
        nxt = _next_tokens(logits, forced, i, c.pad_token_id)  # (N,)
        rec.logits.append(logits)
        rec.tokens.append(nxt)
        names = cap.names
        if record != "none":
            # only row i of the 128 query rows matters at step i
            rec.cross.append(torch.stack([cap.last(m)[:, :, i] for m in names if m.endswith("multihead_attn")]))  # (layers, N, heads, S)
        if record == "all":
            rec.dec_self.append([cap.last(m)[:, :, i, : i + 1] for m in names if m.startswith("transformer.decoder") and m.endswith("self_attn")])
            if rec.enc_self is None:
                rec.enc_self = torch.stack([cap.last(m) for m in names if m.startswith("transformer.encoder")])
        done |= nxt == c.end_token_id
        if _finished(done, forced, i):
            break
        if i + 1 < length:
            template[:, i + 1] = nxt
            template_mask[:, i + 1] = False
    grid = (int(patch_mask[0].shape[1]), int(patch_mask[0].shape[2]))
    return rec, patch_mask[0].flatten(1), grid


def _assemble(model: CATR, batch: Batch, rec: _Recorder, feat_mask, grid, forced, record: Record) -> list[CaptionTrace]:
    c = model.config
    vocab = model_vocab(model)
    tokens = torch.stack(rec.tokens, dim=1).cpu()  # (N, steps)
    logits = torch.stack(rec.logits, dim=1).float().cpu()  # (N, steps, V)
    cross = torch.stack(rec.cross, dim=3).float().cpu() if rec.cross else None  # (layers, N, heads, steps, S)
    traces = []
    for b, (gh, gw) in enumerate(_valid_grid(feat_mask.cpu(), grid)):
        ids = tokens[b].tolist()
        if forced is not None:
            steps = len(forced[b])
        else:
            steps = ids.index(c.end_token_id) + 1 if c.end_token_id in ids else len(ids)
        ids = ids[:steps]
        ca = None
        if cross is not None:
            layers, _, heads = cross.shape[:3]
            ca = cross[:, b, :, :steps].reshape(layers, heads, steps, *grid)[..., :gh, :gw]  # (layers, heads, steps, gh, gw)
            ca = np.ascontiguousarray(ca.numpy())
        enc = dec = None
        if record == "all":
            e = rec.enc_self[:, b].float().cpu()  # (layers, heads, S, S)
            e = e.reshape(*e.shape[:2], *grid, *grid)[:, :, :gh, :gw, :gh, :gw]  # (layers, heads, gh, gw, gh, gw)
            enc = np.ascontiguousarray(e.reshape(*e.shape[:2], gh * gw, gh * gw).numpy())
            layers, heads = len(rec.dec_self[0]), rec.dec_self[0][0].shape[1]
            dec = np.zeros((layers, heads, steps, steps), dtype=np.float32)  # row t: step t over steps 0..t
            for t in range(steps):
                for layer, row in enumerate(rec.dec_self[t]):
                    dec[layer, :, t, : t + 1] = row[b].float().cpu().numpy()  # row: (N, heads, t+1)
        traces.append(
            CaptionTrace(
                token_ids=np.array(ids, dtype=np.int64),
                words=[vocab.token(i) for i in ids],
                logits=np.ascontiguousarray(logits[b, :steps].numpy()),
                cross_attention=ca,
                grid=(gh, gw),
                image=batch.images[b],
                model_name=getattr(model, "name", "catr"),
                caption=vocab.decode(ids),
                encoder_self_attention=enc,
                decoder_self_attention=dec,
            )
        )
    return traces


def caption(
    model: CATR,
    image: ImageInput | Sequence[ImageInput],
    *,
    max_len: int | None = None,
    tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    mode: Literal["incremental", "template"] = "incremental",
    record: Record = "cross",
) -> CaptionTrace | list[CaptionTrace]:
    """Caption ``image`` and record the decoder's words-to-patches attention.

    Args:
        model: a model from :func:`attnlab.load_model` (or :func:`attnlab.models.build_catr`).
        image: a path, PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor, or a
            list of them (then a list of traces; sizes may differ: images are
            padded and each trace is cropped to its own grid).
        max_len: most tokens to generate (default: the model's limit, 127 for CATR).
        tokens: teacher forcing: the token ids of a given caption (for a list of
            images, one list for all or one per image). Step ``i`` is the query
            that predicts ``tokens[i]``; the start token is added here.
        mode: ``"incremental"`` (cached decoder, fast) or ``"template"`` (the
            original 128-position loop, slow, for checking).
        record: ``"cross"`` (default), ``"all"`` (also encoder and decoder
            self-attention) or ``"none"`` (tokens and logits only).
    """
    if mode not in ("incremental", "template"):
        raise AttnlabError(f"mode must be 'incremental' or 'template', not {mode!r}")
    if record not in ("none", "cross", "all"):
        raise AttnlabError(f"record must be 'none', 'cross' or 'all', not {record!r}")
    c = model.config
    limit = c.max_positions - 1
    if max_len is None:
        max_len = limit
    if not isinstance(max_len, int) or not 1 <= max_len <= limit:
        raise AttnlabError(f"max_len must be an integer from 1 to {limit}, not {max_len!r}")
    many = isinstance(image, (list, tuple))
    images = list(image) if many else [image]
    if not images:
        raise AttnlabError("no image given")
    forced = _check_tokens(tokens, len(images), limit, c.vocab_size)
    if forced is not None:
        max_len = max(len(f) for f in forced)
    device = next(model.parameters()).device
    batch = prepare(images, c.image_size, c.mean, c.std)
    batch = Batch(batch.pixels.to(device), batch.mask.to(device), batch.images)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            run = _incremental if mode == "incremental" else _template
            rec, feat_mask, grid = run(model, batch, forced, max_len, record)
            traces = _assemble(model, batch, rec, feat_mask, grid, forced, record)
    finally:
        model.train(was_training)
    for t in traces:
        t.meta["mode"] = mode
    return traces if many else traces[0]
