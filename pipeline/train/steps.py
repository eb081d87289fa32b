"""Step arithmetic shared by the loop and the cooldown probe: micro-batches per optimizer
step, and the torch seed of each step."""

from __future__ import annotations

import hashlib

from pipeline.train.config import TrainConfig


def accum_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each of `world` workers: the global batch stays
    batch_size x grad_accum x max_workers when an elastic run has fewer workers (rounded up
    when max_workers x grad_accum is not a multiple of the world size)."""
    target = cfg.optim.grad_accum * max(1, cfg.trainer.max_workers)
    return max(1, -(-target // max(1, world)))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one optimizer step on one rank. Reseeding every step makes MAE
    masks, dropout and latent subsampling a function of (trainer.seed, rank, step), so a
    resumed run (any rank, any worker restart) draws what an uninterrupted run would."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:8], "big")


__all__ = ["accum_steps", "step_seed"]
