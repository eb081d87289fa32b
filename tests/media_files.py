"""Media files encoded in memory for the media tests (tests/test_media_*.py): images, WAV
and compressed audio, videos with and without audio, long AAC made fast; plus small
assertions and the whole-file audio reference they share."""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

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
    gop: int | None = None,
) -> bytes:
    """(F, H, W, 3) uint8 at 8 fps (+ a (T,) mono or (2, T) stereo float32 AAC track) ->
    container bytes; `gop`: frames between keyframes (None: the encoder's default)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        video = container.add_stream(codec, rate=8)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if gop:
            video.codec_context.gop_size = gop
        if codec == "mpeg4":
            video.codec_context.bit_rate = 4_000_000
        if audio is not None:  # every stream must exist before the first packet is written
            layout = "mono" if audio.ndim == 1 else "stereo"
            sound = container.add_stream("aac", rate=rate, layout=layout)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            planes = np.atleast_2d(audio)  # (C, T)
            chunk = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
            chunk.sample_rate, chunk.pts = rate, 0
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return buffer.getvalue()


def av_audio_bytes(x: np.ndarray, rate: int, *, fmt: str, codec: str, layout: str) -> bytes:
    """(C, T) float32 -> one audio stream through PyAV (containers libsndfile cannot read)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        for i in range(0, x.shape[1], 4_800):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(x[:, i : i + 4_800]), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


# Long AAC without encoding it all: a tone with a whole number of cycles per PERIOD samples,
# two periods encoded once, then the second period's packets muxed again and again.
TILE_RATE, TILE_FRAME, TILE_PACKETS = 48_000, 1024, 480  # 48 kHz mono; AAC frames per period
TILE_PERIOD = TILE_FRAME * TILE_PACKETS  # 491_520 samples = 10.24 s
TILE_HZ = 4506 * TILE_RATE / TILE_PERIOD  # ~440 Hz


def tiled_aac(seconds: float, *, fmt: str = "ipod", video_frames: int = 0) -> bytes:
    """~`seconds` (whole AAC frames) of mono 48 kHz AAC tone in a container: muxing 20 minutes
    takes ~0.3 s where encoding them would take ~15 s. From TILE_PERIOD on, the decoded
    signal repeats exactly (tiled_reference). `video_frames` grey 16x16 frames at 8 fps go
    first, in a video stream of their own."""
    n = np.arange((2 * TILE_PACKETS + 4) * TILE_FRAME)
    x = (0.3 * np.sin(2 * np.pi * TILE_HZ * n / TILE_RATE)).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        video = container.add_stream("mpeg4", rate=8) if video_frames else None
        audio = container.add_stream("aac", rate=TILE_RATE, layout="mono")
        packets = []  # packets[k] holds samples from (k - 1) * TILE_FRAME; packets[0] primes
        for i in range(0, len(x), TILE_FRAME):
            frame = av.AudioFrame.from_ndarray(x[None, i : i + TILE_FRAME], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = TILE_RATE, i
            packets += audio.encode(frame)
        if video:
            video.width = video.height = 16
            for i, image in enumerate(grey_frames(video_frames, step=1, h=16, w=16)):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        container.mux(packets[0])
        for j in range(round(seconds * TILE_RATE / TILE_FRAME)):
            # the first period as encoded, then the second one over and over
            k = j + 1 if j < TILE_PACKETS + 2 else TILE_PACKETS + 3 + (j - 2) % TILE_PACKETS
            packet = packets[k]
            packet.pts = packet.dts = j * TILE_FRAME
            container.mux(packet)
    return buffer.getvalue()


@functools.cache
def _tile_decoded() -> np.ndarray:
    with av.open(io.BytesIO(tiled_aac(3 * TILE_PERIOD / TILE_RATE))) as container:
        return np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])


def tiled_reference(start: int, count: int) -> np.ndarray:
    """Decoded samples [start, start + count) of any tiled_aac file (start >= TILE_PERIOD)."""
    assert start >= TILE_PERIOD
    index = TILE_PERIOD + (np.arange(start, start + count) - TILE_PERIOD) % TILE_PERIOD
    return _tile_decoded()[index]


def whole_file_audio(data: bytes, *, sample_rate: int, num_samples: int) -> np.ndarray:
    """What decode_audio did before decoding only the window: decode every sample, mix,
    resample it all with resample_poly, centre-crop -> (num_samples,) float32. An MP4 is as
    long as its header says (the encoder's padding after the last sample is not audio)."""
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        n = len(wave)
    except sf.LibsndfileError:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format="fltp")
            wave = np.concatenate([out.to_ndarray() for frame in container.decode(stream)
                                   for out in to_float.resample(frame)], axis=1).T
            rate = stream.codec_context.sample_rate
            n = stream.duration if "mp4" in container.format.name else len(wave)
    g = math.gcd(rate, sample_rate)
    mono = wave[:n].mean(axis=1)
    full = resample_poly(mono, sample_rate // g, rate // g) if rate != sample_rate else mono
    start = max(0, (len(full) - num_samples) // 2)
    out = np.zeros(num_samples, np.float32)
    kept = full[start : start + num_samples]
    out[: len(kept)] = kept
    return np.clip(out, -1, 1)


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
