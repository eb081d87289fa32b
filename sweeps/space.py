"""Search spaces: sweep `Dim`s -> Ray Tune domains, and checking points before Ray starts.

Tune's param_space is flat: {dotted job-config key: domain}; a trial's config is the same
keys with sampled values. `check_space` builds every enumerable point's job config and model
(on the meta device, through pipeline.train.driver.preflight), so a group count larger than the
sequence or a width the heads do not divide is found in seconds, without Ray.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.driver import JobError, preflight
from sweeps.config import Dim, SweepConfig, trial_config

MAX_CHECKED_POINTS = 256


def to_tune(space: dict[str, Dim]) -> dict[str, Any]:
    """{key: Dim} -> {key: tune domain}."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.kind == "grid":
            out[key] = tune.grid_search(list(d.grid))
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.choice))
        elif d.kind == "uniform":
            out[key] = tune.quniform(*d.uniform, d.q) if d.q else tune.uniform(*d.uniform)
        elif d.kind == "loguniform":
            lo, hi = d.loguniform
            out[key] = tune.qloguniform(lo, hi, d.q) if d.q else tune.loguniform(lo, hi)
        else:
            out[key] = tune.randint(*d.randint)
    return out


def candidate_values(d: Dim) -> list[Any]:
    """Values of a dimension worth checking: all of a grid/choice, the bounds otherwise
    (values between the bounds that do not fit are pruned when their trial starts)."""
    if d.kind in ("grid", "choice"):
        return list(d.values)
    low, high = d.values
    return [low, high - 1] if d.kind == "randint" else [low, high]


def points(space: dict[str, Dim], limit: int = MAX_CHECKED_POINTS) -> list[dict[str, Any]]:
    """The cross product of every dimension's candidate values (at most `limit`)."""
    keys = list(space)
    combos = itertools.product(*(candidate_values(space[k]) for k in keys))
    return [dict(zip(keys, c, strict=True)) for c in itertools.islice(combos, limit)]


def grid_size(space: dict[str, Dim]) -> int:
    n = 1
    for d in space.values():
        if d.kind == "grid":
            n *= len(d.grid)
    return n


@dataclass(frozen=True)
class Invalid:
    point: dict[str, Any]
    reason: str


def check_point(sweep: SweepConfig, base: TrainConfig, values: dict[str, Any]) -> str | None:
    """Why this point cannot run (config, data or model shapes), or None if it can."""
    for stage in sweep.stages:
        try:
            # init_from is only known after the pretrain stage; shapes match by construction
            # (both stages build the same backbone from the same overrides).
            preflight(trial_config(base, values, sweep=sweep, stage=stage))
        except (ConfigError, JobError) as e:
            where = f"{stage} stage: " if len(sweep.stages) == 2 and stage == "finetune" else ""
            return where + " ".join(str(e).split())
    return None


def check_space(sweep: SweepConfig, base: TrainConfig) -> list[Invalid]:
    """Every enumerable point that cannot run (empty list: all fit)."""
    out = []
    for values in points(sweep.space):
        reason = check_point(sweep, base, values)
        if reason is not None:
            out.append(Invalid(values, reason))
    return out


def format_point(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


__all__ = ["to_tune", "points", "check_point", "check_space", "Invalid", "grid_size",
           "candidate_values", "format_point", "MAX_CHECKED_POINTS"]
