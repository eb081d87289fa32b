"""Modality adapters: raw inputs -> embedded tokens, grouping into HiP's first-level groups.

Shape letters: B batch, M positions of one modality, C raw channels, E embedding channels,
G groups, N tokens per group. Model input is a dict modality -> (B, M, C) float tensor (M in
raster order); dict order is the order modalities are laid out in groups.

This is the only place that knows modalities exist; the Perceiver/HiP cores see (B, G, N, E).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from models.attention import linear
from models.position import LearnedPositions

InputSpec = Mapping[str, tuple[int, int]]  # modality -> (M positions, C raw channels)


def check_inputs(x: Mapping[str, torch.Tensor], spec: InputSpec) -> None:
    """Raise ValueError naming the values when x does not match the model's input spec."""
    if set(x) != set(spec):
        raise ValueError(f"model expects modalities {sorted(spec)}, got {sorted(x)}")
    batch = None
    for name, (m, c) in spec.items():
        t = x[name]
        if t.ndim != 3 or tuple(t.shape[1:]) != (m, c):
            raise ValueError(
                f"input {name!r} must have shape (B, {m}, {c}), got {tuple(t.shape)}")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(f"batch sizes differ across modalities: {t.shape[0]} vs {batch}")
        batch = t.shape[0]


def assign_groups(num_groups: int, lengths: list[int]) -> list[int]:
    """Groups per modality, proportional to length (official greedy rule).

    Every modality gets one group; each extra group goes to the modality whose tokens per
    group is currently largest, which minimises the largest group. No group mixes modalities.
    """
    if len(lengths) > num_groups:
        raise ValueError(f"{len(lengths)} modalities cannot share {num_groups} groups: "
                         "a group never mixes modalities")
    counts = [1] * len(lengths)
    per_group = [float(n) for n in lengths]
    for _ in range(num_groups - len(lengths)):
        i = max(range(len(lengths)), key=lambda j: per_group[j])
        counts[i] += 1
        per_group[i] = lengths[i] / counts[i]
    for n, g in zip(lengths, counts, strict=True):
        if n < g:
            raise ValueError(f"sequence of length {n} is shorter than its group count {g}")
    return counts


def group_tokens(tokens: list[torch.Tensor], groups: list[int]) -> torch.Tensor:
    """Split each (B, M_i, E) into groups[i] contiguous chunks -> (B, sum(groups), N, E).

    Each modality is zero-padded at its end to a multiple of its group count, then every group
    to the common N = max tokens per group (the official ConstNumGrouper; padded tokens are
    plain zeros that the cross-attention sees, exactly as in the official code).
    """
    per_group = max(math.ceil(t.shape[1] / g) for t, g in zip(tokens, groups, strict=True))
    out = []
    for t, g in zip(tokens, groups, strict=True):
        b, m, e = t.shape
        n = math.ceil(m / g)
        if n * g != m:
            t = torch.nn.functional.pad(t, (0, 0, 0, n * g - m))
        t = t.reshape(b, g, n, e)  # (B, M, E) -> (B, g, n, E), contiguous chunks
        if n != per_group:
            t = torch.nn.functional.pad(t, (0, 0, 0, per_group - n))
        out.append(t)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def ungroup_tokens(x: torch.Tensor, lengths: list[int], groups: list[int]) -> list[torch.Tensor]:
    """Inverse of group_tokens: (B, G, N, E) -> [(B, M_i, E)] with all padding removed."""
    out, start = [], 0
    for m, g in zip(lengths, groups, strict=True):
        n = math.ceil(m / g)
        chunk = x[:, start:start + g, :n]  # (B, g, n, E)
        out.append(chunk.reshape(x.shape[0], g * n, x.shape[-1])[:, :m])
        start += g
    return out


class InputAdapter(nn.Module):
    """Per-modality Linear(C -> E) embed plus a learned (M, E) position table, ADDED.

    forward: dict (B, M, C) -> dict (B, M, E). `positions()` gives the (M, E) tables that the
    MAE reconstruction head uses as queries. These are HiP's low-dimensional learned positions.
    """

    def __init__(self, spec: InputSpec, embed_dim: int) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.embed = nn.ModuleDict({k: linear(c, embed_dim) for k, (_, c) in spec.items()})
        self.pos = nn.ModuleDict({k: LearnedPositions(m, embed_dim) for k, (m, _) in spec.items()})

    def positions(self) -> dict[str, torch.Tensor]:
        return {k: self.pos[k]() for k in self.spec}

    def forward(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.embed[k](x[k]) + self.pos[k]() for k in self.spec}


class OutputAdapter(nn.Module):
    """Per-modality zero-initialised Linear(E -> C): dict (B, M, E) -> dict (B, M, C)."""

    def __init__(self, spec: InputSpec, embed_dim: int) -> None:
        super().__init__()
        self.unembed = nn.ModuleDict(
            {k: linear(embed_dim, c, init_scale=0.0) for k, (_, c) in spec.items()})

    def forward(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.unembed[k](v) for k, v in x.items()}
