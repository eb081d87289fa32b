"""pipeline.data.media on real files encoded here: shapes, values, a reason for every bad file."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

from pipeline.data import media
from pipeline.data.media import MediaError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ------------------------------------------------------------------------- file builders


def image_bytes(img: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def wav_bytes(x: np.ndarray, rate: int, *, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, x, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG claiming width x height, with no real pixel data (headers are all we need)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x") + chunk(b"IEND", b"")


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)).astype(
        np.float32
    )


def peak_hz(x: np.ndarray, rate: int) -> float:
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(np.abs(np.fft.rfft(x)))])


def video_bytes(
    frames: np.ndarray,
    *,
    audio: np.ndarray | None = None,
    rate: int = 16_000,
    fmt: str = "mp4",
    codec: str = "mpeg4",
) -> bytes:
    """(F, H, W, 3) uint8 at 8 fps (+ mono float32 AAC track) -> container bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        video = container.add_stream(codec, rate=8)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "mpeg4":
            video.codec_context.bit_rate = 4_000_000
        if audio is not None:  # every stream must exist before the first packet is written
            sound = container.add_stream("aac", rate=rate, layout="mono")
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            chunk = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
            chunk.sample_rate, chunk.pts = rate, 0
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return buffer.getvalue()


def grey_frames(n: int, *, step: int = 25, h: int = 48, w: int = 64) -> np.ndarray:
    """(n, h, w, 3) frames whose grey level encodes the frame index: level = 20 + step * i."""
    levels = 20 + step * np.arange(n)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8)


def assert_fresh(x: np.ndarray) -> None:
    assert x.flags.writeable and x.flags.c_contiguous and x.flags.owndata


def assert_reason(reason: str, fn, *args, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, info.value
    return info.value


@pytest.fixture(scope="module")
def clip_with_audio() -> bytes:
    return video_bytes(grey_frames(10), audio=tone(440, 16_000, 1.25))


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


# ---------------------------------------------------------------------------------- audio


def test_int16_audio_storage_rounds_clips_and_training_reads_it_back_within_half_a_step():
    import torch

    from pipeline.data.decode import to_int16
    from pipeline.train.batches import to_model_input

    x = np.array([0.0, 1.0, -1.0, 1.5, -2.0, 0.5 / 32767, 1.5 / 32767, -0.25], np.float32)
    q = to_int16(x)
    assert q.dtype == np.int16
    assert q.tolist() == [0, 32767, -32767, 32767, -32767, 0, 2, -8192]
    # What preprocessing stores (to_int16) -> what training feeds the model (to_model_input):
    # the clipped signal to within half a quantisation step. A scale that differs between
    # the two by even one count (32768) is off by up to a whole step near full scale.
    signal = np.concatenate([x, np.random.default_rng(0).uniform(-1, 1, 2000)]
                            ).astype(np.float32)
    stored = torch.from_numpy(np.stack([to_int16(signal), to_int16(-signal)]))
    back = to_model_input({"audio": stored}, {"audio": (len(signal), 1)})["audio"]
    assert back.dtype == torch.float32 and back.shape == (2, len(signal), 1)
    want = np.clip(signal, -1, 1)
    half_step = 0.5 / 32767
    np.testing.assert_allclose(back[0, :, 0].numpy(), want, rtol=0, atol=half_step * 1.001)
    np.testing.assert_allclose(back[1, :, 0].numpy(), -want, rtol=0, atol=half_step * 1.001)


def test_wav_int16_same_rate_is_exact_and_padded():
    x = tone(500, 16_000, 0.5)
    out = media.decode_audio(wav_bytes(x, 16_000), sample_rate=16_000, num_samples=10_000)
    assert out.shape == (10_000,) and out.dtype == np.float32
    assert_fresh(out)
    np.testing.assert_allclose(out[:8_000], x, atol=1 / 32_768)
    assert not out[8_000:].any()  # zero padding at the end


def test_centre_crop_without_resampling():
    ramp = np.linspace(-0.9, 0.9, 1_000, dtype=np.float32)
    data = wav_bytes(ramp, 8_000, subtype="FLOAT")
    out = media.decode_audio(data, sample_rate=8_000, num_samples=200)
    np.testing.assert_array_equal(out, ramp[400:600])


def test_float_wav_is_clipped_and_cleaned():
    x = np.array([2.0, -3.0, np.nan, 0.25] * 100, np.float32)
    out = media.decode_audio(wav_bytes(x, 8_000, subtype="FLOAT"), sample_rate=8_000, num_samples=8)
    np.testing.assert_array_equal(out, [1.0, -1.0, 0.0, 0.25] * 2)


def test_stereo_is_averaged_to_mono():
    stereo = np.stack([np.full(4_000, 0.5), np.full(4_000, 0.1)], 1).astype(np.float32)
    out = media.decode_audio(wav_bytes(stereo, 8_000, subtype="FLOAT"), sample_rate=8_000)
    np.testing.assert_allclose(out[:4_000], 0.3, atol=1e-6)


@pytest.mark.parametrize(("rate_in", "rate_out"), [(44_100, 48_000), (48_000, 16_000)])
def test_resampling_length_pitch_and_padding(rate_in, rate_out):
    data = wav_bytes(tone(1_000, rate_in, 1.0), rate_in)
    out = media.decode_audio(data, sample_rate=rate_out, num_samples=rate_out + 500)
    assert out[:-500].std() > 0.3 and not out[-500:].any()  # 1 s of signal, then zeros
    assert abs(peak_hz(out[: rate_out // 2], rate_out) - 1_000) <= 2


@pytest.mark.parametrize(("rate_in", "rate_out"),
                         [(22_050, 48_000), (44_100, 48_000), (48_000, 16_000)])
def test_windowed_resampling_equals_resample_then_crop(rate_in, rate_out):
    """Also pins the cached low-pass filter to resample_poly's own default design."""
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 3 * rate_in).astype(np.float32)
    data = wav_bytes(x, rate_in, subtype="FLOAT")
    out = media.decode_audio(data, sample_rate=rate_out, num_samples=20_000)
    g = np.gcd(rate_in, rate_out)
    full = resample_poly(x, rate_out // g, rate_in // g)
    start = (len(full) - 20_000) // 2
    np.testing.assert_allclose(out, np.clip(full[start : start + 20_000], -1, 1), atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_compressed_audio(fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile here cannot write {fmt}")
    data = wav_bytes(tone(880, 16_000, 1.0), 16_000, fmt=fmt, subtype=subtype)
    out = media.decode_audio(data, sample_rate=16_000, num_samples=16_000)
    assert out.shape == (16_000,) and out.dtype == np.float32
    assert abs(peak_hz(out, 16_000) - 880) <= 2
    assert 0.3 < np.abs(out).max() <= 0.6


def test_m4a_goes_through_pyav():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ipod") as container:
        stream = container.add_stream("aac", rate=22_050, layout="stereo")
        x = tone(440, 22_050, 1.0)
        interleaved = np.stack([x, x], 1).reshape(1, -1)  # (1, T * C) packed stereo
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout="stereo")
        frame.sample_rate, frame.pts = 22_050, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    out = media.decode_audio(buffer.getvalue(), sample_rate=16_000, num_samples=16_000)
    assert abs(peak_hz(out, 16_000) - 440) <= 2
    assert 0.4 < np.abs(out).max() <= 0.6  # averaged, not summed


def test_min_samples_counts_after_resampling():
    data = wav_bytes(tone(200, 8_000, 0.125), 8_000)  # 1000 samples -> 2000 at 16 kHz
    assert media.decode_audio(data, sample_rate=16_000, num_samples=100, min_samples=2_000).any()
    err = assert_reason(
        "too_short", media.decode_audio, data, sample_rate=16_000, min_samples=2_001
    )
    assert "2000" in err.detail


def test_bad_audio(clip_with_audio):
    text = b"this is a text file named sound.wav\n" * 5
    assert_reason("empty_file", media.decode_audio, b"")
    assert_reason("not_media", media.decode_audio, text)
    assert_reason("not_media", media.decode_audio, image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    assert_reason("not_media", media.decode_audio, video_bytes(grey_frames(2)))  # no audio track
    assert_reason("no_samples", media.decode_audio, wav_bytes(np.zeros(0, np.float32), 8_000))
    wav = wav_bytes(tone(300, 8_000, 1.0), 8_000)
    assert_reason("corrupt", media.decode_audio, wav[:30])  # cut inside the header
    assert_reason("corrupt", media.decode_audio, wav[: len(wav) // 2])  # cut inside the data
    flac = wav_bytes(np.random.default_rng(0).uniform(-1, 1, 8_000), 8_000, fmt="FLAC")
    assert_reason("corrupt", media.decode_audio, flac[: len(flac) // 2])
    assert_reason("corrupt", media.decode_audio, clip_with_audio[: len(clip_with_audio) // 2])


# ---------------------------------------------------------------------------------- video


def test_video_frames_are_sampled_uniformly(clip_with_audio):
    frames, audio, has_audio = media.decode_video(clip_with_audio, num_frames=4, size=16)
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
    assert_fresh(frames)
    assert audio is None and has_audio  # the track exists, but was not asked for
    expected = 20 + 25 * np.array([0, 3, 6, 9])  # linspace(0, 9, 4).round()
    np.testing.assert_allclose(frames.mean((1, 2, 3)), expected, atol=4)


def test_video_with_audio_track(clip_with_audio):
    frames, audio, has_audio = media.decode_video(
        clip_with_audio, num_frames=3, size=8, with_audio=True, sample_rate=8_000, num_samples=6_000
    )
    assert frames.shape == (3, 8, 8, 3)
    assert audio.shape == (6_000,) and audio.dtype == np.float32 and has_audio
    assert_fresh(audio)
    assert abs(peak_hz(audio, 8_000) - 440) <= 2
    assert 0.4 < np.abs(audio).max() <= 0.6


def test_video_without_audio_track():
    data = video_bytes(grey_frames(3))
    frames, audio, has_audio = media.decode_video(data, num_frames=5, size=8, with_audio=True)
    assert frames.shape == (5, 8, 8, 3)  # more frames asked than exist: indices repeat
    np.testing.assert_allclose(frames.mean((1, 2, 3)), 20 + 25 * np.array([0, 0, 1, 2, 2]), atol=4)
    assert audio.shape == (122_880,) and not audio.any() and not has_audio
    assert media.decode_video(data, size=8)[1:] == (None, False)


def test_video_centre_crop():
    frames = np.zeros((2, 64, 128, 3), np.uint8)
    frames[:, :, :32] = RED
    frames[:, :, 32:96] = GREEN
    frames[:, :, 96:] = BLUE
    out, _, _ = media.decode_video(video_bytes(frames), num_frames=2, size=16)
    np.testing.assert_allclose(out[:, 2:-2, 2:-2].reshape(-1, 3).mean(0), GREEN, atol=12)


@pytest.mark.parametrize(
    ("fmt", "codec"),
    [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("matroska", "mpeg4")],
    ids=["h264", "webm-no-frame-count", "mkv"],
)
def test_other_codecs_and_containers(fmt, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder in this PyAV build")
    data = video_bytes(grey_frames(6, step=40), fmt=fmt, codec=codec)
    frames, _, _ = media.decode_video(data, num_frames=6, size=8)
    np.testing.assert_allclose(frames.mean((1, 2, 3)), 20 + 40 * np.arange(6), atol=4)


def test_bad_video(clip_with_audio):
    assert_reason("empty_file", media.decode_video, b"")
    assert_reason("not_media", media.decode_video, b"not a video, just text named clip.mp4\n" * 4)
    assert_reason("not_media", media.decode_video, wav_bytes(tone(300, 8_000, 0.5), 8_000))
    truncated = clip_with_audio[: len(clip_with_audio) // 2]  # moov (the index) is at the end
    assert_reason("corrupt", media.decode_video, truncated)
    assert_reason("too_large", media.decode_video, clip_with_audio, max_pixels=64 * 48 - 1)


def test_video_with_undecodable_frames(clip_with_audio):
    # Keep the container intact but overwrite every byte of media data (mdat) with garbage.
    start = clip_with_audio.index(b"mdat") + 4
    length = struct.unpack(">I", clip_with_audio[start - 8 : start - 4])[0] - 8
    garbage = clip_with_audio[:start] + b"\xab" * length + clip_with_audio[start + length :]
    err = assert_reason("no_frames", media.decode_video, garbage)
    assert err.detail


# ---------------------------------------------------------------------------- the contract


def test_media_error_pickles_and_rejects_unknown_reasons():
    err = pickle.loads(pickle.dumps(MediaError("corrupt", "cut at byte 10")))
    assert (err.reason, err.detail, str(err)) == (
        "corrupt",
        "cut at byte 10",
        "corrupt: cut at byte 10",
    )
    assert media.REASON_EMPTY == "empty_file" and len(media.REASONS) == 8
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
