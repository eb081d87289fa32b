"""PyAV (FFmpeg) container opening and packet decoding shared by audio and video."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence

import av

from pipeline.data.media.errors import (
    REASON_CORRUPT,
    REASON_TOO_LARGE,
    REASON_UNSUPPORTED,
    MediaError,
    _describe,
    _unreadable,
)

# Demuxers allowed to see untrusted bytes: only the containers EXTENSIONS promises. FFmpeg
# carries dozens of rarely used parsers; fewer parsers means less attack surface.
_AV_AUDIO_DEMUXERS = "mov,matroska,ogg,mp3,wav,flac,aac,aiff,caf,w64,asf"
_AV_VIDEO_DEMUXERS = "mov,matroska,avi,mpegts,mpeg,flv,asf,ogg"


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


def _decoded(
    container: av.container.InputContainer,
    streams: Sequence[av.stream.Stream],
    errors: list[str],
) -> Iterator[av.VideoFrame | av.AudioFrame]:
    """Demux and decode `streams` from where the container stands, frame by frame; decoding
    errors are appended to `errors`. Stopping early (break) leaves the rest undecoded.

    Like ffmpeg, decoding goes on past a bad packet, so one damaged packet does not cost the
    file; callers decide from what was decoded.
    """
    try:
        for packet in container.demux(*streams):
            try:
                frames = packet.decode()
            except av.error.DecoderNotFoundError as e:
                raise MediaError(REASON_UNSUPPORTED, _describe(e)) from e
            except av.FFmpegError as e:
                errors.append(_describe(e))
                continue
            yield from frames
    except av.FFmpegError as e:  # the container ends early: flush what the decoders hold
        errors.append(_describe(e))
        for stream in streams:
            with contextlib.suppress(av.FFmpegError):
                yield from stream.codec_context.decode(None)
