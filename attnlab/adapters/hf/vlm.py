"""Vision-language models behind the captioner seam (:class:`VLMCaptioner`, built by
:func:`attnlab.from_huggingface` for every family of :mod:`.families`: Qwen2/2.5/3-VL, LLaVA-1.5,
LLaVA-NeXT, PaliGemma, Gemma 3, LLaVA-OneVision, ...). The family gives the layout, the prompt text
(default: the chat template), the default prompt and an optional post-processing of the run.

One decode path. The engine (:func:`.stepping.generate_rows`) runs the model's own greedy
``generate`` for the whole caption: the tokens are the model's by construction (its
``generation_config`` processors, end-token lists, rope deltas and cache handling), which a
hand-written step loop could only copy per family through private APIs. So ``begin`` runs
it for each image and ``step`` replays it: step ``i`` returns the scores ``generate`` chose
token ``i`` from (the logits after its processors, so ``caption()``'s argmax is
``generate``'s token exactly) and the rows of that step over every key of the prompt (the
tokens generated earlier after them, zero beyond). A caller that feeds other tokens than
the replayed ones (teacher forcing, beam search) gets one line (:data:`REPLAY_ONLY`).
The explanation methods read :meth:`VLMCaptioner.sequence` instead (:mod:`.sequence`: one
teacher-forced pass over the prompt and the caption).

The photo reaches ``begin`` as given (``spec.transform`` keeps its pixels, values / 255),
the processor makes the model input from it with the prompt; ``trace.meta`` records the
prompt and the exact text handed to the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...captioner import CaptionerSpec, Encoded, Record, StepOutput, check_record, pad_to
from ...errors import AttnlabError
from ...keys import KeyLayout
from ..module import ModuleCaptioner
from .generation import GENERATE_NEW_TOKENS, first_id, setting
from .families import classes, family_of, model_inputs
from .sequence import shown_layout
from .stepping import VLMRun, generate_rows
from .vocab import HFVocab

VLM_CLASSES = classes()  # every registered family's classes (attnlab.adapters.hf.families)
DEFAULT_PROMPT = "Describe this image."  # the chat families' plain captioning request (Family.default_prompt)
SHOWN_SIDE = 1024  # the long side of the image figures draw on (the boxes are scaled onto it)
REPLAY_ONLY = ("attnlab.caption on a vision-language model replays the model's own greedy generate, so it takes no given "
               "tokens and no beams: trace given tokens with attnlab.explain(captioner, image, \"raw\", tokens=[...])")


def is_vlm(model: Any, tf: Any) -> bool:
    """Whether ``model`` is one of the supported vision-language classes (every registered family's)."""
    return any(isinstance(model, getattr(tf, name, ())) for name in classes())


def photo_tensor(image: Image.Image) -> torch.Tensor:
    """The photo as given, ``(3, H, W)`` float32 in [0, 1] (``begin`` gets its exact pixels back)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def photo_of(pixels: torch.Tensor) -> Image.Image:
    """:func:`photo_tensor`'s inverse (exact for 8-bit photos)."""
    x = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def chat_text(processor: Any, prompt: str) -> str:
    """``prompt`` as one user turn holding the image and the text, through the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if not getattr(processor, "chat_template", None):
        raise AttnlabError("the processor has no chat template: pass raw_prompt= (the exact text, image placeholder included)")
    return str(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def trace_layout(run: VLMRun, photo: tuple[int, int]) -> KeyLayout:
    """The run's key layout for its trace: the boxes on the image the figures draw on (the photo
    with its long side :data:`SHOWN_SIDE`), the keys of the tokens generated earlier the kind
    ``"generated"`` (the replayed rows run over the prompt and those keys)."""
    return shown_layout(run.layout, photo, SHOWN_SIDE, run.rows.shape[-1])  # rows: (layers, heads, n, prompt + n)


@dataclass
class VLMState:
    """The replayed runs: one per caption still in the batch, and how many steps were replayed."""

    runs: list[VLMRun]
    fed: int = 0
    first: list[int] = field(default_factory=list)  # the start id each caption was fed at step 0

    def select(self, indices: torch.Tensor) -> "VLMState":
        idx = [int(i) for i in indices.tolist()]
        if len(set(idx)) != len(idx):
            raise AttnlabError(REPLAY_ONLY)  # copies of a caption: beam search
        self.runs = [self.runs[i] for i in idx]
        return self


class VLMCaptioner(ModuleCaptioner):
    """A vision-language model with its processor and prompt (see the module docstring)."""

    def __init__(self, model: Any, processor: Any, *, prompt: str | None, raw_prompt: str | None,
                 max_len: int | None, name: str | None) -> None:
        self.model, self.processor, self._max_len, self._name = model, processor, max_len, name
        self.family = family_of(model)
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or not callable(getattr(processor, "apply_chat_template", None)):
            raise AttnlabError(f"a vision-language model takes its combined processor (AutoProcessor.from_pretrained(name)), not a {type(processor).__name__}")
        if prompt is not None and raw_prompt is not None:
            raise AttnlabError("pass prompt= (your words, put into the chat template) or raw_prompt= (the exact text), not both")
        for key, value in (("prompt", prompt), ("raw_prompt", raw_prompt), ("name", name)):
            if value is not None and not isinstance(value, str):
                raise AttnlabError(f"{key} must be a string, not {type(value).__name__}")
        self.prompt = self.family.default_prompt if prompt is None and raw_prompt is None else prompt
        self.raw_prompt = raw_prompt
        self.text = raw_prompt if raw_prompt is not None else (self.family.prompt_text or chat_text)(processor, self.prompt)
        gen, cfg = model.generation_config, model.config
        eos = first_id(setting(gen, cfg, "eos_token_id"), getattr(self.tokenizer, "eos_token_id", None))
        if eos is None:
            raise AttnlabError("the model names no end token: set model.generation_config.eos_token_id")
        pad = first_id(setting(gen, cfg, "pad_token_id"), getattr(self.tokenizer, "pad_token_id", None), eos)
        bos = first_id(setting(gen, cfg, "bos_token_id"), getattr(self.tokenizer, "bos_token_id", None), pad)
        size = int(model.get_output_embeddings().weight.shape[0])
        # generate's max_length counts the prompt (hundreds of image tokens): only max_new_tokens is a caption length
        length = int(max_len or getattr(gen, "max_new_tokens", None) or GENERATE_NEW_TOKENS)
        listed = setting(gen, cfg, "eos_token_id")  # generate stops at any of a list of end tokens
        others = tuple(int(t) for t in (listed if isinstance(listed, (list, tuple)) else [listed]) if t is not None and int(t) != eos)
        self._spec = CaptionerSpec(
            name=name or getattr(model, "name_or_path", "") or type(model).__name__, vocab=HFVocab(self.tokenizer, size),
            bos=bos, eos=eos, pad=pad, max_len=length, image_size=SHOWN_SIDE, resize="long", transform=photo_tensor,
            end_tokens=others,
        )  # fmt: skip

    @property
    def spec(self) -> CaptionerSpec:
        return self._spec

    def prompted(self, prompt: str | None = None, raw_prompt: str | None = None) -> "VLMCaptioner":
        """The same model and processor with another prompt (what ``caption(..., prompt=)`` asks per call)."""
        return VLMCaptioner(self.model, self.processor, prompt=prompt, raw_prompt=raw_prompt, max_len=self._max_len, name=self._name)

    @property
    def meta(self) -> dict[str, Any]:
        """What every trace of this captioner records: the prompt and the exact text handed to the processor."""
        return {"prompt": self.prompt, "raw_prompt": self.text}

    def run(self, photo: Image.Image, max_new_tokens: int | None = None) -> VLMRun:
        """The engine's run on one photo: ``generate`` with every step's rows (kept for the replay)."""
        inputs = model_inputs(self.family, self.processor, self.text, photo, self._device())
        layout = self.family.layout(self.model.config, self.processor, inputs, photo.size)
        run = generate_rows(self.model, inputs, layout, max_new_tokens or self._spec.max_len, keep_rows=True, family=self.family)
        return run if self.family.after is None else self.family.after(self.model, inputs, run)

    def sequence(self, pixels: torch.Tensor, tokens: Sequence[int], *, prompt: str | None = None) -> Any:
        """The teacher-forced pass of ``tokens`` (after this prompt, or the user words ``prompt``) for the explanations."""
        from .sequence import sequence_pass  # adapters/hf/sequence.py

        cap = self if prompt is None else self.prompted(prompt)
        return sequence_pass(cap.model, cap.processor, photo_of(pixels), tokens, cap.text, SHOWN_SIDE, cap.meta)

    def begin(self, pixels: Sequence[torch.Tensor], record: Record = "cross") -> Encoded:
        check_record(record)
        if not torch.is_inference_mode_enabled():
            raise AttnlabError(f"{REPLAY_ONLY}; attnlab.caption(...) traces the attention of its own tokens")
        photos = [photo_of(p) for p in pixels]
        runs = [self.run(photo) for photo in photos]
        layouts = [trace_layout(r, photo.size) for r, photo in zip(runs, photos)]
        enc = Encoded(VLMState(runs), [r.layout.views[0].grid for r in runs], None, layouts)
        enc.meta = [self.meta for _ in runs]  # each trace's prompt, for decoding to record (Encoded.meta)
        return enc

    def step(self, state: VLMState, ids: torch.Tensor, record: Record = "cross") -> StepOutput:
        s = state.fed
        for run, token in zip(state.runs, ids.tolist()):
            if s == len(run.tokens):  # decoding stops at every end token generate stops at (spec.end_tokens)
                raise AttnlabError(f"the model ended its caption with token {int(run.tokens[-1])}, which decoding does not "
                                   f"take for an end token: set model.generation_config.eos_token_id to the model's end tokens")
            expected = self._spec.bos if s == 0 else int(run.tokens[s - 1])
            if int(token) != expected:
                raise AttnlabError(f"{REPLAY_ONLY} (fed {int(token)} at step {s})")
        state.fed += 1
        logits = torch.stack([torch.from_numpy(r.scores[s]) for r in state.runs])  # (M, V)
        cross = None
        if record != "none":
            width = max(r.rows.shape[-1] for r in state.runs)
            per = [pad_to(torch.from_numpy(r.rows[:, :, s]), width, 2) for r in state.runs]  # each (layers, heads, K)
            cross = list(torch.stack(per, dim=1))  # per layer (M, heads, K)
        return StepOutput(logits, cross, None)
