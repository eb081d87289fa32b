"""The embedded sample dataset: small labelled PNG / WAV / MP4 files a tiny model can learn.

Ten classes share names across modalities, so class c is the same label everywhere:
    image  a patch of pattern c (shape or texture) at a random place, size, colour, noise
    audio  sound pattern c (tones, chirps, AM, pulses, noise bands) with random pitch/level
    video  pattern c moving across the frame, with sound pattern c on an AAC audio track
Every file gets its own generator seeded from (seed, modality, class, index), so a file's
content does not depend on per_class or on which other modalities are written.

Shapes: S image side, F frames, T samples.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "stripes_h",
    "stripes_v",
    "checker",
    "ring",
    "cross",
    "dots",
    "gradient",
)
SAMPLE_KINDS = ("image", "audio", "video")
_SUFFIXES = {"image": ".png", "audio": ".wav", "video": ".mp4"}
VIDEO_FPS = 8
AAC_SAMPLE_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


def write_sample_data(
    out: str | Path,
    *,
    per_class: int = 8,
    seed: int = 0,
    modalities: Sequence[str] = SAMPLE_KINDS,
    image_size: int = 64,
    sample_rate: int = 16_000,
    audio_seconds: float = 1.0,
    video_frames: int = 8,
    video_size: int = 64,
) -> dict[str, int]:
    """Write OUT/<modality>/<class>/<class>_<i>.{png,wav,mp4}; -> {modality: files written}.

    Deterministic under `seed`: PNG and WAV files are byte-identical, MP4 files decode to the
    same frames and samples. Existing files of the same name are overwritten; no others are
    touched. Videos run at VIDEO_FPS, so their audio lasts video_frames / VIDEO_FPS seconds.
    """
    unknown = set(modalities) - set(SAMPLE_KINDS)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {SAMPLE_KINDS}")
    positive = {"per_class": per_class, "image_size": image_size, "sample_rate": sample_rate}
    for name, value in {**positive, "video_frames": video_frames}.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if audio_seconds <= 0:
        raise ValueError(f"audio_seconds must be > 0, got {audio_seconds}")
    if video_size < 2 or video_size % 2:
        # yuv420p stores chroma at half resolution: sides must be even.
        raise ValueError(f"video_size must be an even number >= 2, got {video_size}")
    if "video" in modalities and sample_rate not in AAC_SAMPLE_RATES:
        raise ValueError(f"video audio is AAC: sample_rate must be in {AAC_SAMPLE_RATES}")
    num_samples = max(1, round(sample_rate * audio_seconds))

    def encode(modality: str, rng: np.random.Generator, label: int) -> bytes:
        if modality == "image":
            return encode_png(make_image(rng, label, size=image_size))
        if modality == "audio":
            audio = make_audio(rng, label, sample_rate=sample_rate, num_samples=num_samples)
            return encode_wav(audio, sample_rate)
        frames, audio = make_video(
            rng, label, num_frames=video_frames, size=video_size, sample_rate=sample_rate
        )
        return encode_mp4(frames, audio, sample_rate=sample_rate)

    root = Path(out)
    counts: dict[str, int] = {}
    for modality in dict.fromkeys(modalities):  # ordered, without repeats
        for label, name in enumerate(CLASSES):
            folder = root / modality / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                key = [seed, SAMPLE_KINDS.index(modality), label, i]
                rng = np.random.default_rng(np.random.SeedSequence(key))
                path = folder / f"{name}_{i:03d}{_SUFFIXES[modality]}"
                path.write_bytes(encode(modality, rng, label))
        counts[modality] = per_class * len(CLASSES)
    return counts


# ------------------------------------------------------------------------------- content


def make_image(rng: np.random.Generator, label: int, *, size: int) -> np.ndarray:
    """Pattern `label` as a patch at a random place -> (S, S, 3) uint8."""
    radius = rng.uniform(0.18, 0.32) * size
    centre = rng.uniform(radius, size - radius, 2)
    background, foreground, noise = _colours(rng)
    coverage = _pattern(label, rng, size=size, centre=centre, radius=radius)
    return _paint(coverage, background, foreground, noise, rng)


def make_audio(
    rng: np.random.Generator, label: int, *, sample_rate: int, num_samples: int
) -> np.ndarray:
    """Sound pattern `label` with random pitch (+-8%), level and noise -> (T,) float32."""
    t = np.arange(num_samples) / sample_rate
    duration = num_samples / sample_rate
    nyquist = 0.45 * sample_rate  # keep every component clear of aliasing at low rates
    j = rng.uniform(0.92, 1.08)
    phase = rng.uniform(0, 2 * np.pi)

    def tone(freq: float) -> np.ndarray:
        return np.sin(2 * np.pi * min(freq * j, nyquist) * t + phase)

    def chirp(f0: float, f1: float) -> np.ndarray:
        f0, f1 = min(f0 * j, nyquist), min(f1 * j, nyquist)
        return np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration)) + phase)

    def band(lo: float, hi: float) -> np.ndarray:
        spectrum = np.fft.rfft(rng.standard_normal(num_samples))
        freqs = np.fft.rfftfreq(num_samples, 1 / sample_rate)
        spectrum[(freqs < lo * j) | (freqs > min(hi * j, nyquist))] = 0
        return np.fft.irfft(spectrum, num_samples)

    def square(freq: float) -> np.ndarray:  # band-limited: odd harmonics below nyquist
        harmonics = [k for k in range(1, 40, 2) if k * freq * j < nyquist]
        return sum(np.sin(2 * np.pi * k * freq * j * t + phase) / k for k in harmonics)

    patterns: tuple[Callable[[], np.ndarray], ...] = (
        lambda: tone(330),  # circle: pure low tone
        lambda: square(330),  # square: the same pitch, bright timbre
        lambda: tone(880),  # triangle: pure high tone
        lambda: chirp(300, 3000),  # stripes_h: rising sweep
        lambda: chirp(3000, 300),  # stripes_v: falling sweep
        lambda: tone(1200) * (0.5 + 0.5 * np.sin(2 * np.pi * 6 * j * t)),  # checker: tremolo
        lambda: tone(1800) * (np.sin(2 * np.pi * 4 * j * t) > 0.3),  # ring: beeps
        lambda: tone(440) + tone(660),  # cross: a fifth
        lambda: band(200, 700),  # dots: low rumble
        lambda: band(2500, 4000),  # gradient: hiss
    )
    wave = patterns[label]()
    wave = wave / max(np.abs(wave).max(), 1e-9) * rng.uniform(0.3, 0.7)
    wave = wave + rng.normal(0, rng.uniform(0.0, 0.02), num_samples)
    return np.clip(wave, -1, 1).astype(np.float32)


def make_video(
    rng: np.random.Generator, label: int, *, num_frames: int, size: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pattern `label` moving in a straight line, with sound `label`.

    -> (frames (F, S, S, 3) uint8, audio (T,) float32), T = F / VIDEO_FPS seconds of samples.
    """
    radius = rng.uniform(0.18, 0.28) * size
    start, end = rng.uniform(radius, size - radius, (2, 2))
    background, foreground, noise = _colours(rng)
    texture_seed = int(rng.integers(2**32))  # the same stripe period etc. in every frame
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        centre = start + (end - start) * (f / max(num_frames - 1, 1))
        texture = np.random.default_rng(texture_seed)
        coverage = _pattern(label, texture, size=size, centre=centre, radius=radius)
        frames[f] = _paint(coverage, background, foreground, noise, rng)
    num_samples = round(num_frames / VIDEO_FPS * sample_rate)
    audio = make_audio(rng, label, sample_rate=sample_rate, num_samples=num_samples)
    return frames, audio


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """A dark background and a bright foreground of random hues (every channel at least 90
    apart), noise sigma. Any hue, but the pattern is always the bright part: with fully
    random colours (either one brighter, per channel) the quickstart's small HiP stayed at
    chance for 300 fine-tuning steps; with this it reaches ~60% val accuracy at 32 px."""
    background = rng.integers(0, 80, 3)
    foreground = rng.integers(170, 256, 3)
    return background, foreground, rng.uniform(0.0, 12.0)


def _paint(
    coverage: np.ndarray,
    background: np.ndarray,
    foreground: np.ndarray,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(S, S) coverage in [0, 1] -> (S, S, 3) uint8 blend of the two colours plus noise."""
    blend = background + coverage[..., None] * (foreground - background).astype(np.float64)
    blend += rng.normal(0.0, noise, blend.shape)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def _pattern(
    label: int, rng: np.random.Generator, *, size: int, centre: np.ndarray, radius: float
) -> np.ndarray:
    """Pattern `label` in a patch of half-width `radius` at `centre` -> (S, S) float in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - centre[1], x - centre[0]
    dist = np.hypot(dx, dy)
    patch = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    period = max(2.0, radius * rng.uniform(0.35, 0.5))  # stripe / check / dot spacing
    arm = radius / 4
    name = CLASSES[label]
    if name == "circle":
        mask = dist <= radius
    elif name == "square":
        mask = (np.abs(dx) <= 0.85 * radius) & (np.abs(dy) <= 0.85 * radius)
    elif name == "triangle":  # apex up, base at the bottom of the patch
        mask = (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    elif name == "stripes_h":
        mask = patch & (np.floor((dy + radius) / period) % 2 == 0)
    elif name == "stripes_v":
        mask = patch & (np.floor((dx + radius) / period) % 2 == 0)
    elif name == "checker":
        mask = patch & (
            (np.floor((dx + radius) / period) + np.floor((dy + radius) / period)) % 2 == 0
        )
    elif name == "ring":
        mask = (dist <= radius) & (dist >= 0.6 * radius)
    elif name == "cross":
        mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= radius)
        )
    elif name == "dots":
        cell_x, cell_y = (dx + radius) % period - period / 2, (dy + radius) % period - period / 2
        mask = patch & (np.hypot(cell_x, cell_y) <= period / 3)
    else:  # gradient: a ramp across the patch in one of four directions
        ramp = [dx, -dx, dy, -dy][rng.integers(4)]
        return np.where(patch, (ramp + radius) / (2 * radius), 0.0).clip(0, 1)
    return mask.astype(np.float64)


# ------------------------------------------------------------------------------ encoding


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (Pillow writes no timestamp: same array, same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """(T,) float in [-1, 1] -> 16-bit PCM mono WAV bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, audio: np.ndarray, *, sample_rate: int) -> bytes:
    """(F, S, S, 3) uint8 at VIDEO_FPS and (T,) float32 -> MP4 bytes (MPEG-4 video, AAC audio)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        # MPEG-4 Part 2, not H.264: FFmpeg's own encoder is reproducible, while the libx264 in
        # the PyAV wheel gave different streams for the same frames from call to call.
        video = container.add_stream("mpeg4", rate=VIDEO_FPS)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.codec_context.bit_rate = 2_000_000  # tiny frames: near-lossless
        video.codec_context.thread_count = 1
        sound = container.add_stream("aac", rate=sample_rate, layout="mono")
        sound.codec_context.bit_rate = 64_000
        sound.options = {"aac_coder": "fast"}  # the default search is ~5x slower here
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        chunk = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
        chunk.sample_rate, chunk.pts = sample_rate, 0
        container.mux(sound.encode(chunk))  # PyAV re-chunks to AAC's 1024-sample frames
        container.mux(sound.encode(None))
    return buffer.getvalue()
