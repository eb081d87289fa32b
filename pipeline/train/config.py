"""Training job config (`hip pretrain`, `hip finetune`): strict pydantic sections.

Sections: data, model, mae, optim, trainer, tracking, storage, finetune. Defaults are the
embedded local setup: local Ray, MLflow in a SQLite file under runs/, checkpoints in runs/.
Relative local paths are kept as written in the config and resolved to absolute paths by
`resolve_paths` at job start (Ray changes each worker's working directory).
Credentials never belong here: gs:// access comes from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import StrictModel
from pipeline.constants import DEFAULT_CHECKPOINTS, DEFAULT_TRACKING_URI, Modality


class AudioFeatures(StrictModel):
    """What the model sees of an audio column (pipeline/train/batches.py `audio_tokens`)."""

    kind: Literal["raw", "log_spectrogram"] = Field("raw", description=(
        "raw: one token per sample (T, 1), as in the HiP paper; log_spectrogram: one token per "
        "STFT frame, its log power in window // 2 + 1 bins, standardised per clip "
        "(1 + T // hop tokens): what a small model on a small budget learns from "
        "(docs/audio-features.md)"))
    window: int = Field(256, ge=4, description="log_spectrogram: samples per Hann-windowed "
                        "frame (256 = 32 ms at 8 kHz, 16 ms at 16 kHz)")
    hop: int = Field(128, ge=1, description="log_spectrogram: samples between frames")

    @model_validator(mode="after")
    def _hop(self) -> AudioFeatures:
        if self.hop > self.window:
            raise ValueError(f"hop ({self.hop}) must not exceed window ({self.window}): "
                             "samples between frames would never be seen")
        return self


class Augment(StrictModel):
    """Train-time augmentation of images, video frames and audio clips
    (pipeline/train/augment.py)."""

    shift: int = Field(0, ge=0, description=(
        "move each training image by a random whole-pixel offset in [-shift, shift] along "
        "each axis (edge pixels repeat into the gap); 0 = off"))
    flip: bool = Field(False, description=(
        "mirror half of the training images left-right (not for digits or text)"))
    time_shift: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "move each training audio clip earlier or later by a random offset of up to this "
        "fraction of its length (silence fills the gap; applied to the samples, before "
        "any log-spectrogram); 0 = off; not for audio+video, where it would move the sound "
        "against the pictures"))


class DataSection(StrictModel):
    path: str = Field("data/shards/image", description="shards folder/URI written by "
                      "`hip preprocess` (holds manifest.json, train/, val/)")
    modality: Modality | None = Field(
        None, description="checked against the manifest; None = take the manifest's")
    train_split: str = "train"
    val_split: str = "val"
    deterministic: bool = Field(False, description=(
        "every run of this config sees the same batches in the same order (Ray Data "
        "preserve_order; the per-epoch file order and the shuffle buffer are always seeded "
        "from trainer.seed): what a sweep comparing configurations wants; costs some ingest "
        "throughput on big clusters (docs/data-order.md)"))
    in_memory_mb: float = Field(256.0, ge=0.0, description=(
        "a lean sweep trial (one worker, in the trial's process) reads a split of at most "
        "this many MB of shards into memory with pyarrow instead of opening a Ray Dataset "
        "(no read tasks; a full shuffle per epoch); 0 = always Ray Data"))
    audio: AudioFeatures = Field(default_factory=AudioFeatures, description=(
        "model input of audio columns: raw samples or log-spectrogram frames"))
    augment: Augment = Field(default_factory=Augment, description=(
        "train batches only: random shifts / mirrors of images and video frames"))


class ModelSection(StrictModel):
    preset: str = Field("hip_tiny", description="models.registry preset name")
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "create_model overrides, e.g. {channels: [..], groups: [..], width_mult: 0.5, "
        "processor_latents_train: 32, checkpoint_levels: true}"))
    head: Literal["learned_query", "mean_pool"] | None = Field(
        None, description="classification head (finetune); None = the preset's default")


class MaeSection(StrictModel):
    mask_ratio: float = Field(0.85, ge=0.0, lt=1.0, description="fraction of positions hidden")
    masking: Literal["per_group", "groupwise", "random"] = Field("per_group", description=(
        "per_group: every group hides its own random positions (the same count per group); "
        "groupwise: the same relative positions in every group (only sensible when a group "
        "spans many image rows, e.g. HiP-16 at 224 px); random: anywhere (docs/masking.md)"))
    target_norm: Literal["none", "token", "group"] = "none"


class OptimSection(StrictModel):
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as lr fraction")
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float | None = Field(1.0, gt=0.0, description="None disables clipping")
    batch_size: int = Field(16, ge=1, description="per worker, per micro-step")
    grad_accum: int = Field(1, ge=1)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="finetune only")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description=(
        "finetune only: layer-wise lr decay (BEiT/MAE fine-tuning): the head at optim.lr, "
        "each HiP level below it x layer_decay more, the input embeddings lowest; 1 = off. "
        "0.75 fine-tuned MAE weights better on digits (docs/benchmarks.md)"))


class TrainerSection(StrictModel):
    num_workers: int | tuple[int, int] = Field(1, description=(
        "Ray Train workers; 0 runs the loop in the driver (local mode); [min, max] is elastic "
        "training: the run goes on with as few as min workers when nodes are lost and grows "
        "back to max when they return, keeping the global batch of max workers "
        "(docs/elastic.md); needs trainer.max_failures != 0"))
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    steps: int = Field(100, ge=1, description="optimizer steps in total")
    checkpoint_every: int = Field(50, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_cooldown_steps: int = Field(0, ge=0, description=(
        "also evaluate a copy annealed for this many steps (lr falling linearly to "
        "optim.min_lr_ratio) before every eval but the last, logged as cooled_val_loss "
        "(cooled_val_accuracy): ranks early rungs of a sweep by where runs are heading; "
        "the run itself is unchanged (pipeline/train/cooldown.py)"))
    eval_cooldown_fraction: float = Field(0.0, ge=0.0, le=1.0, description=(
        "longer probes later in a run: a probe at step s anneals for max(eval_cooldown_steps, "
        "fraction x s x the schedule's lr factor at s) steps, at most the steps left; "
        "0: always eval_cooldown_steps (pipeline/train/cooldown.py probe_length)"))
    eval_cooldown_at: list[int] = Field(default_factory=list, description=(
        "probe only the evaluations at these steps (empty: every evaluation); a sweep sets "
        "its scheduler's decision steps (rungs) here for lean trials"))
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts (-1 = forever)")
    elastic_check_s: float = Field(60.0, gt=0, description=(
        "elastic runs: how often a healthy group checks whether more workers fit (growing "
        "restarts the group from its last checkpoint)"))
    seed: int = 0
    bf16: bool = Field(True, description="bf16 autocast (+TF32) when on GPU; CPU stays fp32")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept in storage")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int):
            if v < 0:
                raise ValueError("must be >= 0 (0: local mode)")
            return v
        low, high = v
        if not 1 <= low <= high:
            raise ValueError(f"elastic [min, max] needs 1 <= min <= max, got [{low}, {high}]")
        return v

    @model_validator(mode="after")
    def _cooldown(self) -> TrainerSection:
        if self.eval_cooldown_fraction and not self.eval_cooldown_steps:
            raise ValueError("eval_cooldown_fraction needs eval_cooldown_steps > 0 (probes are "
                             "on only then, and it is the shortest probe)")
        return self

    @property
    def max_workers(self) -> int:
        """The largest world size (the one the global batch is defined for); 0: local mode."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @field_validator("resources_per_worker")
    @classmethod
    def _resource_keys(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if k.lower() in ("cpu", "gpu") and k not in ("CPU", "GPU"):
                raise ValueError(f"resource key {k!r} must be spelled 'CPU' or 'GPU'")
        return v


class TrackingSection(StrictModel):
    uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking URI")
    experiment: str = "hip"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials in the tracking URI are not allowed; use "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        return v


class StorageSection(StrictModel):
    path: str = Field(DEFAULT_CHECKPOINTS, description="local folder or gs:// URI for "
                      "Ray Train checkpoints; multi-node runs need shared storage")


class FinetuneSection(StrictModel):
    init_from: str | None = Field(None, description="MLflow run id or checkpoint URI")


class TrainConfig(StrictModel):
    task: Literal["mae", "classify"] = "mae"
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    mae: MaeSection = Field(default_factory=MaeSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        from models.registry import PRESETS

        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset {self.model.preset!r} is not one of {PRESETS}")
        if self.trainer.use_gpu and self.trainer.num_workers == 0:
            raise ValueError("trainer.use_gpu needs trainer.num_workers >= 1")
        if self.trainer.elastic and self.trainer.max_failures == 0:
            raise ValueError("elastic trainer.num_workers needs trainer.max_failures > 0 or -1: "
                             "a lost node restarts the worker group, which counts as a failure")
        if self.finetune.init_from and self.task != "classify":
            raise ValueError("finetune.init_from is only used by task 'classify'")
        return self


def resolve_paths(cfg: TrainConfig, base: Path | None = None) -> TrainConfig:
    """Make local data/storage paths and sqlite URIs absolute (workers run elsewhere)."""
    base = base or Path.cwd()
    out = cfg.model_copy(deep=True)
    if "://" not in out.data.path:
        out.data.path = str((base / out.data.path).resolve())
    if "://" not in out.storage.path:
        out.storage.path = str((base / out.storage.path).resolve())
    prefix = "sqlite:///"
    if out.tracking.uri.startswith(prefix) and not out.tracking.uri.startswith(prefix + "/"):
        db = (base / out.tracking.uri[len(prefix):]).resolve()
        out.tracking.uri = prefix + str(db)
    return out
