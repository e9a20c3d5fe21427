"""A student-style captioner for the shapes world: what a course homework builds.

:class:`StudentCaptioner` is deliberately *not* an attnlab captioner: a timm ViT
encoder whose ``forward_features`` returns the CLS token and 8 x 8 patch tokens,
fed whole to an ``nn.TransformerDecoder(batch_first=True)``, and a linear head.
Notebook 05 wraps it with :func:`attnlab.wrap` in three lines. Like real
captioners it writes WordPiece tokens: three words of the shapes world are
two pieces each in its vocabulary (:data:`PIECES`: ``triangle`` is ``tri``
``##angle``), so its captions show what pieces do to figures. Its small
trained weights ship as ``attnlab/weights/shapes-student.pt``; this module
also holds the script that trained them::

    python -m attnlab.shapes.student --steps 8000 --seed 0 --width 96 --depth 4 --dec-layers 3 --out shapes-student.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AttnlabError
from ..fileio import atomic_write
from .scenes import IMAGE_SIZE, MAX_CAPTION_WORDS, PAD_ID, VOCAB

BUNDLED_STUDENT = Path(__file__).resolve().parents[1] / "weights" / "shapes-student.pt"
PATCH = 16  # 128 px -> an 8 x 8 grid
GRID = (IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)
PIECES: dict[str, tuple[str, str]] = {"triangle": ("tri", "##angle"), "purple": ("pur", "##ple"), "yellow": ("yel", "##low")}
"""Words the student's tokenizer splits into WordPiece pieces."""
STUDENT_VOCAB: list[str] = [*VOCAB, *(p for pair in PIECES.values() for p in pair)]
"""The shapes vocabulary plus the pieces (the split words' own ids stay, unused)."""
MAX_TOKENS = MAX_CAPTION_WORDS + 3 * len(PIECES) + 2  # start, words (some as two pieces), end


def encode_pieces(caption: str) -> list[int]:
    """The student's token ids of a caption: words, with the words of :data:`PIECES` as two pieces."""
    index = {t: i for i, t in enumerate(STUDENT_VOCAB)}
    return [index[p] for w in caption.split() for p in PIECES.get(w, (w,))]


class StudentCaptioner(nn.Module):
    """timm ViT (CLS + 64 patch tokens) -> ``nn.TransformerDecoder`` -> linear head.

    ``encode(pixels (N, 3, 128, 128)) -> memory (N, 65, d)``;
    ``decode(memory, ids (N, t)) -> logits (N, t, V)``; ``forward`` does both
    (the teacher-forced training step).
    """

    def __init__(self, width: int = 64, depth: int = 3, heads: int = 4, dec_layers: int = 2) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.encoder = VisionTransformer(
            img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=width, depth=depth, num_heads=heads,
            mlp_ratio=2.0, num_classes=0,
        )  # fmt: skip
        self.embed = nn.Embedding(len(STUDENT_VOCAB), width, padding_idx=PAD_ID)
        self.pos = nn.Embedding(MAX_TOKENS, width)
        layer = nn.TransformerDecoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, dec_layers, norm=nn.LayerNorm(width))
        self.head = nn.Linear(width, len(STUDENT_VOCAB))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(pixels)  # (N, 1 + 64, d): CLS, then the patches row by row

    def decode(self, memory: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos.weight[:t]  # (N, t, d)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)  # (t, t) True = hidden
        h = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad_mask, tgt_is_causal=True)  # (N, t, d)
        return self.head(h)  # (N, t, V)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(pixels), ids, pad_mask)


def load_student(path: str | Path | None = None) -> StudentCaptioner:
    """The trained student model (``attnlab/weights/shapes-student.pt`` by default), in eval mode."""
    from ..hub import check_state_dict, read_checkpoint, state_dict_of

    path = Path(path) if path is not None else BUNDLED_STUDENT
    obj = read_checkpoint(path)
    config = _stored_config(obj.get("config", {}), path)
    sd = {k: v.float() for k, v in state_dict_of(obj, str(path)).items()}  # stored as float16
    with torch.device("meta"):  # shapes only: a config that does not fit the weights fails before any memory
        check_state_dict(StudentCaptioner(**config), sd, str(path))
    model = StudentCaptioner(**config)
    model.load_state_dict(sd)
    return model.eval()


# the student's sizes a checkpoint may set, with their inclusive bounds (far beyond the shipped 96 / 4 / 4 / 3)
CONFIG_RANGES = {"width": (2, 1024), "depth": (1, 24), "heads": (1, 64), "dec_layers": (1, 24)}


def _stored_config(raw: Any, path: Path) -> dict[str, int]:
    """A student checkpoint's ``config``, every key and value checked before anything is built (one line)."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise AttnlabError(f"{path} has a damaged config (not a dict of sizes); re-save it with train_student")
    for key, value in raw.items():
        if key not in CONFIG_RANGES:
            raise AttnlabError(f"{path} has a damaged config: {key!r} is not one of {', '.join(CONFIG_RANGES)}; re-save it with train_student")
        low, high = CONFIG_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise AttnlabError(f"{path} has a damaged config: {key}={repr(value)[:30]} is not a whole number in {low}..{high}")
    config = {**{"width": 64, "heads": 4}, **raw}
    if config["width"] % config["heads"]:
        raise AttnlabError(f"{path} has a damaged config: width {config['width']} does not divide into {config['heads']} heads")
    return raw


def train_student(
    out: str | Path, steps: int = 3000, seed: int = 0, batch_size: int = 32, lr: float = 1e-3, overwrite: bool = False, **config: int
) -> dict:
    """Train :class:`StudentCaptioner` (``config``: its width, depth, heads, dec_layers) on fresh
    shapes scenes; write its weights (float16) and configuration to ``out``. An existing ``out``
    that attnlab's training did not write is refused unless ``overwrite``."""
    from tqdm.auto import tqdm

    from .train import TrainConfig, adamw, lr_factor, scene_batch, train_step, written_by_training

    out = Path(out)
    if out.is_dir():
        raise AttnlabError(f"--out {out} is a folder: give a file name")
    if out.is_file() and not overwrite and not written_by_training(out):
        raise AttnlabError(f"--out {out} exists and attnlab's training did not write it: give another --out, or pass --overwrite")
    cfg = TrainConfig(steps=steps, seed=seed, batch_size=batch_size, lr=lr, warmup=200)
    torch.manual_seed(seed)
    model = StudentCaptioner(**config).train()
    optimizer = adamw(model, cfg, fused=False)  # the loop, as the shipped student was trained
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train student", unit="step")
    loss = acc = float("nan")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, cfg)
        pixels, ids = scene_batch(step, batch_size, seed, encode=encode_pieces, length=MAX_TOKENS)
        loss, acc = train_step(model, optimizer, pixels, ids, cfg.clip)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    obj = {
        "format": "attnlab-student",
        "config": config,
        "model": {k: v.half() for k, v in model.state_dict().items()},
        "meta": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "seconds": round(seconds, 1)},
    }
    atomic_write(out, lambda fh: torch.save(obj, fh))
    return {"steps": steps, "seconds": seconds, "loss": loss, "token_accuracy": acc, "out": str(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the student-style shapes captioner (notebook 05).")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="shapes-student.pt")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3, help="encoder blocks")
    parser.add_argument("--dec-layers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace --out even when training did not write it")
    args = parser.parse_args(argv)
    try:
        result = train_student(args.out, args.steps, args.seed, args.batch_size, args.lr, overwrite=args.overwrite,
                               width=args.width, depth=args.depth, dec_layers=args.dec_layers)  # fmt: skip
    except AttnlabError as exc:
        raise SystemExit(f"attnlab: error: {exc}") from None
    print(f"trained {result['steps']} steps in {result['seconds'] / 60:.1f} min; last batch loss {result['loss']:.4f}, "
          f"token accuracy {result['token_accuracy']:.3f}; wrote {result['out']}")


if __name__ == "__main__":
    main()
