"""The model's image processor as ``spec.transform`` (:func:`processor_input`), checked once,
on a synthetic image, to stretch the photo to a square, or to resize it and cut out its centre
(CLIP's and DeiT's processors: ``do_center_crop``): then ``spec.crop`` gives the box of the photo
the model saw, and every patch of a figure sits on the part of the photo it covers. A processor
that crops or pads in any other way is refused in one line."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import AttnlabError
from ...util import one_line

STRETCH_TOLERANCE = 0.03  # largest difference (pixel values in [0, 1]) from a plain resize to a square
MAX_SIDE = 2048  # the largest input side an image processor may ask for (checked before it runs)
_SIDE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


@dataclass(frozen=True)
class ProcessorInput:
    """What the image processor makes of a photo, as the spec needs it."""

    transform: Callable[[Image.Image], torch.Tensor]  # a photo -> pixels (3, side, side)
    side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: Callable[[int, int], tuple[float, float, float, float]] | None = None  # (width, height) -> the box seen


def _triple(value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3  # type: ignore[return-value]
    if isinstance(value, numbers.Real):
        return (float(value),) * 3  # type: ignore[return-value]
    out = tuple(float(v) for v in value)
    return out if len(out) == 3 else (out[0],) * 3  # type: ignore[return-value]


def _sides(sizes: Any) -> dict[str, float]:
    """The pixel sides an image processor's ``size`` asks for: a number, a dict or transformers' ``SizeDict``."""
    if isinstance(sizes, numbers.Real):
        return {"side": sizes}
    items = sizes.items() if isinstance(sizes, dict) else vars(sizes).items() if hasattr(sizes, "__dict__") else ()
    return {k: v for k, v in items if k in _SIDE_KEYS and isinstance(v, numbers.Real)}


def _check_sizes(processor: Any) -> None:
    """Every side the processor asks for is at most :data:`MAX_SIDE` (before it runs on anything)."""
    for key in ("size", "crop_size"):
        for side, value in _sides(getattr(processor, key, None)).items():
            if value > MAX_SIDE:
                raise AttnlabError(
                    f"the image processor's {key} {side}={value} is larger than attnlab's limit of {MAX_SIDE} px: set it to the model's input size"
                )


def _ramp() -> Image.Image:
    """A wide test image: red grows left to right, green top to bottom; a crop or padding moves them."""
    side = 64
    xs = np.linspace(0.0, 1.0, 2 * side)
    ys = np.linspace(0.0, 1.0, side)
    ramp = np.stack(
        [np.broadcast_to(xs, (side, 2 * side)), np.broadcast_to(ys[:, None], (side, 2 * side)), np.full((side, 2 * side), 0.5)],
        axis=-1,
    )  # (64, 128, 3) in [0, 1]
    return Image.fromarray((ramp * 255).round().astype(np.uint8))


def centre_crop_box(processor: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The box ``(x0, y0, x1, y1)`` of a ``width x height`` photo that ``processor`` keeps when it
    resizes (``size``: ``shortest_edge`` or ``height``/``width``) and then cuts out the centre
    (``do_center_crop``, ``crop_size``), as transformers does it; ``None`` when it does not crop.
    A crop larger than the resized photo is padded: the box then overhangs the photo."""
    crop, size = _sides(getattr(processor, "crop_size", None)), _sides(getattr(processor, "size", None))
    if not getattr(processor, "do_center_crop", False) or not {"height", "width"} <= set(crop):
        return None
    if "shortest_edge" in size:
        short, long = sorted((width, height))
        new_short, new_long = int(size["shortest_edge"]), int(size["shortest_edge"] * long / short)
        nw, nh = (new_short, new_long) if width <= height else (new_long, new_short)
    elif {"height", "width"} <= set(size):
        nw, nh = int(size["width"]), int(size["height"])
    else:
        return None
    cw, ch = int(crop["width"]), int(crop["height"])
    left = (nw - cw) // 2 if nw >= cw else -((cw - nw) // 2)  # a crop beyond the image is padded around it
    top = (nh - ch) // 2 if nh >= ch else -((ch - nh) // 2)
    return (left * width / nw, top * height / nh, (left + cw) * width / nw, (top + ch) * height / nh)


def _check_stretch(x: torch.Tensor, probe: Image.Image, mean: tuple, std: tuple, scale: float, box: Any = None) -> None:
    """``x`` (the processor's pixels for ``probe``) must be ``probe`` (or its ``box``) resized to a square."""
    if x.dim() != 3 or x.shape[0] != 3 or x.shape[1] != x.shape[2]:
        raise AttnlabError(
            f"the image processor gives {tuple(x.shape)} pixels; attnlab needs a square (3, S, S) input: set its size to a square"
        )
    s = int(x.shape[-1])
    unit = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) / (scale * 255.0)  # (3, S, S) in [0, 1]
    seen = probe.resize((s, s), Image.BILINEAR, box=box)  # the box of the probe the model should see, as a square
    expected = torch.from_numpy(np.asarray(seen, dtype=np.float32) / 255.0).permute(2, 0, 1)
    gap = float((unit - expected)[:, 1:-1, 1:-1].abs().max()) if s > 2 else 0.0
    if gap > STRETCH_TOLERANCE:
        raise AttnlabError(
            f"the image processor crops or pads the image (off by {gap:.2f} from a plain resize or a centre crop to {s}x{s}), so attnlab's "
            "figures could not place the patches: use one that only resizes to a square (e.g. do_center_crop=False and "
            "size=crop_size; the model then sees the whole image, not its centre)"
        )


def processor_input(image_processor: Any) -> ProcessorInput:
    """The processor as ``spec.transform``, checked on a synthetic wide image to stretch it to a square."""
    processor = getattr(image_processor, "image_processor", image_processor)  # a combined processor works too
    if not callable(processor):
        raise AttnlabError(
            f"image_processor must be the model's Hugging Face image processor (AutoImageProcessor.from_pretrained(...)), "
            f"not a {type(image_processor).__name__}"
        )
    normalize = getattr(processor, "do_normalize", True)
    mean = _triple(getattr(processor, "image_mean", None) if normalize else None, 0.0)
    std = _triple(getattr(processor, "image_std", None) if normalize else None, 1.0)
    scale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    _check_sizes(processor)

    def transform(img: Image.Image) -> torch.Tensor:
        out = processor(images=img, return_tensors="pt")
        x = out["pixel_values"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return torch.as_tensor(x)[0].float()  # (3, S, S)

    probe = _ramp()
    try:
        x = transform(probe)  # (3, S, S)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign processor becomes one line
        raise AttnlabError(f"the image processor failed on a test image ({one_line(exc, with_type=True)}): pass the model's own image processor") from None
    box = centre_crop_box(processor, *probe.size)
    _check_stretch(x, probe, mean, std, scale, None if box is None else _inside(box, probe.size))
    crop = None if box is None else (lambda width, height: centre_crop_box(processor, width, height))
    return ProcessorInput(transform, int(x.shape[-1]), mean, std, crop)


def _inside(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` if it lies within the photo; a crop that pads is refused (the check compares plain pixels)."""
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]:
        raise AttnlabError("the image processor's crop_size is larger than its resized image (it pads): set crop_size to at most its size")
    return box
