"""`hip sweep`: a Ray Tune Tuner over sweeps.trial.train_trial, for a plan (sweeps/plan.py).

run_sweep    opens (or, with resume, reopens) the MLflow parent run, runs the Tuner with ASHA
             (or no scheduler), max_concurrent_trials from the cluster's resources and
             FailureConfig at both levels, then closes every trial's child run with its
             outcome (ASHA stops a trial by killing its actor, so nobody else would) and
             records the best trial and its config on the parent run.

Storage: <storage.path>/<sweep name>/ holds sweep.json (the parent run id), tune/ (Tune's
experiment: restored by --resume) and train/<run name>/ (one Ray Train run per trial stage).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray import tune
from ray.tune.search import BasicVariantGenerator

from pipeline import locks, storage, tracking
from pipeline.config import config_to_dict
from pipeline.runtime import init_ray, test_env_vars
from sweeps import tags as T
from sweeps.config import SweepConfig, runs_lean
from sweeps.halving import Halving, PauseAwareGenerator, Slots
from sweeps.outcomes import TrialOutcome, close_trials, pick_best, record_summary
from sweeps.plan import SweepPlan
from sweeps.schedulers import (
    HALVING_STATE,
    decision_steps,
    make_scheduler,
    scheduler_params,
    warmup_warning,
)
from sweeps.space import format_point, grid_size, to_tune
from sweeps.trial import TrialSetup, train_trial

STATE_FILE = "sweep.json"
LOCK = ".hip-sweep.lock"


class SweepError(ValueError):
    """A sweep that cannot start or resume: one line, exit code 2."""


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_dir: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    interrupted: bool
    elapsed_s: float

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def all_lean(plan: SweepPlan) -> bool:
    """Does every stage of a trial run in the trial's own process (sweeps/trial.py)?"""
    return all(runs_lean(plan.sweep, plan.stage_config(s)) for s in plan.sweep.stages)


def trial_resources(plan: SweepPlan) -> dict[str, float]:
    """What the Tune trial actor itself holds. A lean trial trains in it: one worker's CPUs
    and resources.gpus_per_trial (fractions share a GPU); otherwise it only drives a
    TorchTrainer (resources.driver_cpu) whose workers hold their own."""
    r = plan.sweep.resources
    if not all_lean(plan):
        return {"CPU": r.driver_cpu}
    t = plan.scored_config().trainer
    gpu = r.gpus_per_trial if r.gpus_per_trial is not None else \
        t.resources_per_worker.get("GPU", 1.0 if t.use_gpu else 0.0)
    out = {"CPU": t.resources_per_worker.get("CPU", 1.0)}
    return {**out, "GPU": gpu} if gpu else out


def _trial_need(plan: SweepPlan) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds: a lean trial its own; otherwise its driver's CPU
    fraction plus its Train workers'."""
    if all_lean(plan):
        own = trial_resources(plan)
        return own["CPU"], own.get("GPU", 0.0)
    need_cpu = need_gpu = 0.0
    # Stages run one after the other: the larger one counts.
    for cfg in (plan.stage_config(s) for s in plan.sweep.stages):
        t = cfg.trainer
        workers = max(1, t.max_workers)  # 0 workers: the loop runs in the trial, one CPU
        cpu = t.resources_per_worker.get("CPU", 1.0)
        gpu = t.resources_per_worker.get("GPU", 1.0 if t.use_gpu else 0.0)
        need_cpu = max(need_cpu, plan.sweep.resources.driver_cpu + workers * cpu)
        need_gpu = max(need_gpu, workers * gpu)
    return need_cpu, need_gpu


def max_concurrent_trials(plan: SweepPlan, cluster: dict[str, float]) -> int:
    """Trials that fit at once: (CPUs - reserve) // per-trial CPUs, and GPUs // per-trial GPUs."""
    r = plan.sweep.resources
    if r.max_concurrent:
        return r.max_concurrent
    need_cpu, need_gpu = _trial_need(plan)
    n = math.floor((cluster.get("CPU", 0.0) - r.reserve_cpu) / need_cpu + 1e-9)
    if need_gpu:
        n = min(n, math.floor(cluster.get("GPU", 0.0) / need_gpu + 1e-9))
    return max(1, n)


def ingest_warning(plan: SweepPlan, cluster: dict[str, float], n: int) -> str | None:
    """A warning when `n` trials at once leave less than one CPU for Ray Data's read tasks
    (each asks for one): the trials then wait for their first batch forever (measured: three
    1.25-CPU trials on 4 CPUs hung with every trial RUNNING). Only a warning: an autoscaling
    cluster may add the CPUs later."""
    left = cluster.get("CPU", 0.0) - n * _trial_need(plan)[0]
    if left >= 1.0 - 1e-9:
        return None
    fix = ("lower resources.max_concurrent or leave it unset" if plan.sweep.resources.max_concurrent
           else "give the cluster more CPUs or the trials fewer (trainer.resources_per_worker)")
    return (f"[hip] warning: {n} trials at once hold {cluster.get('CPU', 0.0) - left:g} of the "
            f"cluster's {cluster.get('CPU', 0.0):g} CPUs, leaving {max(left, 0.0):g} for Ray "
            f"Data's read tasks (1 CPU each): trials will wait for data until the cluster grows; "
            f"{fix}")


def _read_state(plan: SweepPlan) -> dict[str, Any] | None:
    uri = storage.join(plan.sweep_dir, STATE_FILE)
    return storage.read_json(uri) if storage.exists(uri) else None


def _space_json(sweep: SweepConfig) -> dict[str, Any]:
    return {k: d.model_dump(mode="json", exclude_none=True) for k, d in sweep.space.items()}


def _definition(sweep: SweepConfig) -> dict[str, Any]:
    """What a resumed sweep must keep (the trials already run were scored by it)."""
    return {"kind": sweep.kind, "metric": sweep.metric, "mode": sweep.mode,
            "overrides": sweep.overrides, "finetune_overrides": sweep.finetune_overrides}


def _check_same_sweep(plan: SweepPlan, state: dict[str, Any]) -> None:
    """--resume continues the sweep that was started: same space, same definition, same
    resolved base job config (data, steps, model, ...). Else SweepError naming the first
    differences, since the finished trials would be compared with trials of another job."""
    s = plan.sweep
    now = {"space": _space_json(s), "definition": _definition(s),
           "base": config_to_dict(plan.base)}
    changed = []
    for part, current in now.items():
        if part not in state:  # a sweep.json from before this part was recorded
            continue
        old, new = tracking.flatten(state[part]), tracking.flatten(current)
        changed += [f"{part}.{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        raise SweepError(f"sweep {s.name} at {plan.sweep_dir} was started with another "
                         f"configuration: {'; '.join(changed[:3])}{more}; resume needs the "
                         f"same one, or name=OTHER starts another sweep")


def _open_parent(plan: SweepPlan, max_concurrent: int) -> str:
    s = plan.sweep
    params = {"sweep.name": s.name, "sweep.kind": s.kind, "sweep.base": s.base,
              "sweep.metric": s.metric, "sweep.mode": s.mode, "sweep.num_samples": s.num_samples,
              "sweep.grid_points": grid_size(s.space), "sweep.invalid": s.invalid,
              "sweep.max_failures": s.max_failures, "scheduler.type": s.scheduler.type,
              "searcher.type": s.searcher.type, "searcher.seed": s.searcher.seed,
              "resources.driver_cpu": s.resources.driver_cpu,
              "resources.max_concurrent_trials": max_concurrent,
              **{f"space.{k}": d.describe() for k, d in s.space.items()}}
    params.update(scheduler_params(plan))
    params["resources.lean"] = all_lean(plan)
    tags = T.to_parent(s.name, s.kind, s.metric, s.mode, list(s.space), plan.sweep_dir,
                       [f"{format_point(i.point)}: {i.reason}" for i in plan.invalid])
    return tracking.start_run(
        plan.uri, plan.experiment, run_name=f"sweep-{s.name}", params=params,
        tags={**tracking.source_tags("hip sweep"),
              "mlflow.source.git.commit": tracking.git_commit(), **tags},
        artifacts={"sweep/sweep.yaml": tracking.config_yaml(s.model_dump(mode="json")),
                   "sweep/base.yaml": tracking.config_yaml(config_to_dict(plan.base))})


def _data_context() -> dict[str, Any]:
    """Ray Data settings of this process that trials should share (a trial is a fresh actor
    with a default DataContext). Progress bars of concurrent trials interleave: off."""

    ctx = ray.data.DataContext.get_current()
    out: dict[str, Any] = {"enable_progress_bars": False}
    if hasattr(ctx, "use_datasource_v2"):
        out["use_datasource_v2"] = ctx.use_datasource_v2
    return out


def _trial_dirname(trial) -> str:
    return trial.trial_id  # short and stable; Tune's default embeds every param


def _tuner(plan: SweepPlan, trainable, max_concurrent: int, resume: bool, log):
    where = storage.storage_kwargs(plan.sweep_dir)
    tune_path = plan.tune_dir if storage.is_local(plan.tune_dir) else \
        storage.join(where["storage_path"], "tune")
    fs = where.get("storage_filesystem")
    if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        log(f"[hip] resuming Tune experiment {plan.tune_dir}")
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=fs)
    s = plan.sweep
    stale = storage.join(plan.sweep_dir, HALVING_STATE)  # from a run Tune cannot restore
    if storage.exists(stale):
        fs, path = storage.resolve(stale)
        fs.rm(path)
    slots = Slots(max_concurrent)
    scheduler = make_scheduler(plan, slots)
    if isinstance(scheduler, Halving):
        # Trials waiting at a rung must not hold a concurrency slot (halving.py).
        search, limit = PauseAwareGenerator(slots, random_state=s.searcher.seed), None
    elif s.searcher.type == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=s.searcher.seed)
        limit = max_concurrent  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:
        # Tune ignores max_concurrent_trials for a SearchAlgorithm such as this one (it
        # warns and runs every trial at once): the generator limits concurrency itself.
        search = BasicVariantGenerator(random_state=s.searcher.seed,
                                       max_concurrent=max_concurrent)
        limit = None
    return tune.Tuner(
        trainable, param_space=to_tune(s.space),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, scheduler=scheduler, search_alg=search,
            num_samples=s.num_samples, max_concurrent_trials=limit,
            # A lean trial's actor (torch, the pipeline and MLflow imported) takes the next
            # trial: a stopped trial's training thread exits at its next report.
            reuse_actors=all_lean(plan), trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name="tune", **where, verbose=1,
            # Lean trials that pause or clone (hyperband, asha promote, pbt) give Tune a
            # checkpoint at every report; Tune keeps them all: with num_to_keep, Ray 2.60
            # registers a checkpoint again when PBT or a pause saves the trial, then
            # deletes it twice, and PBT's clone source is gone.
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # A trial's last report ends it, whatever the scheduler: PBT would otherwise
            # "exploit" a finished trial and run it again.
            stop={"step": plan.scored_config().trainer.steps}))


def run_sweep(plan: SweepPlan, *, resume: bool = False, log=print) -> SweepResult:
    """Run the sweep on the current or a new local Ray cluster. resume=True continues the
    sweep of the same name under storage.path (or starts it if there is none); without it an
    existing sweep of that name is an error (SweepError), never overwritten. One `hip sweep`
    per sweep folder at a time (LOCK, pipeline/locks.py): a second one is a SweepError."""
    if storage.is_local(plan.sweep_dir):
        Path(plan.sweep_dir).mkdir(parents=True, exist_ok=True)
    try:
        with locks.locked(plan.sweep_dir, LOCK, uuid.uuid4().hex[:8],
                          warn=lambda m: log(f"[hip] warning: {m}"), activity="used"):
            return _run_locked(plan, resume, log)
    except locks.LockHeld as e:
        raise SweepError(f"sweep {plan.sweep.name}: {e}") from None


def _run_locked(plan: SweepPlan, resume: bool, log) -> SweepResult:
    state = _read_state(plan)
    s = plan.sweep
    if state and not resume:
        raise SweepError(f"sweep {s.name} already exists at {plan.sweep_dir} (MLflow run "
                         f"{state['parent_run_id']}); pass --resume to continue it, or "
                         f"name=OTHER to start another")
    if resume and state is None:  # as Tuner.can_restore: resume when there is something
        log(f"[hip] nothing to resume at {plan.sweep_dir}: starting sweep {s.name}")
    if state:
        _check_same_sweep(plan, state)

    init_ray()
    cluster = ray.cluster_resources()
    max_concurrent = max_concurrent_trials(plan, cluster)
    for warning in (ingest_warning(plan, cluster, max_concurrent), warmup_warning(plan)):
        if warning is not None:
            log(warning)
    if state:
        parent = state["parent_run_id"]
        tracking.client(plan.uri).update_run(parent, status="RUNNING")
        tracking.set_tags(plan.uri, parent, T.to_resumed(time.strftime("%Y-%m-%dT%H:%M:%S")))
    else:
        parent = _open_parent(plan, max_concurrent)
        storage.write_json(storage.join(plan.sweep_dir, STATE_FILE), {
            "parent_run_id": parent, "tracking_uri": plan.uri, "experiment": plan.experiment,
            "sweep_file": plan.sweep_file, "space": _space_json(s),
            "definition": _definition(s), "base": config_to_dict(plan.base),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log(f"[hip] sweep {s.name}: MLflow parent run {parent} in experiment {plan.experiment!r} "
        f"at {plan.uri}; up to {max_concurrent} trials at once; Tune experiment "
        f"{plan.tune_dir}")
    setup = TrialSetup(s, plan.base, parent, _data_context(), decision_steps(plan),
                       test_env_vars())
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    trial_resources(plan))
    start = time.time()
    tuner = _tuner(plan, trainable, max_concurrent, resume, log)
    try:
        grid = tuner.fit()
    except BaseException:
        tracking.set_tags(plan.uri, parent, T.to_interrupted(True))
        tracking.end_run(plan.uri, parent, "KILLED")
        raise
    elapsed = time.time() - start
    trials = close_trials(plan, parent, grid)
    interrupted = any(t.status == "INTERRUPTED" for t in trials)
    best = pick_best(trials, s.mode)
    record_summary(plan, parent, trials, best, interrupted, elapsed)
    return SweepResult(parent, plan.tune_dir, trials, best, interrupted, elapsed)


__all__ = ["run_sweep", "SweepResult", "SweepError",
           "max_concurrent_trials", "ingest_warning", "STATE_FILE", "TrialOutcome", "pick_best"]
