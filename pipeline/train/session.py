"""What the training loop asks of the outside world, and its two providers.

The loop (pipeline/train/loop.py) is one piece of code run in two places:

    TrainSession   a Ray Train worker (`hip pretrain`/`hip finetune`, multi-worker sweep
                   trials): rank and world size from Train's context, DDP through
                   prepare_model, dataset shards from the trainer, ray.train.report.
    TuneSession    the Tune trial's own process (the lean trial path, sweeps/trial.py): one
                   worker, the device the trial was given, datasets handed in, tune.report
                   with Tune checkpoints. No TorchTrainer, no controller, no worker actors:
                   a trial stopped at its first rung pays no Train start-up (issue 19).

Both answer the same five questions: rank/world/device, prepare_model, the checkpoint to
resume from, a split's dataset, and report(metrics, checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def resume_checkpoint(self) -> Any:
        """A ray.train.Checkpoint to resume from (None: start fresh or from our folders)."""

    def dataset(self, split: str) -> Any:
        """This worker's rows of `split` (anything with iter_torch_batches), or None."""

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        """Called by every worker at the same steps (eval and checkpoint steps)."""


class TrainSession:
    """The loop inside a Ray Train worker (TorchTrainer.fit)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def resume_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, split: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(split)

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)


@dataclass
class TuneSession:
    """The loop in a Tune function trainable's process: world size 1, no DDP.

    datasets: split -> rows (pipeline/train/memory_split.py or a Ray Dataset).
    to_tune: forward reports to Tune (False for a pretrain stage, whose metric is not the
      sweep's). The report at `final_step` is held back in `final` (with its checkpoint):
      Tune may stop a trial on any report, so the trial sends the last one itself after it
      has closed the MLflow run (sweeps/trial.py).
    attach_checkpoints: give Tune the checkpoint of every report that has one (PBT exploits
      and HyperBand pauses restore from Tune's checkpoints); otherwise reports carry metrics
      only and a restarted trial resumes from the loop's own checkpoint folders.
    require: reports without this metric are not sent to Tune (Tune fails a trial whose
      report lacks the sweep's metric): a sweep ranking by cooled_val_loss probes only at
      its scheduler's decision steps (trainer.eval_cooldown_at), and only those reports
      (and the final one) reach Tune."""

    device: torch.device
    datasets: dict[str, Any]
    final_step: int
    to_tune: bool = True
    attach_checkpoints: bool = False
    require: str | None = None
    rank: int = 0
    world: int = 1
    final: tuple[dict[str, Any], Any] | None = field(default=None, init=False)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def resume_checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def dataset(self, split: str) -> Any:
        return self.datasets.get(split)

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        from ray import tune

        if metrics.get("step", 0) >= self.final_step:
            self.final = (metrics, checkpoint)
            return
        if not self.to_tune or (self.require and self.require not in metrics):
            return
        ckpt = None
        if checkpoint is not None and self.attach_checkpoints:
            ckpt = tune.Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem)
        tune.report(metrics, checkpoint=ckpt)


def tune_device(use_gpu: bool) -> torch.device:
    """The device of a lean trial: its GPU (Ray sets CUDA_VISIBLE_DEVICES for the trial, so
    index 0; fractional GPUs share it) when the job asks for one, else the CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


__all__ = ["Session", "TrainSession", "TuneSession", "tune_device"]
