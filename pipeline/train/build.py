"""What a training run is built from: the model for the data, the optimizer, the lr schedule.

Used by the worker loop, the driver's pre-flight (on the meta device) and the learning
benchmark, so all three build exactly the same thing from a TrainConfig.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from models import create_model
from pipeline.train.batches import input_spec
from pipeline.train.config import TrainConfig


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> torch.nn.Module:
    """The `cfg.model.preset` for the manifest's columns and classes and `cfg.task`."""
    num_classes = max(1, len(manifest.get("classes") or []))
    return create_model(cfg.model.preset, inputs=input_spec(manifest), task=cfg.task,
                        num_classes=num_classes, head=cfg.model.head,
                        mask_ratio=cfg.mae.mask_ratio, masking=cfg.mae.masking,
                        target_norm=cfg.mae.target_norm, **cfg.model.overrides)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to min_lr_ratio (or constant)."""
    o, total = cfg.optim, cfg.trainer.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, latent and position tables (as in MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.endswith(".table"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """`lr_factor` as a LambdaLR: stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


__all__ = ["build_model", "lr_factor", "make_optimizer", "make_scheduler"]
