"""The MLflow tags of a sweep: every name defined here, written by `to_*` functions and read
back with `TrialRunTags.from_run` / `SweepRunTags.from_run`.

A sweep is one parent run (role "sweep") and child runs (role "trial"), one per trial stage.
`hip sweep` (trial.py, outcomes.py, driver.py) writes these tags and `hip compare` reads them;
nothing else should spell a tag name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.constants import MLFLOW_TAG_LIMIT

ROLE = "hip.role"  # "sweep" on the parent run, "trial" on child runs
SWEEP = "hip.sweep"  # the sweep's name, on both
# Child runs
TRIAL = "hip.trial_id"
STAGE = "hip.stage"  # pretrain | finetune
SCORED = "hip.sweep_scored"  # "true" on the run whose metric Tune sees
STATUS = "hip.sweep_status"  # one of STATUSES
PARAMS = "hip.sweep_params"  # JSON of the trial's sampled values
SUPERSEDED = "hip.superseded"  # a run left behind by a restarted trial
PRUNED = "hip.pruned"
PRUNE_REASON = "hip.prune_reason"
EARLY_STOPPED = "hip.early_stopped"
STOPPED_AT = "hip.stopped_at_step"
ERROR = "hip.error"
INTERRUPTED = "hip.interrupted"  # also on the parent run
# Parent run
KIND = "hip.kind"
METRIC = "hip.metric"
MODE = "hip.mode"
SPACE_KEYS = "hip.space_keys"
SWEEP_DIR = "hip.sweep_dir"
INVALID_POINTS = "hip.invalid_points"
RESUMED_AT = "hip.resumed_at"
BEST_TRIAL = "hip.best_trial"
BEST_RUN = "hip.best_run_id"
BEST_PARAMS = "hip.best_params"

STATUSES = ("FINISHED", "EARLY_STOPPED", "PRUNED", "FAILED", "INTERRUPTED")
TRUE = "true"


def clip(text: str) -> str:
    """A tag value MLflow accepts: at most MLFLOW_TAG_LIMIT characters."""
    return text[:MLFLOW_TAG_LIMIT]


def _flag(value: bool) -> str:
    return TRUE if value else "false"


# ----------------------------------------------------------------------------- writing


def to_trial(sweep: str, trial_id: str, values: dict[str, Any], stage: str,
             *, scored: bool = False) -> dict[str, str]:
    """Tags of a trial stage's child run."""
    tags = {ROLE: "trial", SWEEP: sweep, TRIAL: trial_id, STAGE: stage,
            PARAMS: clip(json.dumps(values, default=str))}
    if scored:
        tags[SCORED] = TRUE
    return tags


def to_pruned(reason: str) -> dict[str, str]:
    return {PRUNED: TRUE, PRUNE_REASON: clip(reason), STATUS: "PRUNED"}


def to_superseded() -> dict[str, str]:
    return {SUPERSEDED: TRUE}


def to_outcome(status: str, *, step: int | None = None, error: str | None = None
               ) -> dict[str, str]:
    """The final status of a trial's run (set after tuner.fit)."""
    if status not in STATUSES:
        raise ValueError(f"unknown trial status {status!r}; expected one of {STATUSES}")
    tags = {STATUS: status}
    if status == "EARLY_STOPPED":
        tags.update({EARLY_STOPPED: TRUE, STOPPED_AT: str(step)})
    elif status == "INTERRUPTED":
        tags[INTERRUPTED] = TRUE
    if error:
        tags[ERROR] = clip(error)
    return tags


def to_parent(name: str, kind: str, metric: str, mode: str, space_keys: list[str],
              sweep_dir: str, invalid_points: list[str] = ()) -> dict[str, str]:
    tags = {ROLE: "sweep", SWEEP: name, KIND: kind, METRIC: metric, MODE: mode,
            SPACE_KEYS: json.dumps(list(space_keys)), SWEEP_DIR: sweep_dir}
    if invalid_points:
        tags[INVALID_POINTS] = clip("; ".join(invalid_points))
    return tags


def to_best(trial_id: str, run_id: str | None, values: dict[str, Any]) -> dict[str, str]:
    return {BEST_TRIAL: trial_id, BEST_RUN: run_id or "",
            BEST_PARAMS: clip(json.dumps(values, default=str))}


def to_interrupted(interrupted: bool) -> dict[str, str]:
    return {INTERRUPTED: _flag(interrupted)}


def to_resumed(when: str) -> dict[str, str]:
    return {RESUMED_AT: when}


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TrialRunTags:
    """What a child run's tags say about it."""

    trial_id: str | None
    stage: str | None
    scored: bool
    status: str | None  # STATUS tag (None until the trial's outcome is recorded)
    pruned: bool
    prune_reason: str | None
    superseded: bool
    values: dict[str, Any]

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> TrialRunTags:
        return cls(trial_id=tags.get(TRIAL), stage=tags.get(STAGE),
                   scored=tags.get(SCORED) == TRUE, status=tags.get(STATUS),
                   pruned=tags.get(PRUNED) == TRUE, prune_reason=tags.get(PRUNE_REASON),
                   superseded=tags.get(SUPERSEDED) == TRUE,
                   values=json.loads(tags.get(PARAMS) or "{}"))

    @classmethod
    def from_run(cls, run) -> TrialRunTags:
        return cls.from_tags(run.data.tags)


@dataclass(frozen=True)
class SweepRunTags:
    """What a parent run's tags say about its sweep."""

    is_sweep: bool
    name: str | None
    kind: str
    metric: str | None
    mode: str | None
    space_keys: list[str]

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> SweepRunTags:
        return cls(is_sweep=tags.get(ROLE) == "sweep", name=tags.get(SWEEP),
                   kind=tags.get(KIND, "pretrain"), metric=tags.get(METRIC),
                   mode=tags.get(MODE), space_keys=json.loads(tags.get(SPACE_KEYS) or "[]"))

    @classmethod
    def from_run(cls, run) -> SweepRunTags:
        return cls.from_tags(run.data.tags)


def query_sweeps() -> str:
    """MLflow search filter of sweeps' parent runs."""
    return f"tags.`{ROLE}` = 'sweep'"


def query_trial(parent_run_id: str, trial_id: str, stage: str | None = None) -> str:
    """MLflow search filter of one trial's child runs (optionally one stage)."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND tags.`{TRIAL}` = '{trial_id}'"
    if stage:
        query += f" AND tags.`{STAGE}` = '{stage}'"
    return query


__all__ = ["TrialRunTags", "SweepRunTags", "STATUSES", "clip", "to_trial", "to_pruned",
           "to_superseded", "to_outcome", "to_parent", "to_best", "to_interrupted",
           "to_resumed", "query_sweeps", "query_trial"]
