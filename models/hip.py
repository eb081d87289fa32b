"""Hierarchical Perceiver (HiP, Carreira et al. 2022): levels of grouped Perceiver blocks.

Shape letters: B batch, G groups, N tokens per group (block input), K latents per group,
C input channels of a block, D latent channels of a block, E embedding channels.

Encoder levels -> processor (the middle level, 1 group) -> decoder levels (mirror), with
U-Net skips: decoder level i (i > mid) receives level n-1-i's output, Linear-projected when
the widths differ, summed into its latent queries before the query LayerNorm. Every number
follows the official JAX code (google-deepmind/hierarchical_perceiver); see docs/reference.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttentionBlock, SelfAttentionBlock, linear
from models.heads import ReconstructionHead
from models.inputs import (
    InputAdapter,
    InputSpec,
    OutputAdapter,
    assign_groups,
    check_inputs,
    group_tokens,
    ungroup_tokens,
)
from models.position import LearnedPositions


@dataclass(frozen=True)
class LevelSpec:
    """One level of the hierarchy (one HiP block)."""

    groups: int
    layers: int  # self-attention layers
    heads: int  # self-attention heads
    channels: int  # D
    latents: int  # K, latents per group
    cross_heads: int = 1
    cross_widening: int = 1
    self_widening: int = 4


def regroup(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G', N', C) -> (B, G, G'*N'/G, C): neighbouring groups merge (plain reshape)."""
    b, g_prev, n_prev, c = x.shape
    if (g_prev * n_prev) % groups:
        raise ValueError(f"cannot regroup {g_prev} groups x {n_prev} tokens into {groups} groups")
    return x.reshape(b, groups, g_prev * n_prev // groups, c)


class HiPBlock(nn.Module):
    """Regroup -> per-group cross-attention from learned latents -> L self-attention layers.

    inputs (B, G', N', C) -> (B, G, K, D). Latent queries are a (G*K, D) table split into G
    groups of K. `latents_train` < K samples a random subset of latents per example and group
    at train time (the official processor_index_dim_train).
    """

    def __init__(self, spec: LevelSpec, *, in_dim: int, skip_dim: int | None = None,
                 regroup_inputs: bool = True, latents_train: int | None = None,
                 activation: str = "sq_relu", dropout: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if spec.channels % spec.heads:
            raise ValueError(f"channels {spec.channels} not divisible by heads {spec.heads}")
        if latents_train is not None and not 0 < latents_train <= spec.latents:
            raise ValueError(f"latents_train={latents_train} must be in [1, {spec.latents}]")
        self.spec = spec
        self.regroup_inputs = regroup_inputs
        self.latents_train = latents_train
        self.latents = LearnedPositions(spec.groups * spec.latents, spec.channels)
        self.skip = None
        if skip_dim is not None and skip_dim != spec.channels:
            self.skip = linear(skip_dim, spec.channels)
        self.cross = CrossAttentionBlock(
            q_dim=spec.channels, kv_dim=in_dim, num_heads=spec.cross_heads,
            widening=spec.cross_widening, query_residual=True, activation=activation)
        self.layers = nn.ModuleList(
            SelfAttentionBlock(spec.channels, num_heads=spec.heads, widening=spec.self_widening,
                               activation=activation, dropout=dropout,
                               drop_path_rate=drop_path_rate)
            for _ in range(spec.layers))

    def _queries(self, batch: int) -> torch.Tensor:
        g, k, d = self.spec.groups, self.spec.latents, self.spec.channels
        q = self.latents().view(1, g, k, d).expand(batch, -1, -1, -1)  # (B, G, K, D)
        if self.training and self.latents_train is not None and self.latents_train < k:
            idx = torch.rand(batch, g, k, device=q.device).argsort(dim=-1)[..., :self.latents_train]
            q = torch.gather(q, 2, idx[..., None].expand(-1, -1, -1, d))  # (B, G, K_train, D)
        return q

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.regroup_inputs:
            x = regroup(x, self.spec.groups)
        elif x.shape[1] != self.spec.groups:
            raise ValueError(f"block expects {self.spec.groups} groups, got {x.shape[1]}")
        z = self._queries(x.shape[0])
        if skip is not None:
            if skip.shape[:3] != z.shape[:3]:
                raise ValueError(f"skip shape {tuple(skip.shape)} does not match latents "
                                 f"{tuple(z.shape)}")
            z = z + (self.skip(skip) if self.skip is not None else skip)
        z = self.cross(z, x)
        for layer in self.layers:
            z = layer(z)
        return z


class HiP(nn.Module):
    """The HiP backbone: input adapter, levels, and (with decoder=True) the MAE output side.

    Built with decoder=False it holds the encoder + processor only (classification); the
    parameter names of the shared part are identical either way, so MAE weights load into it.
    """

    def __init__(self, *, inputs: InputSpec, levels: Sequence[LevelSpec], embed_dim: int,
                 decoder: bool = True, activation: str = "sq_relu",
                 processor_latents_train: int | None = None, dropout: float = 0.0,
                 drop_path_rate: float = 0.0, checkpoint_levels: bool = False) -> None:
        super().__init__()
        levels = list(levels)
        n = len(levels)
        if n < 3 or n % 2 == 0:
            raise ValueError(f"HiP needs an odd number >= 3 of levels, got {n}")
        self.mid = n // 2
        if levels[self.mid].groups != 1:
            raise ValueError(f"the processor (level {self.mid}) must have 1 group, "
                             f"got {levels[self.mid].groups}")
        for i in range(self.mid + 1, n):
            a, b = levels[i], levels[n - 1 - i]
            if (a.groups, a.latents) != (b.groups, b.latents):
                raise ValueError(f"U-Net skip from level {n - 1 - i} to {i} needs equal groups "
                                 f"and latents, got {(b.groups, b.latents)} vs "
                                 f"{(a.groups, a.latents)}")
        if decoder and levels[-1].groups != levels[0].groups:
            raise ValueError("the last decoder level must have as many groups as the first "
                             f"({levels[-1].groups} != {levels[0].groups})")
        self.spec = dict(inputs)
        self.levels_spec = levels
        self.embed_dim = embed_dim
        self.checkpoint_levels = checkpoint_levels
        self.lengths = [m for m, _ in self.spec.values()]
        self.groups = assign_groups(levels[0].groups, self.lengths)
        built = levels if decoder else levels[:self.mid + 1]
        for i in range(1, len(built)):
            prev = levels[i - 1]
            if (prev.groups * prev.latents) % levels[i].groups:
                raise ValueError(f"level {i}: {prev.groups} groups x {prev.latents} latents "
                                 f"cannot regroup into {levels[i].groups} groups")
        self.adapter = InputAdapter(inputs, embed_dim)
        self.levels = nn.ModuleList(
            HiPBlock(s, in_dim=embed_dim if i == 0 else levels[i - 1].channels,
                     skip_dim=levels[n - 1 - i].channels if i > self.mid else None,
                     regroup_inputs=i > 0,
                     latents_train=processor_latents_train if i == self.mid else None,
                     activation=activation, dropout=dropout, drop_path_rate=drop_path_rate)
            for i, s in enumerate(built))
        self.decoder = decoder
        if decoder:
            self.recon = ReconstructionHead(embed_dim=embed_dim, latent_dim=levels[-1].channels,
                                            activation=activation)
            self.output = OutputAdapter(inputs, embed_dim)

    @property
    def out_channels(self) -> int:
        return self.levels_spec[len(self.levels) - 1].channels

    def embed(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dict (B, M, C) -> dict (B, M, E): embedded tokens with positions added."""
        check_inputs(x, self.spec)
        return self.adapter(x)

    def encode(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """dict (B, M_i', E) (all or only visible tokens) -> last level's latents (B, G, K, D)."""
        z = group_tokens([tokens[k] for k in self.spec], self.groups)  # (B, G0, N, E)
        hidden: list[torch.Tensor] = []
        n = len(self.levels_spec)
        for i, level in enumerate(self.levels):
            skip = hidden[n - 1 - i] if i > self.mid else None
            if self.checkpoint_levels and self.training:
                z = checkpoint(level, z, skip, use_reentrant=False)
            else:
                z = level(z, skip)
            hidden.append(z)
        return z

    def reconstruct(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """latents (B, G, K, D) -> dict (B, M, C): every position, queried by its embedding."""
        if not self.decoder:
            raise ValueError("this HiP was built without a decoder (decoder=False)")
        pos = self.adapter.positions()
        queries = group_tokens([pos[k][None] for k in self.spec], self.groups)  # (1, G, N, E)
        queries = queries.expand(latents.shape[0], -1, -1, -1)
        out = self.recon(queries, latents)  # (B, G, N, E)
        parts = ungroup_tokens(out, self.lengths, self.groups)
        return self.output(dict(zip(self.spec, parts, strict=True)))

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """dict (B, M, C) -> latents of the last built level (B, G, K, D)."""
        return self.encode(self.embed(x))


__all__ = ["HiP", "HiPBlock", "LevelSpec", "regroup"]
