"""Masked auto-encoding (He et al. 2021) as used by HiP: mask, encode, decode, loss.

Shape letters: B batch, M positions of a modality, V visible positions, C raw channels,
E embedding channels, G groups of a modality.

Mask convention everywhere in this project: mask 1 = HIDDEN (dropped from the encoder, loss
taken there), 0 = visible. Hidden tokens are removed from the encoder input (gathered out,
not zeroed): that is where MAE saves compute. Visible tokens keep raster order, so HiP's
grouping still splits them into contiguous chunks.

Masking kinds:
- "random": each example hides round(ratio * M) positions anywhere.
- "groupwise" (the paper's 85% HiP-16 setting): each example draws one set of relative
  positions inside a group and hides it in every group, so every group keeps the same
  number of visible tokens and visible chunks line up with the groups exactly. Keeps
  n - round(ratio * n) of each group's n = ceil(M / G) positions (zero padding as in the
  grouper when M does not divide).

Loss: MSE over hidden positions and channels, per modality, averaged over modalities.
Target normalisation (not published for HiP, so a config field): "none"; "token" normalises
each position over its channels (needs C > 1); "group" normalises over each group's
positions and channels, the analogue of MAE's per-patch norm_pix_loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

MASK_KINDS = ("random", "groupwise")
TARGET_NORMS = ("none", "token", "group")


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")


def random_mask(batch: int, length: int, ratio: float, *, device=None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids_keep (B, V) sorted ascending, mask (B, M) with 1 = hidden."""
    _check_ratio(ratio)
    keep = max(1, length - round(ratio * length))
    noise = torch.rand(batch, length, generator=generator, device=device)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # argsort-of-noise, raster order
    mask = torch.ones(batch, length, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


def groupwise_mask(batch: int, length: int, groups: int, ratio: float, *, device=None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide the same relative positions in each of `groups` contiguous groups.

    -> ids_keep (B, V) sorted ascending, mask (B, M) with 1 = hidden. When M does not divide
    into the groups, positions are laid out as the grouper pads them (ceil(M / groups) per
    group, zero padding at the end): ids may then point into that padding (index >= M;
    `MaskedAutoencoder` pads the tokens the same way), which keeps V = groups * keep for
    every example, as the grouped encoder input needs.
    """
    _check_ratio(ratio)
    per_group = math.ceil(length / groups)
    keep = max(1, per_group - round(ratio * per_group))
    noise = torch.rand(batch, per_group, generator=generator, device=device)
    rel = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep)
    offsets = torch.arange(groups, device=device)[:, None] * per_group  # (G, 1)
    ids = (offsets[None] + rel[:, None, :]).reshape(batch, groups * keep)  # (B, G*keep) sorted
    mask = torch.ones(batch, per_group * groups, device=device)
    mask.scatter_(1, ids, 0.0)
    return ids, mask[:, :length]


def normalise_target(target: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """target (B, M, C) -> normalised copy (see module docstring)."""
    if kind == "none":
        return target
    if kind == "token":
        if target.shape[-1] < 2:
            raise ValueError("target_norm='token' needs more than one channel per position")
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        return (target - mean) / (var + 1e-6).sqrt()
    if kind == "group":
        b, m, c = target.shape
        n = math.ceil(m / groups)
        t = nn.functional.pad(target, (0, 0, 0, n * groups - m)).reshape(b, groups, n * c)
        # Statistics over each group's real (unpadded) values only.
        valid = torch.zeros(n * groups, device=target.device)
        valid[:m] = 1.0
        w = valid.reshape(groups, n).repeat_interleave(c, dim=1)[None]  # (1, G, n*C)
        count = w.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (t * w).sum(-1, keepdim=True) / count
        var = (((t - mean) * w) ** 2).sum(-1, keepdim=True) / count
        t = (t - mean) / (var + 1e-6).sqrt()
        return t.reshape(b, groups * n, c)[:, :m]
    raise ValueError(f"unknown target_norm {kind!r}; choose one of {TARGET_NORMS}")


def _gather(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, M, E), ids (B, V) -> (B, V, E); ids >= M select zero padding tokens."""
    pad = int(ids.max()) + 1 - tokens.shape[1] if ids.numel() else 0
    if pad > 0:
        tokens = nn.functional.pad(tokens, (0, 0, 0, pad))
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


class MaskedAutoencoder(nn.Module):
    """MAE around a backbone exposing embed / encode / reconstruct and `groups` per modality.

    forward(x: dict (B, M, C)) -> (loss, prediction dict (B, M, C), mask dict (B, M)).
    """

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.85,
                 masking: str = "groupwise", target_norm: str = "none") -> None:
        super().__init__()
        _check_ratio(mask_ratio)
        if masking not in MASK_KINDS:
            raise ValueError(f"unknown masking {masking!r}; choose one of {MASK_KINDS}")
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"unknown target_norm {target_norm!r}; choose one of {TARGET_NORMS}")
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        self.masking = masking
        self.target_norm = target_norm

    def make_masks(self, batch: int, device, generator: torch.Generator | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """modality -> (ids_keep (B, V), mask (B, M))."""
        out = {}
        for (name, (m, _)), g in zip(self.backbone.spec.items(), self.backbone.groups,
                                     strict=True):
            if self.masking == "groupwise":
                out[name] = groupwise_mask(batch, m, g, self.mask_ratio, device=device,
                                           generator=generator)
            else:
                out[name] = random_mask(batch, m, self.mask_ratio, device=device,
                                        generator=generator)
        return out

    def forward(self, x: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tokens = self.backbone.embed(x)  # 1. embed + positions: dict (B, M, E)
        batch = next(iter(tokens.values())).shape[0]
        device = next(iter(tokens.values())).device
        masks = self.make_masks(batch, device, generator)  # 2. mask
        visible = {k: _gather(t, masks[k][0]) for k, t in tokens.items()}  # (B, V, E)
        latents = self.backbone.encode(visible)  # 3. encode visible tokens only
        pred = self.backbone.reconstruct(latents)  # 4. decode every position: dict (B, M, C)
        losses = []  # 5. loss on hidden positions
        for (name, _), g in zip(self.backbone.spec.items(), self.backbone.groups, strict=True):
            target = normalise_target(x[name].float(), self.target_norm, g)
            per_pos = (pred[name].float() - target).pow(2).mean(-1)  # (B, M)
            mask = masks[name][1]
            losses.append((per_pos * mask).sum() / mask.sum().clamp_min(1.0))
        loss = torch.stack(losses).mean()
        return loss, pred, {k: v[1] for k, v in masks.items()}
