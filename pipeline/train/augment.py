"""Train-time augmentation (`data.augment`), on the raw shard tensors of a train batch.

Shapes: image (B, H, W, C) and video (B, F, H, W, C) uint8, every frame of a clip moved
alike; audio (B, T) int16 or float samples. Each example draws its own offset (and mirror)
from torch's global generator, which the loop reseeds from (seed, rank, step) before every
step, so a replayed or resumed step augments exactly as before. Pure indexing (gathers): no
Python loop over examples, any device. Evaluation never augments.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.train.config import Augment

PIXEL_COLUMNS = ("image", "video")


def shift_and_flip(x: torch.Tensor, shift: int, flip: bool) -> torch.Tensor:
    """Move each example by a whole-pixel offset in [-shift, shift] along H and W (the edge
    pixels repeat into the gap) and, with `flip`, mirror half of them left-right."""
    if not shift and not flip:
        return x
    b, h, w = x.shape[0], x.shape[-3], x.shape[-2]
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)  # out[:, i] = x[:, rows[:, i]]
    cols = torch.arange(w, device=dev).expand(b, w)
    if shift:
        rows = (rows - torch.randint(-shift, shift + 1, (b, 1), device=dev)).clamp(0, h - 1)
        cols = (cols - torch.randint(-shift, shift + 1, (b, 1), device=dev)).clamp(0, w - 1)
    if flip:
        cols = torch.where(torch.rand(b, 1, device=dev) < 0.5, w - 1 - cols, cols)
    lead = (1,) * (x.ndim - 4)  # the frame axis of video
    x = torch.gather(x, x.ndim - 3, rows.reshape(b, *lead, h, 1, 1).expand_as(x))
    return torch.gather(x, x.ndim - 2, cols.reshape(b, *lead, 1, w, 1).expand_as(x))


def time_shift(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Move each clip of (B, T) samples by a whole-sample offset in [-s, s], s = fraction * T
    (positive = later); zeros (silence) fill the gap, samples moved past an end are dropped."""
    s = int(fraction * x.shape[1])
    if not s:
        return x
    b, t = x.shape
    src = torch.arange(t, device=x.device) - torch.randint(-s, s + 1, (b, 1), device=x.device)
    inside = (src >= 0) & (src < t)  # (B, T): out[:, i] = x[:, src[:, i]] where inside
    moved = torch.gather(x, 1, src.clamp(0, t - 1))
    return torch.where(inside, moved, torch.zeros((), dtype=x.dtype, device=x.device))


def augment(batch: Mapping[str, torch.Tensor], cfg: Augment) -> dict[str, torch.Tensor]:
    """A train batch with its pixel and audio columns augmented (labels as they are)."""
    out = dict(batch)
    for name in PIXEL_COLUMNS:
        if name in out:
            out[name] = shift_and_flip(out[name], cfg.shift, cfg.flip)
    if cfg.time_shift and "audio" in out:
        out["audio"] = time_shift(out["audio"], cfg.time_shift)
    return out
