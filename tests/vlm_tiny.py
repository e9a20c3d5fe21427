"""Tiny random vision-language models and their processors, built offline and seeded.

``build(family, tmp_path)`` returns ``(model, processor)`` for ``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl``, ``llava`` and ``llava_next``: a small language model (2 layers, 4 heads of
which 2 key/value heads), a small vision tower, and a processor loaded back from files
written into ``tmp_path`` (a word-level ``tokenizers`` tokenizer with the family's special
tokens and chat template, the family's image processor). ``prompt(processor, photo)`` makes
the model input for one photo.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next")
WORDS = ["user", "assistant", "USER", "ASSISTANT", ":", "describe", "this", "image", ".", "a", "cat", "dog", "red",
         "car", "the", "what", "colour", "is", "?"] + [f"w{i}" for i in range(60)]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAVA_PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126], [126, 42]]


def word_tokenizer(special: list[str], folder: Path, plain: list[str] = (), words: list[str] = WORDS, **tokens):
    """A word-level tokenizer written to ``folder``: ``special`` tokens, ``plain`` added tokens (newlines), then
    ``words`` and ``[UNK]``; returns ``(tokenizer, vocab)``."""
    import transformers as tf
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(special + list(plain) + list(words) + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), "isolated")]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in plain])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **tokens), vocab


def _qwen(family: str, folder: Path):
    import transformers as tf

    tokenizer, vocab = word_tokenizer(QWEN_SPECIAL, folder, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                eos_token_id=vocab["<|im_end|>"], bos_token_id=vocab["<|endoftext|>"])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14)
        cfg, cls, patch, video = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, 14, tf.Qwen2VLVideoProcessor
        proc_cls = tf.Qwen2VLProcessor
    elif family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                      window_size=56, fullatt_block_indexes=[1])
        cfg, cls, patch, video = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, 14, tf.Qwen2VLVideoProcessor
        proc_cls = tf.Qwen2_5_VLProcessor
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        text.update(head_dim=16, rope_parameters={**rope, "mrope_interleaved": True})
        cfg, cls, patch, video = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, 16, tf.Qwen3VLVideoProcessor
        proc_cls = tf.Qwen3VLProcessor
    model = cls._from_config(cfg(vision_config=vision, text_config=text, **ids), attn_implementation="sdpa")
    side = patch * 2
    image = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                     min_pixels=side * side * 4, max_pixels=side * side * 48)
    processor = proc_cls(image_processor=image, tokenizer=tokenizer, video_processor=video(), chat_template=QWEN_TEMPLATE)
    return model, processor


def _llava(family: str, folder: Path, strategy: str = "default"):
    import transformers as tf

    tokenizer, vocab = word_tokenizer(LLAVA_SPECIAL, folder, eos_token="</s>", bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    side = 84 if family == "llava" else 42
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=side, patch_size=14, projection_dim=32)
    text = tf.LlamaConfig(vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=vocab["</s>"], bos_token_id=vocab["<s>"],
                          pad_token_id=vocab["<pad>"])
    kw = dict(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
              vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    image_kw = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True)
    proc_kw = dict(tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_TEMPLATE)
    if family == "llava":
        model = tf.LlavaForConditionalGeneration._from_config(tf.LlavaConfig(**kw), attn_implementation="sdpa")
        processor = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**image_kw), **proc_kw)
    else:
        cfg = tf.LlavaNextConfig(image_grid_pinpoints=LLAVA_PINPOINTS, **kw)
        model = tf.LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
        image = tf.LlavaNextImageProcessor(image_grid_pinpoints=LLAVA_PINPOINTS, **image_kw)
        processor = tf.LlavaNextProcessor(image_processor=image, **proc_kw)
    return model, processor


def build(family: str, folder: Path, seed: int = 0, **options):
    """``(model, processor)``: the model in eval mode under sdpa, the processor reloaded from ``folder``.
    ``strategy="full"`` (LLaVA only) keeps CLS among the image tokens."""
    import transformers as tf

    torch.manual_seed(seed)
    model, processor = (_qwen if family.startswith("qwen") else _llava)(family, Path(folder) / "files", **options)
    # a random model may pick an image placeholder; generate's own suppress_tokens (a logits processor) keeps them out
    image = getattr(model.config, "image_token_id", None)
    model.generation_config.suppress_tokens = [image if image is not None else model.config.image_token_index]
    processor.save_pretrained(str(Path(folder) / "processor"))
    processor = tf.AutoProcessor.from_pretrained(str(Path(folder) / "processor"))
    return model.eval(), processor


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def prompt(processor, image: Image.Image, text: str = "describe this image .") -> dict:
    """The processor's input for one user turn holding the photo and ``text``."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[chat], images=[image], return_tensors="pt"))


# ------------------------------------------------------------------ the layout, computed independently of attnlab
def qwen_grid(processor, width, height):
    """Qwen's smart resize: each side a multiple of patch * merge, area within [min, max] pixels."""
    ip = processor.image_processor
    f = ip.patch_size * ip.merge_size
    lo, hi = ip.size["shortest_edge"], ip.size["longest_edge"]
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h, w = math.floor(height / beta / f) * f, math.floor(width / beta / f) * f
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h // f, w // f


def expected_layout(family, model, processor, ids, width, height):
    """[(grid, key positions row-major)] per view and the newline positions, from the photo size."""
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    start = int(np.flatnonzero(ids == image_id)[0])
    if family.startswith("qwen"):
        g = qwen_grid(processor, width, height)
        return [(g, start + np.arange(g[0] * g[1]))], []
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    base = ((side, side), start + np.arange(side * side))
    if family == "llava":
        return [base], []
    rows, cols, drop_r, drop_c = next_grid(model, width, height)
    shape = (rows - 2 * drop_r, cols - 2 * drop_c)
    first = start + side * side
    cells = first + np.arange(shape[0])[:, None] * (shape[1] + 1) + np.arange(shape[1])[None, :]
    newlines = first + np.arange(shape[0]) * (shape[1] + 1) + shape[1]
    return [base, (shape, cells.reshape(-1))], list(newlines)


def next_grid(model, width, height):
    """LLaVA-NeXT: the stitched grid (rows, cols) of the best pinpoint and the rows / columns of padding dropped each side."""
    tile = model.config.vision_config.image_size
    side = tile // model.config.vision_config.patch_size
    fits = []
    for ph, pw in model.config.image_grid_pinpoints:  # the pinpoint that keeps most of the photo, then wastes least
        s = min(pw / width, ph / height)
        kept = min(int(width * s) * int(height * s), width * height)
        fits.append((-kept, ph * pw - kept, ph, pw))
    _, _, ph, pw = min(fits)
    rows, cols = ph // tile * side, pw // tile * side
    if width * rows > height * cols:  # wider than the stitched grid: whole rows of padding go
        return rows, cols, (rows - int(height * cols / width)) // 2, 0
    return rows, cols, 0, (cols - int(width * rows / height)) // 2


def eager_rows(model, inputs, tokens):
    """Eager attention of one teacher-forced forward over the prompt and the tokens: rows of each step."""
    n = len(tokens)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.as_tensor(tokens[None, :-1])], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, n - 1, dtype=torch.long)], 1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**full, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    T = inputs["input_ids"].shape[1]
    return [[a[0, :, T - 1 + s, : T + s].numpy() for s in range(n)] for a in out.attentions]  # [layer][step] (heads, K)
