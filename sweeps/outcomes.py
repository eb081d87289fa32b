"""After tuner.fit(): every trial's outcome, its child runs closed, the sweep's summary.

ASHA stops a trial by killing its actor, so nothing inside the trial closes its MLflow run:
`close_trials` reads each trial's final state from the ResultGrid and gives the child runs
their outcome (FINISHED, EARLY_STOPPED with the step, PRUNED, FAILED with the error line,
INTERRUPTED). `record_summary` puts counts, the best trial and its config on the parent run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial

from pipeline import tracking
from pipeline.config import config_to_dict
from sweeps import tags as T
from sweeps.config import trial_config
from sweeps.plan import SweepPlan
from sweeps.space import format_point
from sweeps.trial import trial_runs


@dataclass
class TrialOutcome:
    trial_id: str
    status: str  # FINISHED | EARLY_STOPPED | PRUNED | FAILED | INTERRUPTED
    values: dict[str, Any]
    metric: float | None
    step: int | None
    run_id: str | None
    error: str | None = None


def tune_trials(grid) -> list:
    """The Tune Trial objects behind a ResultGrid (status, config and last result of every
    trial). ResultGrid's public Results have no status, and no config for a trial that never
    reported (a pruned one), so this reaches into the grid's ExperimentAnalysis: the one
    private attribute the sweeps use (checked against Ray 2.60)."""
    return list(grid._experiment_analysis.trials)


def close_trials(plan: SweepPlan, parent: str, grid) -> list[TrialOutcome]:
    """Give every trial's child runs their final status (ASHA-stopped trials are still
    RUNNING in MLflow: Tune killed the actor that would have closed them)."""

    s = plan.sweep
    target = plan.scored_config().trainer.steps
    out = []
    for trial in tune_trials(grid):
        last = trial.last_result or {}
        runs = trial_runs(plan.uri, parent, trial.trial_id, s.scored_stage)
        run = runs[0] if runs else None
        run_tags = T.TrialRunTags.from_run(run) if run is not None else None
        values = {k: trial.config.get(k) for k in s.space}
        step = last.get("step")
        error = None
        if run_tags is not None and run_tags.pruned:
            status = "PRUNED"
            error = run_tags.prune_reason
        elif trial.status == Trial.ERROR:
            status = "FAILED"
            error = _error_line(trial)
        elif trial.status == Trial.TERMINATED:
            status = "FINISHED" if step is not None and step >= target else "EARLY_STOPPED"
        else:
            status = "INTERRUPTED"
        for r in trial_runs(plan.uri, parent, trial.trial_id):
            if status == "PRUNED" or (r.info.run_id != (run and run.info.run_id)
                                      and r.info.status != "RUNNING"):
                continue  # a pruned record, or a finished earlier stage: already final
            tracking.set_tags(plan.uri, r.info.run_id, T.to_outcome(status, step=step,
                                                                    error=error))
            # A stopped trial's run is RUNNING (actor killed) or FAILED (its trainer saw the
            # trial's queue vanish first): either way it was stopped, so KILLED.
            final = "FAILED" if status == "FAILED" else "KILLED"
            if r.info.status == "RUNNING" or (r.info.status == "FAILED" and final == "KILLED"):
                end = last.get("timestamp")  # when Tune stopped it, not now
                tracking.client(plan.uri).set_terminated(
                    r.info.run_id, final, end_time=int(end * 1000) if end else None)
        metric = last.get(s.metric) if status in ("FINISHED", "EARLY_STOPPED") else None
        out.append(TrialOutcome(trial.trial_id, status, values,
                                float(metric) if metric is not None else None, step,
                                run.info.run_id if run else None, error))
    return out


def _error_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial errored (see the Tune experiment folder)"


def pick_best(trials: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    """Best last-reported metric over the trials that ran (finished or stopped early)."""
    scored = [t for t in trials if t.metric is not None and math.isfinite(t.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)


def record_summary(plan: SweepPlan, parent: str, trials: list[TrialOutcome],
                    best: TrialOutcome | None, interrupted: bool, elapsed: float) -> None:
    s = plan.sweep
    counts = {st: sum(t.status == st for t in trials) for st in T.STATUSES}
    tracking.log_metrics(plan.uri, parent, {
        "trials_total": len(trials), **{f"trials_{k.lower()}": v for k, v in counts.items()},
        "sweep_wall_s": elapsed}, step=0)
    summary = [{"trial_id": t.trial_id, "status": t.status, "metric": t.metric, "step": t.step,
                "run_id": t.run_id, "values": t.values, "error": t.error} for t in trials]
    tracking.log_bytes(plan.uri, parent, "sweep/trials.json",
                       json.dumps(summary, indent=2, default=str))
    if best is not None:
        tracking.log_metrics(plan.uri, parent, {f"best_{s.metric}": best.metric}, step=0)
        tracking.set_tags(plan.uri, parent, T.to_best(best.trial_id, best.run_id, best.values))
        header = (f"# best trial {best.trial_id} of sweep {s.name}: {s.metric} = "
                  f"{best.metric:.6g}\n# {format_point(best.values)}\n")
        cfg = trial_config(plan.base, best.values, sweep=s, stage=s.stages[0])
        cfg.tracking.run_name = None
        tracking.log_bytes(plan.uri, parent, "best/config.yaml",
                           header + tracking.config_yaml(config_to_dict(cfg)))
        if len(s.stages) == 2:  # the finetune stage, from the best trial's pretrained run
            pre = trial_runs(plan.uri, parent, best.trial_id, "pretrain")
            ft = trial_config(plan.base, best.values, sweep=s, stage="finetune",
                              init_from=pre[0].info.run_id if pre else None)
            ft.tracking.run_name = None
            tracking.log_bytes(plan.uri, parent, "best/finetune.yaml",
                               header + tracking.config_yaml(config_to_dict(ft)))
    tracking.set_tags(plan.uri, parent, T.to_interrupted(interrupted))
    tracking.end_run(plan.uri, parent, "KILLED" if interrupted else "FINISHED")


__all__ = ["TrialOutcome", "close_trials", "pick_best", "record_summary", "tune_trials"]
