"""Reject reasons, MediaError and the checks every decoder shares (no decoding here)."""

from __future__ import annotations

REASON_EMPTY = "empty_file"
REASON_NOT_MEDIA = "not_media"  # not the expected kind of file at all (text, other modality)
REASON_CORRUPT = "corrupt"  # recognised container, but truncated or undecodable
REASON_TOO_LARGE = "too_large"  # over the pixel limit, decompression bomb, out of memory
REASON_TOO_SHORT = "too_short"  # audio shorter than min_samples after resampling
REASON_NO_SAMPLES = "no_samples"  # audio stream with zero samples
REASON_NO_FRAMES = "no_frames"  # video stream without one decodable frame
REASON_UNSUPPORTED = "unsupported"  # recognised, but no decoder / conversion in this build
# Found by the job around the decoders (listing, the isolating child process):
REASON_NOT_A_FILE = "not_a_file"  # a FIFO, device, socket or dangling symlink in the input
REASON_TIMEOUT = "timeout"  # read + decode ran past read.file_timeout_s
REASON_CRASHED = "crashed"  # the decoder killed its process (segfault, abort, OOM kill)
REASONS = frozenset(
    {REASON_EMPTY, REASON_NOT_MEDIA, REASON_CORRUPT, REASON_TOO_LARGE, REASON_TOO_SHORT}
    | {REASON_NO_SAMPLES, REASON_NO_FRAMES, REASON_UNSUPPORTED}
    | {REASON_NOT_A_FILE, REASON_TIMEOUT, REASON_CRASHED}
)

# File extensions (lower case, with dot) the preprocessing job lists per modality.
EXTENSIONS: dict[str, frozenset[str]] = {
    "image": frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}),
    "audio": frozenset(
        {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff"}
    ),
    "video": frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"}),
}

# Signatures that tell "damaged file of a known kind" (corrupt) from "something else" (not_media).
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\0", b"MM\0*")
_AUDIO_MAGIC = (b"fLaC", b"ID3", b"FORM", b".snd", b"caff")
_AV_MAGIC = (b"\x1aE\xdf\xa3", b"OggS", b"FLV", b"\0\0\1\xba", b"\0\0\1\xb3", b"0&\xb2u")


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
