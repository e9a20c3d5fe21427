"""Cost of attnlab's attention rows on a vision-language model, as ratios measured in one run.

A random Qwen2-VL-like model (the language side of Qwen2-0.5B: 24 layers, hidden 896, 14
heads of which 2 key/value heads, vocabulary 151,936; a small 2-layer vision tower so that
the comparison is about the decoder, where the rows are taken), a 640 x 480 photo (391
image tokens), 20 generated tokens (no end token), one thread. Four variants, all on the same
prompt (a small word-level tokenizer's chat template):

* ``sdpa``: plain ``model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=20)``;
* ``attnlab``: :func:`attnlab.adapters.hf.generate_rows` (the same generate under sdpa, with
  the rows of every layer, head and step split into the view's map and the shares);
* ``caption``: ``attnlab.caption(attnlab.from_huggingface(model, processor, max_len=20), photo)``,
  the whole user path (the processor on the photo, the same generate with the rows kept for the
  replay, the trace with its views and shares);
* ``eager``: ``generate(..., output_attentions=True, return_dict_in_generate=True)`` under
  eager attention, what the tools that force eager do.

Time: one process builds the model once and the variants take turns in each of ``--rounds``
rounds (a shared, noisy machine: separate processes measured minutes apart differ by more
than the effect); printed are each variant's fastest CPU seconds (``process_time``: with
one thread, the computation's own time, the least disturbed by other work) with the ratio to
``sdpa``, and the median wall seconds.

Memory: a fresh process per variant (glibc told to serve large blocks from mmap, so that
freed memory leaves the resident set at once) builds the model, makes 2 tokens, then
``--rounds`` times resets the peak resident memory (``/proc/self/clear_refs``) and makes the
``--tokens``; printed are the median peak (whole process) and the median peak above the
memory before the run (``run MB``), with their ratios to ``sdpa``.
Targets: attnlab and caption <= 1.10x sdpa in time and in peak memory.

Usage: nice -n -5 python benchmarks/bench_vlm.py [--tokens 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("sdpa", "attnlab", "caption", "eager")
IDS = dict(pad=0, im_start=1, im_end=2, vision_start=3, vision_end=4, image=5, video=6)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ["user", "assistant", "describe", "this", "image", "in", "a", "few", "words", "."]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
PROMPT = "describe this image in a few words ."


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def processor_for(folder: str):
    """A Qwen2-VL processor: the image processor, a word-level tokenizer with Qwen's special tokens at ``IDS``, a chat template."""
    import transformers as tf
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), "isolated")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(os.path.join(folder, "tokenizer.json"))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(), tokenizer=tokenizer,
                               video_processor=tf.Qwen2VLVideoProcessor(), chat_template=TEMPLATE)


def build():
    import tempfile

    import numpy as np
    import torch
    import transformers as tf
    from PIL import Image

    torch.manual_seed(0)
    text = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6},
                tie_word_embeddings=True, eos_token_id=IDS["im_end"], bos_token_id=IDS["pad"])
    vision = dict(depth=2, embed_dim=128, hidden_size=896, num_heads=2, patch_size=14)
    cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IDS["image"], video_token_id=IDS["video"],
                           vision_start_token_id=IDS["vision_start"], vision_end_token_id=IDS["vision_end"])
    model = tf.Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # every run is --tokens long
    model.generation_config.suppress_tokens = [IDS["image"], IDS["im_end"]]  # nor does attnlab's decoding stop early
    with tempfile.TemporaryDirectory() as folder:
        processor = processor_for(folder)
    photo = Image.fromarray(np.random.RandomState(0).randint(0, 255, (480, 640, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[chat], images=[photo], return_tensors="pt"))
    n = int((inputs["input_ids"] == IDS["image"]).sum())
    return model, processor, inputs, photo, n


def hwm_mb() -> float:
    """Peak resident memory of this process since the last reset (Linux VmHWM), MB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) * 1024 / 1e6  # kB are KiB


def reset_hwm() -> bool:
    """Reset the peak resident memory to the current level (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def runner(variant: str, model, processor, inputs, photo):
    """A function of k that makes k tokens the variant's way."""
    import torch

    import attnlab
    from attnlab.adapters.hf import generate_rows, vlm_layout

    layout = vlm_layout(model, processor, inputs, photo.size)

    def once(k: int):
        model.set_attn_implementation("eager" if variant == "eager" else "sdpa")
        if variant == "caption":
            return attnlab.caption(attnlab.from_huggingface(model, processor, prompt=PROMPT, max_len=k), photo)
        with torch.inference_mode():
            if variant == "attnlab":
                return generate_rows(model, inputs, layout, k)
            extra = dict(output_attentions=True, return_dict_in_generate=True) if variant == "eager" else {}
            return model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=k, **extra)

    return once


def memory(variant: str, tokens: int, repeats: int) -> dict:
    """In a fresh process: the peak resident memory of one run, total and above the level after the build."""
    import torch

    torch.set_num_threads(1)
    model, processor, inputs, photo, n = build()
    once = runner(variant, model, processor, inputs, photo)
    once(2)  # first-call allocations (thread pools, caches) belong to no variant
    peaks, added, exact = [], [], True
    for _ in range(repeats):
        before = rss_mb()
        exact = reset_hwm() and exact
        out = once(tokens)
        peaks.append(hwm_mb() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6)
        added.append(peaks[-1] - before)
        del out
    peak, added = statistics.median(peaks), statistics.median(added)
    return dict(variant=variant, peak_mb=peak, added_mb=added, exact=exact, image_tokens=n)


def timing(tokens: int, rounds: int) -> dict:
    """In one process, the variants taking turns in each round: the fastest CPU seconds of each
    (one thread: the computation's own time, the least disturbed by other work on the machine)
    and the median wall seconds."""
    import torch

    torch.set_num_threads(1)
    model, processor, inputs, photo, n = build()
    runs = {v: runner(v, model, processor, inputs, photo) for v in VARIANTS}
    runs["sdpa"](2)
    cpu = {v: [] for v in VARIANTS}
    wall = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, once in runs.items():
            c, t = time.process_time(), time.perf_counter()
            out = once(tokens)
            cpu[v].append(time.process_time() - c)
            wall[v].append(time.perf_counter() - t)
            del out
    return {v: dict(cpu=min(cpu[v]), wall=statistics.median(wall[v])) for v in VARIANTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        result = timing(args.tokens, args.rounds) if args.part == "timing" else memory(args.part, args.tokens, args.rounds)
        print(json.dumps(result))
        return
    root = Path(__file__).resolve().parents[1]
    # large blocks straight from mmap, so that freed memory leaves the resident set at once and
    # the peak is the peak of live memory, not of glibc's arena bookkeeping (the same for every variant)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def part(name: str) -> dict:
        cmd = [sys.executable, __file__, "--part", name, "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    mem = {v: part(v) for v in VARIANTS}
    times = part("timing")
    base = mem["sdpa"]
    print(f"Qwen2-VL-like: 24 layers x 14 heads, hidden 896, {base['image_tokens']} image tokens, {args.tokens} tokens, 1 thread")
    print(f"{'variant':8s} {'CPU s':>7s} {'x sdpa':>7s} {'wall s':>7s} {'peak MB':>8s} {'x sdpa':>7s} {'run MB':>7s} {'x sdpa':>7s}")
    for v in VARIANTS:
        m, t = mem[v], times[v]
        print(f"{v:8s} {t['cpu']:7.2f} {t['cpu'] / times['sdpa']['cpu']:7.3f} {t['wall']:7.2f} "
              f"{m['peak_mb']:8.0f} {m['peak_mb'] / base['peak_mb']:7.3f} "
              f"{m['added_mb']:7.0f} {m['added_mb'] / max(base['added_mb'], 1):7.3f}")
    if not base["exact"]:
        print("(peak memory from ru_maxrss: /proc/self/clear_refs could not be written, so the build's peak may hide the runs')")


if __name__ == "__main__":
    main()
