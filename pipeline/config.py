"""Strict job configs: pydantic models, YAML loading, dotted `key=value` overrides.

Generic part (reused by every job): `StrictModel`, `ConfigError`, `load_config`,
`config_to_dict`, `config_hash`. Job part: `PreprocessConfig` and its sections.

Validation never rewrites a value: a bad or inconsistent value raises, and every problem
is reported in ONE `ConfigError` line naming the dotted key (`image.size: ...`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# --------------------------------------------------------------------------------------
# Generic: strict models, loading, overrides, hashing
# --------------------------------------------------------------------------------------


class StrictModel(BaseModel):
    """Base of every config section: unknown keys and bad assignments raise."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message is one readable line."""


M = TypeVar("M", bound=BaseModel)
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=3"` -> `("a.b", 3)`; the value is parsed as YAML (`x=` gives None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for key "a.b", creating sections as needed."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {key}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[M],
    path: str | Path | None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> M:
    """Build `cls` from a YAML file, then `key=value` overrides, then typed `values`.

    `values` maps dotted keys to already-typed values (e.g. CLI flags such as a path, which
    must not be YAML-parsed: `--input yes` is the folder "yes", not True). Later wins.
    """
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        set_dotted(data, *parse_override(text))
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = f" ({path})" if path is not None else ""
        raise ConfigError(f"invalid config{where}: {format_errors(e, cls)}") from None


def format_errors(error: ValidationError, cls: type[BaseModel]) -> str:
    """pydantic's errors as `dotted.key: message` joined by "; " (one line)."""
    parts = []
    for err in error.errors():
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc) or "<root>"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            known = _known_keys(cls, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            if close:
                msg += f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
            elif known:
                msg += f" (known: {', '.join(sorted(known))})"
        elif err["type"] == "missing":
            msg = "required"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict | list):
                msg += f", got {err['input']!r}"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def _known_keys(cls: type[BaseModel], loc: Sequence[str]) -> list[str]:
    """Field names of the (nested) model section at `loc`, [] if it is not a model."""
    model: Any = cls
    for name in loc:
        field = model.model_fields.get(name) if _is_model(model) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if _is_model(model) else []


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of a config (what gets saved with every output)."""
    return cfg.model_dump(mode="json")


def config_hash(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """sha256 (hex) of the canonical JSON of `cfg` without the top-level keys `exclude`."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in (exclude or set())}
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Preprocess job
# --------------------------------------------------------------------------------------

Modality = Literal["image", "audio", "video", "audio+video"]


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
