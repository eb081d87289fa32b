"""Decode and normalise media bytes into fixed-shape arrays.

Pure functions: bytes in, new numpy arrays out; no Ray and no file system. Bad input always
raises MediaError with a stable `reason` code, which the preprocessing job records as a reject.

Shape letters: S output side (`size`), F frames (`num_frames`), T samples, C channels.
    decode_image -> (S, S, 3) uint8 RGB
    decode_audio -> (T,) float32 mono in [-1, 1] at `sample_rate`, T = `num_samples`
    decode_video -> (F, S, S, 3) uint8 RGB, (T,) float32 audio or None, has_audio

Memory follows the output, not the file: audio is decoded only over the window the centre
crop keeps (audio.py), video keeps only the sampled frames.
"""

from pipeline.data.media.audio import decode_audio
from pipeline.data.media.errors import (
    EXTENSIONS,
    REASON_CORRUPT,
    REASON_EMPTY,
    REASON_NO_FRAMES,
    REASON_NO_SAMPLES,
    REASON_NOT_MEDIA,
    REASON_TOO_LARGE,
    REASON_TOO_SHORT,
    REASON_UNSUPPORTED,
    REASONS,
    MediaError,
)
from pipeline.data.media.image import decode_image, resize_center_crop
from pipeline.data.media.video import decode_video

__all__ = [
    "EXTENSIONS", "REASONS", "REASON_CORRUPT", "REASON_EMPTY", "REASON_NOT_MEDIA",
    "REASON_NO_FRAMES", "REASON_NO_SAMPLES", "REASON_TOO_LARGE", "REASON_TOO_SHORT",
    "REASON_UNSUPPORTED", "MediaError", "decode_audio", "decode_image", "decode_video",
    "resize_center_crop",
]
