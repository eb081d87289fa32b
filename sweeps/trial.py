"""One Tune trial: build the trial's job config and run it with pipeline.train.driver.run_training.

`train_trial(config, setup)` is the Tune function trainable (the Train V2 + Tune pattern: a
driver function that builds and fits one TorchTrainer per trial). `config` holds the sampled
values by dotted key; `setup` (through tune.with_parameters) the sweep, the resolved base
config and the MLflow parent run. Metrics reach Tune through TuneReportCallback on the
Train run; the Train run name derives from the trial id, so a restarted trial resumes from
its last Train checkpoint.

MLflow: each trial stage is a child run of the sweep's parent run, tagged
hip.trial_id / hip.stage; the run whose metric Tune sees is tagged hip.sweep_scored=true.
A rerun of a trial whose scored run already FINISHED reports that run's final metrics
instead of training again (a driver killed between a trial's end and Tune's next state
save must not cost a rerun).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import tracking
from pipeline.config import ConfigError
from pipeline.constants import MLFLOW_TAG_LIMIT
from sweeps.config import SweepConfig, trial_config

ROLE_TAG = "hip.role"  # "sweep" on the parent run, "trial" on child runs
TRIAL_TAG = "hip.trial_id"
STAGE_TAG = "hip.stage"  # pretrain | finetune
SCORED_TAG = "hip.sweep_scored"  # "true" on the run whose metric Tune sees
STATUS_TAG = "hip.sweep_status"  # FINISHED | EARLY_STOPPED | PRUNED | FAILED | INTERRUPTED
PARAMS_TAG = "hip.sweep_params"  # JSON of the trial's sampled values
SUPERSEDED_TAG = "hip.superseded"  # a run left behind by a restarted trial
REPORTED = ("loss", "val_loss", "val_accuracy", "lr", "step")


def stages(sweep: SweepConfig) -> list[str]:
    if sweep.kind == "pretrain-then-finetune":
        return ["pretrain", "finetune"]
    return [sweep.kind]


def trial_runs(uri: str, parent_run_id: str, trial_id: str, stage: str | None = None,
               *, include_superseded: bool = False) -> list:
    """Child runs of one trial (newest first)."""
    c = tracking.client(uri)
    parent = c.get_run(parent_run_id)
    query = (f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND "
             f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    if stage:
        query += f" AND tags.`{STAGE_TAG}` = '{stage}'"
    runs = c.search_runs([parent.info.experiment_id], query,
                         order_by=["attributes.start_time DESC"])
    if include_superseded:
        return list(runs)
    return [r for r in runs if r.data.tags.get(SUPERSEDED_TAG) != "true"]


def _supersede(uri: str, parent_run_id: str, trial_id: str, stage: str) -> None:
    """Runs of this trial stage that never finished (a killed driver, a retried trial) are
    closed as KILLED before the stage runs again, so each stage has one live run."""
    for run in trial_runs(uri, parent_run_id, trial_id, stage):
        if run.info.status != "FINISHED":
            tracking.set_tags(uri, run.info.run_id, {SUPERSEDED_TAG: "true"})
            if run.info.status == "RUNNING":
                tracking.end_run(uri, run.info.run_id, "KILLED")


def _finished(uri: str, parent_run_id: str, trial_id: str, stage: str):
    for run in trial_runs(uri, parent_run_id, trial_id, stage):
        if run.info.status == "FINISHED":
            return run
    return None


def _record_pruned(uri: str, experiment: str, parent_run_id: str, run_name: str,
                   tags: dict[str, str], values: dict[str, Any], reason: str) -> str:
    """A child run for a point that cannot run: params, the reason, status KILLED."""
    run_id = tracking.start_run(
        uri, experiment, run_name=run_name, params=values, parent_run_id=parent_run_id,
        tags={**tags, "hip.pruned": "true", "hip.prune_reason": reason[:MLFLOW_TAG_LIMIT],
              STATUS_TAG: "PRUNED"},
        artifacts={"pruned.txt": reason + "\n"})
    tracking.end_run(uri, run_id, "KILLED")
    return run_id


def train_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune trainable. setup: {"sweep": dict, "base": dict, "parent_run_id": str,
    "tracking_uri": str, "experiment": str}."""
    import ray.data
    from ray import tune

    from pipeline.train.driver import JobError, run_training
    from sweeps.callbacks import TrialReport
    from sweeps.space import check_point

    ctx = ray.data.DataContext.get_current()
    for key, value in setup.get("data_context", {}).items():
        setattr(ctx, key, value)
    sweep = SweepConfig.model_validate(setup["sweep"])
    uri, experiment, parent = setup["tracking_uri"], setup["experiment"], setup["parent_run_id"]
    trial_id = tune.get_context().get_trial_id()
    values = {k: config[k] for k in sweep.space}
    run_name = f"{sweep.name}-{trial_id}"
    tags = {ROLE_TAG: "trial", "hip.sweep": sweep.name, TRIAL_TAG: trial_id,
            PARAMS_TAG: json.dumps(values, default=str)[:MLFLOW_TAG_LIMIT]}

    def log(msg: str) -> None:
        print(f"[hip sweep {trial_id}] {msg}", flush=True)

    names = stages(sweep)
    done = _finished(uri, parent, trial_id, names[-1])
    if done is not None:
        # Finished before the driver went down: give Tune its final metrics, train nothing.
        m = done.data.metrics
        log(f"already finished as MLflow run {done.info.run_id}; reporting its metrics")
        tune.report({**{k: m[k] for k in REPORTED if k in m},
                     "step": int(done.data.params.get("trainer.steps", 0))})
        return
    if any(r.data.tags.get("hip.pruned") == "true"
           for r in trial_runs(uri, parent, trial_id)):
        log("already pruned")  # a resumed sweep re-runs it: keep the one record
        return
    reason = check_point(sweep, setup["base"], values)
    if reason is not None:
        log(f"pruned: {reason}")
        _record_pruned(uri, experiment, parent, run_name, {**tags, STAGE_TAG: names[-1]},
                       values, reason)
        return
    init_from = None
    if sweep.kind == "pretrain-then-finetune":
        pre = _finished(uri, parent, trial_id, "pretrain")
        if pre is None:
            _supersede(uri, parent, trial_id, "pretrain")
            cfg = trial_config(setup["base"], values, sweep=sweep)
            cfg.tracking.run_name = f"{run_name}-pretrain"
            pre_id = run_training(cfg, parent_run_id=parent, log=log,
                                  extra_tags={**tags, STAGE_TAG: "pretrain"}).run_id
        else:
            pre_id = pre.info.run_id
        init_from = pre_id
    stage = names[-1]
    _supersede(uri, parent, trial_id, stage)
    try:
        cfg = trial_config(setup["base"], values, sweep=sweep,
                           stage="finetune" if init_from else "first", init_from=init_from)
    except ConfigError as e:  # validated in check_point; only a changed base gets here
        raise JobError(str(e)) from None
    cfg.tracking.run_name = run_name if init_from is None else f"{run_name}-finetune"
    result = run_training(cfg, parent_run_id=parent, log=log,
                          callbacks=[TrialReport(cfg.trainer.steps)],
                          extra_tags={**tags, STAGE_TAG: stage, SCORED_TAG: "true"})
    tracking.set_tags(uri, result.run_id, {STATUS_TAG: "FINISHED"})
    # The last report, held back by TrialReport until the run is closed (see callbacks.py).
    tune.report({k: v for k, v in result.metrics.items() if isinstance(v, int | float)})


__all__ = ["train_trial", "trial_runs", "stages", "ROLE_TAG", "TRIAL_TAG", "STAGE_TAG",
           "SCORED_TAG", "STATUS_TAG", "PARAMS_TAG", "SUPERSEDED_TAG"]
