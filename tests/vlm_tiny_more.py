"""Tiny random PaliGemma, Gemma 3 and LLaVA-OneVision models with their processors, built offline and seeded
(the same pattern as tests/vlm_tiny.py: a small language model of 2 layers, 4 heads of which 2 key/value
heads, a small vision tower, a word-level tokenizer written into ``folder``).

``build(family, folder, **options)`` -> ``(model, processor)``; ``prompt(family, processor, photo)`` the
model input for one photo (PaliGemma: its plain ``"caption en"`` prefix; the others: the chat template).
"""

from __future__ import annotations

from pathlib import Path

import torch
from vlm_tiny import word_tokenizer

FAMILIES = ("paligemma", "gemma3", "llava_onevision")
WORDS = ["user", "model", "USER", "ASSISTANT", ":", "describe", "this", "image", ".", "a", "cat", "dog", "red",
         "car", "caption", "en", "what", "colour", "is", "?"] + [f"w{i}" for i in range(60)]
PALI_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
GEMMA3_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
OV_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
GEMMA3_TEMPLATE = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)
OV_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
OV_PINPOINTS = [[42, 42], [42, 84], [84, 42], [84, 84], [42, 126], [126, 42], [126, 126]]


def _tokenizer(special: list[str], folder: Path, plain: list[str] = (), **tokens):
    """:func:`vlm_tiny.word_tokenizer` over this file's :data:`WORDS`."""
    return word_tokenizer(special, folder, plain, WORDS, **tokens)


def _siglip(image_size: int, patch: int):
    import transformers as tf

    return tf.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=image_size, patch_size=patch)


def _paligemma(folder: Path, text: str = "gemma"):
    """PaliGemma; ``text="gemma2"``: PaliGemma 2 (Gemma 2: attention logits softcapped, a sliding-window layer)."""
    import transformers as tf

    tokenizer, _ = _tokenizer(PALI_SPECIAL, folder, ["\n"], bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                              unk_token="<unk>")
    image = tf.SiglipImageProcessor(size={"height": 56, "width": 56})
    image.image_seq_length = 16  # (56 / 14)^2
    processor = tf.PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer)  # adds <loc..>/<seg..> tokens
    size = len(processor.tokenizer) + 3
    common = dict(vocab_size=size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if text == "gemma2":
        text = tf.Gemma2Config(**common, sliding_window=12, layer_types=["sliding_attention", "full_attention"],
                               attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    else:
        text = tf.GemmaConfig(**common)
    cfg = tf.PaliGemmaConfig(vision_config=_siglip(56, 14), text_config=text, image_token_index=processor.image_token_id,
                             vocab_size=size, projection_dim=64, hidden_size=64, tie_word_embeddings=False)
    attn = "eager" if text.model_type == "gemma2" else "sdpa"  # Gemma 2 refuses sdpa (softcapping)
    model = tf.PaliGemmaForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    if attn == "eager":  # large attention logits, so that the softcap (tanh) changes the rows well beyond float noise
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(20.0)
    return model, processor


def _gemma3(folder: Path, sliding_window: int = 12):
    import transformers as tf

    tokens = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    tokenizer, vocab = _tokenizer(GEMMA3_SPECIAL, folder, ["\n\n"], bos_token="<bos>", eos_token="<end_of_turn>",
                                  pad_token="<pad>", unk_token="<unk>", extra_special_tokens=tokens)
    text = tf.Gemma3TextConfig(vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               bos_token_id=vocab["<bos>"], eos_token_id=vocab["<end_of_turn>"], pad_token_id=vocab["<pad>"])
    cfg = tf.Gemma3Config(text_config=text, vision_config=_siglip(56, 7), mm_tokens_per_image=16,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab["<image_soft_token>"], tie_word_embeddings=False)
    model = tf.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    image = tf.Gemma3ImageProcessor(size={"height": 56, "width": 56}, do_pan_and_scan=False)
    processor = tf.Gemma3Processor(image_processor=image, tokenizer=tokenizer, image_seq_length=16, chat_template=GEMMA3_TEMPLATE)
    return model, processor


def _onevision(folder: Path, aspect: str = "anyres_max_9", vision: str = "clip"):
    """LLaVA-OneVision; ``vision="siglip"``: as real checkpoints, SigLIP (no CLS) with ``vision_feature_select_strategy="full"``."""
    import transformers as tf

    tokenizer, vocab = _tokenizer(OV_SPECIAL, folder, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    strategy, extra = ("full", 0) if vision == "siglip" else ("default", 1)
    vision = _siglip(42, 14) if vision == "siglip" else tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=42, patch_size=14,
        projection_dim=32)
    text = tf.Qwen2Config(vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=vocab["<|im_end|>"],
                          bos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    cfg = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                                  video_token_index=vocab["<video>"], vision_feature_select_strategy=strategy,
                                  vision_feature_layer=-2, image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio=aspect)
    model = tf.LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    image = tf.LlavaOnevisionImageProcessor(size={"height": 42, "width": 42}, image_grid_pinpoints=OV_PINPOINTS)
    processor = tf.LlavaOnevisionProcessor(image_processor=image, tokenizer=tokenizer, video_processor=tf.LlavaOnevisionVideoProcessor(),
                                           num_image_tokens=3 * 3 + extra, vision_feature_select_strategy=strategy,
                                           vision_aspect_ratio=aspect, chat_template=OV_TEMPLATE)
    return model, processor


def build(family: str, folder: Path, seed: int = 0, **options):
    """``(model, processor)``: the model in eval mode under sdpa (PaliGemma 2: eager), the image placeholder
    suppressed in generate."""
    torch.manual_seed(seed)
    make = {"paligemma": _paligemma, "gemma3": _gemma3, "llava_onevision": _onevision}[family]
    model, processor = make(Path(folder) / "files", **options)
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    # untied output heads: a tied random Gemma repeats its last input token, which would make every step alike
    return model.eval(), processor


def prompt(family: str, processor, image, text: str | None = None) -> dict:
    """The processor's input for one photo (``labels`` dropped: a forward must not get them)."""
    if family == "paligemma":
        out = dict(processor(text=["<image>" + (text or "caption en")], images=[image], return_tensors="pt"))
        out.pop("labels", None)
        return out
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text or "describe this image ."}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[chat], images=[image], return_tensors="pt"))
