"""``attnlab train shapes``: train the shapes captioner on freshly generated scenes.

Batch ``k`` holds the training scenes ``k * B .. k * B + B - 1`` (see
:func:`attnlab.shapes.scene_seed`), so a run is a pure function of its seed
and number of steps: stopping, resuming and running again give the same weights.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AttnlabError
from ..fileio import atomic_write, make_temp, remove_stale_temps
from ..hub import check_state_dict, read_checkpoint, save_checkpoint, state_dict_of
from ..preprocess import normalize
from ..util import is_real, one_line
from .model import build_model
from .scenes import MAX_CAPTION_WORDS, PAD_ID, SEED_STRIDE, CLS_ID, SEP_ID, encode_caption, make_scene, scene_seed


@dataclass
class TrainConfig:
    steps: int = 3000  # the learning-rate schedule's length; --minutes may stop earlier
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    model: str = "catr"  # a key of attnlab.shapes.model.MODELS


def scene_batch(
    step: int, batch_size: int, seed: int, encode: Callable[[str], list[int]] = encode_caption, length: int = MAX_CAPTION_WORDS + 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: images ``(B, 3, 128, 128)`` normalised to [-1, 1] and
    token ids ``(B, length)``: start, the caption's tokens (``encode``), end, padding."""
    images = np.empty((batch_size, 128, 128, 3), dtype=np.uint8)  # (B, H, W, 3)
    ids = np.full((batch_size, length), PAD_ID, dtype=np.int64)  # (B, T)
    for j in range(batch_size):
        index = step * batch_size + j
        scene = make_scene(scene_seed(seed + index // SEED_STRIDE, index % SEED_STRIDE, "train"))
        images[j] = scene.image
        words = [CLS_ID, *encode(scene.caption), SEP_ID]
        ids[j, : len(words)] = words
    return normalize(images), torch.from_numpy(ids)  # (B, 3, H, W) with the mean/std of shapes_config()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% at ``cfg.steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def train_step(model, optimizer, pixels: torch.Tensor, ids: torch.Tensor, clip: float) -> tuple[float, float]:
    """One optimisation step; returns (loss, token accuracy) of the batch."""
    inputs, labels = ids[:, :-1], ids[:, 1:]  # (B, T-1) each: predict token t+1 from tokens <= t
    logits = model(pixels, inputs, inputs == PAD_ID)  # (B, T-1, V)
    valid = labels != PAD_ID  # (B, T-1)
    loss = F.cross_entropy(logits[valid], labels[valid])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    acc = (logits[valid].argmax(-1) == labels[valid]).float().mean()
    return loss.item(), acc.item()


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".train")


TRAINING_FORMATS = ("attnlab-catr", "attnlab-cptr", "attnlab-student")


def written_by_training(path: Path) -> bool:
    """Whether ``path`` is a file attnlab's training wrote: a model checkpoint with its training
    record (``attnlab train``, the student trainer) or a resume state (``PATH.train``)."""
    try:
        obj = read_checkpoint(path)
    except AttnlabError:
        return False
    if path.name.endswith(".train"):
        return {"model", "optimizer", "step", "elapsed", "config"} <= set(obj)
    meta = obj.get("meta")
    return obj.get("format") in TRAINING_FORMATS and isinstance(meta, dict) and "steps" in meta


def check_out_is_ours(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, to replace ``out`` or ``out.train`` when training did not write them
    (a user's file that happens to have that name) unless ``overwrite``; earlier training outputs are
    replaced (a rerun), as the captioning outputs are."""
    if overwrite:
        return
    for target in (out, _state_path(out)):
        if target.is_file() and not written_by_training(target):
            raise AttnlabError(
                f"--out {out}: {target} exists and attnlab's training did not write it: "
                "give another --out, or pass --overwrite to replace it"
            )


def check_train_args(out: Path, cfg: TrainConfig, minutes: float | None, overwrite: bool = False) -> None:
    """One-line errors, before any work, for settings and outputs that cannot work."""
    for key in ("steps", "batch_size", "warmup", "seed"):
        value = getattr(cfg, key)
        low = 0 if key in ("warmup", "seed") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise AttnlabError(f"{key.replace('_', '-')} must be a whole number of at least {low}, not {value!r}")
    for key in ("lr", "weight_decay", "clip"):
        value = getattr(cfg, key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise AttnlabError(f"{key} must be a finite {'positive' if key == 'lr' else 'non-negative'} number, not {value!r}")
    if minutes is not None and not (is_real(minutes) and minutes > 0):
        raise AttnlabError(f"minutes must be a positive number, not {minutes!r}")
    for target in (out, _state_path(out)):
        if target.is_dir():
            raise AttnlabError(f"--out {out}: {target} is a folder; give a file name such as {target / 'shapes.pt'}")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AttnlabError(f"--out {out}: {existing} is a file, not a folder; give another path")
    try:  # really try: permission bits do not tell for root, ACLs or read-only file systems
        fd, probe = make_temp(existing / out.name)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise AttnlabError(f"--out {out}: cannot write in {existing} ({exc.strerror or type(exc).__name__}); give a path you can write to") from None
    check_out_is_ours(out, overwrite)


def _damaged(state_file: Path, what: str) -> AttnlabError:
    return AttnlabError(f"{state_file} is damaged ({what}): train again without --resume (or restore the file attnlab wrote)")


def _check_adam_state(state_file: Path, optimizer: torch.optim.Optimizer, expected: list[dict]) -> None:
    """After loading: the hyperparameters are the ones this run's settings make, and every
    parameter's moments are finite tensors of its shape (a bad state fails here, not mid-step)."""
    for group, fresh in zip(optimizer.param_groups, expected):
        odd = [k for k, v in fresh.items() if k != "lr" and group.get(k) != v]
        if odd:
            raise _damaged(state_file, f"optimizer {odd[0]}={group.get(odd[0])!r}, not {fresh[odd[0]]!r}")
        for p in group["params"]:
            moments = optimizer.state.get(p, {})
            if not moments:
                continue
            if set(moments) != {"step", "exp_avg", "exp_avg_sq"}:
                raise _damaged(state_file, f"optimizer state keys {sorted(map(str, moments))}")
            for key in ("exp_avg", "exp_avg_sq"):
                t = moments[key]
                if not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise _damaged(state_file, f"optimizer {key} is not a finite tensor of shape {list(p.shape)}")
            t = moments["step"]
            if not isinstance(t, torch.Tensor) or t.numel() != 1 or not math.isfinite(float(t)) or float(t) < 0:
                raise _damaged(state_file, f"optimizer step {t!r}")


def _resume(state_file: Path, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Load ``state_file`` (``PATH.train``) into ``model`` and ``optimizer``; every value is checked
    first (one line naming it), so a damaged state fails before any training step."""
    if not state_file.is_file():
        raise AttnlabError(f"nothing to resume: {state_file} does not exist (train without --resume first)")
    state = read_checkpoint(state_file)
    missing = [k for k in ("model", "optimizer", "step", "elapsed", "config") if k not in state]
    if missing:
        raise _damaged(state_file, f"no {', '.join(missing)}")
    if not isinstance(state["config"], dict) or not all(isinstance(k, str) for k in state["config"]):
        raise _damaged(state_file, f"config is a {type(state['config']).__name__}, not a dict of the training settings")
    saved = {"model": "catr", **state["config"]}  # files from before --model were CATR's
    if saved != vars(cfg):
        diff = ", ".join(f"{k}={saved.get(k)!r}"[:60] for k in sorted(set(saved) | set(vars(cfg)), key=str) if saved.get(k) != vars(cfg).get(k))
        raise AttnlabError(f"{state_file} was trained with other settings ({diff}): resume with the same ones")
    step, elapsed = state["step"], state["elapsed"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.steps:
        raise _damaged(state_file, f"step {step!r} is not a whole number in 0..{cfg.steps}")
    if not is_real(elapsed) or elapsed < 0:
        raise _damaged(state_file, f"elapsed {elapsed!r} is not a number of seconds")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise _damaged(state_file, "model is not a state dict of tensors")
    check_state_dict(model, weights, str(state_file))
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        raise _damaged(state_file, "model weights hold NaN or infinite values")
    expected = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # noqa: BLE001 - torch fails on a malformed state with any exception type
        raise _damaged(state_file, f"optimizer state: {one_line(exc, 80, with_type=True)}") from None
    _check_adam_state(state_file, optimizer, expected)
    model.load_state_dict(weights)
    return step, float(elapsed)


class _StopAtStepEnd:
    """While active (main thread only), Ctrl-C asks the loop to stop at the end of the
    current step instead of raising inside it; a second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> "_StopAtStepEnd":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def train(
    out: str | Path,
    *,
    minutes: float | None = None,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    save_every: int = 250,
    stop_after: int | None = None,
    init: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) the shapes model; writes ``out`` (the model, attnlab format)
    and ``out.train`` (optimizer state, to resume). Returns a summary dict.

    ``minutes`` stops at the first step boundary after that much time, and
    ``stop_after`` after that many steps; either way the schedule stays the one of
    ``cfg.steps``, so a later ``resume=True`` continues exactly where it stopped.
    ``init``: start from the weights of a shapes checkpoint (fine-tuning with a new
    schedule) instead of random ones; its record is kept in the new file's meta.
    A bare state dict of the shapes model works too (it has no record to keep).

    Settings and ``out`` are checked before any work (one-line :class:`AttnlabError`):
    an existing ``out`` or ``out.train`` that training did not write (a user's file) is
    refused unless ``overwrite``; earlier training outputs are replaced.
    Ctrl-C finishes the current step, saves ``out`` and ``out.train`` and then
    raises ``KeyboardInterrupt``; ``resume=True`` continues from there.
    """
    cfg = cfg or TrainConfig()
    out = Path(out)
    check_train_args(out, cfg, minutes, overwrite)
    remove_stale_temps(out.parent)
    model = build_model(cfg.model, cfg.seed)
    lineage = _start_from(model, init) if init is not None else []
    model.train()
    optimizer = adamw(model, cfg)
    step, elapsed = _resume(_state_path(out), cfg, model, optimizer) if resume else (0, 0.0)
    run = _Run(out, cfg, model, optimizer, step, time.perf_counter() - elapsed, init, lineage)
    bar = _ProgressBar(cfg, step) if progress else None
    with _StopAtStepEnd() as interrupt:  # Ctrl-C: finish the step, save, then stop
        while run.step < cfg.steps and not interrupt.requested and not run.stop_now(minutes, stop_after):
            run.train_one()
            if bar is not None:
                bar.update(run)
            if run.step % save_every == 0:
                run.save()
        run.save()
    if bar is not None:
        bar.close()
    model.eval()
    if interrupt.requested:
        raise KeyboardInterrupt(f"saved step {run.step} of {cfg.steps} to {out} and {_state_path(out)}; continue with --resume")
    return {"steps": run.step, "seconds": time.perf_counter() - run.start, "loss": run.loss, "token_accuracy": run.acc, "out": str(out)}


def _start_from(model: torch.nn.Module, init: str | Path) -> list:
    """Load the weights of ``init`` (a shapes checkpoint or a bare state dict) into ``model``;
    returns the lineage the new file records: the earlier ones, then ``init``'s meta."""
    start_from = read_checkpoint(init)
    weights = state_dict_of(start_from, str(init))  # {'model': ...} or a bare state dict
    check_state_dict(model, weights, str(init))
    model.load_state_dict(weights)
    meta = start_from.get("meta", {}) if "model" in start_from else {}
    meta = meta if isinstance(meta, dict) else {}
    earlier = meta.get("lineage", [])
    return [*(earlier if isinstance(earlier, list) else []), {k: v for k, v in meta.items() if k != "lineage"}]


def adamw(model: torch.nn.Module, cfg: TrainConfig, *, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on biases and norms); ``fused``: one
    kernel for all parameters (5x faster than the loop on CPU)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


@dataclass
class _Run:
    """A training run in progress: where it is, and how to take a step and save."""

    out: Path
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    start: float  # perf_counter() at the (resumed) run's start, earlier sessions included
    init: str | Path | None
    lineage: list
    loss: float = float("nan")
    acc: float = float("nan")

    def stop_now(self, minutes: float | None, stop_after: int | None) -> bool:
        """``minutes`` have passed or ``stop_after`` steps are done (checked at a step boundary)."""
        if minutes is not None and time.perf_counter() - self.start >= minutes * 60:
            return True
        return stop_after is not None and self.step >= stop_after

    def train_one(self) -> None:
        """Batch ``step`` at the schedule's learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
        pixels, ids = scene_batch(self.step, self.cfg.batch_size, self.cfg.seed)
        self.loss, self.acc = train_step(self.model, self.optimizer, pixels, ids, self.cfg.clip)
        self.step += 1

    def save(self) -> None:
        """``out`` (the model, attnlab format) and ``out.train`` (the state to resume from)."""
        meta = {
            "steps": self.step,
            "seconds": round(time.perf_counter() - self.start, 1),
            "train_config": vars(self.cfg),
            "init": None if self.init is None else str(self.init),
            "lineage": self.lineage,  # the meta of the checkpoints this one was fine-tuned from
        }
        save_checkpoint(self.model, self.out, meta=meta)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": time.perf_counter() - self.start,
            "config": vars(self.cfg),
        }
        atomic_write(_state_path(self.out), lambda fh: torch.save(state, fh))


class _ProgressBar:
    """A tqdm bar with the loss, the token accuracy and the samples per second of the last ~10 s."""

    def __init__(self, cfg: TrainConfig, step: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=cfg.steps, initial=step, unit="step", desc=f"train shapes ({cfg.model})")
        self.batch_size = cfg.batch_size
        self.since, self.samples = time.perf_counter(), 0

    def update(self, run: _Run) -> None:
        self.samples += self.batch_size
        now = time.perf_counter()
        self.bar.update(1)
        rate = self.samples / max(now - self.since, 1e-9)
        self.bar.set_postfix(loss=f"{run.loss:.3f}", acc=f"{run.acc:.3f}", samples_s=f"{rate:.0f}")
        if now - self.since > 10:
            self.since, self.samples = now, 0

    def close(self) -> None:
        self.bar.close()
