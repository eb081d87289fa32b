"""Position encodings: Perceiver Fourier features and learned low-dimensional positions.

Shape letters: M flattened positions (raster order), E embedding channels, K Fourier bands.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.attention import trunc_normal_, variance_scaling_


def fourier_features(shape: tuple[int, ...], *, num_bands: int,
                     max_resolution: tuple[int, ...] | None = None,
                     concat_pos: bool = True) -> torch.Tensor:
    """Perceiver Fourier features for a grid `shape` -> (prod(shape), d * (2K + concat_pos)).

    Per axis, positions x in [-1, 1] and K frequencies spaced linearly from 1 to
    max_resolution/2: features [x, sin(f_k pi x), cos(f_k pi x)] (positions first, then all
    sines, then all cosines, as in the official code). ImageNet: shape (224, 224), K=64 ->
    2 + 2*2*64 = 258 channels.
    """
    max_resolution = max_resolution or shape
    if len(max_resolution) != len(shape):
        raise ValueError(f"max_resolution {max_resolution} does not match shape {shape}")
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    freqs = torch.stack([torch.linspace(1.0, r / 2.0, num_bands) for r in max_resolution])
    # (M, d, 1) * (d, K) -> (M, d, K) -> (M, d*K)
    scaled = (pos[:, :, None] * freqs[None] * math.pi).reshape(pos.shape[0], -1)
    feats = [torch.sin(scaled), torch.cos(scaled)]
    if concat_pos:
        feats.insert(0, pos)
    return torch.cat(feats, dim=-1)


class LearnedPositions(nn.Module):
    """A learned (M, E) table.

    init_std=None: the HiP code's TrainablePositionEncoding init, variance scaling over M
    (Haiku treats the first axis of a 2-D parameter as fan-in): HiP latents and positions.
    init_std=0.02: the Perceiver / Perceiver IO code's truncated normal with std 0.02, used
    for their latent arrays and decoder queries.
    """

    def __init__(self, num_positions: int, channels: int, *,
                 init_std: float | None = None) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.empty(num_positions, channels))
        if init_std is None:
            variance_scaling_(self.table, fan_in=num_positions)
        else:
            trunc_normal_(self.table, std=init_std)

    def forward(self) -> torch.Tensor:
        return self.table
