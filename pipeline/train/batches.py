"""From shard rows to model inputs: input specs from the manifest, batch normalisation.

Shape letters: B batch, H/W image size, F frames, T audio samples, M positions, C channels.
Shard columns (pipeline/data/preprocess.py, README "Data"): image uint8 (B, H, W, 3); audio
float32 or int16 (B, T) (see preprocess's audio.dtype; int16 holds round(x * 32767)); video
uint8 (B, F, H, W, 3). Model input: dict modality -> (B, M, C) float32, positions in raster
order; audio is (B, T, 1) samples or, with data.audio.kind=log_spectrogram, (B, S, K) frames
(S = 1 + T // hop STFT frames, K = window // 2 + 1 frequency bins).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.data.config import AUDIO_INT16_SCALE
from pipeline.train.config import AudioFeatures

# ImageNet statistics: a standard choice for RGB pixels (audio is already in [-1, 1]).
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
TENSOR_COLUMNS = {"image": ("image",), "audio": ("audio",), "video": ("video",),
                  "audio+video": ("video", "audio")}


def dataset_modality(manifest: Mapping[str, Any]) -> str:
    mod = manifest.get("modality") or manifest.get("config", {}).get("modality")
    if mod not in TENSOR_COLUMNS:
        raise ValueError(f"manifest names no known modality (got {mod!r})")
    return mod


RAW_AUDIO = AudioFeatures()


def input_spec(manifest: Mapping[str, Any], audio: AudioFeatures = RAW_AUDIO
               ) -> dict[str, tuple[int, int]]:
    """Manifest column shapes -> the model's inputs {modality: (M, C)}; `audio` is the
    config's data.audio (raw samples by default)."""
    columns = manifest["columns"]
    spec: dict[str, tuple[int, int]] = {}
    for col in TENSOR_COLUMNS[dataset_modality(manifest)]:
        shape = tuple(columns[col]["shape"])
        if col == "audio":
            spec[col] = audio_shape(shape[0], audio)
        else:  # image (H, W, 3) or video (F, H, W, 3)
            m = 1
            for n in shape[:-1]:
                m *= n
            spec[col] = (m, shape[-1])
    return spec


def audio_shape(samples: int, audio: AudioFeatures) -> tuple[int, int]:
    """(M, C) of a clip of `samples` samples: (T, 1) raw, (1 + T // hop, window // 2 + 1)."""
    if audio.kind == "raw":
        return samples, 1
    if audio.window > samples:
        raise ValueError(f"data.audio.window={audio.window} is longer than the clips "
                         f"({samples} samples)")
    return 1 + samples // audio.hop, audio.window // 2 + 1


def log_spectrogram(x: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """Samples (B, T) in [-1, 1] -> log power (B, 1 + T // hop, window // 2 + 1), each clip
    standardised over all its frames and bins (silence is floored at 1e-10 power, -100 dB).

    Frames are centred (torch.stft center=True, reflect padding); any device.
    """
    spec = torch.stft(x, n_fft=window, hop_length=hop,
                      window=torch.hann_window(window, device=x.device), center=True,
                      return_complex=True)  # (B, K, S)
    power = torch.log(spec.real.square() + spec.imag.square() + 1e-10).transpose(1, 2)
    mean = power.mean(dim=(1, 2), keepdim=True)
    std = power.std(dim=(1, 2), keepdim=True)
    return (power - mean) / (std + 1e-5)


def to_model_input(batch: Mapping[str, torch.Tensor], spec: Mapping[str, tuple[int, int]],
                   audio: AudioFeatures = RAW_AUDIO) -> dict[str, torch.Tensor]:
    """Raw shard tensors -> normalised float (B, M, C); works on any device. `audio` must be
    the one `spec` was made with (input_spec)."""
    out = {}
    for name, (m, c) in spec.items():
        x = batch[name]
        b = x.shape[0]
        if name == "audio":  # (B, T); int16 shards hold round(x * 32767)
            x = x.float() / AUDIO_INT16_SCALE if x.dtype == torch.int16 else x.float()
            if audio.kind == "raw":
                out[name] = x.reshape(b, m, 1)  # (B, T) -> (B, T, 1)
            else:
                out[name] = log_spectrogram(x, audio.window, audio.hop)  # (B, S, K)
        else:
            x = x.reshape(b, m, c).float() / 255.0  # (B, [F,] H, W, 3) -> (B, M, 3)
            mean = torch.tensor(RGB_MEAN, device=x.device)
            std = torch.tensor(RGB_STD, device=x.device)
            out[name] = (x - mean) / std
    return out


def to_pixels(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised image tokens (B, H*W, 3) -> pixels in [0, 1], (B, H, W, 3)."""
    mean = torch.tensor(RGB_MEAN, device=x.device)
    std = torch.tensor(RGB_STD, device=x.device)
    return (x.float() * std + mean).clamp(0, 1).reshape(x.shape[0], *size, 3)
