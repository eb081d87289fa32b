"""What a training run is built from: the model for the data, the optimizer, the lr schedule.

Used by the worker loop, the driver's pre-flight (on the meta device) and the learning
benchmark, so all three build exactly the same thing from a TrainConfig.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from models import create_model
from pipeline.train.batches import input_spec
from pipeline.train.config import TrainConfig


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> torch.nn.Module:
    """The `cfg.model.preset` for the manifest's columns and classes and `cfg.task`."""
    num_classes = max(1, len(manifest.get("classes") or []))
    return create_model(cfg.model.preset, inputs=input_spec(manifest, cfg.data.audio),
                        task=cfg.task, num_classes=num_classes, head=cfg.model.head,
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
    """AdamW; no weight decay on biases, norms, latent and position tables (as in MAE). With
    optim.layer_decay < 1 (classification), each group's lr is optim.lr x
    layer_decay ** layer_depth."""
    decay = cfg.optim.layer_decay if cfg.task == "classify" else 1.0
    levels = len(getattr(getattr(model, "backbone", None), "levels", ()))
    if decay < 1.0 and not levels:
        raise ValueError(f"optim.layer_decay needs a HiP classifier (backbone.levels); "
                         f"{type(model).__name__} has none: use 1.0")
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        no_wd = p.ndim < 2 or name.endswith(".table")
        depth = layer_depth(name, levels) if decay < 1.0 else 0
        groups.setdefault((depth, no_wd), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if no_wd else cfg.optim.weight_decay,
          "lr": cfg.optim.lr * decay ** depth}
         for (depth, no_wd), ps in sorted(groups.items(), key=lambda kv: kv[0])],
        lr=cfg.optim.lr, betas=cfg.optim.betas)


def layer_depth(name: str, levels: int) -> int:
    """Depth of a classifier parameter for layer-wise lr decay: the head (and anything else
    after the backbone) 0, the last level 1, ..., level 0 `levels`, the input adapter
    (embeddings, positions) levels + 1."""
    m = re.match(r"backbone\.levels\.(\d+)\.", name)
    if m:
        return levels - int(m.group(1))
    return levels + 1 if name.startswith("backbone.") else 0


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """`lr_factor` as a LambdaLR: stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


__all__ = ["build_model", "layer_depth", "lr_factor", "make_optimizer", "make_scheduler"]
