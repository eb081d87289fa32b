"""`hip preprocess` config: which columns the rows get, how media is normalised, how shards
are written and how decoding is spread over Ray Data."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.constants import Modality


class ImageSettings(StrictModel):
    size: int = Field(224, ge=8, le=4096, description="Output side S: images become (S, S, 3).")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Images with more pixels are rejected as too_large."
    )


# audio.dtype=int16 shards hold round(x * 32767): preprocessing multiplies, training divides.
AUDIO_INT16_SCALE = 32767.0


class AudioSettings(StrictModel):
    sample_rate: int = Field(48_000, ge=1_000, le=384_000, description="Output rate in Hz.")
    seconds: float = Field(2.56, gt=0, le=600, description="Clips are cropped/padded to this.")
    min_seconds: float = Field(
        0.0, ge=0, description="Shorter clips are rejected as too_short (0: any non-empty clip)."
    )
    max_channels: int = Field(
        64, ge=1, le=4096, description="Files with more channels are rejected as too_large "
        "(the decoder holds every channel of the window it keeps before the mono mix).")
    dtype: Literal["int16", "float32"] = Field(
        "int16", description="Storage of the audio column: int16 = round(x * 32767), clipped "
        "(half the bytes of float32 to write, store and read; quantisation noise at -96 dBFS, "
        "the resolution of the 16-bit PCM most sources have), or float32 in [-1, 1]. "
        "Training reads either as float in [-1, 1]."
    )

    @property
    def num_samples(self) -> int:
        """T of the (T,) audio column."""
        return round(self.seconds * self.sample_rate)

    @property
    def min_samples(self) -> int:
        return max(1, math.ceil(self.min_seconds * self.sample_rate - 1e-6))

    @model_validator(mode="after")
    def _check(self) -> AudioSettings:
        exact = self.seconds * self.sample_rate
        if abs(exact - round(exact)) > 1e-6 * max(1.0, exact):
            raise ValueError(
                f"seconds * sample_rate = {exact} is not a whole number of samples"
            )
        if self.min_seconds > self.seconds:
            raise ValueError(f"min_seconds ({self.min_seconds}) > seconds ({self.seconds})")
        return self


class VideoSettings(StrictModel):
    frames: int = Field(8, ge=1, le=512, description="F frames sampled uniformly per clip.")
    size: int = Field(224, ge=8, le=4096, description="Frames become (S, S, 3).")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Frames with more pixels are rejected as too_large."
    )


class SplitSettings(StrictModel):
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of rows in val; decided from each row's id."
    )


class ShardSettings(StrictModel):
    max_rows_per_file: int | None = Field(
        None, ge=1, description="Upper bound on rows per Parquet file (null: no bound)."
    )
    target_mb_per_file: float | None = Field(
        128.0, gt=0, le=4096, description="Target uncompressed MB of rows per file."
    )
    write: Literal["fused", "separate"] = Field(
        "fused", description="fused: each decode task writes the rows it decoded (no "
        "object-store hop; files hold at most one decode batch, i.e. <= read.block_mb). "
        "separate: write tasks bundle rows up to the file target (fewer, bigger files; one "
        "more copy). read.strategy=actors always writes separately.")
    compression: Literal["none", "snappy", "zstd", "lz4", "gzip"] = Field(
        "snappy", description="Parquet codec (uint8 pixels barely compress; snappy is cheap)."
    )
    shuffle_seed: int = Field(
        0, ge=0, description="Rows are written in a random order seeded by this (sorted by "
        "sha256 of seed and row id), not in listing order: with class sub-folders the listing "
        "is sorted by class, and every file would hold one or two classes. The same inputs "
        "and seed give the same order."
    )

    @model_validator(mode="after")
    def _check(self) -> ShardSettings:
        if self.max_rows_per_file is None and self.target_mb_per_file is None:
            raise ValueError("set max_rows_per_file or target_mb_per_file (or both)")
        return self


class ReadSettings(StrictModel):
    batch_size: int = Field(
        128, ge=1, le=4096, description="Files decoded per map_batches call (upper bound)."
    )
    block_mb: float = Field(
        64.0, gt=0, description="Upper bound on decoded MB per batch: big rows (video) get "
        "smaller batches, so object-store use stays bounded.")
    num_cpus: float = Field(1.0, gt=0, le=64, description="CPUs reserved per decode worker.")
    concurrency: int | None = Field(
        None, ge=1, description="Decode workers (null: cluster CPUs // num_cpus)."
    )
    strategy: Literal["tasks", "actors"] = Field(
        "tasks", description="Ray Data compute: stateless tasks or a fixed actor pool."
    )
    max_file_mb: float = Field(
        4096.0, gt=0, description="Inputs larger than this are rejected as too_large from "
        "the listing's sizes, before any byte is read.")
    file_timeout_s: float = Field(
        300.0, gt=0, description="Read + decode time limit per file: a file over it becomes "
        "a reject (reason timeout) and its batch goes on without it.")
    isolate: bool = Field(
        True, description="Decode in a child process of each decode worker, so a decoder "
        "that crashes the process (reject reason crashed) or hangs (timeout) costs only its "
        "file. Off: a crash fails the task and Ray's retries end the job.")
    op_reservation: bool = Field(
        False, description="Ray Data's per-operator resource reservation. Off by default: "
        "this job has one operator, and with it on Ray starts one task alone and waits for "
        "it before the others (measured: 0.5 s of one idle core per job, -15% rows/s).")


class PreprocessConfig(StrictModel):
    """`hip preprocess`: raw files -> normalised rows -> Parquet shards + manifest."""

    modality: Modality = Field(description="Which tensor columns the rows get.")
    input: str | None = Field(None, description="Folder or gs:// prefix of raw files.")
    output: str | None = Field(None, description="Folder or gs:// prefix for the shards.")
    labels: str | None = Field(None, description="Optional CSV `path,label` (else sub-folders).")
    image: ImageSettings = Field(default_factory=ImageSettings)
    audio: AudioSettings = Field(default_factory=AudioSettings)
    video: VideoSettings = Field(default_factory=VideoSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    shards: ShardSettings = Field(default_factory=ShardSettings)
    read: ReadSettings = Field(default_factory=ReadSettings)

    # Where data lives is not part of what the rows are: excluded from the content hash
    # so a moved output still counts as "up to date" (inputs are fingerprinted instead).
    LOCATION_KEYS: ClassVar[frozenset[str]] = frozenset({"input", "output", "labels"})
