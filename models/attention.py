"""Attention layers shared by Perceiver, Perceiver IO and HiP.

Shape letters: B batch, G groups, N query tokens, M key/value tokens, C/D channels, H heads.
Every layer accepts any number of leading dims (``...``): (B, N, C) and (B, G, N, C) alike, so
groups never need a Python loop: they ride along as a batch dim into one SDPA call.

Conventions (docs/reference.md, official HiP code):
- All Linear layers have biases; LayerNorms have scale and bias.
- Logits are scaled by 1/sqrt(head_dim); softmax is taken in fp32. The fused SDPA kernels
  (flash / memory-efficient on GPU, flash on CPU) accumulate the softmax in fp32 even under
  bf16 autocast; `attention_reference` upcasts explicitly and is the test oracle.
- Weights use Haiku's VarianceScaling(1.0) (fan_in, truncated normal), biases zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Haiku's truncated normal divides by this so the truncated distribution keeps the variance.
_TRUNC_STD_CORRECTION = 0.87962566103423978


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated to +-2 std, in place, by inverse CDF.

    One pass, no rejection loop: torch's own trunc_normal_ resamples until all values fall
    inside and took ~25 s to initialise HiP-256 on a 2-core CPU; this takes well under 1 s.
    """
    if tensor.is_meta:  # shapes only (a preflight build): on meta, erfinv_ and clamp_ go
        return tensor  # through torch._refs, which imports torch._dynamo (~1.2 s of CPU)
    lo = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))  # Phi(-2)
    with torch.no_grad():
        tensor.uniform_(2 * lo - 1, 1 - 2 * lo)  # erf-space image of [Phi(-2), Phi(2)]
        tensor.erfinv_().mul_(std * math.sqrt(2.0))
        return tensor.clamp_(-2 * std, 2 * std)


def variance_scaling_(tensor: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
    """Haiku VarianceScaling(scale, 'fan_in', 'truncated_normal') in place."""
    return trunc_normal_(tensor, math.sqrt(scale / max(1, fan_in)) / _TRUNC_STD_CORRECTION)


def linear(in_features: int, out_features: int, *, init_scale: float = 1.0) -> nn.Linear:
    """A Linear with bias, Haiku-initialised (init_scale 0 gives zeros, as for unembedding)."""
    layer = nn.Linear(in_features, out_features, bias=True)
    if init_scale == 0.0:
        nn.init.zeros_(layer.weight)
    else:
        variance_scaling_(layer.weight, fan_in=in_features, scale=init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


ACTIVATIONS = {"sq_relu": squared_relu, "gelu": F.gelu, "relu": F.relu}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain attention, softmax in fp32. q (..., H, N, d), k/v (..., H, M, d) -> (..., H, N, d)."""
    logits = torch.einsum("...nd,...md->...nm", q, k) / math.sqrt(q.shape[-1])
    weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
    return torch.einsum("...nm,...md->...nd", weights, v)


class Attention(nn.Module):
    """Multi-head attention: Q from `q_dim`, K/V from `kv_dim`, output `out_dim`.

    q (..., N, q_dim), kv (..., M, kv_dim) -> (..., N, out_dim). qk_channels and v_channels
    default to kv_dim (HiP cross-attention: widths equal the key/value input width).
    """

    def __init__(
        self,
        *,
        q_dim: int,
        kv_dim: int,
        num_heads: int,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        qk_channels = qk_channels or kv_dim
        v_channels = v_channels or qk_channels
        out_dim = out_dim or q_dim
        for name, width in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if width % num_heads:
                raise ValueError(f"{name}={width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.use_sdpa = True  # False routes through attention_reference (tests, debugging)
        self.q = linear(q_dim, qk_channels)
        self.k = linear(kv_dim, qk_channels)
        self.v = linear(kv_dim, v_channels)
        self.out = linear(v_channels, out_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., N, H*d) -> (..., H, N, d)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        lead = q_in.shape[:-2]
        # Fold leading dims (B, G, ...) into one batch dim: the fused kernels want 4-D inputs.
        q = self._heads(self.q(q_in)).flatten(0, -4) if lead else self._heads(self.q(q_in))
        k = self._heads(self.k(kv_in)).reshape(q.shape[:-2] + (-1, q.shape[-1]))
        v = self._heads(self.v(kv_in))
        v = v.reshape(q.shape[:-2] + v.shape[-2:])
        if self.use_sdpa:
            p = self.dropout if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            o = attention_reference(q, k, v)
        o = o.transpose(-3, -2).flatten(-2)  # (B*, H, N, d) -> (B*, N, H*d)
        return self.out(o.reshape(lead + o.shape[-2:]))


class MLP(nn.Module):
    """x (..., D) -> (..., D) through a hidden layer of widening * D."""

    def __init__(self, dim: int, *, widening: int, activation: str = "sq_relu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = linear(dim, widening * dim)
        self.fc2 = linear(widening * dim, dim)
        self.act = get_activation(activation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per example (dim 0); rate 0 is the identity."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= rate
    return x * keep.to(x.dtype) / (1.0 - rate)


class CrossAttentionBlock(nn.Module):
    """Queries (..., N, q_dim) attend to inputs (..., M, kv_dim) -> (..., N, q_dim).

    x = Attn(LN(q), LN(kv)) [+ q if query_residual]; x += MLP(LN(x)). Separate LayerNorms for
    queries and inputs. Q/K/V widths = kv_dim (REFERENCE: width of the block's input).
    """

    def __init__(self, *, q_dim: int, kv_dim: int, num_heads: int = 1, widening: int = 1,
                 query_residual: bool = True, activation: str = "sq_relu",
                 qk_channels: int | None = None) -> None:
        super().__init__()
        self.query_residual = query_residual
        self.norm_q = nn.LayerNorm(q_dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = Attention(q_dim=q_dim, kv_dim=kv_dim, num_heads=num_heads,
                              qk_channels=qk_channels or kv_dim, out_dim=q_dim)
        self.norm_mlp = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening=widening, activation=activation)

    def forward(self, queries: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm_q(queries), self.norm_kv(inputs))
        if self.query_residual:
            x = x + queries
        return x + self.mlp(self.norm_mlp(x))


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer layer on (..., N, D): x += attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, *, num_heads: int, widening: int = 4,
                 activation: str = "sq_relu", dropout: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channels {dim} are not divisible by num_heads={num_heads}")
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(q_dim=dim, kv_dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, widening=widening, activation=activation, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + drop_path(self.drop(self.attn(h, h)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm_mlp(x)), self.drop_path_rate, self.training)
