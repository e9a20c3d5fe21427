"""How many tokens a photo becomes in real vision-language checkpoints, and where they sit: offline.

:data:`CHECKPOINTS` holds, per family, the settings of one published checkpoint that decide
its image tokens: the values of its ``preprocessor_config.json`` (the image processor),
``processor_config.json`` (the combined processor) and ``config.json`` (the model; only
what the layout and the cost of attention read). :func:`photo_tokens` builds that
checkpoint's processor offline, without weights or downloads (the family's own image
processor class with those settings, a stand-in word-level tokenizer holding the family's
special tokens, written to a temporary folder and loaded back), and its configuration
(no model is built), runs the processor on a photo of the given size with a prompt in the
checkpoint's chat format, and returns the key layout (:class:`attnlab.keys.KeyLayout`, from the
family registry's ``layout_of``, as for a loaded model) and the counts.

The image tokens are exact: the real processor class expands the image placeholder by its
own rule. Text tokens are the stand-in's (one token per word, punctuation mark or line
break); the checkpoint's BPE tokenizer splits words differently, so prompt counts are
approximate. Token ids are the stand-in's, not the checkpoint's (its own ids are listed in
``config`` for reference and replaced when the configuration is built).

Where the values come from (``Checkpoint.source``): the published files of each checkpoint
on the Hugging Face Hub as the authors of this module know them (not downloaded here), checked
against the defaults and docstrings of the processor classes in ``transformers`` 5.x.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AttnlabError
from ...keys import KeyLayout, View

__all__ = ["CHECKPOINTS", "Checkpoint", "PhotoTokens", "build_offline", "checkpoint_table", "photo_table", "photo_tokens", "plain_photo"]

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_L_336 = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
              "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "projection_dim": 768}


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint's settings that decide its image tokens (read-only tables).

    ``image_settings``: its ``preprocessor_config.json`` (passed to ``image_processor``, the
    ``transformers`` class name); ``processor_settings``: its ``processor_config.json``
    (passed to ``processor``); ``config``: the ``config.json`` values that matter, for
    ``config_class`` (``vision_config`` / ``text_config`` nested); ``ids``: the config's
    token-id fields and the token each names (set to the stand-in tokenizer's ids);
    ``special``: the tokenizer's special tokens; ``chat``: the text the chat template makes of
    one user turn holding the image and ``{prompt}``; ``bos``: the tokenizer puts this
    token first; ``source``: where the values come from.
    """

    name: str
    hub: str
    model_type: str
    image_processor: str
    processor: str
    config_class: str
    image_settings: dict
    processor_settings: dict
    config: dict
    ids: dict
    special: tuple[str, ...]
    chat: str
    tokens: dict = field(default_factory=dict)
    bos: str | None = None
    source: str = ""

    @property
    def text_layers_heads(self) -> tuple[int, int]:
        """The language model's ``(layers, attention heads)``: each layer holds ``heads x T x T`` weights."""
        text = self.config["text_config"]
        return int(text["num_hidden_layers"]), int(text["num_attention_heads"])


_HF = "the checkpoint's preprocessor_config.json, processor_config.json and config.json on the Hugging Face Hub"

#: The published settings by name: ``"qwen2-vl"``, ``"llava-1.5"``, ``"llava-next"``, ``"smolvlm"``.
CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in (
    Checkpoint(
        "qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", "Qwen2VLImageProcessor", "Qwen2VLProcessor", "Qwen2VLConfig",
        image_settings={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                        "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        processor_settings={},
        config={"vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "patch_size": 14,
                                  "spatial_merge_size": 2, "temporal_patch_size": 2},
                "text_config": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                                "num_key_value_heads": 2}},
        ids={"image_token_id": ("<|image_pad|>", 151655), "video_token_id": ("<|video_pad|>", 151656),
             "vision_start_token_id": ("<|vision_start|>", 151652), "vision_end_token_id": ("<|vision_end|>", 151653)},
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"),
        chat="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
        tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        source=f"{_HF} (Qwen2-VL-7B-Instruct has the same preprocessing; transformers' default max_pixels is lower, 28*28*1280)",
    ),
    Checkpoint(
        "llava-1.5", "llava-hf/llava-1.5-7b-hf", "llava", "CLIPImageProcessor", "LlavaProcessor", "LlavaConfig",
        image_settings={"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
                        "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        processor_settings={"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                            "image_token": "<image>"},
        config={"vision_config": CLIP_L_336, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "num_key_value_heads": 32}},
        ids={"image_token_index": ("<image>", 32000)},
        special=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
        chat="USER: <image>\n{prompt} ASSISTANT:",
        tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, bos="<s>",
        source=f"{_HF}; CLIP ViT-L/14 at 336 px, its CLS dropped (vision_feature_select_strategy='default')",
    ),
    Checkpoint(
        "llava-next", "llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", "LlavaNextImageProcessor", "LlavaNextProcessor",
        "LlavaNextConfig",
        image_settings={"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
                        "image_grid_pinpoints": LLAVA_PINPOINTS, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        processor_settings={"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                            "image_token": "<image>"},
        config={"vision_config": CLIP_L_336, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                "image_grid_pinpoints": LLAVA_PINPOINTS,
                "text_config": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "num_key_value_heads": 8}},
        ids={"image_token_index": ("<image>", 32000)},
        special=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
        chat="[INST] <image>\n{prompt} [/INST]",
        tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, bos="<s>",
        source=f"{_HF}; the same CLIP tower as LLaVA-1.5, tiles of 336 px on the best of five grid pinpoints",
    ),
    Checkpoint(
        "smolvlm", "HuggingFaceTB/SmolVLM-Instruct", "idefics3", "Idefics3ImageProcessor", "Idefics3Processor",
        "Idefics3Config",
        image_settings={"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}, "do_image_splitting": True,
                        "do_pad": True, "resample": 1, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        processor_settings={"image_seq_len": 81},
        config={"scale_factor": 3,
                "vision_config": {"model_type": "idefics3_vision", "image_size": 384, "patch_size": 14, "hidden_size": 1152,
                                  "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16},
                "text_config": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 24,
                                "num_attention_heads": 32, "num_key_value_heads": 32}},
        ids={"image_token_id": ("<image>", 49190)},
        special=("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                 "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))),
        chat="<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:",
        tokens={"eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>"},
        source=f"{_HF} (SmolVLM-Instruct, 2B, runs on the Idefics3 classes; SigLIP at 384 px, 27 x 27 patches, "
               "pixel shuffle by 3: 81 tokens a tile; transformers' Idefics3 defaults are 364 px tiles and 169 tokens)",
    ),
)}


@dataclass(frozen=True, eq=False)
class PhotoTokens:
    """One photo through one checkpoint's processor: the sequence, its key layout and the counts.

    ``tokens``: every key's token (the stand-in tokenizer's strings); ``image_tokens``: the
    image placeholders the processor put in (every view's cells, newline and prefix keys);
    ``layout``: the :class:`KeyLayout` (views with their boxes on the photo and every other
    kind of key, from the family registry's ``layout_of``); ``tiles``:
    the images the vision encoder sees and their size in pixels ``(n, h, w)``.
    """

    checkpoint: Checkpoint
    photo: tuple[int, int]
    prompt: str
    tokens: tuple[str, ...]
    image_tokens: int
    layout: KeyLayout
    tiles: tuple[int, int, int]

    @property
    def length(self) -> int:
        """``T``, the keys of the prompt (image tokens included)."""
        return len(self.tokens)

    @property
    def views(self) -> tuple[View, ...]:
        return self.layout.views

    @property
    def tile_grid(self) -> tuple[int, int] | None:
        """``(rows, columns)`` of the tiles an Idefics3-style processor cut (its ``<row_r_col_c>`` tokens), else ``None``."""
        found = [tuple(int(v) for v in m.groups()) for t in self.tokens if (m := re.fullmatch(r"<row_(\d+)_col_(\d+)>", t))]
        return (max(r for r, _ in found), max(c for _, c in found)) if found else None

    def counts(self) -> dict[str, int]:
        """Keys per view (by name) and per kind (``"prompt"``, ``"special"``, ``"newline"``, ...)."""
        out = {v.name: len(k) for v, k in zip(self.layout.views, self.layout.view_keys)}
        out.update({kind: len(k) for kind, k in self.layout.kinds.items() if len(k)})
        return out

    def totals(self) -> dict[str, int]:
        """Keys of all views together (``"views"``) and per kind."""
        out = {"views": sum(len(k) for k in self.layout.view_keys)}
        return out | {kind: len(k) for kind, k in self.layout.kinds.items() if len(k)}

    def eager_bytes(self, bytes_per_weight: int = 2) -> int:
        """What eager attention holds for the prompt's forward with ``output_attentions=True``:
        ``layers x heads x T x T`` weights (bf16: 2 bytes each)."""
        layers, heads = self.checkpoint.text_layers_heads
        return layers * heads * self.length * self.length * bytes_per_weight

    def sequence(self) -> str:
        """The prompt as a line of tokens, each view's run of keys (with its newline keys) shown as one bracket."""
        owner = np.full(self.length, -1)
        for i, keys in enumerate(self.layout.view_keys):
            owner[keys] = i
        newline = np.zeros(self.length, bool)
        newline[self.layout.kinds.get("newline", np.zeros(0, int))] = True
        parts, k = [], 0
        while k < self.length:
            if owner[k] < 0:
                parts.append(_shown(self.tokens[k]))
                k += 1
                continue
            view, start = owner[k], k
            while k < self.length and (owner[k] == view or (newline[k] and k + 1 < self.length and owner[k + 1] == view)
                                       or (newline[k] and owner[k - 1] == view)):
                k += 1
            parts.append(_bracket(self.layout.views[view], int(newline[start:k].sum())))
        return " ".join(parts)


def _shown(token: str) -> str:
    return "\\n" if token == "\n" else token


def _bracket(view: View, newlines: int) -> str:
    h, w = view.grid
    if newlines:
        return f"[{view.name}: {h} rows of {w} + newline = {h * w + newlines:,}]"
    return f"[{view.name}: {h} x {w} = {h * w:,}]"


def plain_photo(width: int, height: int) -> Any:
    """A plain RGB photo of ``width x height`` (a gradient: its content does not change any count)."""
    from PIL import Image

    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                    np.full((height, width), 128.0, np.float32)], -1)  # (H, W, 3)
    return Image.fromarray(rgb.astype(np.uint8))


PIECES = r"\w+|\n|[^\w\s]"  # the stand-in's words: a run of letters and digits, a line break, one punctuation mark


def _tokenizer(checkpoint: Checkpoint, text: str, folder: Path) -> Any:
    """A word-level tokenizer with the checkpoint's special tokens and the words of ``text``, saved and loaded back."""
    import transformers as tf
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

    plain = re.split("(" + "|".join(re.escape(s) for s in checkpoint.special) + ")", text)
    words = sorted({w for part in plain if part not in checkpoint.special for w in re.findall(PIECES, part)} | {"\n"})
    vocab = {t: i for i, t in enumerate([*checkpoint.special, *words, "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), "removed"),
                                                 pre_tokenizers.Split(Regex(PIECES), "isolated")])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in checkpoint.special])
    if checkpoint.bos is not None:
        bos = checkpoint.bos
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.save(str(folder / "tokenizer.json"))
    return tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **checkpoint.tokens)


def build_offline(checkpoint: Checkpoint | str, prompt: str = "Describe this image.") -> tuple[Any, Any, str]:
    """``(processor, config, text)``: the checkpoint's processor (its image processor class with the published
    settings, the stand-in tokenizer written to a temporary folder), its configuration (no weights) and the
    processor's text for one user turn holding the photo and ``prompt``."""
    import transformers as tf

    checkpoint = _checkpoint(checkpoint)
    text = checkpoint.chat.format(prompt=prompt)
    with tempfile.TemporaryDirectory(prefix="attnlab-offline-") as folder:
        tokenizer = _tokenizer(checkpoint, text, Path(folder))
    image = getattr(tf, checkpoint.image_processor)(**checkpoint.image_settings)
    parts = {"image_processor": image, "tokenizer": tokenizer, **checkpoint.processor_settings}
    if checkpoint.model_type == "qwen2_vl":
        parts["video_processor"] = tf.Qwen2VLVideoProcessor()
    processor = getattr(tf, checkpoint.processor)(**parts)
    ids = {attr: tokenizer.convert_tokens_to_ids(token) for attr, (token, _) in checkpoint.ids.items()}
    config = getattr(tf, checkpoint.config_class)(**checkpoint.config, **ids)
    return processor, config, text


def _checkpoint(checkpoint: Checkpoint | str) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if checkpoint not in CHECKPOINTS:
        raise AttnlabError(f"no published settings for {checkpoint!r}: use one of {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[checkpoint]


def _tiles(inputs: Any, checkpoint: Checkpoint) -> tuple[int, int, int]:
    """The images the vision encoder sees: ``(n, h, w)`` pixels (Qwen: one image, read from its grid)."""
    if "image_grid_thw" in inputs:
        _, h, w = (int(v) for v in np.asarray(inputs["image_grid_thw"])[0])
        patch = checkpoint.image_settings["patch_size"]
        return 1, h * patch, w * patch
    shape = tuple(int(v) for v in inputs["pixel_values"].shape)
    return (shape[1] if len(shape) == 5 else 1), shape[-2], shape[-1]


def photo_tokens(checkpoint: Checkpoint | str, photo: tuple[int, int] = (640, 480), prompt: str = "Describe this image.") -> PhotoTokens:
    """Run ``checkpoint``'s processor (built offline, :func:`build_offline`) on a ``photo = (width, height)``
    with ``prompt``; its sequence, counts and key layout."""
    from .families import layout_of
    from .families.common import image_token_id

    checkpoint = _checkpoint(checkpoint)
    try:
        width, height = (int(v) for v in photo)
    except (TypeError, ValueError):
        raise AttnlabError(f"photo={photo!r} must be (width, height) in pixels") from None
    if not (28 <= width <= 8192 and 28 <= height <= 8192):
        raise AttnlabError(f"photo={photo!r}: give a photo between 28 and 8192 pixels a side")
    processor, config, text = build_offline(checkpoint, prompt)
    inputs = processor(text=[text], images=[plain_photo(width, height)], return_tensors="np")
    ids = np.asarray(inputs["input_ids"])[0]
    tokens = tuple(processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
    image_id = image_token_id(config)
    layout = layout_of(config, processor, inputs, (width, height))  # the family registry's, as for a loaded model
    return PhotoTokens(checkpoint, (width, height), prompt, tokens, int((ids == image_id).sum()), layout,
                       _tiles(inputs, checkpoint))


def checkpoint_table(names: Any = None) -> str:
    """The published settings of ``names`` (default: all of :data:`CHECKPOINTS`) as a text table, one block each."""
    lines = []
    for name in names or CHECKPOINTS:
        c = _checkpoint(name)
        layers, heads = c.text_layers_heads
        lines.append(f"{c.name} ({c.hub}): {c.image_processor} + {c.processor}")
        shown = {k: v for k, v in {**c.image_settings, **c.processor_settings}.items()
                 if k not in ("image_mean", "image_std", "resample", "image_token")}
        vision = c.config["vision_config"]
        if "image_size" in vision:
            shown["vision: image_size / patch_size"] = f"{vision['image_size']} / {vision['patch_size']}"
        for key in ("spatial_merge_size", "scale_factor", "vision_feature_select_strategy"):
            if key not in shown and vision.get(key, c.config.get(key)) is not None:
                shown[key] = vision.get(key, c.config.get(key))
        shown["language model: layers x heads"] = f"{layers} x {heads}"
        lines += [f"  {key:32s} {value}" for key, value in shown.items()]
    return "\n".join(lines)


def photo_table(results: Any) -> str:
    """One line per :class:`PhotoTokens`: its views, image tokens, the prompt's length ``T``, what the vision
    encoder sees and what eager attention would hold for the prompt (bf16, every layer and head)."""
    lines = [f"{'checkpoint':11s} {'photo':>9s}  {'views (rows x columns)':28s} {'image':>6s} {'T':>6s}  {'encoder sees':18s} eager maps"]
    for r in results:
        views = _view_names(r.views)
        n, h, w = r.tiles
        lines.append(f"{r.checkpoint.name:11s} {r.photo[0]:>4d}x{r.photo[1]:<4d}  {views:28s} {r.image_tokens:>6,d} {r.length:>6,d}  "
                     f"{n:>2d} of {h} x {w}{'':3s} {r.eager_bytes() / 2**30:8.2f} GiB")
    return "\n".join(lines)


def _view_names(views: tuple[View, ...]) -> str:
    """``"image 17x23"``, ``"base 24x24, high-res 36x48"``, ``"12 tiles 9x9, global 9x9"``: views of one kind grouped."""
    groups: list[list] = []
    for v in views:
        kind = v.name.split()[0]
        if groups and groups[-1][0] == kind and groups[-1][1] == v.grid and kind != v.name:
            groups[-1][2] += 1
        else:
            groups.append([kind if kind != v.name else v.name, v.grid, 1])
    return ", ".join(f"{n} {k}s {g[0]}x{g[1]}" if n > 1 else f"{k} {g[0]}x{g[1]}" for k, g, n in groups)
