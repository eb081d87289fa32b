"""Masked auto-encoding (He et al. 2021) as used by HiP: mask, encode, decode, loss.

Shape letters: B batch, M positions of a modality, V visible positions, C raw channels,
E embedding channels, G groups of a modality.

Mask convention everywhere in this project: mask 1 = HIDDEN (dropped from the encoder, loss
taken there), 0 = visible. Hidden tokens are removed from the encoder input (gathered out,
not zeroed): that is where MAE saves compute. Visible tokens keep raster order, so HiP's
grouping still splits them into contiguous chunks.

Masking kinds (docs/masking.md says which to choose when). The grouped encoder needs every
group of the first level to hold the same number of visible tokens, so the two grouped kinds
keep n - round(ratio * n) of each group's n = ceil(M / G) positions (zero padding as in the
grouper when M does not divide) and visible chunks line up with the groups exactly:
- "per_group" (default): every group draws its own visible positions, independently per
  example and per group. Works at every size, including when a group is one image row.
- "groupwise": each example draws ONE set of relative positions and hides it in every
  group. Cheaper to describe, but when a group is one image row (16x16 px, 16 groups) it
  hides the same columns in every row: the encoder never sees most columns. Kept for
  comparisons at the paper's scales (a 224 px HiP-16 group is 14 rows).
- "random": each example hides round(ratio * M) positions anywhere; group sizes then differ
  per example, so the grouped encoder sees unequal, re-chunked groups (a baseline).

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

MASK_KINDS = ("per_group", "groupwise", "random")
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


def _grouped_ids(rel: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """rel (B, G or 1, keep) positions inside each group -> ids (B, G*keep) sorted ascending."""
    offsets = torch.arange(groups, device=rel.device)[:, None] * per_group  # (G, 1)
    return (offsets[None] + rel).reshape(rel.shape[0], -1)  # (B, G, keep) -> (B, G*keep)


def grouped_mask(batch: int, length: int, groups: int, ratio: float, *, shared: bool = False,
                 device=None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide the same NUMBER of positions in each of `groups` contiguous groups.

    shared=False ("per_group"): every group of every example draws its own positions.
    shared=True ("groupwise"): one draw of relative positions per example, used in every group.
    -> ids_keep (B, V) sorted ascending, mask (B, M) with 1 = hidden. When M does not divide
    into the groups, positions are laid out as the grouper pads them (ceil(M / groups) per
    group, zero padding at the end): ids may then point into that padding (index >= M;
    `MaskedAutoencoder` pads the tokens the same way), which keeps V = groups * keep for
    every example, as the grouped encoder input needs.
    """
    _check_ratio(ratio)
    per_group = math.ceil(length / groups)
    keep = max(1, per_group - round(ratio * per_group))
    draws = 1 if shared else groups
    noise = torch.rand(batch, draws, per_group, generator=generator, device=device)
    rel = noise.argsort(dim=-1)[..., :keep].sort(dim=-1).values  # (B, 1 or G, keep)
    ids = _grouped_ids(rel.expand(-1, groups, -1), groups, per_group)  # (B, G*keep)
    mask = torch.ones(batch, per_group * groups, device=device)
    mask.scatter_(1, ids, 0.0)
    return ids, mask[:, :length]


def groupwise_mask(batch: int, length: int, groups: int, ratio: float, *, device=None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same relative positions hidden in every group (see `grouped_mask`, shared=True)."""
    return grouped_mask(batch, length, groups, ratio, shared=True, device=device,
                        generator=generator)


def per_group_mask(batch: int, length: int, groups: int, ratio: float, *, device=None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions drawn independently in every group (see `grouped_mask`, shared=False)."""
    return grouped_mask(batch, length, groups, ratio, shared=False, device=device,
                        generator=generator)


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
                 masking: str = "per_group", target_norm: str = "none") -> None:
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
            if self.masking in ("per_group", "groupwise"):
                out[name] = grouped_mask(batch, m, g, self.mask_ratio,
                                         shared=self.masking == "groupwise", device=device,
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
