"""Sweep definitions (`sweeps/*.yaml`): a strict pydantic model, loading, per-trial job configs.

A sweep names a base job config (a configs/ YAML, path relative to the sweep file), fixed
dotted overrides on it, the kind of trial (pretrain, finetune, pretrain-then-finetune), and
a search space over any job-config field by dotted path:

    space:
      mae.mask_ratio: {uniform: [0.5, 0.95]}
      model.overrides.groups: {grid: [[4, 1, 4], [8, 1, 8]]}

Command-line `key=value` pairs go to the job config when the first segment is a job-config
section (data.path=..., trainer.steps=...), else to the sweep (num_samples=8,
scheduler.grace_period=4). A trial's config = base YAML <- sweep `overrides` <- command line
<- the trial's sampled values (<- `finetune_overrides` for the finetune stage).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import (
    DOTTED_KEY,
    ConfigError,
    StrictModel,
    config_to_dict,
    parse_override,
    read_yaml,
    set_dotted,
    validate,
)
from pipeline.train.config import TrainConfig

KINDS = ("pretrain", "finetune", "pretrain-then-finetune")
# A trial runs one or two stages, each one training job (MLflow tag hip.stage): "pretrain"
# (task mae) and "finetune" (task classify). The last stage is the scored one.
Stage = Literal["pretrain", "finetune"]
DIM_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Infrastructure, not hyperparameters: a trial's task, tracking and storage are the sweep's.
UNSWEEPABLE = ("task", "tracking", "storage", "finetune")
METRICS = ("loss", "val_loss", "val_accuracy", "cooled_val_loss", "cooled_val_accuracy")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Dim(StrictModel):
    """One searched dimension: exactly one of the fields. Bounds are [low, high]; randint's
    high is exclusive (as tune.randint). `q` rounds uniform/loguniform samples to a multiple."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, crossed "
                                   "with the other grid dimensions (tune.grid_search)")
    choice: list[Any] | None = Field(None, min_length=1, description="one value at random")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    q: float | None = Field(None, gt=0, description="quantisation for uniform/loguniform")

    @model_validator(mode="after")
    def _exactly_one(self) -> Dim:
        set_kinds = [k for k in DIM_KINDS if getattr(self, k) is not None]
        if len(set_kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(DIM_KINDS)}, got "
                             f"{set_kinds or 'none'}")
        kind = set_kinds[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind} needs low < high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {low}")
        if self.q is not None and kind not in ("uniform", "loguniform"):
            raise ValueError("q only applies to uniform and loguniform")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIM_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)

    def describe(self) -> str:
        """One line for MLflow params and the terminal: `uniform [0.5, 0.95]`."""
        vals = list(self.values)
        q = f" q={self.q}" if self.q is not None else ""
        return f"{self.kind} {vals}{q}"


# PBT perturbs only what keeps a trial's checkpoint loadable by another configuration.
PBT_MUTABLE = ("optim.", "mae.")


class SchedulerSection(StrictModel):
    type: Literal["asha", "hyperband", "pbt", "none"] = Field("asha", description=(
        "asha: asynchronous successive halving (see asha_rule); "
        "hyperband: synchronous HyperBand (a rung is cut only once every trial of the "
        "bracket reached it: the same winner as the full sweep more often, paused trials "
        "resume from checkpoints); pbt: population-based training (perturbs optim.* and "
        "mae.* values, exploits through checkpoints); none: every trial runs to "
        "trainer.steps"))
    asha_rule: Literal["auto", "promote", "stop"] = Field("auto", description=(
        "asha: promote = the ASHA paper's rule (a trial waits PAUSED at a rung until it "
        "ranks in the best n // reduction_factor of the n results there; needs trials that "
        "can pause: lean, checkpoint_every = eval_every, searcher random); stop = Ray's "
        "ASHAScheduler (a trial goes on unless worse than the best 1/reduction_factor "
        "recorded there so far: the first arrivals always go on); auto = promote when the "
        "trials can pause, else stop"))
    grace_period: int = Field(1, ge=1, description="steps before ASHA may stop a trial "
                              "(its first rung)")
    reduction_factor: float = Field(3.0, ge=2.0, description="1/reduction_factor of the "
                                    "trials at a rung go on to the next (asha, hyperband)")
    brackets: int = Field(1, ge=1, description=(
        "hyperband: brackets (trials dealt round-robin); bracket b's first rung is at "
        "grace_period x reduction_factor^b steps. 1 = synchronous successive halving"))
    perturbation_interval: int | None = Field(None, ge=1, description=(
        "pbt: steps between exploit/explore decisions (None = trainer.eval_every x 2)"))
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5, description=(
        "pbt: the bottom fraction copies the top fraction's checkpoint and config"))
    resample_probability: float = Field(0.25, ge=0.0, le=1.0, description=(
        "pbt: chance a perturbed value is resampled from the space instead of scaled"))
    mutate: list[str] | None = Field(None, description=(
        "pbt: space keys to perturb (None = every optim.* and mae.* key of the space)"))


class SearcherSection(StrictModel):
    type: Literal["random", "optuna"] = Field("random", description="random = Tune's "
                                              "basic variant generator (grid + sampling)")
    seed: int | None = Field(0, description="sampling seed (None = fresh each run)")


class ResourcesSection(StrictModel):
    driver_cpu: float = Field(0.25, gt=0.0, le=1.0, description="CPU of the trial's driver "
                              "(it only builds and fits the TorchTrainer; 0 is refused by Tune)")
    reserve_cpu: float = Field(1.0, ge=0.0, description="CPUs left free for Ray Data ingest "
                               "when deriving max_concurrent_trials")
    max_concurrent: int | None = Field(None, ge=1, description="None = (cluster CPUs - "
                                       "reserve_cpu) // per-trial need (and GPUs likewise)")
    lean: bool = Field(True, description=(
        "a stage with one worker (trainer.num_workers 0 or 1) runs the training loop in the "
        "trial's own process (no TorchTrainer, controller or worker actors); false = every "
        "stage a nested TorchTrainer"))
    gpus_per_trial: float | None = Field(None, ge=0.0, description=(
        "GPUs a lean trial holds; fractions pack trials on one GPU (0.25: four per GPU). "
        "None = 1 if trainer.use_gpu else 0. Multi-worker trials take "
        "trainer.resources_per_worker"))


class SweepConfig(StrictModel):
    name: str = Field(description="sweep name: the Tune experiment folder under "
                      "storage.path and the MLflow parent run's name")
    description: str = ""
    base: str = Field(description="job config YAML, relative to this sweep file")
    kind: Literal["pretrain", "finetune", "pretrain-then-finetune"] = "pretrain"
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed dotted "
                                      "overrides on the base config, e.g. trainer.steps: 60")
    finetune_overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "pretrain-then-finetune only: dotted overrides of the finetune stage"))
    space: dict[str, Dim] = Field(min_length=1, description="dotted job-config key -> Dim")
    metric: str = Field("val_loss", description="reported by every eval: loss, val_loss, "
                        "val_accuracy (classify); cooled_val_loss / cooled_val_accuracy "
                        "with trainer.eval_cooldown_steps (docs/sweeps.md)")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1, description="samples of the space (x every grid point)")
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    searcher: SearcherSection = Field(default_factory=SearcherSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    max_failures: int = Field(1, ge=-1, description="Tune-level retries of a failed trial "
                              "(trainer.max_failures covers worker restarts inside a trial)")
    invalid: Literal["reject", "prune"] = Field("reject", description=(
        "a point of the space the model cannot be built for: reject = the sweep does not "
        "start; prune = the trial is skipped and its reason recorded in its MLflow run"))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '_', '-', '.' (at most 64), e.g. width-study")
        return v

    @field_validator("overrides", "finetune_overrides")
    @classmethod
    def _dotted_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not DOTTED_KEY.match(key):
                raise ValueError(f"key {key!r} must be a dotted job-config path")
        return v

    @field_validator("space")
    @classmethod
    def _space_keys(cls, v: dict[str, Dim]) -> dict[str, Dim]:
        for key in v:
            if not DOTTED_KEY.match(key):
                raise ValueError(f"key {key!r} must be a dotted job-config path")
            if key.split(".")[0] in UNSWEEPABLE:
                raise ValueError(f"{key} cannot be swept: {', '.join(UNSWEEPABLE)} belong to "
                                 "the sweep, not to a trial")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepConfig:
        if self.finetune_overrides and self.kind != "pretrain-then-finetune":
            raise ValueError("finetune_overrides is only used by kind pretrain-then-finetune")
        if self.metric.endswith("val_accuracy") and self.kind == "pretrain":
            raise ValueError(f"metric {self.metric} needs a classification stage (kind "
                             "finetune or pretrain-then-finetune); MAE reports val_loss")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not reported at every eval; use "
                             f"one of {', '.join(METRICS)}")
        grid = [k for k, d in self.space.items() if d.kind == "grid"]
        if grid and self.searcher.type == "optuna":
            raise ValueError(f"the optuna searcher samples; {grid} use grid (use choice, or "
                             "searcher.type: random)")
        if self.scheduler.type != "none" and "trainer.steps" in self.space:
            raise ValueError(f"{self.scheduler.type}'s horizon is trainer.steps; do not "
                             f"sweep trainer.steps with scheduler.type {self.scheduler.type}")
        if self.scheduler.type == "pbt":
            bad = [k for k in self.pbt_mutations if k not in self.space]
            if bad:
                raise ValueError(f"scheduler.mutate names {bad}, which are not in the space")
            fixed = [k for k in self.pbt_mutations if not k.startswith(PBT_MUTABLE)]
            if fixed:
                raise ValueError(f"pbt cannot perturb {fixed}: another trial's checkpoint "
                                 f"must load (perturb keys under {', '.join(PBT_MUTABLE)})")
            if not self.pbt_mutations:
                raise ValueError("pbt needs an optim.* or mae.* key in the space to perturb")
        return self

    @property
    def pbt_mutations(self) -> list[str]:
        """Space keys PBT perturbs."""
        if self.scheduler.mutate is not None:
            return list(self.scheduler.mutate)
        return [k for k in self.space if k.startswith(PBT_MUTABLE)]

    @property
    def task(self) -> str:
        """Task of the stage whose metric Tune sees."""
        return "mae" if self.kind == "pretrain" else "classify"

    @property
    def stages(self) -> list[Stage]:
        """The stages of one trial, in order; the last one is scored."""
        if self.kind == "pretrain-then-finetune":
            return ["pretrain", "finetune"]
        return [self.kind]

    @property
    def scored_stage(self) -> Stage:
        return self.stages[-1]


def is_job_key(key: str) -> bool:
    """Does a command-line override address the job config (vs the sweep)?"""
    return key.split(".")[0] in TrainConfig.model_fields


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, list[str]]:
    """Read and validate a sweep YAML. Returns it and the job-config overrides of `overrides`
    (`key=value` strings whose first segment is a job-config section)."""
    data = read_yaml(path)
    job: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        if is_job_key(key):
            job.append(text)
        else:
            set_dotted(data, key, value)
    return validate(SweepConfig, data, f"invalid sweep {path}"), job


def base_path(sweep_file: str | Path, sweep: SweepConfig) -> Path:
    p = Path(sweep.base)
    return p if p.is_absolute() else (Path(sweep_file).resolve().parent / p).resolve()


def base_config(sweep_file: str | Path, sweep: SweepConfig, job_overrides: list[str] = ()
                ) -> TrainConfig:
    """The base job config: base YAML <- sweep.overrides <- command line, with the task of
    the first stage (ConfigError names the key and the file)."""
    path = base_path(sweep_file, sweep)
    if not path.is_file():
        raise ConfigError(f"sweep {sweep.name}: base config {path} does not exist "
                          f"(base: {sweep.base} is relative to {Path(sweep_file).parent})")
    data = read_yaml(path)
    for key, value in sweep.overrides.items():
        set_dotted(data, key, copy.deepcopy(value))
    for text in job_overrides:
        set_dotted(data, *parse_override(text))
    data["task"] = "classify" if sweep.kind == "finetune" else "mae"
    return validate(TrainConfig, data, f"base config {path} with the sweep's overrides")


def trial_config(base: TrainConfig, values: dict[str, Any], *, sweep: SweepConfig,
                 stage: Stage, init_from: str | None = None) -> TrainConfig:
    """The job config of one trial stage: the base <- the sampled values (<- for "finetune":
    task classify, the sweep's finetune_overrides and the pretrained run to start from).
    Raises ConfigError naming the swept key when a sampled value is not valid for it."""
    if stage not in sweep.stages:
        raise ValueError(f"stage {stage!r} is not one of sweep {sweep.name}'s {sweep.stages}")
    data = config_to_dict(base)
    for key, value in values.items():
        set_dotted(data, key, copy.deepcopy(value))
    if stage == "finetune":
        data["task"] = "classify"
        for key, value in sweep.finetune_overrides.items():
            set_dotted(data, key, copy.deepcopy(value))
        if init_from:
            set_dotted(data, "finetune.init_from", init_from)
    return validate(TrainConfig, data, f"point {values}")


def runs_lean(sweep: SweepConfig, cfg: TrainConfig) -> bool:
    """Does a stage with this job config run in the trial's own process (sweeps/trial.py):
    resources.lean, one worker, not elastic?"""
    return sweep.resources.lean and cfg.trainer.max_workers <= 1 and not cfg.trainer.elastic


def _cannot_pause(sweep: SweepConfig, configs: list[TrainConfig]) -> str | None:
    """Why trials of this sweep cannot wait PAUSED (or be cloned) and resume from the Tune
    checkpoint of their last report, or None when they can."""
    t = configs[-1].trainer
    if not all(runs_lean(sweep, c) for c in configs):
        return ("pauses or clones trials through Tune checkpoints, which lean trials give: "
                "use trainer.num_workers 1 and resources.lean: true")
    if t.checkpoint_every != t.eval_every:
        return (f"restores trials from the checkpoint of their last report: set "
                f"trainer.checkpoint_every ({t.checkpoint_every}) = trainer.eval_every "
                f"({t.eval_every})")
    if sweep.scheduler.type != "pbt" and sweep.searcher.type != "random":
        return ("needs searcher.type random (Tune's concurrency limit for a searcher counts "
                "trials waiting at a rung)")
    return None


def check_against_base(sweep: SweepConfig, base: TrainConfig) -> None:
    """Checks that need the job config: every Tune report must carry the metric, and ASHA's
    rungs must fit in the run. Raises ConfigError."""
    configs = [trial_config(base, {}, sweep=sweep, stage=s) for s in sweep.stages]
    t = configs[-1].trainer
    if not sweep.resources.lean and any(c.trainer.num_workers == 0 for c in configs):
        # Ray 2.60 refuses ray.train.get_context()/report() inside a Tune trial's process,
        # which is where local mode would run the loop.
        raise ConfigError(f"sweep {sweep.name}: trainer.num_workers=0 (Ray Train's local "
                          "mode) cannot run inside a Tune trial; use 1 or more workers, or "
                          "resources.lean: true")
    kind, s = sweep.scheduler.type, sweep.scheduler
    if kind == "asha" and s.asha_rule == "auto":  # resolved here, recorded in the parent run
        s.asha_rule = "stop" if _cannot_pause(sweep, configs) else "promote"
    if kind in ("hyperband", "pbt") or (kind == "asha" and s.asha_rule == "promote"):
        name = f"{kind} (asha_rule promote)" if kind == "asha" else kind
        if reason := _cannot_pause(sweep, configs):
            raise ConfigError(f"sweep {sweep.name}: scheduler.type {name} {reason}"
                              + ("; or scheduler.asha_rule: stop" if kind == "asha" else ""))
    if kind in ("asha", "hyperband") and sweep.scheduler.grace_period >= t.steps:
        raise ConfigError(f"sweep {sweep.name}: scheduler.grace_period "
                          f"({sweep.scheduler.grace_period}) must be below trainer.steps "
                          f"({t.steps}), or {kind} can never stop a trial")
    if sweep.metric.startswith("cooled_") and not t.eval_cooldown_steps:
        raise ConfigError(f"sweep {sweep.name}: metric {sweep.metric} is reported only with "
                          "trainer.eval_cooldown_steps > 0; set it in overrides (e.g. half of "
                          "scheduler.grace_period), or use metric "
                          f"{sweep.metric.removeprefix('cooled_')}")
    if sweep.metric != "loss" and t.checkpoint_every % t.eval_every:
        # Reports happen at eval and checkpoint steps; a checkpoint-only report has no
        # val_* metric, and Tune fails a trial whose report lacks the sweep's metric.
        raise ConfigError(f"sweep {sweep.name}: trainer.checkpoint_every ({t.checkpoint_every})"
                          f" must be a multiple of trainer.eval_every ({t.eval_every}) so "
                          f"every report to Tune carries {sweep.metric}")


__all__ = ["Dim", "METRICS", "SweepConfig", "Stage", "KINDS", "load_sweep", "base_config",
           "base_path", "trial_config", "check_against_base", "is_job_key", "runs_lean"]
