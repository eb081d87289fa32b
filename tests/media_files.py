"""Media files encoded in memory for the media tests (tests/test_media_*.py): images, WAV
and compressed audio, videos with and without audio; plus small assertions they share."""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline.data.media import MediaError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)




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
