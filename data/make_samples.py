"""Re-create the sample images in attnlab/samples (all made here, free to ship).

    python data/make_samples.py

They ship inside the package (read with ``attnlab.sample_path(name)``), so an
installed wheel has them too; data/README.md keeps their provenance.

* scene-*.png: held-out shapes-world scenes (eval split, seed 7), 128x128.
* drawing-park.png: a 320x240 drawing (sky gradient, hill, sun, a purple
  star kite, a yellow square sign) made with PIL: a non-square "photo-like"
  picture, whose 14x19-style non-square grid the figures must handle.
* drawing-tabletop.jpg: a 300x400 (portrait) drawing of coloured shapes on
  a wooden-looking table, saved as JPEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from attnlab.shapes import make_scenes

OUT = Path(__file__).resolve().parents[1] / "attnlab" / "samples"


def park() -> Image.Image:
    w, h = 320, 240
    sky = np.linspace([120, 170, 235], [215, 235, 250], h)[:, None, :].repeat(w, axis=1)  # (H, W, 3)
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([-80, 150, 420, 420], fill=(70, 150, 70))
    d.ellipse([250, 20, 295, 65], fill=(240, 200, 40))
    star = [(80 + r * np.sin(a), 70 - r * np.cos(a)) for i, a in enumerate(np.linspace(0, 2 * np.pi, 11)[:-1]) for r in [(26 if i % 2 == 0 else 11)]]
    d.polygon(star, fill=(150, 50, 190))
    d.line([(80, 96), (120, 200)], fill=(60, 60, 60), width=2)
    d.rectangle([200, 140, 236, 176], fill=(235, 205, 30))
    d.line([(218, 176), (218, 215)], fill=(90, 60, 30), width=4)
    rng = np.random.default_rng(3)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
    return Image.fromarray(np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8))


def tabletop() -> Image.Image:
    w, h = 300, 400
    rng = np.random.default_rng(5)
    grain = 150 + 25 * np.sin(np.linspace(0, 40, w))[None, :] + rng.normal(0, 6, (h, w))  # (H, W)
    wood = np.stack([grain, grain * 0.75, grain * 0.5], axis=-1)  # (H, W, 3)
    img = Image.fromarray(np.clip(wood, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([40, 60, 130, 150], fill=(220, 40, 40))
    d.rectangle([170, 230, 250, 310], fill=(40, 70, 220))
    d.polygon([(90, 260), (140, 350), (40, 350)], fill=(40, 170, 60))
    return img.filter(ImageFilter.GaussianBlur(0.6))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(make_scenes(4, seed=7, split="eval")):
        Image.fromarray(scene.image).save(OUT / f"scene-{i}.png")
    park().save(OUT / "drawing-park.png")
    tabletop().save(OUT / "drawing-tabletop.jpg", quality=92)
    print(f"wrote {len([p for p in OUT.iterdir() if p.suffix in ('.png', '.jpg')])} images to {OUT}")


if __name__ == "__main__":
    main()
