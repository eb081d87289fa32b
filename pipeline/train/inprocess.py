"""The training loop in this very process, under Tune: the lean sweep trial (issue 19).

A sweep trial whose training needs one worker does not build a TorchTrainer (a controller
actor, a worker actor, dataset actors: ~29 s of CPU per trial on 2 cores before its first
step, docs/benchmarks.md "Sweeps"). It runs the same loop (pipeline/train/loop.py) in the
trial's own process through a TuneSession: reports go to tune.report, and the loop writes
its checkpoints itself under storage.path/<run name>/ as in local mode. Splits of at most
data.in_memory_mb are read into memory once (pipeline/train/memory_split.py), larger ones
are Ray Datasets executed from this process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.train import loop
from pipeline.train.batches import input_spec
from pipeline.train.config import TrainConfig
from pipeline.train.memory_split import MemorySplit, split_bytes
from pipeline.train.session import TuneSession, tune_device
from pipeline.train.tasks import make_task


@dataclass(frozen=True)
class InProcess:
    """How a lean trial's run talks to Tune (see TuneSession)."""

    to_tune: bool = True  # False: a pretrain stage whose metric is not the sweep's
    attach_checkpoints: bool = False  # PBT and HyperBand restore from Tune's checkpoints
    require: str | None = None  # send Tune only the reports with this metric (TuneSession)


def datasets(cfg: TrainConfig, manifest: dict[str, Any], ray_datasets) -> dict[str, Any]:
    """Each split in memory when small enough, else the Ray Dataset `ray_datasets()` gives."""
    columns = make_task(cfg.task).columns(list(input_spec(manifest)))
    limit = cfg.data.in_memory_mb * 2**20
    names = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    wanted = {k: v for k, v in names.items() if manifest.get("splits", {}).get(v)}
    if all(split_bytes(manifest, v) <= limit for v in wanted.values()):
        return {k: MemorySplit.read(cfg.data.path, v, manifest, columns)
                for k, v in wanted.items()}
    return ray_datasets()


def fit(args: loop.WorkerArgs, data: dict[str, Any], how: InProcess
        ) -> tuple[dict[str, Any], Any]:
    """Train in this process; -> (the final report's metrics, its checkpoint or None)."""
    cfg = args.cfg
    session = TuneSession(tune_device(cfg.trainer.use_gpu), data, cfg.trainer.steps,
                          to_tune=how.to_tune, attach_checkpoints=how.attach_checkpoints,
                          require=how.require)
    loop.train(loop.setup(args, session))
    return session.final or ({}, None)


__all__ = ["InProcess", "datasets", "fit"]
