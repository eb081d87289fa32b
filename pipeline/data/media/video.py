"""Video: encoded bytes -> (F, S, S, 3) uint8 frames (+ the audio track, optionally)."""

from __future__ import annotations

import av
import numpy as np

from pipeline.data.media.audio import _AudioAccumulator, _fit_audio
from pipeline.data.media.av_io import _AV_VIDEO_DEMUXERS, _decode_packets, _open_av
from pipeline.data.media.errors import (
    REASON_CORRUPT,
    REASON_NO_FRAMES,
    REASON_NOT_MEDIA,
    REASON_TOO_LARGE,
    MediaError,
    _check_nonempty,
    _check_positive,
    _describe,
)
from pipeline.data.media.image import resize_center_crop


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


