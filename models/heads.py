"""Output heads: classification (learned query, mean pool) and the dense reconstruction head.

Shape letters: B batch, G groups, K latents per group, D latent channels, E embedding
channels, N query tokens per group, C raw channels.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import CrossAttentionBlock, linear
from models.position import LearnedPositions

HEAD_KINDS = ("learned_query", "mean_pool")
QUERY_INIT_STD = 0.02  # the official Perceiver IO decoder query init


class MeanPoolHead(nn.Module):
    """latents (B, ..., K, D) -> mean over all latents -> LN -> Linear -> (B, classes).

    The LayerNorm is our choice (the paper does not publish its head): the latents are an
    un-normalised pre-LN residual stream, so the head normalises before the classifier.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = linear(dim, num_classes)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        pooled = latents.flatten(1, -2).mean(dim=1)  # (B, ..., K, D) -> (B, D)
        return self.fc(self.norm(pooled))


class LearnedQueryHead(nn.Module):
    """Perceiver IO classification decoder: one learned query (1, D), truncated-normal std
    0.02 as in the official code, cross-attends to the latents (1 head, widening 1, query
    residual), then Linear -> (B, classes). No LayerNorm before the logits: the official
    decoder has none (its cross-attention already normalises the latents it reads)."""

    def __init__(self, dim: int, num_classes: int, *, activation: str = "sq_relu") -> None:
        super().__init__()
        self.query = LearnedPositions(1, dim, init_std=QUERY_INIT_STD)
        self.cross = CrossAttentionBlock(q_dim=dim, kv_dim=dim, num_heads=1, widening=1,
                                         query_residual=True, activation=activation)
        self.fc = linear(dim, num_classes)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        kv = latents.flatten(1, -2)  # (B, ..., K, D) -> (B, L, D)
        q = self.query()[None].expand(kv.shape[0], -1, -1)  # (B, 1, D)
        return self.fc(self.cross(q, kv)[:, 0])  # (B, 1, D) -> (B, D) -> (B, classes)


def make_classifier_head(kind: str, dim: int, num_classes: int, *,
                         activation: str = "sq_relu") -> nn.Module:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if kind == "mean_pool":
        return MeanPoolHead(dim, num_classes)
    if kind == "learned_query":
        return LearnedQueryHead(dim, num_classes, activation=activation)
    raise ValueError(f"unknown head {kind!r}; choose one of {HEAD_KINDS}")


class ReconstructionHead(nn.Module):
    """MAE decoder: position queries (B, G, N, E) attend to latents (B, G, K, D) -> (B, G, N, E).

    The same cross-attention module as the HiP blocks: Q/K/V widths = D (the key/value width),
    output projected D -> E, 1 head, NO query residual, then x += MLP(LN(x)), widening 1.
    Unembedding E -> C happens in the OutputAdapter (zero-initialised).
    """

    def __init__(self, *, embed_dim: int, latent_dim: int, activation: str = "sq_relu") -> None:
        super().__init__()
        self.cross = CrossAttentionBlock(q_dim=embed_dim, kv_dim=latent_dim, num_heads=1,
                                         widening=1, query_residual=False, activation=activation)

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if queries.shape[:-2] != latents.shape[:-2]:
            raise ValueError(f"query groups {tuple(queries.shape[:-2])} do not match latent "
                             f"groups {tuple(latents.shape[:-2])}")
        return self.cross(queries, latents)


class Classifier(nn.Module):
    """A backbone that returns latents (B, ..., K, D) plus a classification head.

    dict (B, M, C) -> logits (B, classes). For HiP the backbone holds the encoder + processor
    only (built with decoder=False), as in the paper's fine-tuning.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int, head: str = "learned_query",
                 activation: str = "sq_relu") -> None:
        super().__init__()
        if getattr(backbone, "decoder", False):
            raise ValueError("classification uses the encoder + processor only: "
                             "build the backbone with decoder=False")
        self.backbone = backbone
        self.head = make_classifier_head(head, backbone.out_channels, num_classes,
                                         activation=activation)

    def forward(self, x) -> torch.Tensor:
        return self.head(self.backbone(x))
