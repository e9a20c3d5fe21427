"""The bundled shapes-world vision-language model (``attnlab.load_model("shapes-vlm")``):
a tiny :class:`transformers.LlavaForConditionalGeneration` built here, trained by
:mod:`attnlab.shapes.train_vlm`, saved with ``save_pretrained`` in ``attnlab/weights/shapes-vlm``.

The model: a CLIP vision tower (128 px, patch 16: CLS + an 8 x 8 grid; its position
embeddings start from 2-D sine-cosine positions), LLaVA's two-layer projector and a small
Llama decoder; a word-level tokenizer (``tokenizers``) over the shapes words and the chat
words, and a :class:`transformers.LlavaProcessor` whose chat template makes the fixed
prompt ``"USER: <image> describe the scene . ASSISTANT:"``. ``transformers`` is imported
lazily: without it :func:`load` says how to install it in one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...errors import AttnlabError

FOLDER = Path(__file__).resolve().parents[2] / "weights" / "shapes-vlm"
"""Where the bundled model's files live (inside the package)."""
PROMPT = "describe the scene ."
"""The prompt the model was trained with (the user turn's text after the image)."""
SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
CHAT_WORDS = ["USER", "ASSISTANT", ":", "describe", "the", "scene", "."]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE, PATCH = 128, 16  # an 8 x 8 grid of 16-px patches on the 128-px scene
INSTALL = 'the bundled vision-language model needs transformers: pip install "attnlab[hf]"'


def _transformers():
    try:
        import transformers
    except ImportError:
        raise AttnlabError(INSTALL) from None
    return transformers


def write_tokenizer(words: list[str], folder: Path) -> Path:
    """A word-level ``tokenizer.json`` over the special tokens, the chat words and ``words``."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    names = [w for w in words if not (w.startswith("[") and w.endswith("]"))]  # the shapes words, no [PAD] etc.
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL + CHAT_WORDS + names))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), "isolated")]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """``(grid * grid, dim)`` 2-D sine-cosine positions (half the channels for y, half for x), row-major."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]  # each (grid^2, dim/4)
    return torch.cat(out, dim=1)  # (grid^2, dim): sin y, cos y, sin x, cos x


def build(words: list[str], folder: Path, seed: int = 0, *, width: int = 128, vision_layers: int = 3,
          text_layers: int = 2, heads: int = 4) -> tuple[Any, Any]:
    """A fresh (untrained) model and its processor; the processor's files are written into ``folder``."""
    tf = _transformers()
    torch.manual_seed(seed)
    tok_file = write_tokenizer(words, Path(folder))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token="</s>", bos_token="<s>",
                                           pad_token="<pad>", unk_token="<unk>")
    vocab = tokenizer.get_vocab()
    vision = tf.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vision_layers,
                                 num_attention_heads=heads, image_size=IMAGE, patch_size=PATCH, projection_dim=width)
    text = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=text_layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
                          eos_token_id=vocab["</s>"], bos_token_id=vocab["<s>"], pad_token_id=vocab["<pad>"],
                          tie_word_embeddings=True)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                            vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=True)
    model = tf.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    grid = IMAGE // PATCH
    with torch.no_grad():  # a strong 2-D position signal to start from: sine-cosine for the patches, zero for CLS
        emb = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + grid^2, width)
        emb.zero_()
        emb[1:] = sincos_2d(grid, width)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = vocab["</s>"], vocab["<pad>"], vocab["<s>"]
    gen.max_new_tokens, gen.do_sample, gen.suppress_tokens = 16, False, [vocab["<image>"]]
    image = tf.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                  do_center_crop=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = tf.LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  image_token="<image>", chat_template=TEMPLATE)
    return model, processor


def load(folder: str | Path = FOLDER) -> tuple[Any, Any]:
    """``(model, processor)`` from a ``save_pretrained`` folder (offline), the model in float32, eval mode."""
    tf = _transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AttnlabError(f"{folder} holds no saved model (config.json): reinstall attnlab or train one with "
                           "python -m attnlab.shapes.train_vlm")
    bars = tf.utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # a 3 MB model: no "Loading weights" bar in a student's notebook
    try:
        model = tf.LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
        processor = tf.AutoProcessor.from_pretrained(str(folder))
    finally:
        if shown:
            bars.enable_progress_bar()
    return model.eval(), processor


def chat(processor: Any, prompt: str = PROMPT) -> str:
    """The exact text handed to the processor for ``prompt`` (through the chat template, as the captioner's)."""
    from .vlm import chat_text

    return chat_text(processor, prompt)


def grid_of(model: Any) -> int:
    """The side of the model's patch grid."""
    v = model.config.vision_config
    return int(math.floor(v.image_size / v.patch_size))
