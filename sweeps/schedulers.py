"""`scheduler.type` -> a Ray Tune trial scheduler, and the parameters the parent run records.

    asha       rungs at grace_period x reduction_factor^k steps, asynchronous. asha_rule
               `promote` (the paper's; `auto` picks it when trials can pause): Halving
               (sweeps/halving.py), a trial waits PAUSED at a rung until it ranks in the
               best n // rf of the n results there, so none goes on before rf results
               exist. `stop` (Ray's ASHAScheduler): a trial reaching a rung goes on unless
               it ranks below the best 1/rf of the results recorded there so far (the
               first arrivals always go on); for trials that cannot pause.
    hyperband  Halving, synchronous: a bracket's rung is cut only once every trial of the
               bracket has reached it; trials wait PAUSED meanwhile and resume from their
               Tune checkpoint (lean trials: pipeline/train/inprocess.py). Rungs as ASHA's
               (bracket 0), `brackets` brackets with rungs rf times later each.
    pbt        PopulationBasedTraining, time_attr "step": every perturbation_interval steps
               the bottom quantile_fraction of trials load a top trial's checkpoint and
               continue with its config, perturbed (x0.8 / x1.2, or resampled from the
               space with resample_probability) on the `mutate` keys.
    none       FIFOScheduler: every trial runs to trainer.steps.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    PopulationBasedTraining,
    TrialScheduler,
)

from pipeline import storage
from sweeps.halving import Halving, Slots, rungs
from sweeps.plan import SweepPlan
from sweeps.space import grid_size, to_tune

HALVING_STATE = "halving.json"  # in the sweep folder: Halving's decisions, for --resume


def _pbt_interval(plan: SweepPlan) -> int:
    t = plan.scored_config().trainer
    return plan.sweep.scheduler.perturbation_interval or 2 * t.eval_every


def total_trials(plan: SweepPlan) -> int:
    return plan.sweep.num_samples * grid_size(plan.sweep.space)


def make_scheduler(plan: SweepPlan, slots: Slots | None = None) -> TrialScheduler:
    """slots: the running-trial limit Halving shares with its PauseAwareGenerator."""
    slots = slots or Slots(1)
    s, t = plan.sweep.scheduler, plan.scored_config().trainer
    if s.type == "asha" and s.asha_rule == "stop":
        return ASHAScheduler(time_attr="step", max_t=t.steps, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=1)
    if s.type in ("asha", "hyperband"):  # check_against_base resolved asha_rule auto
        return Halving(metric=plan.sweep.metric, mode=plan.sweep.mode, max_t=t.steps,
                       grace=s.grace_period, rf=s.reduction_factor, total=total_trials(plan),
                       slots=slots, brackets=s.brackets if s.type == "hyperband" else 1,
                       synchronous=s.type == "hyperband",
                       state_uri=storage.join(plan.sweep_dir, HALVING_STATE))
    if s.type == "pbt":
        space = to_tune({k: plan.sweep.space[k] for k in plan.sweep.pbt_mutations})
        mutations = {k: (v["grid_search"] if isinstance(v, dict) and "grid_search" in v else v)
                     for k, v in space.items()}
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=_pbt_interval(plan),
            hyperparam_mutations=mutations, quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability,
            custom_explore_fn=_Clip({k: plan.sweep.space[k] for k in mutations}))
    return FIFOScheduler()


def decision_steps(plan: SweepPlan) -> tuple[int, ...] | None:
    """The evaluation steps at which the scheduler reads a trial's metric: ASHA's and
    HyperBand's rungs, PBT's perturbation points, each moved to the first evaluation at or
    after it (both read the first report there); None for `none` (every report). A sweep
    ranking by a cooled_* metric probes only these (trainer.eval_cooldown_at)."""
    s, t = plan.sweep.scheduler, plan.scored_config().trainer
    if s.type in ("asha", "hyperband"):  # the last step is always probed and reported
        brackets = s.brackets if s.type == "hyperband" else 1
        points = {r for b in rungs(s.grace_period, s.reduction_factor, t.steps, brackets)
                  for r in b}
    elif s.type == "pbt":
        points = set(range(_pbt_interval(plan), t.steps, _pbt_interval(plan)))
    else:
        return None
    e = t.eval_every
    return tuple(sorted({min(t.steps, -(-p // e) * e) for p in points}))


class _Clip:
    """PBT's explore step scales values by 0.8 / 1.2 with no regard for the space: a mask
    ratio of 0.9 would become 1.08, a config that cannot run. Keep every perturbed value
    inside its dimension's [low, high]."""

    def __init__(self, dims: dict[str, Any]):
        self.bounds = {k: (d.values[0], d.values[1] - (d.kind == "randint"))
                       for k, d in dims.items() if d.kind in ("uniform", "loguniform", "randint")}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (low, high) in self.bounds.items():
            if key in config:
                config[key] = type(config[key])(min(max(config[key], low), high))
        return config


def warmup_warning(plan: SweepPlan) -> str | None:
    """A warning when the first rung comes before the learning-rate warmup ends: trials are
    then ranked while their rates are still ramping (measured: at 50 of 100 warmup steps the
    highest learning rates of a sweep rank among the worst and end best; docs/benchmarks.md,
    "Sweeps")."""
    s, o = plan.sweep.scheduler, plan.scored_config().optim
    if s.type not in ("asha", "hyperband") or s.grace_period >= o.warmup_steps:
        return None
    return (f"[hip] warning: scheduler.grace_period ({s.grace_period}) is below "
            f"optim.warmup_steps ({o.warmup_steps}): the first rung ranks learning rates "
            "still warming up; a grace period of at least the warmup ranks them settled")


def scheduler_params(plan: SweepPlan) -> dict[str, Any]:
    """What the sweep's MLflow parent run records about its scheduler."""
    s, t = plan.sweep.scheduler, plan.scored_config().trainer
    if s.type == "asha":
        return {"scheduler.asha_rule": s.asha_rule, "scheduler.grace_period": s.grace_period,
                "scheduler.reduction_factor": s.reduction_factor,
                "scheduler.max_t": t.steps, "scheduler.time_attr": "step"}
    if s.type == "hyperband":
        return {"scheduler.grace_period": s.grace_period,
                "scheduler.reduction_factor": s.reduction_factor,
                "scheduler.brackets": s.brackets, "scheduler.max_t": t.steps,
                "scheduler.time_attr": "step"}
    if s.type == "pbt":
        return {"scheduler.perturbation_interval": _pbt_interval(plan),
                "scheduler.quantile_fraction": s.quantile_fraction,
                "scheduler.resample_probability": s.resample_probability,
                "scheduler.mutate": ",".join(plan.sweep.pbt_mutations),
                "scheduler.time_attr": "step"}
    return {}


__all__ = ["HALVING_STATE", "decision_steps", "make_scheduler", "scheduler_params",
           "total_trials", "warmup_warning"]
