"""Train the bundled shapes vision-language model (``python -m attnlab.shapes.train_vlm``).

The model is a tiny :class:`transformers.LlavaForConditionalGeneration`
(:func:`attnlab.adapters.hf.shapes_vlm.build`). Each step takes a batch of fresh
training-split scenes (batch ``k`` holds scenes ``k * B .. k * B + B - 1`` of the seed):
the input is the fixed prompt ``"USER: <image> describe the scene . ASSISTANT:"`` (the
image expanded to its 64 patch tokens by the processor), then the caption's words and
``</s>``; the loss is the cross-entropy of the caption's words and the end token.

An auxiliary loss helps the tiny model ground its words: every projected image token
(what the decoder reads) also predicts, through small linear heads used only in training
and not saved, the colour, shape and size of the object that covers most of its patch
(or "background" when none covers at least 16 of its 256 pixels). The heads are thrown
away; the shipped model is the LLaVA class alone.

AdamW, linear warm-up then cosine decay to 5%; a checkpoint (model, heads, optimizer,
step) every ``--save-every`` steps in ``OUT/train.pt``, so ``--resume`` loses little;
at the end ``save_pretrained`` (safetensors) with the processor's files into ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters.hf.shapes_vlm import build, chat
from ..errors import AttnlabError
from ..fileio import atomic_write
from ..util import one_line
from .scenes import COLORS, SEED_STRIDE, SHAPES, SIZES, VOCAB, make_scene, make_scenes, scene_seed

MARK = "attnlab-train-vlm.json"  # written first into every folder this trainer writes: only such a folder is written again
COVER = 16  # pixels of a 16 x 16 patch an object must cover to be its patch's target


def patch_targets(scene, grid: int = 8) -> np.ndarray:
    """``(3, grid * grid)`` int: colour, shape and size class of each patch's main object (the last class: background)."""
    side = scene.image.shape[0] // grid
    out = np.array([[len(COLORS)], [len(SHAPES)], [len(SIZES)]]).repeat(grid * grid, axis=1)  # (3, grid^2)
    if not scene.objects:
        return out
    cover = np.stack([o.mask.reshape(grid, side, grid, side).sum(axis=(1, 3)).reshape(-1) for o in scene.objects])  # (objects, grid^2)
    best = cover.argmax(axis=0)  # (grid^2,)
    for p in np.flatnonzero(cover.max(axis=0) >= COVER):
        o = scene.objects[int(best[p])]
        out[:, p] = (list(COLORS).index(o.color), SHAPES.index(o.shape), SIZES.index(o.size))
    return out


class Batches:
    """Training batches: pixels ``(B, 3, 128, 128)`` in [-1, 1], ids ``(B, P + L)`` (prompt, caption, end, padding),
    patch targets ``(B, 3, 64)``."""

    def __init__(self, processor, seed: int, batch_size: int) -> None:
        self.seed, self.batch_size = seed, batch_size
        self.tokenizer = processor.tokenizer
        probe = make_scene(scene_seed(seed, 0, "train")).image
        inputs = processor(text=[chat(processor)], images=[probe], return_tensors="pt")
        self.prompt = inputs["input_ids"][0]  # (P,)
        mine = self.pixels([probe])
        if not torch.allclose(mine, inputs["pixel_values"], atol=1e-5):  # training must see what the processor makes
            raise RuntimeError("the processor's pixels differ from the training pixels")
        self.vocab = self.tokenizer.get_vocab()
        self.eos, self.pad = self.vocab["</s>"], self.vocab["<pad>"]
        self.length = 16  # 14 words at most, the end token, one to spare

    @staticmethod
    def pixels(images) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        return (x / 255 - 0.5) / 0.5

    def caption_ids(self, caption: str) -> list[int]:
        return [self.vocab[w] for w in caption.split(" ")] + [self.eos]

    def __call__(self, step: int):
        scenes = []
        for j in range(self.batch_size):
            index = step * self.batch_size + j
            scenes.append(make_scene(scene_seed(self.seed + index // SEED_STRIDE, index % SEED_STRIDE, "train")))
        caps = torch.full((len(scenes), self.length), self.pad, dtype=torch.long)  # (B, L)
        for j, s in enumerate(scenes):
            ids = self.caption_ids(s.caption)
            caps[j, : len(ids)] = torch.tensor(ids)
        ids = torch.cat([self.prompt.expand(len(scenes), -1), caps], dim=1)  # (B, P + L)
        targets = torch.from_numpy(np.stack([patch_targets(s) for s in scenes]))  # (B, 3, 64)
        return self.pixels([s.image for s in scenes]), ids, targets


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def exact_rate(model, processor, n: int, seed: int = 1, batch: int = 50) -> float:
    """Share of exactly right greedy captions on ``n`` eval-split scenes of ``seed`` (a quick check while training)."""
    right = 0
    every = make_scenes(n, seed, "eval")
    for start in range(0, n, batch):
        scenes = every[start : start + batch]
        inputs = processor(text=[chat(processor)] * len(scenes), images=[s.image for s in scenes], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(t.strip() == s.caption for t, s in zip(texts, scenes))
    return right / n


def claim_folder(out: Path, resume: bool) -> Path:
    """Check that ``out`` may be written and mark it as this trainer's; returns its ``train.pt`` (the state).

    ``out`` must be new, empty, or a folder this trainer wrote before (it holds :data:`MARK`): the files of
    a folder of yours are never replaced. A folder holding a state is continued only with ``--resume``,
    and ``--resume`` needs that state. One-line :class:`AttnlabError` otherwise."""
    if out.exists() and not out.is_dir():
        raise AttnlabError(f"--out {out} is a file, not a folder: choose a folder for the training run")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise AttnlabError(f"--out {out} holds files attnlab's trainer did not write: choose a new or empty folder")
    state = out / "train.pt"
    if resume and not state.is_file():
        raise AttnlabError(f"--resume: {state} does not exist (no run to continue there): check --out, or leave out --resume")
    if not resume and state.exists():
        raise AttnlabError(f"{out} holds a training run ({state.name}): pass --resume to continue it, or choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MARK, lambda fh: fh.write(json.dumps({"attnlab_train_vlm": 1}).encode()))
    return state


def load_state(state: Path) -> dict:
    """The training state saved by :func:`train` (tensors, numbers and dicts only: never code)."""
    try:
        st = torch.load(state, weights_only=True)
        return {k: st[k] for k in ("model", "heads", "opt", "step", "elapsed")}
    except Exception as exc:  # any unreadable or incomplete file: one line
        raise AttnlabError(f"{state} is damaged ({one_line(exc)}): train into a new folder") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--aux", type=float, default=0.5, help="weight of the patch-target loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=100, help="eval-split scenes (seed 1) of the exact-caption check")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this much wall time")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    try:
        train(a)
    except AttnlabError as exc:
        raise SystemExit(f"attnlab: error: {exc}") from None  # one line, exit status 1


def train(a) -> None:
    out: Path = a.out
    state_file = claim_folder(out, a.resume)
    model, processor = build(VOCAB, out / "files", a.seed, width=a.width, vision_layers=a.vision_layers, text_layers=a.text_layers)
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, len(COLORS) + 1), torch.nn.Linear(width, len(SHAPES) + 1),
                                 torch.nn.Linear(width, len(SIZES) + 1)])
    params = list(model.parameters()) + list(heads.parameters())
    decay = [q for q in params if q.ndim >= 2]
    rest = [q for q in params if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=a.lr)
    step, elapsed = 0, 0.0
    if a.resume:
        st = load_state(state_file)
        try:
            model.load_state_dict(st["model"])
            heads.load_state_dict(st["heads"])
            opt.load_state_dict(st["opt"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AttnlabError(f"{state_file} does not fit a model of these settings ({one_line(exc, 200)}): "
                               "resume with the --width and --*-layers of that run") from None
        step, elapsed = st["step"], st["elapsed"]
        print(f"resumed at step {step} ({elapsed:.0f} s)", flush=True)
    data = Batches(processor, a.seed, a.batch_size)
    P = len(data.prompt)
    feats = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    model.train()
    t0 = time.time() - elapsed
    log_loss = log_acc = log_aux = 0.0
    n_log = 0
    try:
        while step < a.steps:
            for g in opt.param_groups:
                g["lr"] = a.lr * lr_factor(step, a.steps, a.warmup)
            pixels, ids, targets = data(step)
            logits = model(input_ids=ids[:, :-1], pixel_values=pixels).logits  # (B, P + L - 1, V)
            labels = ids[:, P:]  # (B, L): the caption's words and the end token
            pred = logits[:, P - 1 :]  # (B, L, V)
            valid = labels != data.pad
            loss = F.cross_entropy(pred[valid], labels[valid])
            x = feats.pop("x").reshape(len(ids), -1, width)  # (B, 64, width): the projected image tokens
            aux = sum(F.cross_entropy(h(x).flatten(0, 1), targets[:, k].flatten()) for k, h in enumerate(heads)) / 3
            opt.zero_grad(set_to_none=True)
            (loss + a.aux * aux).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            log_loss += loss.item()
            log_aux += aux.item()
            log_acc += (pred[valid].argmax(-1) == labels[valid]).float().mean().item()
            n_log += 1
            if step % 50 == 0:
                print(f"step {step} loss {log_loss / n_log:.4f} acc {log_acc / n_log:.4f} aux {log_aux / n_log:.4f} "
                      f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s", flush=True)
                log_loss = log_acc = log_aux = 0.0
                n_log = 0
            if step % a.save_every == 0 or step == a.steps:
                tmp = out / "train.pt.tmp"
                torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                            "step": step, "elapsed": time.time() - t0}, tmp)
                os.replace(tmp, state_file)
            if step % a.eval_every == 0 or step == a.steps:
                model.eval()
                print(f"step {step} exact ({a.eval_n} eval scenes, seed 1) {exact_rate(model, processor, a.eval_n):.1%}", flush=True)
                model.train()
            if a.minutes is not None and time.time() - t0 > 60 * a.minutes:
                break
    finally:
        hook.remove()
    model.eval()
    model.save_pretrained(str(out / "model"))
    processor.save_pretrained(str(out / "model"))
    print(f"saved {out / 'model'} at step {step}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
