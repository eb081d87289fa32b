"""Video: encoded bytes -> (F, S, S, 3) uint8 frames (+ the audio track, optionally).

Memory does not grow with the clip: only the chosen frames are kept (as (S, S, 3) arrays),
and of the audio track only the window the crop keeps is decoded (see audio.py).
"""

from __future__ import annotations

import bisect

import av
import numpy as np

from pipeline.data.media.audio import _check_channels, _Crop, _read_av_window
from pipeline.data.media.av_io import _AV_VIDEO_DEMUXERS, _decoded, _open_av
from pipeline.data.media.errors import (
    REASON_CORRUPT,
    REASON_NO_FRAMES,
    REASON_NO_SAMPLES,
    REASON_NOT_MEDIA,
    REASON_TOO_LARGE,
    MediaError,
    _check_nonempty,
    _check_positive,
    _describe,
)
from pipeline.data.media.image import resize_center_crop

_SEEKABLE = ("mp4", "matroska")  # FFmpeg format names with an index to seek frames by pts


def decode_video(
    data: bytes,
    *,
    num_frames: int = 8,
    size: int = 224,
    max_pixels: int = 64_000_000,
    with_audio: bool = False,
    sample_rate: int = 48_000,
    num_samples: int = 122_880,
    max_channels: int = 64,
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Encoded video -> (frames (F, S, S, 3) uint8, audio (T,) float32 | None, has_audio).

    F frames at np.linspace over the clip's frames, each resized like an image: decoded by
    seeking to each one where the container has an index and that decodes fewer frames,
    else in one pass keeping only the chosen ones. With `with_audio` the first audio track
    is normalised like decode_audio (more than `max_channels` channels: too_large); a clip
    without a (decodable) audio track gives silence and has_audio=False. Without
    `with_audio`, has_audio says whether a track exists.
    """
    _check_positive(num_frames=num_frames, size=size, max_pixels=max_pixels)
    _check_positive(sample_rate=sample_rate, num_samples=num_samples, max_channels=max_channels)
    _check_nonempty(data)
    with _open_av(data, "video", _AV_VIDEO_DEMUXERS) as container:
        if not container.streams.video:
            raise MediaError(REASON_NOT_MEDIA, "no video stream")
        video = container.streams.video[0]
        w, h = video.codec_context.width, video.codec_context.height
        if w * h > max_pixels:  # from the header, before any frame is decoded
            raise MediaError(REASON_TOO_LARGE, f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
        tracks = container.streams.audio
        if with_audio and tracks:
            _check_channels(tracks[0].codec_context.channels, max_channels)
        # seeking decodes >= 1 frame per chosen frame: it cannot halve fewer than 2F frames
        seekable = (any(name in container.format.name for name in _SEEKABLE)
                    and not 0 < video.frames < 2 * num_frames)
        strict = not video.frames
        index = _index(data, video.index, strict=strict) if seekable or strict else None
        total = video.frames or len(index)
        if total == 0:
            raise MediaError(REASON_NO_FRAMES, "video stream has no frames")
        wanted = np.linspace(0, total - 1, num_frames).round().astype(np.int64)  # (F,)
        frames = None
        if seekable and _seek_pays(index, wanted):
            frames = _seek_frames(data, video.index, index, wanted, size, max_pixels)
        if frames is None:
            frames = _stream_frames(container, video, wanted, size, max_pixels)
        if not with_audio:
            return frames, None, bool(tracks)
    crop = _Crop(sample_rate, num_samples, 0)
    try:
        got = _read_av_window(data, "video", _AV_VIDEO_DEMUXERS, crop, max_channels)
    except MediaError as e:  # an undecodable track is no track; too many channels is a reject
        if e.reason not in (REASON_CORRUPT, REASON_NO_SAMPLES):
            raise
        got = None
    if got is None:
        return frames, np.zeros(num_samples, np.float32), False
    wave, window = got
    return frames, window.fit(wave), True


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
        _check_frame(frame, self._max_pixels)
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


def _check_frame(frame: av.VideoFrame, max_pixels: int) -> None:
    if frame.width * frame.height > max_pixels:
        raise MediaError(REASON_TOO_LARGE, f"frame {frame.width}x{frame.height}")


def _stream_frames(
    container: av.container.InputContainer,
    video: av.VideoStream,
    wanted: np.ndarray,
    size: int,
    max_pixels: int,
) -> np.ndarray:
    """One pass over the video stream keeping the frames at `wanted` -> (F, S, S, 3) uint8."""
    # Ray runs one task per CPU; FFmpeg's default of a thread per core would oversubscribe.
    video.codec_context.thread_count = 1
    sampler = _FrameSampler(wanted, size=size, max_pixels=max_pixels)
    errors: list[str] = []
    for frame in _decoded(container, [video], errors):
        sampler.add(frame)
        if sampler.count > wanted[-1]:
            break  # the rest of the file (a long audio track, say) is not even demuxed
    if sampler.count == 0:
        raise MediaError(REASON_NO_FRAMES, errors[0] if errors else "no decodable frames")
    return sampler.finish()


def _index(data: bytes, stream_index: int, *, strict: bool) -> list[tuple[int | None, bool]]:
    """(pts, is_keyframe) of every frame's packet in presentation order: demux only. Gives
    the frame count of containers without one in the header (Matroska, WebM): `strict`
    rejects a file the demuxer gives up on, else that only turns seeking off."""
    with _open_av(data, "video", _AV_VIDEO_DEMUXERS) as container:
        stream = container.streams[stream_index]
        try:
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream)
                       if p.size > 0 and not p.is_discard]
        except av.FFmpegError as e:
            if strict:
                raise MediaError(REASON_CORRUPT, _describe(e)) from e
            return []
    if any(pts is None for pts, _ in packets):
        return packets  # no order to sort by; seeking is off (_seek_pays)
    return sorted(packets, key=lambda p: p[0])


def _seek_pays(index: list[tuple[int | None, bool]], wanted: np.ndarray) -> bool:
    """Whether seeking to each wanted frame decodes at most half the frames one pass would:
    each seek decodes from the keyframe before its frame."""
    if not index or len(index) < int(wanted[-1]) + 1 or any(p is None for p, _ in index):
        return False
    keys = [i for i, (_, key) in enumerate(index) if key]
    if not keys:
        return False
    cost = 0
    for i in set(wanted.tolist()):
        k = bisect.bisect_right(keys, i) - 1
        cost += i - (keys[k] if k >= 0 else 0) + 1
    return 2 * cost <= int(wanted[-1]) + 1


def _seek_frames(
    data: bytes,
    stream_index: int,
    index: list[tuple[int, bool]],
    wanted: np.ndarray,
    size: int,
    max_pixels: int,
) -> np.ndarray | None:
    """Seek to each wanted frame's pts and decode from the keyframe before it up to it ->
    (F, S, S, 3) uint8; None if a frame is not where the index says (decode in one pass)."""
    kept: dict[int, np.ndarray] = {}
    with _open_av(data, "video", _AV_VIDEO_DEMUXERS) as container:
        video = container.streams[stream_index]
        video.codec_context.thread_count = 1
        for i in sorted(set(wanted.tolist())):
            target = index[i][0]
            container.seek(target, stream=video, backward=True)
            for frame in _decoded(container, [video], []):
                _check_frame(frame, max_pixels)
                if frame.pts is None or frame.pts > target:
                    return None
                if frame.pts == target:
                    kept[i] = resize_center_crop(frame.to_image(), size)
                    break
            else:
                return None
    return np.stack([kept[i] for i in wanted.tolist()])
