"""Before a run starts: does its run name already hold checkpoints, and may it resume them?

A run resumes from the checkpoints under storage.path/<run name>/ (a rerun after a crash, a
preempted node, a restarted sweep trial). That is only right for the same job: the newest
checkpoint's meta.json (pipeline/train/checkpoints.py) must name the same dataset (manifest
hash) and the same task and model config. Anything else is refused with one line naming what
differs, before Ray starts; `--restart` (or another tracking.run_name) starts over. A run whose
newest checkpoint already reached trainer.steps is complete: nothing is trained again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.config import config_to_dict
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig


class ResumeMismatch(ValueError):
    """The run name's checkpoints belong to another job: one line, exit code 2."""


@dataclass(frozen=True)
class Previous:
    folder: str  # the newest checkpoint folder
    step: int
    run_id: str | None  # the MLflow run that wrote it
    metrics: dict[str, Any]  # what that run reported last


def run_dir(cfg: TrainConfig, run_name: str) -> str:
    return storage.join(cfg.storage.path, run_name)


def previous(cfg: TrainConfig, run_name: str) -> Previous | None:
    """The newest checkpoint with a meta.json under the run's folder (None: a fresh run, or
    only checkpoints from before meta.json existed, which resume unchecked)."""
    for folder in checkpoints.step_folders(run_dir(cfg, run_name)):
        meta = checkpoints.read_meta(folder)
        if meta is not None:
            return Previous(folder, int(meta["step"]), meta.get("run_id"),
                            dict(meta.get("metrics") or {}))
    return None


def check(cfg: TrainConfig, manifest_hash: str, run_name: str) -> Previous | None:
    """The previous checkpoint this run would resume, after checking it is the same job."""
    prev = previous(cfg, run_name)
    if prev is None:
        return None
    meta = checkpoints.read_meta(prev.folder) or {}
    where = f"run {run_name!r} ({run_dir(cfg, run_name)}, step {prev.step})"
    hint = "pass --restart to train it from step 0, or set another tracking.run_name"
    if meta.get("manifest_hash") not in (None, manifest_hash):
        raise ResumeMismatch(f"{where} was trained on another dataset (manifest hash "
                             f"{meta['manifest_hash']}, {cfg.data.path} has {manifest_hash}); "
                             f"{hint}")
    if meta.get("task") not in (None, cfg.task):
        raise ResumeMismatch(f"{where} was task {meta['task']!r}, this job is {cfg.task!r}; "
                             f"{hint}")
    now = config_to_dict(cfg)["model"]
    if meta.get("model") is not None and meta["model"] != now:
        diff = _diff(meta["model"], now, "model")
        raise ResumeMismatch(f"{where} was trained with another model config ({diff}); {hint}")
    return prev


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str) -> str:
    """`model.preset: 'a' -> 'b'; ...` for the keys whose values differ."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            parts.append(f"{prefix}.{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return "; ".join(parts) or "unknown difference"


def clear(cfg: TrainConfig, run_name: str) -> bool:
    """--restart: remove the run's checkpoint folder (and Ray Train's state in it)."""
    fs, path = storage.resolve(run_dir(cfg, run_name))
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


__all__ = ["Previous", "ResumeMismatch", "check", "clear", "previous", "run_dir"]
