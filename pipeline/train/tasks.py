"""What differs between training tasks, one small object each: MAE pretraining and
classification fine-tuning.

A task says which columns a batch needs, how the model is called, the loss, and what
evaluation adds up. The worker loop (pipeline/train/loop.py) only talks to this interface,
so adding a task is adding a class here and a name in TrainConfig.task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


class MaeTask:
    """Masked auto-encoding: the model returns (loss, predictions, masks) per input."""

    name = "mae"
    sum_keys: tuple[str, ...] = ()  # what eval_sums returns, summed across workers

    def columns(self, inputs: list[str]) -> list[str]:
        return list(inputs)

    def forward(self, model: torch.nn.Module, x: Batch, generator: torch.Generator | None = None):
        return model(x, generator=generator) if generator is not None else model(x)

    def loss(self, out, batch: Batch) -> torch.Tensor:
        return out[0]

    def eval_sums(self, out, batch: Batch) -> dict[str, float]:
        """What one validation batch adds to the sums (all-reduced across workers)."""
        return {}

    def eval_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {}

    def on_first_eval_batch(self, x: Batch, out, log_sample: Callable[[Batch, Any], None]
                            ) -> None:
        log_sample(x, out)  # reconstructions of the first validation batch


class ClassifyTask:
    """Classification: the model returns logits (B, classes); the label column is needed."""

    name = "classify"
    sum_keys: tuple[str, ...] = ("correct",)

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def columns(self, inputs: list[str]) -> list[str]:
        return [*inputs, "label"]

    def forward(self, model: torch.nn.Module, x: Batch, generator: torch.Generator | None = None):
        return model(x)  # no randomness at eval: the generator is for masks

    def loss(self, out, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(out.float(), batch["label"].long(),
                               label_smoothing=self.label_smoothing)

    def eval_sums(self, out, batch: Batch) -> dict[str, float]:
        return {"correct": float((out.argmax(-1) == batch["label"]).sum())}

    def eval_metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {"val_accuracy": sums["correct"] / max(count, 1)}

    def on_first_eval_batch(self, x: Batch, out, log_sample) -> None:
        pass


Task = MaeTask | ClassifyTask


def make_task(name: str, *, label_smoothing: float = 0.0) -> Task:
    """The task object of TrainConfig.task."""
    if name == "mae":
        return MaeTask()
    if name == "classify":
        return ClassifyTask(label_smoothing)
    raise ValueError(f"unknown task {name!r}; expected 'mae' or 'classify'")


__all__ = ["MaeTask", "ClassifyTask", "Task", "make_task"]
