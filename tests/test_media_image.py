"""pipeline.data.media images on real files encoded here, and the media error contract:
shapes, values, a reason for every bad file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from media_files import (
    BLUE,
    GREEN,
    RED,
    WHITE,
    assert_fresh,
    assert_reason,
    image_bytes,
    png_header,
)
from PIL import Image

from pipeline.data import media
from pipeline.data.media import MediaError

# ---------------------------------------------------------------------------------- image


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "JPEG", "WEBP", "GIF"])
def test_image_formats_give_rgb_square_with_centre_crop(fmt):
    # 200x100, red left half, blue right half: the centred 100x100 square is half and half.
    out = media.decode_image(image_bytes(halves((200, 100), RED, BLUE), fmt), size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert_fresh(out)
    tolerance = 0 if fmt in ("PNG", "BMP", "TIFF") else 30
    np.testing.assert_allclose(out[:, :12].mean((0, 1)), RED, atol=tolerance + 0.5)
    np.testing.assert_allclose(out[:, -12:].mean((0, 1)), BLUE, atol=tolerance + 0.5)


def test_tall_image_keeps_the_middle_rows():
    img = Image.new("RGB", (100, 300), GREEN)
    img.paste(WHITE, (0, 100, 100, 200))
    out = media.decode_image(image_bytes(img, "PNG"), size=50)
    assert out.shape == (50, 50, 3)
    # Only the white middle third survives (the filter may blend a row at each edge).
    assert out[2:-2].min() == 255


def test_upscales_small_images():
    out = media.decode_image(image_bytes(Image.new("RGB", (5, 7), (10, 200, 30)), "PNG"), size=64)
    assert out.shape == (64, 64, 3)
    assert (out == (10, 200, 30)).all()


def test_greyscale_palette_cmyk_and_16_bit_become_rgb():
    grey = media.decode_image(image_bytes(Image.new("L", (40, 40), 77), "PNG"), size=8)
    assert (grey == 77).all()
    palette = Image.new("RGB", (40, 40), (12, 34, 56)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert (media.decode_image(image_bytes(palette, "PNG"), size=8) == (12, 34, 56)).all()
    cmyk = media.decode_image(image_bytes(Image.new("CMYK", (40, 40), 0), "JPEG"), size=8)
    assert cmyk.min() >= 250  # no ink = white
    deep = Image.fromarray(np.full((40, 40), 0x8000, np.uint16))
    assert (media.decode_image(image_bytes(deep, "PNG"), size=8) == 128).all()


def test_transparency_is_composited_over_white():
    rgba = halves((40, 20), (0, 0, 0, 0), (0, 0, 255, 255), mode="RGBA")
    out = media.decode_image(image_bytes(rgba, "PNG"), size=20)
    np.testing.assert_array_equal(out[:, :8].reshape(-1, 3).min(0), WHITE)
    np.testing.assert_array_equal(out[:, -8:].reshape(-1, 3).max(0), BLUE)
    gif = halves((40, 20), 0, 1, mode="P")
    gif.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    out = media.decode_image(image_bytes(gif, "GIF", transparency=0), size=20)
    np.testing.assert_array_equal(out[:, :8].reshape(-1, 3).min(0), WHITE)
    np.testing.assert_array_equal(out[:, -8:].reshape(-1, 3).max(0), RED)


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert (media.decode_image(data, size=8) == RED).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 40), RED)
    img.paste(BLUE, (0, 20, 40, 40))  # red top, blue bottom as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": red ends on the right
    out = media.decode_image(image_bytes(img, "PNG", exif=exif), size=20)
    np.testing.assert_array_equal(out[:, -6:].reshape(-1, 3).min(0), RED)
    np.testing.assert_array_equal(out[:, :6].reshape(-1, 3).max(0), BLUE)


def test_big_jpeg_draft_matches_lossless_decode():
    y, x = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([x * 255 // 1600, y * 255 // 1200, np.full_like(x, 90)], -1).astype(np.uint8)
    img = Image.fromarray(smooth)
    jpeg = media.decode_image(image_bytes(img, "JPEG", quality=95), size=64)
    png = media.decode_image(image_bytes(img, "PNG"), size=64)
    assert jpeg.shape == (64, 64, 3)
    assert np.abs(jpeg.astype(int) - png).mean() < 3


def test_resize_center_crop_helper():
    out = media.resize_center_crop(halves((30, 10), RED, BLUE), 10)
    assert out.shape == (10, 10, 3)
    assert (out[:, :4] == RED).all() and (out[:, -4:] == BLUE).all()
    assert_fresh(out)


@pytest.mark.parametrize(
    ("data", "reason", "kwargs"),
    [
        (b"", "empty_file", {}),
        (b"just some text, not an image\n" * 4, "not_media", {}),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not_media", {}),  # audio is not an image
        (png_header(64, 64)[:20], "corrupt", {}),  # signature, cut inside the header
        (png_header(64, 64), "corrupt", {}),  # header fine, pixel data garbage
        (png_header(9_000, 9_000), "too_large", {}),  # over the default 64 M pixels
        (png_header(20_000, 20_000), "too_large", {}),  # Pillow's own bomb guard
        (png_header(100, 100), "too_large", {"max_pixels": 5_000}),
    ],
    ids=["empty", "text", "wav", "cut-header", "bad-pixels", "9k", "20k", "max_pixels"],
)
def test_bad_images(data, reason, kwargs):
    err = assert_reason(reason, media.decode_image, data, **kwargs)
    assert isinstance(err, ValueError) and err.detail


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_images_are_corrupt(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (80, 80, 3), np.uint8)
    data = image_bytes(Image.fromarray(noise), fmt)
    assert_reason("corrupt", media.decode_image, data[: len(data) // 2])


# ---------------------------------------------------------------------------- the contract


def test_media_error_pickles_and_rejects_unknown_reasons():
    err = pickle.loads(pickle.dumps(MediaError("corrupt", "cut at byte 10")))
    assert (err.reason, err.detail, str(err)) == (
        "corrupt",
        "cut at byte 10",
        "corrupt: cut at byte 10",
    )
    assert media.REASON_EMPTY == "empty_file" and len(media.REASONS) == 11
    with pytest.raises(ValueError, match="unknown"):
        MediaError("bogus")


def test_invalid_arguments_are_plain_value_errors():
    for call in (
        lambda: media.decode_image(b"x", size=0),
        lambda: media.decode_audio(b"x", num_samples=0),
        lambda: media.decode_video(b"x", num_frames=0),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert not isinstance(info.value, MediaError)


def test_extensions():
    assert set(media.EXTENSIONS) == {"image", "audio", "video"}
    for extensions in media.EXTENSIONS.values():
        assert all(e.startswith(".") and e == e.lower() for e in extensions)
    assert {".png", ".jpg"} <= media.EXTENSIONS["image"]
    assert {".wav", ".flac", ".mp3"} <= media.EXTENSIONS["audio"]
    assert ".mp4" in media.EXTENSIONS["video"]
