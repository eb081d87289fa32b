"""One Tune trial: build the trial's job config and run it with pipeline.train.driver.run_training.

`train_trial(config, setup)` is the Tune function trainable. `config` holds the sampled
values by dotted key; `setup` (a TrialSetup, through tune.with_parameters) the sweep, the
resolved base config and the MLflow parent run. Two ways to run a stage:

  lean    a stage with one worker (trainer.num_workers 0 or 1, resources.lean) runs the
          training loop in this process (pipeline/train/inprocess.py: no TorchTrainer, no
          controller or worker actors) and reports with tune.report;
  Train   a multi-worker stage builds and fits one TorchTrainer (the Train V2 + Tune
          pattern); metrics reach Tune through TuneReportCallback on the Train run.

The run name derives from the trial id, so a restarted trial resumes from its last
checkpoint (or, lean, from the one Tune hands it: a PBT exploit, a paused HyperBand trial).

MLflow (names in sweeps/tags.py): each trial stage is a child run of the sweep's parent run,
tagged with the trial id and its stage; the run whose metric Tune sees is marked scored.
A rerun of a trial whose scored run already FINISHED reports that run's final metrics
instead of training again (a driver killed between a trial's end and Tune's next state
save must not cost a rerun).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray.data
from ray import tune

from pipeline import tracking
from pipeline.config import ConfigError
from pipeline.runtime import process_started_at
from pipeline.train.config import TrainConfig
from pipeline.train.driver import JobError, run_training
from pipeline.train.inprocess import InProcess
from sweeps import tags as T
from sweeps.callbacks import TrialReport
from sweeps.config import METRICS, Stage, SweepConfig, runs_lean, trial_config
from sweeps.plan import Tracked
from sweeps.space import check_point

REPORTED = (*METRICS, "lr", "step")
_trials_in_this_process = 0  # Tune reuses a lean trial's actor for the next trial


@dataclass(frozen=True)
class TrialSetup(Tracked):
    """What every trial of a sweep gets (pickled once into the trainable)."""

    sweep: SweepConfig
    base: TrainConfig  # resolved: absolute paths, storage.path = the sweep's train/ folder
    parent_run_id: str
    data_context: dict[str, Any] = field(default_factory=dict)  # Ray Data settings to copy
    probe_at: tuple[int, ...] | None = None  # the scheduler's decision steps (decision_steps)
    # The driver's test-only hooks (HIP_TEST_*, pipeline/train/faults.py): trial processes
    # of an already running cluster do not inherit the driver's environment.
    test_env: dict[str, str] = field(default_factory=dict)

    def lean(self, cfg: TrainConfig) -> bool:
        """Does this stage run in the trial's own process (one worker, not elastic)?"""
        return runs_lean(self.sweep, cfg)

    @property
    def tune_checkpoints(self) -> bool:
        """Schedulers that restore trials from Tune's checkpoints (pause, exploit)."""
        s = self.sweep.scheduler
        return s.type in ("hyperband", "pbt") or (s.type == "asha" and s.asha_rule == "promote")


def trial_runs(uri: str, parent_run_id: str, trial_id: str, stage: str | None = None,
               *, include_superseded: bool = False) -> list:
    """Child runs of one trial (newest first)."""
    c = tracking.client(uri)
    parent = c.get_run(parent_run_id)
    runs = c.search_runs([parent.info.experiment_id],
                         T.query_trial(parent_run_id, trial_id, stage),
                         order_by=["attributes.start_time DESC"])
    if include_superseded:
        return list(runs)
    return [r for r in runs if not T.TrialRunTags.from_run(r).superseded]


def _supersede(uri: str, parent_run_id: str, trial_id: str, stage: Stage) -> None:
    """Runs of this trial stage that never finished (a killed driver, a retried trial) are
    closed as KILLED before the stage runs again, so each stage has one live run."""
    for run in trial_runs(uri, parent_run_id, trial_id, stage):
        if run.info.status != "FINISHED":
            tracking.set_tags(uri, run.info.run_id, T.to_superseded())
            if run.info.status == "RUNNING":
                tracking.end_run(uri, run.info.run_id, "KILLED")


def _finished(uri: str, parent_run_id: str, trial_id: str, stage: Stage):
    for run in trial_runs(uri, parent_run_id, trial_id, stage):
        if run.info.status == "FINISHED":
            return run
    return None


def _record_pruned(setup: TrialSetup, run_name: str, tags: dict[str, str],
                   values: dict[str, Any], reason: str) -> str:
    """A child run for a point that cannot run: params, the reason, status KILLED."""
    run_id = tracking.start_run(
        setup.uri, setup.experiment, run_name=run_name, params=values,
        parent_run_id=setup.parent_run_id, tags={**tags, **T.to_pruned(reason)},
        artifacts={"pruned.txt": reason + "\n"})
    tracking.end_run(setup.uri, run_id, "KILLED")
    return run_id


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: config = the trial's sampled values by dotted key."""
    global _trials_in_this_process
    # startup_s counts from the process start, or from here in a reused actor.
    started_at = process_started_at() if _trials_in_this_process == 0 else time.time()
    _trials_in_this_process += 1
    os.environ.update(setup.test_env)
    ctx = ray.data.DataContext.get_current()
    for key, value in setup.data_context.items():
        setattr(ctx, key, value)
    sweep, uri, parent = setup.sweep, setup.uri, setup.parent_run_id
    trial_id = tune.get_context().get_trial_id()
    values = {k: config[k] for k in sweep.space}
    run_name = f"{sweep.name}-{trial_id}"

    def tags(stage: Stage, scored: bool = False) -> dict[str, str]:
        return T.to_trial(sweep.name, trial_id, values, stage, scored=scored)

    def log(msg: str) -> None:
        print(f"[hip sweep {trial_id}] {msg}", flush=True)

    scored = sweep.scored_stage
    done = _finished(uri, parent, trial_id, scored)
    if done is not None:
        # Finished before the driver went down: give Tune its final metrics, train nothing.
        m = done.data.metrics
        log(f"already finished as MLflow run {done.info.run_id}; reporting its metrics")
        tune.report({**{k: m[k] for k in REPORTED if k in m},
                     "step": int(done.data.params.get("trainer.steps", 0))})
        return
    if any(T.TrialRunTags.from_run(r).pruned for r in trial_runs(uri, parent, trial_id)):
        log("already pruned")  # a resumed sweep re-runs it: keep the one record
        return
    reason = check_point(sweep, setup.base, values)
    if reason is not None:
        log(f"pruned: {reason}")
        _record_pruned(setup, run_name, tags(scored), values, reason)
        return
    init_from = None
    if sweep.stages == ["pretrain", "finetune"]:
        pre = _finished(uri, parent, trial_id, "pretrain")
        if pre is None:
            _supersede(uri, parent, trial_id, "pretrain")
            cfg = trial_config(setup.base, values, sweep=sweep, stage="pretrain")
            cfg.tracking.run_name = f"{run_name}-pretrain"
            how = InProcess(to_tune=False) if setup.lean(cfg) else None
            init_from = run_training(cfg, parent_run_id=parent, log=log, in_process=how,
                                     started_at=started_at,
                                     extra_tags=tags("pretrain")).run_id
        else:
            init_from = pre.info.run_id
    _supersede(uri, parent, trial_id, scored)
    try:
        cfg = trial_config(setup.base, values, sweep=sweep, stage=scored, init_from=init_from)
    except ConfigError as e:  # validated in check_point; only a changed base gets here
        raise JobError(str(e)) from None
    cfg.tracking.run_name = run_name if init_from is None else f"{run_name}-finetune"
    lean = setup.lean(cfg)
    require = None
    if lean and sweep.metric.startswith("cooled_") and setup.probe_at is not None:
        # Probe only where the scheduler reads the metric; only those reports reach Tune.
        cfg.trainer.eval_cooldown_at, require = list(setup.probe_at), sweep.metric
    result = run_training(
        cfg, parent_run_id=parent, log=log, started_at=started_at,
        extra_tags=tags(scored, scored=True),
        in_process=InProcess(attach_checkpoints=setup.tune_checkpoints,
                             require=require) if lean else None,
        callbacks=None if lean else [TrialReport(cfg.trainer.steps)])
    tracking.set_tags(uri, result.run_id, T.to_outcome("FINISHED"))
    # The last report, held back until the run is closed (TuneSession, callbacks.py).
    final = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    if lean and setup.tune_checkpoints and result.checkpoint:
        tune.report(final, checkpoint=tune.Checkpoint(result.checkpoint))
    else:
        tune.report(final)


__all__ = ["train_trial", "trial_runs", "TrialSetup"]
