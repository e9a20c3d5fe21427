"""Tiny random Florence-2 and BLIP-2 (OPT) models with their processors, built offline and seeded.

``build(family, folder)`` returns ``(model, processor)`` for ``"florence2"`` or ``"blip2"``: the model in
eval mode under sdpa, the processor saved into ``folder`` and loaded back with ``AutoProcessor`` (a
word-level ``tokenizers`` tokenizer written there). Florence-2 keeps the real stages' kernels, strides and
paddings (7/4/3, 3/2/1, 3/2/1, 3/2/1: a 32-px cell) on a 128 x 160 input, so its grid is 4 x 5; its
generation config forces ``<s>`` first and ``</s>`` last and bans repeated trigrams, as the released
checkpoints' does. BLIP-2 has 8 queries over a 5 x 5 grid + CLS, and its Q-Former cross-attends in every
layer. The layouts and eager rows below are computed here, independently of attnlab.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FAMILIES = ("florence2", "blip2")
WORDS = ("What does the image describe ? Describe in detail what is shown . with a paragraph Question : colour is car "
         "Answer photo of cat dog red").split() + [f"w{i}" for i in range(40)]
FLORENCE_SIZE = (128, 160)  # (height, width) the processor resizes to
BLIP_SIDE, BLIP_QUERIES = 70, 8


def _tokenizer(special: list[str], folder: Path, bos_template: str | None = None, **tokens):
    import transformers as tf
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), "isolated")]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    if bos_template is not None:  # OPT's tokenizer starts every text with </s>
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_template} $A", special_tokens=[(bos_template, vocab[bos_template])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **tokens), vocab


def _florence2(folder: Path):
    import transformers as tf

    special = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    tokenizer, vocab = _tokenizer(special, folder, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  extra_special_tokens={"image_token": "<image>"})
    h, w = FLORENCE_SIZE
    image = tf.CLIPImageProcessor(size={"height": h, "width": w}, do_center_crop=False, crop_size={"height": h, "width": w},
                                  image_seq_length=1 + (h // 32) * (w // 32))
    processor = tf.Florence2Processor(image_processor=image, tokenizer=tokenizer)
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                  window_size=2, projection_dim=32, drop_path_rate=0.0)
    text = dict(vocab_size=len(vocab) + 3, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=128,
                bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    cfg = tf.Florence2Config(vision_config=vision, text_config=text, image_token_id=vocab["<image>"])
    model = tf.Florence2ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    gen = model.generation_config
    gen.forced_bos_token_id, gen.forced_eos_token_id, gen.no_repeat_ngram_size = 0, 2, 3  # as the released checkpoints
    gen.suppress_tokens = [vocab["<image>"]]
    return model, processor


def _blip2(folder: Path):
    import transformers as tf

    tokenizer, vocab = _tokenizer(["<unk>", "<pad>", "</s>"], folder, bos_template="</s>", bos_token="</s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    image = tf.BlipImageProcessor(size={"height": BLIP_SIDE, "width": BLIP_SIDE})
    processor = tf.Blip2Processor(image_processor=image, tokenizer=tokenizer, num_query_tokens=BLIP_QUERIES)  # adds <image>
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=BLIP_SIDE, patch_size=14)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, cross_attention_frequency=1)
    text = tf.OPTConfig(vocab_size=len(vocab) + 4, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = tf.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=BLIP_QUERIES,
                         image_token_index=image_id)
    model = tf.Blip2ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    model.generation_config.suppress_tokens = [image_id]
    return model, processor


def build(family: str, folder: Path, seed: int = 0):
    """``(model, processor)``: the model in eval mode under sdpa, the processor reloaded from ``folder``."""
    import transformers as tf

    torch.manual_seed(seed)
    model, processor = (_florence2 if family == "florence2" else _blip2)(Path(folder) / "files")
    with torch.no_grad():  # sharper attention than the 0.02-std init: rows that differ from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", ".query.weight", ".key.weight")):
                p.mul_(8.0)
    processor.save_pretrained(str(Path(folder) / "processor"))
    processor = tf.AutoProcessor.from_pretrained(str(Path(folder) / "processor"))
    return model.eval(), processor


def photo(width: int, height: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def inputs(processor, image, text: str) -> dict:
    """The processor's input for one photo and the text as the processor takes it."""
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


# ------------------------------------------------------------------ layouts and rows, computed independently of attnlab
def florence2_expected(model, ids: np.ndarray, pixel_values) -> dict:
    """Florence-2's encoder keys: the pooled token, the grid (its shape read off the vision tower's output),
    the prompt's words and ``<s>`` / ``</s>``."""
    with torch.no_grad():
        h, w = model.model.vision_tower(pixel_values).last_hidden_state.shape[-2:]
    image = np.flatnonzero(ids == model.config.image_token_id)
    assert len(image) == 1 + h * w and image[0] == 0  # the image tokens come first
    text = np.arange(len(image), len(ids))
    special = text[np.isin(ids[text], [0, 1, 2, 3])]
    return {"grid": (int(h), int(w)), "cells": image[1:], "prefix": image[:1], "special": special,
            "prompt": np.setdiff1d(text, special)}


def florence2_eager(model, inputs: dict, tokens: np.ndarray) -> list[np.ndarray]:
    """The decoder's cross-attention of one teacher-forced eager forward: per layer ``(heads, steps, T)``."""
    start = model.generation_config.decoder_start_token_id
    decoder = torch.as_tensor([[start, *tokens[:-1].tolist()]])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, decoder_input_ids=decoder, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a[0].numpy() for a in out.cross_attentions]


def blip2_eager(model, inputs: dict, tokens: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """One teacher-forced eager forward of the whole model: the language model's rows of every step, per layer
    ``(heads, steps, T + steps)``; and the Q-Former's cross-attention, run here by hand under eager, per
    cross-attention layer ``(heads, queries, 1 + h * w)`` stacked."""
    n, T = len(tokens), inputs["input_ids"].shape[1]
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.as_tensor(tokens[None, :-1])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**full, output_attentions=True)
            vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
            q = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=vision, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    rows = [a[0, :, T - 1: T - 1 + n, :].numpy() for a in out.language_model_outputs.attentions]
    cross = np.stack([a[0].numpy() for a in q.cross_attentions])  # (cross layers, heads, queries, 1 + h * w)
    return rows, cross
