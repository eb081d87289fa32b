"""Decoding inside Ray workers: listing rows -> normalised rows or reject rows.

Row layout and shapes: see pipeline/data/preprocess.py. Nothing here raises on a bad file:
every failure becomes a row with split="rejects" and a reason ("unreadable" and
"decode_error" are found here, "timeout" and "crashed" by pipeline/data/isolate.py, the rest
by the decoders in media/).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipeline.data import codec, isolate, layout, media
from pipeline.data.config import AUDIO_INT16_SCALE, PreprocessConfig
from pipeline.data.listing import unescape_path


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode worker needs: the modality, the decoder settings and output shapes."""

    modality: str
    image: dict[str, int]
    audio: dict[str, int]
    video: dict[str, int]
    audio_dtype: str = "int16"  # or "float32"; int16 holds round(x * 32767) (to_int16)
    file_timeout_s: float = 300.0  # read.file_timeout_s (enforced with isolate only)
    isolate: bool = True  # read.isolate: decode in a child process (pipeline/data/isolate.py)
    fetch_mb: float = 64.0  # remote inputs: raw MB fetched at once (read.block_mb)

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> DecodeSpec:
        a = cfg.audio
        return cls(
            modality=cfg.modality,
            image={"size": cfg.image.size, "max_pixels": cfg.image.max_pixels},
            audio={"sample_rate": a.sample_rate, "num_samples": a.num_samples,
                   "min_samples": a.min_samples, "max_channels": a.max_channels},
            video={"num_frames": cfg.video.frames, "size": cfg.video.size,
                   "max_pixels": cfg.video.max_pixels},
            audio_dtype=a.dtype,
            file_timeout_s=cfg.read.file_timeout_s, isolate=cfg.read.isolate,
            fetch_mb=cfg.read.block_mb,
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
                  "num_samples": self.audio["num_samples"],
                  "max_channels": self.audio["max_channels"]} if with_audio else {}
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


def _waves(sizes: list[int], budget: int) -> Iterator[list[int]]:
    """Indices grouped so that each group's listed bytes stay within `budget` (a file
    larger than the budget goes alone)."""
    group: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if group and total + size > budget:
            yield group
            group, total = [], 0
        group.append(i)
        total += size
    if group:
        yield group


def _fetch(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | Exception]:
    """Whole-file bytes of remote paths (concurrently where the filesystem is async); an
    error in place of bytes, never raised."""
    if getattr(fs, "async_impl", False):
        async def fetch() -> list[Any]:
            jobs = (fs._cat_file(p) for p in paths)
            return await asyncio.gather(*jobs, return_exceptions=True)

        return fsspec.asyn.sync(fs.loop, fetch)
    out: list[bytes | Exception] = []
    for p in paths:
        try:
            out.append(fs.cat_file(p))
        except Exception as e:  # noqa: BLE001 - one unreadable file must not end the job
            out.append(e)
    return out


def _results(paths: list[str], sizes: list[int], todo: list[int], spec: DecodeSpec,
             fs: fsspec.AbstractFileSystem) -> Iterator[tuple[int, tuple]]:
    """(index, ("ok", values) | ("err", reason, detail)) for each index in `todo`.

    Local files are read by whoever decodes them (the isolating child: a read that hangs
    counts against the file's time limit). Remote files are fetched here (concurrently on
    gs://), in waves of at most spec.fetch_mb listed bytes, and handed over as bytes."""
    def run(items: list[tuple[int, str | bytes]]) -> Iterator[tuple[int, tuple]]:
        if spec.isolate:
            yield from isolate.decode_isolated(items, spec.decode, isolate.read_local,
                                               spec.file_timeout_s)
        else:
            for i, source in items:
                yield i, isolate.decode_one(spec.decode, isolate.read_local, source)

    if isinstance(fs, LocalFileSystem):
        yield from run([(i, paths[i]) for i in todo])
        return
    budget = int(spec.fetch_mb * 2**20)
    for wave in _waves([sizes[i] for i in todo], budget):
        chosen = [todo[w] for w in wave]
        fetched = _fetch(fs, [paths[i] for i in chosen])
        for i, data in zip(chosen, fetched, strict=True):
            if isinstance(data, BaseException):
                yield i, ("err", "unreadable", f"{type(data).__name__}: {data}"[:500])
        yield from run([(i, d) for i, d in zip(chosen, fetched, strict=True)
                        if not isinstance(d, BaseException)])


def decode_batch(
    batch: dict[str, np.ndarray], spec: DecodeSpec, fs: fsspec.AbstractFileSystem
) -> pa.Table:
    """Listing rows (B) -> decoded rows (B): tensors, or zeros + split="rejects" + reason.

    Rows the listing already rejected (not_a_file, too_large) are never read. Tensors leave
    as raw bytes (see codec.tensor_to_arrow). Rejects keep zero tensors only in flight (one
    schema per block); ShardSink drops those columns for rejects/.
    """
    paths = [unescape_path(str(p)) for p in batch["path"]]
    n = len(paths)
    out = {k: np.zeros((n, *shape), dtype) for k, (shape, dtype) in spec.tensors.items()}
    split = [str(s) for s in batch["split"]]
    reason = [str(r) for r in batch.get("reject", [""] * n)]
    detail = [str(d) for d in batch.get("detail", [""] * n)]
    sizes = [int(s) for s in batch.get("size", [0] * n)]
    todo = [i for i in range(n) if not reason[i]]
    for i, result in _results(paths, sizes, todo, spec, fs):
        if result[0] == "ok":
            values = {key: np.asarray(v) for key, v in result[1].items()}
            bad = [f"{key}: got {values[key].dtype}{values[key].shape}, expected "
                   f"{dtype}{shape}" for key, (shape, dtype) in spec.tensors.items()
                   if values[key].shape != shape or values[key].dtype != np.dtype(dtype)]
            if not bad:
                for key in spec.tensors:
                    out[key][i] = values[key]
                continue
            result = ("err", "decode_error", bad[0])
        reason[i], detail[i] = result[1], result[2][:500]
    for i in range(n):
        if reason[i]:
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

