"""Planning a sweep, without Ray: load the sweep YAML and its base job config, check every
enumerable point of the space (pipeline.train.driver.preflight on the meta device), and
refuse an invalid space with one line before Ray starts.

Storage: <storage.path>/<sweep name>/ holds sweep.json (the parent run id), tune/ (Tune's
experiment: restored by --resume), halving.json (asha promote / hyperband decisions, which
Tune does not save) and train/<run name>/ (one Ray Train run per trial stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.train.config import TrainConfig, resolve_paths
from sweeps.config import (
    Stage,
    SweepConfig,
    base_config,
    check_against_base,
    load_sweep,
    trial_config,
)
from sweeps.space import Invalid, check_space, format_point, points


class Tracked:
    """Where a sweep's runs go: the MLflow URI and experiment of its base config."""

    base: TrainConfig

    @property
    def uri(self) -> str:
        return self.base.tracking.uri

    @property
    def experiment(self) -> str:
        return self.base.tracking.experiment


@dataclass(frozen=True)
class SweepPlan(Tracked):
    """A checked sweep: what `run_sweep` runs and `hip compare` / the outcomes refer to."""

    sweep: SweepConfig
    sweep_file: str
    base: TrainConfig  # resolved (absolute paths); storage.path is the sweep's train/ folder
    sweep_dir: str
    invalid: list[Invalid] = field(default_factory=list)

    @property
    def tune_dir(self) -> str:
        return storage.join(self.sweep_dir, "tune")

    def stage_config(self, stage: Stage) -> TrainConfig:
        """The job config of one stage with the base values (no sampled point)."""
        return trial_config(self.base, {}, sweep=self.sweep, stage=stage)

    def scored_config(self) -> TrainConfig:
        return self.stage_config(self.sweep.scored_stage)


def plan_sweep(sweep_file: str | Path, overrides: list[str] = ()) -> SweepPlan:
    """Everything checkable without Ray: the sweep, its base config, the space's points."""
    sweep, job_overrides = load_sweep(sweep_file, list(overrides))
    cfg = resolve_paths(base_config(sweep_file, sweep, job_overrides))
    sweep_dir = storage.join(cfg.storage.path, sweep.name)
    cfg.storage.path = storage.join(sweep_dir, "train")
    check_against_base(sweep, cfg)
    invalid = check_space(sweep, cfg)
    checked = len(points(sweep.space))
    if invalid and len(invalid) == checked and len({i.reason for i in invalid}) == 1:
        # Not the space's fault (a missing data path, a bad base config): say so plainly.
        raise ConfigError(f"sweep {sweep.name}: no point of the space can run: "
                          f"{invalid[0].reason}")
    if invalid and (sweep.invalid == "reject" or len(invalid) == checked):
        first = invalid[0]
        hint = ("; set invalid: prune to skip such points" if sweep.invalid == "reject"
                else "")
        raise ConfigError(f"sweep {sweep.name}: {len(invalid)} of {checked} checked points "
                          f"cannot run; {format_point(first.point)}: {first.reason}{hint}")
    return SweepPlan(sweep, str(Path(sweep_file).resolve()), cfg, sweep_dir, invalid)


__all__ = ["SweepPlan", "Tracked", "plan_sweep"]
