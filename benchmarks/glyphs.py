"""An image class-folder set whose classes are shapes: stroke-drawn digit glyphs.

    python -m benchmarks.glyphs --out DIR [--per-class 100] [--size 64]
    python -m benchmarks.learning --data DIR/image

The sample images (pipeline/data/sample_data.py) draw each class as a patch of random hue,
size and place, so most of what MAE reconstruction learns there (hue, brightness, where the
patch is) does not name the class. Here each class is one fixed polyline glyph (the digits
0-9 drawn as strokes), grey on black, under a random rotation (+-15 degrees), shear,
scale, offset, stroke width, brightness, jitter of every vertex and pixel noise: to
reconstruct a masked stroke is to know which glyph it is, as in handwritten digits.
Deterministic under --seed.

Shapes: S image side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# One polyline list per class, on the unit square (x right, y down).
GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "0": [[(0.2, 0.1), (0.8, 0.1), (0.8, 0.9), (0.2, 0.9), (0.2, 0.1)]],
    "1": [[(0.35, 0.25), (0.55, 0.1), (0.55, 0.9)]],
    "2": [[(0.2, 0.2), (0.5, 0.1), (0.8, 0.25), (0.2, 0.9), (0.8, 0.9)]],
    "3": [[(0.2, 0.1), (0.8, 0.1), (0.45, 0.5), (0.8, 0.7), (0.5, 0.9), (0.2, 0.8)]],
    "4": [[(0.7, 0.9), (0.7, 0.1), (0.2, 0.65), (0.85, 0.65)]],
    "5": [[(0.8, 0.1), (0.25, 0.1), (0.2, 0.45), (0.7, 0.5), (0.75, 0.85), (0.2, 0.9)]],
    "6": [[(0.75, 0.1), (0.25, 0.5), (0.25, 0.9), (0.75, 0.9), (0.75, 0.55), (0.25, 0.55)]],
    "7": [[(0.2, 0.1), (0.8, 0.1), (0.4, 0.9)]],
    "8": [[(0.5, 0.5), (0.2, 0.3), (0.5, 0.1), (0.8, 0.3), (0.2, 0.7), (0.5, 0.9), (0.8, 0.7),
           (0.5, 0.5)]],
    "9": [[(0.75, 0.45), (0.25, 0.45), (0.25, 0.1), (0.75, 0.1), (0.75, 0.9), (0.3, 0.9)]],
}


def make_glyph(rng: np.random.Generator, label: int, size: int = 64) -> np.ndarray:
    """Glyph `label` under a random affine map, width, brightness and noise -> (S, S, 3) uint8."""
    from PIL import Image, ImageDraw

    angle, shear = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.2, 0.2)
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    affine = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) * rng.uniform(0.55, 0.85) * size
    offset = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(max(1, size // 20), max(2, size // 9)))
    for stroke in GLYPHS[str(label)]:
        pts = (np.array(stroke) - 0.5 + rng.normal(0, 0.03, (len(stroke), 2))) @ affine.T
        draw.line([tuple(p) for p in pts + offset], fill=int(rng.integers(180, 256)),
                  width=width, joint="curve")
    grey = np.asarray(img, np.float32) + rng.normal(0, 12, (size, size))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def write(out: Path, *, per_class: int, size: int, seed: int) -> int:
    """OUT/image/<digit>/<digit>_<i>.png; -> files written."""
    from pipeline.data.sample_data import encode_png

    for label in range(len(GLYPHS)):
        folder = out / "image" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, label, i]))
            (folder / f"{label}_{i:03d}.png").write_bytes(encode_png(make_glyph(rng, label,
                                                                                 size)))
    return per_class * len(GLYPHS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.per_class < 1 or args.size < 8:
        p.error("--per-class must be >= 1 and --size >= 8")
    n = write(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {n} glyph images to {args.out / 'image'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
