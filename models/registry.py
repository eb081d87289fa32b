"""Named presets and `create_model`: sizes live here, wiring lives in hip.py / perceiver.py.

Presets (docs/reference.md; official VARIANTS of google-deepmind/hierarchical_perceiver):
  hip_mini, hip16, hip256          HiP; MAE (encoder+processor+decoder) or classify (enc+proc)
  perceiver                        Perceiver 2021, ImageNet sizes, Fourier features; classify
  perceiver_io                     Perceiver IO, ImageNet sizes; classify (Fourier) or MAE
                                   (learned positions)
  hip_tiny, hip_tiny5, perceiver_tiny, perceiver_io_tiny   tiny sizes for tests and CPU demos

`inputs` maps modality -> (M positions, C raw channels), e.g. {"image": (224*224, 3)}.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from torch import nn

from models.heads import Classifier
from models.hip import HiP, LevelSpec
from models.inputs import InputSpec
from models.mae import MaskedAutoencoder
from models.perceiver import Perceiver, PerceiverIO

TASKS = ("mae", "classify")
LEVEL_FIELDS = ("groups", "layers", "heads", "channels", "latents")


@dataclass(frozen=True)
class HiPArch:
    groups: tuple[int, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    channels: tuple[int, ...]
    latents: tuple[int, ...]
    embed_dim: int

    def levels(self) -> list[LevelSpec]:
        n = len(self.groups)
        for f in LEVEL_FIELDS:
            if len(getattr(self, f)) != n:
                raise ValueError(f"{f} has {len(getattr(self, f))} entries, groups has {n}")
        return [LevelSpec(groups=self.groups[i], layers=self.layers[i], heads=self.heads[i],
                          channels=self.channels[i], latents=self.latents[i]) for i in range(n)]


def hip16() -> HiPArch:
    return HiPArch(groups=(16, 4, 1, 1, 1, 4, 16), layers=(2, 2, 18, 2, 1, 1, 1),
                   heads=(4, 8, 16, 32, 16, 8, 4), channels=(128, 256, 512, 1024, 512, 256, 128),
                   latents=(128, 256, 256, 64, 256, 256, 128), embed_dim=32)


def hip256() -> HiPArch:
    return HiPArch(groups=(256, 64, 16, 4, 1, 1, 1, 4, 16, 64, 256),
                   layers=(1, 1, 2, 2, 18, 2, 1, 1, 1, 1, 1),
                   heads=(1, 2, 4, 8, 16, 32, 16, 8, 4, 2, 1),
                   channels=(64, 96, 128, 256, 512, 1024, 256, 128, 64, 32, 16),
                   latents=(32, 64, 128, 256, 256, 64, 256, 256, 128, 64, 32), embed_dim=16)


def hip_mini() -> HiPArch:
    # Heads of "Mini" are not in the paper; the official VARIANTS use 4, 32, 4.
    return HiPArch(groups=(16, 1, 16), layers=(2, 1, 1), heads=(4, 32, 4),
                   channels=(128, 1024, 128), latents=(128, 64, 128), embed_dim=32)


def hip_tiny() -> HiPArch:
    return HiPArch(groups=(4, 1, 4), layers=(1, 1, 1), heads=(2, 4, 2), channels=(32, 64, 32),
                   latents=(8, 4, 8), embed_dim=16)


def hip_tiny5() -> HiPArch:
    # Five levels with a width change across the level-1 -> level-3 skip (exercises its Linear).
    return HiPArch(groups=(4, 2, 1, 2, 4), layers=(1, 1, 1, 1, 1), heads=(2, 2, 4, 2, 2),
                   channels=(16, 32, 64, 24, 16), latents=(8, 8, 4, 8, 8), embed_dim=8)


HIP_PRESETS: dict[str, Callable[[], HiPArch]] = {
    "hip16": hip16, "hip256": hip256, "hip_mini": hip_mini, "hip_tiny": hip_tiny,
    "hip_tiny5": hip_tiny5}

PERCEIVER_PRESETS: dict[str, dict[str, Any]] = {
    "perceiver": dict(num_latents=512, latent_dim=1024, cross_attends=8, self_layers=6,
                      self_heads=8, widening=1, num_bands=64),
    "perceiver_tiny": dict(num_latents=16, latent_dim=32, cross_attends=2, self_layers=1,
                           self_heads=2, widening=1, num_bands=4, learned_channels=8),
}
PERCEIVER_IO_PRESETS: dict[str, dict[str, Any]] = {
    "perceiver_io": dict(num_latents=512, latent_dim=1024, blocks=8, layers_per_block=6,
                         self_heads=8, widening=1, num_bands=64, embed_dim=256),
    "perceiver_io_tiny": dict(num_latents=16, latent_dim=32, blocks=2, layers_per_block=1,
                              self_heads=2, widening=1, num_bands=4, embed_dim=16),
}
PRESETS = sorted([*HIP_PRESETS, *PERCEIVER_PRESETS, *PERCEIVER_IO_PRESETS])


def infer_grids(inputs: InputSpec, grids: Mapping[str, tuple[int, ...]] | None
                ) -> dict[str, tuple[int, ...]]:
    """Grid shape per modality for Fourier features: given, else square images / 1-D audio."""
    out = dict(grids or {})
    for name, (m, _) in inputs.items():
        if name in out:
            continue
        side = math.isqrt(m)
        if name.startswith("image") and side * side == m:
            out[name] = (side, side)
        elif name.startswith("audio"):
            out[name] = (m,)
        else:
            raise ValueError(f"cannot infer the grid of {name!r} with {m} positions; pass "
                             f"grids={{{name!r}: (...)}}")
    return out


def resolve_hip_arch(name: str, overrides: dict[str, Any]) -> HiPArch:
    """Preset + overrides (groups/layers/heads/channels/latents tuples, embed_dim, width_mult)."""
    arch = HIP_PRESETS[name]()
    changes = {k: tuple(overrides.pop(k)) for k in LEVEL_FIELDS if k in overrides}
    if "embed_dim" in overrides:
        changes["embed_dim"] = int(overrides.pop("embed_dim"))
    arch = replace(arch, **changes)
    mult = overrides.pop("width_mult", None)
    if mult is not None:
        if mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {mult}")
        chans = tuple(max(1, round(c * mult)) for c in arch.channels)
        bad = [(c, h) for c, h in zip(chans, arch.heads, strict=True) if c % h]
        if bad:
            raise ValueError(f"width_mult={mult} gives channels {chans}; heads do not divide "
                             f"(channels, heads) {bad}")
        arch = replace(arch, channels=chans)
    return arch


def create_model(name: str, *, inputs: InputSpec, task: str = "mae",
                 num_classes: int | None = None, head: str | None = None,
                 mask_ratio: float = 0.85, masking: str = "per_group", target_norm: str = "none",
                 **overrides: Any) -> nn.Module:
    """Build a preset for a task.

    task "mae" -> MaskedAutoencoder (forward returns (loss, prediction, mask));
    task "classify" -> Classifier (forward returns logits (B, num_classes)).
    head: "learned_query" or "mean_pool"; default mean_pool for the Perceiver (its published
    head), learned_query (Perceiver IO decoder) otherwise.
    HiP overrides: groups/layers/heads/channels/latents (full tuples), embed_dim, width_mult,
    processor_latents_train, checkpoint_levels, dropout, drop_path_rate, activation.
    Perceiver / Perceiver IO overrides: any constructor argument (position, grids, ...).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "classify" and num_classes is None:
        raise ValueError("task='classify' needs num_classes")
    if not inputs:
        raise ValueError("inputs must name at least one modality")
    for k, v in inputs.items():
        if len(v) != 2 or min(v) < 1:
            raise ValueError(f"inputs[{k!r}] must be (positions, channels) >= 1, got {v}")
    overrides = dict(overrides)
    activation = overrides.get("activation", "sq_relu" if name in HIP_PRESETS else "gelu")
    if name in HIP_PRESETS:
        arch = resolve_hip_arch(name, overrides)
        backbone = HiP(inputs=inputs, levels=arch.levels(), embed_dim=arch.embed_dim,
                       decoder=task == "mae", **overrides)
    elif name in PERCEIVER_PRESETS:
        if task == "mae":
            raise ValueError("the Perceiver preset has no MAE decoder; use hip* or perceiver_io")
        kw = {**PERCEIVER_PRESETS[name], **overrides}
        if kw.get("position", "fourier") == "fourier":
            kw["grids"] = infer_grids(inputs, kw.get("grids"))
        backbone = Perceiver(inputs=inputs, **kw)
    elif name in PERCEIVER_IO_PRESETS:
        # Fourier features for classification (the ImageNet model); MAE needs learned positions.
        kw = {**PERCEIVER_IO_PRESETS[name], "position": "learned" if task == "mae" else "fourier",
              **overrides}
        if kw["position"] == "fourier":
            kw["grids"] = infer_grids(inputs, kw.get("grids"))
        backbone = PerceiverIO(inputs=inputs, decoder=task == "mae", **kw)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {PRESETS}")
    if task == "mae":
        return MaskedAutoencoder(backbone, mask_ratio=mask_ratio, masking=masking,
                                 target_norm=target_norm)
    if head is None:
        head = "mean_pool" if name in PERCEIVER_PRESETS else "learned_query"
    return Classifier(backbone, num_classes=num_classes, head=head, activation=activation)


class LoadReport(NamedTuple):
    loaded: list[str]
    missing: list[str]  # in the classifier, not in the MAE state (the head)
    unexpected: list[str]  # in the MAE state, not in the classifier (decoder, recon head)


def load_mae_weights(classifier: nn.Module, mae_state: Mapping[str, Any], *,
                     dry_run: bool = False) -> LoadReport:
    """Copy the shared encoder/processor weights of an MAE state dict into a classifier.

    Raises ValueError naming the keys whose shapes differ (a different preset or input size).
    dry_run=True only checks and reports (works on a meta-device model).
    """
    own = classifier.state_dict()
    shared = {k: v for k, v in mae_state.items() if k in own}
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in shared.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("MAE weights do not fit this classifier: " + "; ".join(bad[:5]))
    if not dry_run:
        classifier.load_state_dict(shared, strict=False)
    return LoadReport(loaded=sorted(shared), missing=sorted(set(own) - set(mae_state)),
                      unexpected=sorted(set(mae_state) - set(own)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["HiPArch", "create_model", "load_mae_weights", "count_parameters", "PRESETS",
           "LoadReport", "infer_grids"]
