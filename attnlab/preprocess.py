"""Images in, model inputs out: reading, checking, resizing, normalising, padding.

Every way an image can be wrong ends in an :class:`AttnlabError` with one line
saying what to do. The resize follows CATR: long side to ``image_size`` (299),
short side ``int(short * image_size / long)`` (at least 1 px), PIL's default
filter, then ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import AttnlabError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# PIL refuses images over 2 * MAX_IMAGE_PIXELS (~179 MP) as decompression bombs.
MAX_PIXELS = 250_000_000


def _open_path(path: Path) -> Image.Image:
    """Open (and decode) the image file at ``path``; the caller must close what it gets."""
    if not path.exists():
        raise AttnlabError(f"no image file at {path}: check the path")
    if path.is_dir():
        raise AttnlabError(f"{path} is a directory, not an image: pass an image file")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block or never end
        raise AttnlabError(f"{path} is not a regular file (a pipe, socket or device): pass an image file")
    if path.stat().st_size == 0:
        raise AttnlabError(f"{path} is empty (0 bytes): pass a PNG, JPEG or other image file")
    img = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.width * img.height > MAX_PIXELS:
                raise AttnlabError(
                    f"{path} has {img.width}x{img.height} pixels, more than attnlab reads ({MAX_PIXELS:,}): downscale it first"
                )
            img.load()
    except BaseException as exc:
        if img is not None:
            img.close()  # on every path: no "unclosed file" warning after a bad image
        if isinstance(exc, AttnlabError):
            raise
        if isinstance(exc, UnidentifiedImageError):
            raise AttnlabError(f"{path} is not an image PIL can read: pass a PNG, JPEG, GIF, BMP, TIFF or WebP file") from None
        if isinstance(exc, Image.DecompressionBombError):
            raise AttnlabError(f"{path} is too large to decode safely: downscale it first") from None
        if isinstance(exc, (OSError, SyntaxError, ValueError)):
            raise AttnlabError(f"{path} is truncated or corrupt ({exc}): re-save or re-download the image") from None
        raise
    return img


def _from_array(arr: np.ndarray) -> Image.Image:
    """``(H, W)``, ``(H, W, 1|3|4)`` uint8/uint16/bool or float in [0, 1] -> PIL image."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise AttnlabError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), not {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise AttnlabError(f"the image array is empty: shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)  # 0..65535 -> 0..255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise AttnlabError("the image array has NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise AttnlabError("a float image array must hold values in [0, 1]: scale it or pass uint8")
        arr = (arr * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise AttnlabError(f"image arrays must be uint8, uint16, bool or float in [0, 1], not {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _from_tensor(t: torch.Tensor) -> Image.Image:
    """``(3, H, W)``/``(1, H, W)``/``(H, W)`` tensor (torchvision layout) -> PIL image."""
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)  # (H, W, C)
    elif t.ndim != 2:
        raise AttnlabError(f"an image tensor must be (C, H, W) with C in 1, 3, 4 or (H, W), not {tuple(t.shape)}")
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()  # bfloat16 and float8 have no NumPy dtype
    return _from_array(t.numpy())


def _scale_to_8_bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """One-channel 16-bit, 32-bit integer or float pixels ``(H, W)`` -> uint8 ``(H, W)``.

    16-bit images span 0..65535. Float images (mode ``F``, e.g. a float TIFF) are read as
    [0, 1] when every value lies there, else as 0..255, else as 0..65535. 32-bit integer
    images as 0..255 when they fit, else as 0..65535.
    """
    if mode.startswith("I;16"):
        top = 65535.0
    else:
        if not np.isfinite(arr).all():
            raise AttnlabError("the image holds NaN or infinite pixel values: re-save it with finite values")
        low, high = float(arr.min()), float(arr.max())
        if low < 0 or high > 65535:
            raise AttnlabError(f"the image's pixel values span {low:g}..{high:g}: scale them to [0, 1] or 0..255 and re-save it")
        if mode == "F" and high <= 1.0:
            top = 1.0
        else:
            top = 255.0 if high <= 255 else 65535.0
    return np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: first frame, EXIF orientation applied, alpha over white, 16 bit scaled."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        img = Image.fromarray(_scale_to_8_bit(arr, img.mode), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(image: ImageInput) -> Image.Image:
    """Read a path, PIL image, array or tensor as an upright RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        with _open_path(path) as img:  # closed on every path; the RGB image is a new one
            try:
                return _to_rgb(img)
            except AttnlabError as exc:
                raise AttnlabError(f"{path}: {exc}") from None
            except (OSError, ValueError) as exc:
                raise AttnlabError(f"cannot convert {path} to RGB ({exc}): re-save it as PNG or JPEG") from None
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    elif isinstance(image, torch.Tensor):
        img = _from_tensor(image)
    else:
        raise AttnlabError(f"cannot use a {type(image).__name__} as an image: pass a path, PIL image, array or tensor")
    try:
        return _to_rgb(img)
    except AttnlabError:
        raise
    except (OSError, ValueError) as exc:
        raise AttnlabError(f"cannot convert the image to RGB ({exc}): re-save it as PNG or JPEG") from None


def resized_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """CATR's resize: ``(width, height)`` with the long side ``long_side``."""
    if width >= height:
        return long_side, max(1, int(height * long_side / width))
    return max(1, int(width * long_side / height)), long_side


def normalize(
    images: np.ndarray,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """uint8 RGB ``(N, h, w, 3)`` -> float32 ``(N, 3, h, w)``: ``(x / 255 - mean) / std`` per channel.

    The one place pixels become model input, for captioning and for training alike.
    """
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, h, w) in [0, 1] (a copy: arrays may be read-only)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@dataclass
class Batch:
    """Normalised images, zero-padded to the largest, with their padding mask."""

    pixels: torch.Tensor  # (N, 3, H, W) float32
    mask: torch.Tensor  # (N, H, W) bool, True = padding
    images: list[np.ndarray]  # N resized RGB images, (h_i, w_i, 3) uint8


def prepare(
    images: list[ImageInput],
    image_size: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> Batch:
    """Load, resize and normalise ``images`` into one padded :class:`Batch`."""
    resized = []
    for image in images:
        img = load_image(image)
        resized.append(np.asarray(img.resize(resized_size(img.width, img.height, image_size))))  # (h, w, 3)
    height = max(r.shape[0] for r in resized)
    width = max(r.shape[1] for r in resized)
    pixels = torch.zeros(len(resized), 3, height, width)  # (N, 3, H, W)
    mask = torch.ones(len(resized), height, width, dtype=torch.bool)  # (N, H, W)
    for i, r in enumerate(resized):
        pixels[i, :, : r.shape[0], : r.shape[1]] = normalize(r[None], mean, std)[0]  # (3, h, w); padding stays 0
        mask[i, : r.shape[0], : r.shape[1]] = False
    return Batch(pixels, mask, resized)


def _mean_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(round(min(max(m, 0.0), 1.0) * 255)) for m in mean)  # type: ignore[return-value]


def prepare_for(images: list[ImageInput], spec, *, content: list[tuple[int, int]] | None = None) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Images -> model inputs and display images, by a captioner's spec (:mod:`attnlab.captioner`).

    Returns ``pixels``: one ``(3, h, w)`` float32 tensor per image (sizes may
    differ with ``resize="long"``), and ``shown``: one ``(h', w', 3)`` uint8
    image per input over which the patch grid is stretched in figures:

    * ``"long"``: long side to ``spec.image_size``, aspect kept (CATR); the
      model sees exactly the shown image.
    * ``"stretch"``: the model sees the image squeezed to a square; the shown
      image keeps the aspect (long side ``image_size``). The grid stretches
      over both alike, so each patch lands on the part of the photo it saw.
    * ``"pad"``: long side to ``image_size``, then right/bottom padding with
      the mean colour to a square; the shown image is that square (padding visible).

    ``spec.transform``, when set, makes the model input instead (e.g. a Hugging
    Face image processor); the shown image still follows ``resize``.

    ``content``: a list that receives, per image, the ``(height, width)`` of the
    image itself within the shown one (top-left; smaller than the shown square
    only with ``"pad"``).
    """
    pixels: list[torch.Tensor] = []
    shown: list[np.ndarray] = []
    side = spec.image_size
    for image in images:
        img = load_image(image)
        w, h = resized_size(img.width, img.height, side)
        if spec.resize == "pad":
            canvas = Image.new("RGB", (side, side), _mean_colour(spec.mean))
            canvas.paste(img.resize((w, h)), (0, 0))
            view = np.asarray(canvas)  # (side, side, 3)
            model_in = view
            if content is not None:
                content.append((h, w))
        else:
            view = np.asarray(img.resize((w, h)))  # (h, w, 3), aspect kept
            model_in = view if spec.resize == "long" else np.asarray(img.resize((side, side)))  # (side, side, 3)
            if content is not None:
                content.append(view.shape[:2])
        if spec.transform is not None:
            x = spec.transform(img)
            if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] != 3:
                raise AttnlabError(f"the captioner's transform must return a (3, h, w) tensor, not {getattr(x, 'shape', type(x))}")
            pixels.append(x.float())
        else:
            pixels.append(normalize(model_in[None], spec.mean, spec.std)[0])  # (3, h, w)
        shown.append(view)
    return pixels, shown
