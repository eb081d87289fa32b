"""Perceiver (Jaegle et al. 2021) and Perceiver IO (Jaegle et al. 2021b).

Shape letters: B batch, M input positions, W input feature channels, N latents, D latent
channels, E embedding channels, P position channels.

Both take the same dict of (B, M, C) inputs as HiP. Position handling:
- "fourier": Fourier features (position.fourier_features) CONCATENATED to the raw channels
  (ImageNet: 3 + 258 = 261 channels); needs each modality's grid shape (`grids`).
- "learned": a learned (M, P) table concatenated instead (Perceiver), or for Perceiver IO
  the HiP-style Linear(C -> E) embed plus an ADDED learned (M, E) table, which also gives
  MAE its reconstruction queries (the official code's Perceiver IO MAE).
Several modalities are padded to a common width with a learned per-modality vector and
concatenated along M (the Perceiver IO multimodal convention).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from models.attention import CrossAttentionBlock, SelfAttentionBlock
from models.heads import ReconstructionHead
from models.inputs import InputAdapter, InputSpec, OutputAdapter, check_inputs
from models.position import LearnedPositions, fourier_features

POSITION_KINDS = ("fourier", "learned")
LATENT_INIT_STD = 0.02  # the official Perceiver / Perceiver IO latent array init


class ConcatFeatures(nn.Module):
    """dict (B, M_i, C_i) -> (B, sum M_i, W): raw channels + positions, padded per modality.

    `grids` maps modality -> grid shape whose product is M (needed for Fourier features).
    """

    def __init__(self, spec: InputSpec, *, position: str, grids: Mapping[str, tuple[int, ...]],
                 num_bands: int, learned_channels: int) -> None:
        super().__init__()
        self.spec = dict(spec)
        widths = {}
        for name, (m, c) in spec.items():
            if position == "fourier":
                grid = tuple(grids[name])
                if _prod(grid) != m:
                    raise ValueError(f"grid {grid} for {name!r} does not have {m} positions")
                self.register_buffer(f"ff_{name}", fourier_features(grid, num_bands=num_bands),
                                     persistent=False)
                widths[name] = c + getattr(self, f"ff_{name}").shape[-1]
            else:
                self.add_module(f"pos_{name}", LearnedPositions(m, learned_channels))
                widths[name] = c + learned_channels
        self.width = max(widths.values()) + (4 if len(spec) > 1 else 0)
        self.pads = nn.ParameterDict({
            k: nn.Parameter(torch.randn(self.width - w) * 0.02)
            for k, w in widths.items() if self.width > w})

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name in self.spec:
            t = x[name]
            pos = getattr(self, f"ff_{name}", None)
            if pos is None:
                pos = getattr(self, f"pos_{name}")()
            feats = [t, pos.to(t.dtype)[None].expand(t.shape[0], -1, -1)]
            if name in self.pads:
                feats.append(self.pads[name].to(t.dtype).expand(t.shape[0], t.shape[1], -1))
            parts.append(torch.cat(feats, dim=-1))  # (B, M_i, W)
        return torch.cat(parts, dim=1)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


class LatentStack(nn.Module):
    """`layers` self-attention layers applied `repeats` times with shared weights."""

    def __init__(self, dim: int, *, layers: int, repeats: int, heads: int, widening: int,
                 activation: str) -> None:
        super().__init__()
        self.repeats = repeats
        self.layers = nn.ModuleList(
            SelfAttentionBlock(dim, num_heads=heads, widening=widening, activation=activation)
            for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            for layer in self.layers:
                z = layer(z)
        return z


class Perceiver(nn.Module):
    """Perceiver: `cross_attends` cross-attends interleaved with a latent transformer.

    dict (B, M, C) -> latents (B, N, D). Weight sharing as published: the first cross-attend
    is unshared, all later ones share one module; the latent transformer is shared by all.
    Cross-attention: 1 head, Q/K/V width = input width W, widening 1; self-attention widening 1.
    """

    decoder = False

    def __init__(self, *, inputs: InputSpec, num_latents: int = 512, latent_dim: int = 1024,
                 cross_attends: int = 8, self_layers: int = 6, self_heads: int = 8,
                 widening: int = 1, activation: str = "gelu", position: str = "fourier",
                 grids: Mapping[str, tuple[int, ...]] | None = None, num_bands: int = 64,
                 learned_channels: int = 258) -> None:
        super().__init__()
        if position not in POSITION_KINDS:
            raise ValueError(f"unknown position {position!r}; choose one of {POSITION_KINDS}")
        self.spec = dict(inputs)
        self.features = ConcatFeatures(inputs, position=position, grids=grids or {},
                                       num_bands=num_bands, learned_channels=learned_channels)
        w = self.features.width
        self.latents = LearnedPositions(num_latents, latent_dim, init_std=LATENT_INIT_STD)
        self.cross_first = CrossAttentionBlock(q_dim=latent_dim, kv_dim=w, widening=widening,
                                               activation=activation)
        self.cross_shared = (CrossAttentionBlock(q_dim=latent_dim, kv_dim=w, widening=widening,
                                                 activation=activation)
                             if cross_attends > 1 else None)
        self.cross_attends = cross_attends
        self.transformer = LatentStack(latent_dim, layers=self_layers, repeats=1,
                                       heads=self_heads, widening=widening, activation=activation)
        self.out_channels = latent_dim

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        check_inputs(x, self.spec)
        feats = self.features(x)  # (B, M, W)
        z = self.latents()[None].expand(feats.shape[0], -1, -1)  # (B, N, D)
        for i in range(self.cross_attends):
            z = (self.cross_first if i == 0 else self.cross_shared)(z, feats)
            z = self.transformer(z)
        return z


class PerceiverIO(nn.Module):
    """Perceiver IO encoder + latent processor (+ MAE decoder when decoder=True).

    One cross-attend (1 head by default, widening 1, query residual) from N learned latents,
    then `blocks` repeats of `layers_per_block` shared self-attention layers. Exposes the MAE
    backbone interface (embed / encode / reconstruct, `groups`: one group per modality) when
    position == "learned"; latents come out as (B, 1, N, D) like a 1-group HiP level.
    """

    def __init__(self, *, inputs: InputSpec, num_latents: int = 512, latent_dim: int = 1024,
                 blocks: int = 8, layers_per_block: int = 6, self_heads: int = 8,
                 cross_heads: int = 1, widening: int = 1, activation: str = "gelu",
                 position: str = "fourier", grids: Mapping[str, tuple[int, ...]] | None = None,
                 num_bands: int = 64, embed_dim: int = 256, decoder: bool = False) -> None:
        super().__init__()
        if position not in POSITION_KINDS:
            raise ValueError(f"unknown position {position!r}; choose one of {POSITION_KINDS}")
        if decoder and position != "learned":
            raise ValueError("Perceiver IO MAE needs position='learned' (the learned positions "
                             "are the reconstruction queries)")
        self.spec = dict(inputs)
        self.position = position
        self.groups = [1] * len(self.spec)
        if position == "learned":
            self.adapter = InputAdapter(inputs, embed_dim)
            width = embed_dim
        else:
            self.features = ConcatFeatures(inputs, position=position, grids=grids or {},
                                           num_bands=num_bands, learned_channels=0)
            width = self.features.width
        self.latents = LearnedPositions(num_latents, latent_dim, init_std=LATENT_INIT_STD)
        self.cross = CrossAttentionBlock(q_dim=latent_dim, kv_dim=width, num_heads=cross_heads,
                                         widening=widening, activation=activation)
        self.processor = LatentStack(latent_dim, layers=layers_per_block, repeats=blocks,
                                     heads=self_heads, widening=widening, activation=activation)
        self.decoder = decoder
        self.out_channels = latent_dim
        if decoder:
            self.recon = ReconstructionHead(embed_dim=embed_dim, latent_dim=latent_dim,
                                            activation=activation)
            self.output = OutputAdapter(inputs, embed_dim)

    def embed(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dict (B, M, C) -> dict (B, M, E) (learned positions) — the MAE interface."""
        check_inputs(x, self.spec)
        if self.position != "learned":
            raise ValueError("embed() needs position='learned'")
        return self.adapter(x)

    def encode(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """dict (B, M_i', E) -> latents (B, 1, N, D)."""
        return self._latent_pass(torch.cat([tokens[k] for k in self.spec], dim=1)[:, None])

    def _latent_pass(self, kv: torch.Tensor) -> torch.Tensor:
        """kv (B, 1, M, W) -> latents (B, 1, N, D): cross-attend then the latent processor."""
        z = self.latents()[None, None].expand(kv.shape[0], -1, -1, -1)  # (B, 1, N, D)
        return self.processor(self.cross(z, kv))

    def reconstruct(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = self.adapter.positions()
        q = torch.cat([pos[k] for k in self.spec], dim=0)[None, None]  # (1, 1, sum M, E)
        out = self.recon(q.expand(latents.shape[0], -1, -1, -1), latents)[:, 0]
        parts = out.split([m for m, _ in self.spec.values()], dim=1)
        return self.output(dict(zip(self.spec, parts, strict=True)))

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """dict (B, M, C) -> latents (B, 1, N, D)."""
        if self.position == "learned":
            return self.encode(self.embed(x))
        check_inputs(x, self.spec)
        return self._latent_pass(self.features(x)[:, None])  # (B, M, W) -> (B, 1, M, W)
