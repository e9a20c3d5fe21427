"""Tiny random Idefics3, SmolVLM and GIT models with their processors, built offline and seeded.

``build(family, folder)`` returns ``(model, processor)`` for ``idefics3``, ``smolvlm`` and ``git``:
a small language model (2 layers, 4 heads), a small vision tower, and a processor reloaded from
files written into ``folder`` (a word-level ``tokenizers`` tokenizer from :mod:`vlm_tiny` with the
family's special tokens (Idefics3 / SmolVLM: and ``\n``, the text between rows of tiles), the family's image processor). Idefics3 / SmolVLM: 42-px tiles of 7-px
patches, pixel shuffle 2 (3 x 3 tokens per tile), the photo's long side resized to 168 (up to 4 x 4
tiles). GIT: a 28-px centre crop of 7-px patches (CLS + 4 x 4), eager attention (GIT refuses sdpa).
``prompt(family, processor, photo, text)`` makes the model input for one photo the way the family's
users do (GIT: ``[CLS]`` and the prompt's words, no ``[SEP]``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vlm_tiny import WORDS, photo, word_tokenizer  # noqa: F401  (photo: the same seeded photos as part 1)

FAMILIES = ("idefics3", "smolvlm", "git")
TILE, PATCH, SCALE, LONG = 42, 7, 2, 168  # tile side, patch side, pixel shuffle, the long side the photo is resized to
MARKERS = ["<fake_token_around_image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<image>", "<end_of_utterance>", *MARKERS]
IDEFICS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
GIT_SPECIAL = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]



@contextlib.contextmanager
def smolvlm_without_num2words():
    """SmolVLMProcessor refuses to start without the optional ``num2words`` package, which only its
    video prompts use; the tests run it with a stand-in for the duration (restored afterwards)."""
    import transformers.models.smolvlm.processing_smolvlm as module

    before = module.num2words
    if before is None:
        module.num2words = lambda n: str(n)
    try:
        yield
    finally:
        module.num2words = before


def _idefics(family: str, folder: Path, splitting: bool = True, long: int = LONG):
    import transformers as tf

    tokenizer, vocab = word_tokenizer(IDEFICS_SPECIAL, folder, ["\n"], eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
                  patch_size=PATCH)
    text = dict(model_type="llama", vocab_size=len(vocab) + 3, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=vocab["<end_of_utterance>"],
                bos_token_id=vocab["<|im_start|>"], pad_token_id=vocab["<|endoftext|>"])
    image_kw = dict(size={"longest_edge": long}, max_image_size={"longest_edge": TILE}, do_image_splitting=splitting)
    seq = (TILE // PATCH // SCALE) ** 2
    if family == "idefics3":
        cfg = tf.Idefics3Config(vision_config=vision, text_config=text, image_token_id=vocab["<image>"], scale_factor=SCALE)
        model = tf.Idefics3ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
        processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**image_kw), tokenizer=tokenizer,
                                         image_seq_len=seq, chat_template=IDEFICS_TEMPLATE)
    else:
        cfg = tf.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"], scale_factor=SCALE)
        model = tf.SmolVLMForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
        processor = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessor(**image_kw), tokenizer=tokenizer,
                                        video_processor=tf.SmolVLMVideoProcessor(), image_seq_len=seq,
                                        chat_template=IDEFICS_TEMPLATE)
    model.generation_config.suppress_tokens = [vocab[t] for t in ["<image>", *MARKERS]]  # a random model may pick them
    return model, processor


def _git(folder: Path):
    import transformers as tf
    from tokenizers import processors

    tokenizer, vocab = word_tokenizer(GIT_SPECIAL, folder, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                  unk_token="[UNK]")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(  # BERT's: [CLS] text [SEP]
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    cfg = tf.GitConfig(vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                          image_size=28, patch_size=7),
                       vocab_size=len(vocab) + 3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"],
                       pad_token_id=vocab["[PAD]"])
    model = tf.GitForCausalLM._from_config(cfg, attn_implementation="eager")
    image = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True)
    return model, tf.GitProcessor(image_processor=image, tokenizer=tokenizer)


def build(family: str, folder: Path, seed: int = 0, **options):
    """``(model, processor)``: the model in eval mode (sdpa; GIT eager), the processor reloaded from ``folder``.
    Idefics3 / SmolVLM: ``splitting=False``, or ``long`` (the long side the photo is resized to) at most
    one tile's side, make the global view only."""
    import transformers as tf

    torch.manual_seed(seed)
    with smolvlm_without_num2words():
        if family == "git":
            model, processor = _git(Path(folder) / "files")
        else:
            model, processor = _idefics(family, Path(folder) / "files", **options)
        processor.save_pretrained(str(Path(folder) / "processor"))
        processor = tf.AutoProcessor.from_pretrained(str(Path(folder) / "processor"))
    return model.eval(), processor


def prompt(family: str, processor, image, text: str = "describe this image .") -> dict:
    """The model input for one photo: the chat template (Idefics3 / SmolVLM), or ``[CLS]`` and the words (GIT)."""
    if family == "git":
        ids = [processor.tokenizer.cls_token_id] + processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values": pixels}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[chat], images=[image], return_tensors="pt"))

