"""Decode and normalise media bytes into fixed-shape arrays.

Pure functions: bytes in, new numpy arrays out; no Ray and no file system. Bad input always
raises MediaError with a stable `reason` code, which the preprocessing job records as a reject.

Shape letters: S output side (`size`), F frames (`num_frames`), T samples, C channels.
    decode_image -> (S, S, 3) uint8 RGB
    decode_audio -> (T,) float32 mono in [-1, 1] at `sample_rate`, T = `num_samples`
    decode_video -> (F, S, S, 3) uint8 RGB, (T,) float32 audio or None, has_audio
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Sequence

import av
import numpy as np
import soundfile as sf
from PIL import Image, UnidentifiedImageError
from scipy.signal import resample_poly

REASON_EMPTY = "empty_file"
REASON_NOT_MEDIA = "not_media"  # not the expected kind of file at all (text, other modality)
REASON_CORRUPT = "corrupt"  # recognised container, but truncated or undecodable
REASON_TOO_LARGE = "too_large"  # over the pixel limit, decompression bomb, out of memory
REASON_TOO_SHORT = "too_short"  # audio shorter than min_samples after resampling
REASON_NO_SAMPLES = "no_samples"  # audio stream with zero samples
REASON_NO_FRAMES = "no_frames"  # video stream without one decodable frame
REASON_UNSUPPORTED = "unsupported"  # recognised, but no decoder / conversion in this build
REASONS = frozenset(
    {REASON_EMPTY, REASON_NOT_MEDIA, REASON_CORRUPT, REASON_TOO_LARGE, REASON_TOO_SHORT}
    | {REASON_NO_SAMPLES, REASON_NO_FRAMES, REASON_UNSUPPORTED}
)

# File extensions (lower case, with dot) the preprocessing job lists per modality.
EXTENSIONS: dict[str, frozenset[str]] = {
    "image": frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}),
    "audio": frozenset(
        {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff"}
    ),
    "video": frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"}),
}

# Parsers allowed to see untrusted bytes: only what EXTENSIONS promises. Pillow and FFmpeg each
# carry dozens of rarely used parsers; fewer parsers means less attack surface. (Multi-picture
# camera JPEGs come through "JPEG" and then report format "MPO".)
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_AV_AUDIO_DEMUXERS = "mov,matroska,ogg,mp3,wav,flac,aac,aiff,caf,w64,asf"
_AV_VIDEO_DEMUXERS = "mov,matroska,avi,mpegts,mpeg,flv,asf,ogg"
# Signatures that tell "damaged file of a known kind" (corrupt) from "something else" (not_media).
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\0", b"MM\0*")
_AUDIO_MAGIC = (b"fLaC", b"ID3", b"FORM", b".snd", b"caff")
_AV_MAGIC = (b"\x1aE\xdf\xa3", b"OggS", b"FLV", b"\0\0\1\xba", b"\0\0\1\xb3", b"0&\xb2u")

# Transparent pixels are composited over white: most transparent images (logos, product
# shots, icons) are drawn to be shown on a white page.
_ALPHA_BACKGROUND = (255, 255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_T = Image.Transpose
_EXIF_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM}
_EXIF_TRANSPOSE |= {5: _T.TRANSPOSE, 6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}


class MediaError(ValueError):
    """A file that cannot become a normalised array. `reason` is a short stable code, `detail`
    human text (usually the underlying library's message)."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown MediaError reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Ray pickles exceptions between processes; the default would lose `detail`.
        return (type(self), (self.reason, self.detail))


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


def decode_audio(
    data: bytes, *, sample_rate: int = 48_000, num_samples: int = 122_880, min_samples: int = 1
) -> np.ndarray:
    """Encoded audio (WAV, FLAC, OGG, MP3; M4A/AAC and others via FFmpeg) -> (T,) float32.

    Mono (mean over channels), resampled to `sample_rate`, centre-cropped or zero-padded at the
    end to T = num_samples, clipped to [-1, 1]. `min_samples` counts after resampling.
    """
    _check_positive(sample_rate=sample_rate, num_samples=num_samples)
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    _check_nonempty(data)
    decoded = _read_soundfile(data)
    if decoded is None:  # libsndfile did not recognise it: try FFmpeg (AAC, M4A, WebM, ...)
        decoded = _read_av_audio(data)
    wave, rate = decoded
    return _fit_audio(
        wave, rate, sample_rate=sample_rate, num_samples=num_samples, min_samples=min_samples
    )


def _read_soundfile(data: bytes) -> tuple[np.ndarray, int] | None:
    """libsndfile decode -> ((T, C) float32, rate); None if it cannot even open the bytes."""
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception:
        return None
    with f:
        declared, rate, container = f.frames, f.samplerate, f.format
        try:
            wave = f.read(dtype="float32", always_2d=True)  # (T, C)
        except MemoryError as e:
            raise MediaError(REASON_TOO_LARGE, _describe(e)) from e
        except Exception as e:  # e.g. "flac decoder lost sync" in a truncated FLAC
            raise MediaError(REASON_CORRUPT, _describe(e)) from e
    # MP3 frame counts are estimates (VBR without a Xing header), so only trust the others.
    if container != "MPEG" and len(wave) < declared:
        raise MediaError(REASON_CORRUPT, f"truncated: read {len(wave)} of {declared} frames")
    # libsndfile silently shortens a WAV whose data is cut off; the RIFF size tells. 0 and
    # 0xFFFFFFFF are placeholders left by streaming recorders; +1 allows a missing pad byte.
    riff_size = struct.unpack_from("<I", data, 4)[0] if len(data) >= 8 else 0
    truncated = 0 < riff_size < 0xFFFFFFFF and riff_size + 8 > len(data) + 1
    if container in ("WAV", "WAVEX") and truncated:
        raise MediaError(REASON_CORRUPT, f"truncated: RIFF declares {riff_size + 8} bytes")
    return wave, rate


def _read_av_audio(data: bytes) -> tuple[np.ndarray, int]:
    """FFmpeg decode of the first audio stream -> ((T, C) float32, rate)."""
    with _open_av(data, "audio", _AV_AUDIO_DEMUXERS) as container:
        if not container.streams.audio:
            raise MediaError(REASON_NOT_MEDIA, "no audio stream")
        stream = container.streams.audio[0]
        stream.codec_context.thread_count = 1
        audio = _AudioAccumulator()
        error = _decode_packets(container, [stream], audio.add)
        wave, rate = audio.finish()
    if len(wave) == 0:
        raise MediaError(REASON_CORRUPT if error else REASON_NO_SAMPLES, error or "0 samples")
    return wave, rate


class _AudioAccumulator:
    """Collects decoded PyAV audio frames as planar float at the first frame's layout/rate."""

    def __init__(self) -> None:
        # fltp keeps channels apart so the downmix is our mean, the same as the soundfile path.
        self._resampler = av.AudioResampler(format="fltp")
        self._chunks: list[np.ndarray] = []  # each (C, n)
        self._rate = 0

    def add(self, frame: av.AudioFrame | None) -> None:
        for out in self._resampler.resample(frame):
            self._rate = out.sample_rate
            self._chunks.append(out.to_ndarray())

    def finish(self) -> tuple[np.ndarray, int]:
        """-> ((T, C) float32, rate); T = 0 if nothing was decoded."""
        if self._rate:
            self.add(None)  # flush the resampler
        if not self._chunks:
            return np.zeros((0, 1), np.float32), 0
        return np.concatenate(self._chunks, axis=1).T.astype(np.float32, copy=False), self._rate


def _fit_audio(
    wave: np.ndarray, rate: int, *, sample_rate: int, num_samples: int, min_samples: int
) -> np.ndarray:
    """(T_in, C) float at `rate` -> (num_samples,) float32 mono at `sample_rate`.

    Equal to resampling everything with resample_poly and centre-cropping, but only the window
    that survives the crop (plus the filter's reach) is resampled: long files cost no more.
    """
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise MediaError(REASON_NO_SAMPLES, "0 samples")
    if rate <= 0:
        raise MediaError(REASON_CORRUPT, f"sample rate {rate}")
    mono = wave.mean(axis=1, dtype=np.float32)  # (T_in,)
    np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    g = math.gcd(rate, sample_rate)
    up, down = sample_rate // g, rate // g
    total = -(-len(mono) * up // down)  # ceil(T_in * up / down): resample_poly's output length
    if total < min_samples:
        raise MediaError(REASON_TOO_SHORT, f"{total} samples at {sample_rate} Hz < {min_samples}")
    start = max(0, (total - num_samples) // 2)  # crop offset in output samples
    if up == down:
        kept = mono[start : start + num_samples]
    else:
        reach = math.ceil(10 * max(up, down) / up) + 1  # filter half-width, in input samples
        block = max(0, start * down // up - reach) // down  # whole blocks keep the phase aligned
        stop = min(len(mono), -(-(start + num_samples) * down // up) + reach)
        resampled = resample_poly(mono[block * down : stop], up, down)  # output starts at block*up
        kept = resampled[start - block * up :][:num_samples]
    out = np.zeros(num_samples, np.float32)
    out[: len(kept)] = kept
    return np.clip(out, -1.0, 1.0, out=out)


def decode_video(
    data: bytes,
    *,
    num_frames: int = 8,
    size: int = 224,
    max_pixels: int = 64_000_000,
    with_audio: bool = False,
    sample_rate: int = 48_000,
    num_samples: int = 122_880,
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Encoded video -> (frames (F, S, S, 3) uint8, audio (T,) float32 | None, has_audio).

    F frames at np.linspace over the clip's frames, each resized like an image. Decoding is one
    pass keeping only the chosen frames (as (S, S, 3) arrays). With `with_audio` the first audio
    track is normalised like decode_audio; a clip without a (decodable) audio track gives
    silence and has_audio=False. Without `with_audio`, has_audio says whether a track exists.
    """
    _check_positive(num_frames=num_frames, size=size, max_pixels=max_pixels)
    _check_positive(sample_rate=sample_rate, num_samples=num_samples)
    _check_nonempty(data)
    with _open_av(data, "video", _AV_VIDEO_DEMUXERS) as container:
        if not container.streams.video:
            raise MediaError(REASON_NOT_MEDIA, "no video stream")
        video = container.streams.video[0]
        w, h = video.codec_context.width, video.codec_context.height
        if w * h > max_pixels:  # from the header, before any frame is decoded
            raise MediaError(REASON_TOO_LARGE, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
        total = video.frames or _count_packets(data, video.index)
        if total == 0:
            raise MediaError(REASON_NO_FRAMES, "video stream has no frames")
        sampler = _FrameSampler(
            np.linspace(0, total - 1, num_frames).round().astype(np.int64),  # (F,)
            size=size,
            max_pixels=max_pixels,
        )
        audio = _AudioAccumulator()
        streams = [video, *container.streams.audio[:1]] if with_audio else [video]
        for stream in streams:
            # Ray runs one task per CPU; FFmpeg's default of a thread per core would oversubscribe.
            stream.codec_context.thread_count = 1

        def on_frame(frame: av.VideoFrame | av.AudioFrame) -> None:
            if isinstance(frame, av.AudioFrame):
                audio.add(frame)
            else:
                sampler.add(frame)

        error = _decode_packets(container, streams, on_frame)
        if sampler.count == 0:
            raise MediaError(REASON_NO_FRAMES, error or "no decodable frames")
        frames = sampler.finish()
        if not with_audio:
            return frames, None, bool(container.streams.audio)
        wave, rate = audio.finish()
    if len(wave) == 0:
        return frames, np.zeros(num_samples, np.float32), False
    track = _fit_audio(wave, rate, sample_rate=sample_rate, num_samples=num_samples, min_samples=0)
    return frames, track, True


class _FrameSampler:
    """Keeps the decoded frames at `wanted` indices, each as a (S, S, 3) uint8 array."""

    def __init__(self, wanted: np.ndarray, *, size: int, max_pixels: int) -> None:
        self._wanted = wanted  # (F,) frame indices, ascending, may repeat
        self._wanted_set = set(wanted.tolist())
        self._size, self._max_pixels = size, max_pixels
        self._kept: dict[int, np.ndarray] = {}
        self._last: av.VideoFrame | None = None  # one reference, not a copy of every frame
        self.count = 0

    def add(self, frame: av.VideoFrame) -> None:
        if frame.width * frame.height > self._max_pixels:
            raise MediaError(REASON_TOO_LARGE, f"frame {frame.width}x{frame.height}")
        if self.count in self._wanted_set:
            self._kept[self.count] = resize_center_crop(frame.to_image(), self._size)
        self._last = frame
        self.count += 1

    def finish(self) -> np.ndarray:
        """-> (F, S, S, 3) uint8. Headers can over-count frames (edit lists, damaged tails):
        wanted indices never reached reuse the last decoded frame."""
        if any(int(i) not in self._kept for i in self._wanted):
            tail = resize_center_crop(self._last.to_image(), self._size)
            for i in self._wanted.tolist():
                self._kept.setdefault(i, tail)
        return np.stack([self._kept[i] for i in self._wanted.tolist()])


def _count_packets(data: bytes, stream_index: int) -> int:
    """Frame count for containers without one in the header (Matroska, WebM): demux only."""
    with _open_av(data, "video", _AV_VIDEO_DEMUXERS) as container:
        stream = container.streams[stream_index]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as e:
            raise MediaError(REASON_CORRUPT, _describe(e)) from e


def _open_av(data: bytes, modality: str, demuxers: str) -> av.container.InputContainer:
    try:
        return av.open(
            io.BytesIO(data),
            mode="r",
            options={"format_whitelist": demuxers},
            metadata_errors="replace",  # non-UTF-8 tags must not cost the file
        )
    except av.FFmpegError as e:
        raise _unreadable(data, modality, e) from e
    except MemoryError as e:
        raise MediaError(REASON_TOO_LARGE, _describe(e)) from e
    except Exception as e:
        raise MediaError(REASON_CORRUPT, _describe(e)) from e


def _decode_packets(
    container: av.container.InputContainer,
    streams: Sequence[av.stream.Stream],
    on_frame: Callable[[av.VideoFrame | av.AudioFrame], None],
) -> str:
    """Demux and decode `streams`, calling on_frame per frame; -> first error text or "".

    Like ffmpeg, decoding goes on past a bad packet, so one damaged packet does not cost the
    file; callers decide from what was decoded.
    """
    error = ""
    try:
        for packet in container.demux(*streams):
            try:
                frames = packet.decode()
            except av.error.DecoderNotFoundError as e:
                raise MediaError(REASON_UNSUPPORTED, _describe(e)) from e
            except av.FFmpegError as e:
                error = error or _describe(e)
                continue
            for frame in frames:
                on_frame(frame)
    except av.FFmpegError as e:  # the container ends early: flush what the decoders hold
        error = error or _describe(e)
        for stream in streams:
            try:
                for frame in stream.codec_context.decode(None):
                    on_frame(frame)
            except av.FFmpegError:
                pass
    return error


def _looks_like(data: bytes) -> frozenset[str]:
    """Modalities whose container signature (magic bytes) `data` starts with."""
    head = data[:16]
    riff = head[8:12] if head[:4] in (b"RIFF", b"RF64") else b""
    if head.startswith(_IMAGE_MAGIC) or riff == b"WEBP":
        return frozenset({"image"})
    mpeg_audio_sync = len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    if head.startswith(_AUDIO_MAGIC) or riff == b"WAVE" or mpeg_audio_sync:
        return frozenset({"audio"})
    transport_stream = len(data) > 188 and data[0] == data[188] == 0x47
    if head[4:8] == b"ftyp" or head.startswith(_AV_MAGIC) or riff == b"AVI " or transport_stream:
        return frozenset({"audio", "video"})
    return frozenset()


def _unreadable(data: bytes, modality: str, error: Exception) -> MediaError:
    """A parser gave up: "corrupt" if the bytes carry a known signature, else "not_media"."""
    reason = REASON_CORRUPT if modality in _looks_like(data) else REASON_NOT_MEDIA
    return MediaError(reason, _describe(error))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _check_nonempty(data: bytes) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MediaError(REASON_EMPTY, "0 bytes")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
