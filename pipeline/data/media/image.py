"""Images: encoded bytes -> (S, S, 3) uint8 RGB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.media.errors import (
    REASON_CORRUPT,
    REASON_TOO_LARGE,
    REASON_UNSUPPORTED,
    MediaError,
    _check_nonempty,
    _check_positive,
    _describe,
    _unreadable,
)

# Parsers allowed to see untrusted bytes: only what EXTENSIONS promises. Pillow carries
# dozens of rarely used parsers; fewer parsers means less attack surface. (Multi-picture
# camera JPEGs come through "JPEG" and then report format "MPO".)
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Transparent pixels are composited over white: most transparent images (logos, product
# shots, icons) are drawn to be shown on a white page.
_ALPHA_BACKGROUND = (255, 255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_T = Image.Transpose
_EXIF_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM}
_EXIF_TRANSPOSE |= {5: _T.TRANSPOSE, 6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop: (H, W) RGB/RGBA image -> (S, S, 3) uint8.

    One bicubic resample of the centred square (`box=`), so cropped-away pixels are never
    computed; reducing_gap lets Pillow box-reduce big images first. RGBA is composited over
    white after resizing (Pillow resizes RGBA with premultiplied alpha).
    """
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    if out.mode == "RGBA":
        background = Image.new("RGBA", out.size, _ALPHA_BACKGROUND)
        background.alpha_composite(out)
        out = background.convert("RGB")
    return np.array(out, dtype=np.uint8)  # a copy: writable, C-contiguous


def decode_image(data: bytes, *, size: int = 224, max_pixels: int = 64_000_000) -> np.ndarray:
    """Encoded image (JPEG, PNG, WebP, GIF first frame, BMP, TIFF) -> (S, S, 3) uint8 RGB.

    Palette, greyscale, 16-bit, CMYK and alpha images become RGB; EXIF orientation is applied.
    The pixel count is checked from the header before any pixel is decoded.
    """
    _check_positive(size=size, max_pixels=max_pixels)
    _check_nonempty(data)
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise MediaError(REASON_TOO_LARGE, _describe(e)) from e
    except UnidentifiedImageError as e:
        raise _unreadable(data, "image", e) from e
    except Exception as e:  # Pillow reports a broken header as OSError/SyntaxError/ValueError
        raise MediaError(REASON_CORRUPT, _describe(e)) from e
    with img:
        w, h = img.size
        # Pillow's own bomb limit only warns below 2x; enforce it here as well.
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        if w * h > limit:
            raise MediaError(REASON_TOO_LARGE, f"{w}x{h} = {w * h} pixels > limit {limit}")
        if w < 1 or h < 1:
            raise MediaError(REASON_CORRUPT, f"image has size {w}x{h}")
        try:
            if img.format in ("JPEG", "MPO"):
                # Decode at 1/2, 1/4 or 1/8 scale in the DCT domain; both sides stay >= size.
                img.draft("RGB", (size, size))
            img.load()
        except MemoryError as e:
            raise MediaError(REASON_TOO_LARGE, _describe(e)) from e
        except Exception as e:  # truncated data: OSError "image file is truncated", ...
            raise MediaError(REASON_CORRUPT, _describe(e)) from e
        transpose = _EXIF_TRANSPOSE.get(_exif_orientation(img))
        try:
            rgb = _to_rgb(img)
        except Exception as e:
            raise MediaError(REASON_UNSUPPORTED, f"mode {img.mode}: {_describe(e)}") from e
        out = resize_center_crop(rgb, size)  # inside `with`: close() frees the pixels
    if transpose is not None:
        # The crop is a centred square, so rotating after the resize equals rotating before.
        out = np.array(Image.fromarray(out).transpose(transpose), dtype=np.uint8)
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB", or "RGBA" when the image has transparency."""
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: Pillow's convert clips to 255 instead of scaling the range.
        grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of a big RGB image


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # broken EXIF is metadata damage, not a reason to reject the pixels
        return None


