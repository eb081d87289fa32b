"""Decoding inside Ray workers: listing rows -> normalised rows or reject rows.

Row layout and shapes: see pipeline/data/preprocess.py. Nothing here raises on a bad file:
every failure becomes a row with split="rejects" and a reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.data import codec, layout, media
from pipeline.data.config import AUDIO_INT16_SCALE, PreprocessConfig


class _Reject(Exception):
    """A reject found by the job itself (media.MediaError covers decoding): reasons
    "unreadable" (the file could not be read) and "decode_error" (unexpected failure)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode worker needs: the modality, the decoder settings and output shapes."""

    modality: str
    image: dict[str, int]
    audio: dict[str, int]
    video: dict[str, int]
    audio_dtype: str = "int16"  # or "float32"; int16 holds round(x * 32767) (to_int16)

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> DecodeSpec:
        a = cfg.audio
        return cls(
            modality=cfg.modality,
            image={"size": cfg.image.size, "max_pixels": cfg.image.max_pixels},
            audio={"sample_rate": a.sample_rate, "num_samples": a.num_samples,
                   "min_samples": a.min_samples},
            video={"num_frames": cfg.video.frames, "size": cfg.video.size,
                   "max_pixels": cfg.video.max_pixels},
            audio_dtype=a.dtype,
        )

    @property
    def tensors(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor column -> (per-row shape, dtype)."""
        s, f = self.video["size"], self.video["num_frames"]
        video = {"video": ((f, s, s, 3), "uint8")}
        audio = {"audio": ((self.audio["num_samples"],), self.audio_dtype)}
        return {
            "image": {"image": ((self.image["size"],) * 2 + (3,), "uint8")},
            "audio": audio,
            "video": video,
            "audio+video": {**video, **audio, "has_audio": ((), "bool")},
        }[self.modality]

    def decode(self, data: bytes) -> dict[str, Any]:
        """Bytes of one file -> {column: array}; raises media.MediaError on bad input."""
        if self.modality == "image":
            return {"image": media.decode_image(data, **self.image)}
        if self.modality == "audio":
            return {"audio": self._stored(media.decode_audio(data, **self.audio))}
        with_audio = self.modality == "audio+video"
        kwargs = {"sample_rate": self.audio["sample_rate"],
                  "num_samples": self.audio["num_samples"]} if with_audio else {}
        frames, audio, has_audio = media.decode_video(
            data, **self.video, with_audio=with_audio, **kwargs
        )
        if not with_audio:
            return {"video": frames}
        if audio is None:  # no audio track: silence, flagged
            audio = np.zeros(self.audio["num_samples"], np.float32)
        return {"video": frames, "audio": self._stored(audio), "has_audio": bool(has_audio)}

    def _stored(self, audio: np.ndarray) -> np.ndarray:
        """(T,) float32 in [-1, 1] -> the audio column's dtype."""
        if self.audio_dtype == "int16":
            return to_int16(audio)
        return audio


INT16_SCALE = AUDIO_INT16_SCALE  # full scale; pipeline.train.batches divides by the same number


def to_int16(audio: np.ndarray) -> np.ndarray:
    """(T,) float in [-1, 1] -> (T,) int16, round(x * 32767), out-of-range values clipped."""
    out = np.multiply(audio, INT16_SCALE, dtype=np.float32)
    np.clip(out, -INT16_SCALE, INT16_SCALE, out=out)
    return np.rint(out, out=out).astype(np.int16)


def _read_each(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[bytes | Exception]:
    """Whole-file bytes per path, in order; an error is yielded in place, never raised."""
    if getattr(fs, "async_impl", False):  # gcsfs: fetch the batch concurrently, not serially
        async def fetch() -> list[Any]:
            jobs = (fs._cat_file(p) for p in paths)
            return await asyncio.gather(*jobs, return_exceptions=True)

        yield from fsspec.asyn.sync(fs.loop, fetch)
        return
    for p in paths:  # local: one file in memory at a time
        try:
            data = fs.cat_file(p)
        except Exception as e:  # one unreadable file must not end the job
            data = e
        yield data


def decode_batch(
    batch: dict[str, np.ndarray], spec: DecodeSpec, fs: fsspec.AbstractFileSystem
) -> pa.Table:
    """Listing rows (B) -> decoded rows (B): tensors, or zeros + split="rejects" + reason.

    Tensors leave as raw bytes (see codec.tensor_to_arrow). Rejects keep zero tensors only
    in flight (one schema per block); ShardSink drops those columns for rejects/.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    out = {k: np.zeros((n, *shape), dtype) for k, (shape, dtype) in spec.tensors.items()}
    split = [str(s) for s in batch["split"]]
    reason, detail = [""] * n, [""] * n
    for i, data in enumerate(_read_each(fs, paths)):
        try:
            if isinstance(data, BaseException):
                raise _Reject("unreadable", f"{type(data).__name__}: {data}")
            values = spec.decode(data)
            for key, (shape, dtype) in spec.tensors.items():
                value = np.asarray(values[key])
                if value.shape != shape or value.dtype != np.dtype(dtype):
                    raise _Reject(
                        "decode_error", f"{key}: got {value.dtype}{value.shape}, "
                        f"expected {dtype}{shape}")
                out[key][i] = value
        except Exception as e:  # quarantine every failure as a reject
            reason[i] = getattr(e, "reason", "decode_error")
            detail[i] = (getattr(e, "detail", "") or f"{type(e).__name__}: {e}")[:500]
            split[i] = layout.REJECTS
    text = {"id": batch["id"], "label_name": batch["label_name"], "source": batch["source"],
            "split": split, "reason": reason, "detail": detail}
    columns = {k: pa.array([str(x) for x in v], pa.string()) for k, v in text.items()}
    columns["label"] = pa.array(np.asarray(batch["label"], np.int64))
    for key, (shape, _) in spec.tensors.items():  # scalars (has_audio) stay plain columns
        columns[key] = codec.tensor_to_arrow(out[key]) if shape else pa.array(out[key])
    return pa.table(columns)


class Decoder:
    """decode_batch as a callable class, for ActorPoolStrategy (state set up once)."""

    def __init__(self, spec: DecodeSpec, fs: fsspec.AbstractFileSystem):
        self.spec, self.fs = spec, fs

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return decode_batch(batch, self.spec, self.fs)

