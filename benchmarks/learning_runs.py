"""The learning benchmark's runs: class folders -> shards -> tensors in memory, the in-process
training loop over the pipeline's own pieces, and the linear models (the raw-input floor and
the frozen-feature probe). `benchmarks/learning.py` is the command and the table.

Shape letters: N examples, B batch, D latent channels, F features.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# Data: class folders -> shards (run_preprocess, once) -> tensors in memory
# --------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split in memory: raw shard tensors (uint8 images, int16/float32 audio) + labels."""

    tensors: dict[str, Any]  # column -> torch tensor (N, *shape)
    labels: Any  # torch int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx) -> dict[str, Any]:
        return {**{k: v[idx] for k, v in self.tensors.items()}, "label": self.labels[idx]}

    def subset(self, idx) -> Split:
        return Split({k: v[idx] for k, v in self.tensors.items()}, self.labels[idx])


def sample_folder(workdir: Path, modality: str, per_class: int) -> Path:
    """The embedded sample data (images drawn at 64 px, audio 16 kHz 1 s), written once."""
    from pipeline.data.sample_data import write_sample_data

    raw = workdir / f"sample-{per_class}"
    done = raw / f".done-{modality}"
    if not done.exists():
        write_sample_data(raw, per_class=per_class, seed=0, modalities=(modality,),
                          image_size=64, sample_rate=16_000, audio_seconds=1.0)
        done.write_text("ok\n")
    return raw / modality


DIGITS_RESAMPLE = "bilinear"


def digits_folder(workdir: Path, size: int = 16) -> Path:
    """scikit-learn's bundled digits (1,797 8x8 greyscale scans, values 0..16, 10 classes;
    shipped inside sklearn, no download) written once as class folders 0..9 of greyscale
    PNGs, values scaled to 0..255 and upscaled to size x size with Pillow's bilinear filter:
    the user's set of issue 15 ("about 1,800 small greyscale scans, 10 classes")."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = workdir / f"digits-{size}px"
    done = root / ".done"
    if done.exists():
        return root
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        im = Image.fromarray(pixels)  # (8, 8) uint8 -> mode "L"
        if size != pixels.shape[0]:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        im.save(folder / f"{i:04d}.png")
    done.write_text("ok\n")
    return root


def preprocess(data: Path, out: Path, modality: str, overrides: list[str],
               log: Callable[[str], None]) -> dict[str, Any]:
    """Shards of `data` at `out` through the real run_preprocess; reused if a manifest exists."""
    from pipeline.data import layout

    if (out / layout.MANIFEST).exists():
        log(f"reusing shards {out}")
        return layout.read_manifest(str(out))
    import ray

    from pipeline.config import load_config
    from pipeline.data.config import PreprocessConfig
    from pipeline.data.preprocess import run_preprocess

    cfg = load_config(PreprocessConfig, None, overrides,
                      {"modality": modality, "input": str(data), "output": str(out)})
    out.mkdir(parents=True, exist_ok=True)
    started, address = not ray.is_initialized(), os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    try:
        manifest = run_preprocess(cfg, overwrite=True, echo=log)
    finally:
        if started and ray.is_initialized():  # free the 2 cores for training
            ray.shutdown()
            if address is None:
                os.environ.pop("RAY_ADDRESS", None)
    log(f"preprocessed {data} -> {out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def read_split(root: Path, manifest: dict[str, Any], split: str) -> Split:
    """All rows of a split from the manifest's shard files; tensor columns decoded from
    their raw bytes (codec.tensor_to_numpy; dtype and shape from the manifest)."""
    import pyarrow.parquet as pq
    import torch

    from pipeline import storage
    from pipeline.data import codec, layout

    schema = codec.tensor_column_schema(manifest)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in schema}
    labels: list[np.ndarray] = []
    for uri in layout.shard_uris(str(root), split, manifest):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, columns=[*schema, "label"],
                              filesystem=storage.arrow_filesystem(fs))
        for name, (dtype, shape) in schema.items():
            parts[name].append(codec.tensor_to_numpy(table.column(name), dtype, shape).copy())
        labels.append(table.column("label").to_numpy().astype(np.int64))
    if not labels:
        raise ValueError(f"split {split!r} of {root} has no shard files")
    y = torch.from_numpy(np.concatenate(labels))
    if bool((y < 0).any()):
        raise ValueError(f"split {split!r} of {root} has unlabelled rows (label -1): the "
                         "input must be class folders")
    return Split({k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}, y)


# --------------------------------------------------------------------------------------
# Training: the pipeline's model, optimizer and schedule in a plain loop
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    accuracy: float | None = None  # classify: final val accuracy
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, val metric)
    swing: float | None = None
    train_loss: float = float("nan")  # mean over the last 10% of steps
    val_loss: float = float("nan")
    wall_s: float = 0.0
    state: dict[str, Any] | None = None  # MAE: the trained weights


def global_batch(cfg) -> int:
    return cfg.optim.batch_size * max(1, cfg.trainer.max_workers) * cfg.optim.grad_accum


def evaluate(model, cfg, spec, val: Split, batch_size: int = 128) -> tuple[float, float]:
    """-> (val loss, val accuracy) (MAE: fixed masks, accuracy nan)."""
    import torch
    import torch.nn.functional as F

    from pipeline.train.batches import to_model_input

    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same MAE masks at every evaluation
    loss_sum = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(val), batch_size):
            b = val.batch(slice(i, i + batch_size))
            x = to_model_input(b, spec, cfg.data.audio)
            n = b["label"].shape[0]
            if cfg.task == "mae":
                loss_sum += float(model(x, generator=gen)[0]) * n
            else:
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, b["label"])) * n
                correct += float((logits.argmax(-1) == b["label"]).sum())
    model.train()
    n = max(len(val), 1)
    return loss_sum / n, (correct / n if cfg.task == "classify" else float("nan"))


def train(cfg, manifest, train_split: Split, val: Split, *, seed: int,
          init: dict[str, Any] | None = None, evals: int = 0,
          llrd: float | None = None) -> RunResult:
    """cfg.trainer.steps optimizer steps; `evals` evaluations spread over them (plus the final
    one). Returns final val metrics, the eval history and (MAE) the trained state dict.
    llrd: optim.layer_decay for classification (None: the config's)."""
    import torch
    import torch.nn.functional as F

    from models import load_mae_weights
    from pipeline.train.augment import augment
    from pipeline.train.batches import input_spec, to_model_input
    from pipeline.train.build import build_model, lr_factor, make_optimizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    spec = input_spec(manifest, cfg.data.audio)
    model = build_model(cfg, manifest)
    if init is not None:
        load_mae_weights(model, init)
    if llrd is not None and cfg.task == "classify":
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(
            update={"layer_decay": llrd})})
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    steps, n = cfg.trainer.steps, len(train_split)
    bs = min(global_batch(cfg), n)
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=order), 0
    eval_at = {math.ceil(i * steps / evals) for i in range(1, evals + 1)} if evals else set()
    out = RunResult()
    losses: list[float] = []
    model.train()
    for step in range(1, steps + 1):
        if pos + bs > n:  # a new epoch: a fresh permutation (drop_last, as the pipeline)
            perm, pos = torch.randperm(n, generator=order), 0
        b = train_split.batch(perm[pos:pos + bs])
        pos += bs
        x = to_model_input(augment(b, cfg.data.augment), spec, cfg.data.audio)
        if cfg.task == "mae":
            loss = model(x)[0]
        else:
            loss = F.cross_entropy(model(x), b["label"],
                                   label_smoothing=cfg.optim.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step in eval_at and step != steps:
            vl, acc = evaluate(model, cfg, spec, val)
            out.history.append((step, acc if cfg.task == "classify" else vl))
    out.val_loss, acc = evaluate(model, cfg, spec, val)
    if cfg.task == "classify":
        out.accuracy = acc
    out.history.append((steps, acc if cfg.task == "classify" else out.val_loss))
    out.train_loss = statistics.fmean(losses[-max(1, steps // 10):])
    if cfg.task == "classify" and evals:
        pairs = zip(out.history, out.history[1:], strict=False)
        drops = [a0 - a1 for (s0, a0), (_, a1) in pairs if s0 >= cfg.optim.warmup_steps]
        out.swing = max([0.0, *drops])
    if cfg.task == "mae":
        out.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.wall_s = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------
# Linear models: the raw-input floor (a) and the probe (e)
# --------------------------------------------------------------------------------------


def logreg_accuracy(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray,
                    seed: int = 0) -> float:
    """Standardised features -> multinomial logistic regression -> val accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    clf.fit(xtr, ytr)
    return float((clf.predict(xva) == yva).mean())


def raw_accuracy(tr: Split, va: Split, kind: str = "raw", seed: int = 0) -> float:
    return logreg_accuracy(raw_features(tr, kind), tr.labels.numpy(), raw_features(va, kind),
                           va.labels.numpy(), seed)


def probe_accuracy(cfg, manifest, tr: Split, va: Split, *, seed: int, init, kind: str) -> float:
    def feats(s: Split) -> np.ndarray:
        return frozen_features(cfg, manifest, s, seed=seed, init=init, kind=kind)
    return logreg_accuracy(feats(tr), tr.labels.numpy(), feats(va), va.labels.numpy(), seed)


def raw_features(split: Split, kind: str) -> np.ndarray:
    """Raw inputs as a (N, F) float matrix: pixels / samples, or log-spectrogram features."""
    import torch

    from pipeline.data.config import AUDIO_INT16_SCALE

    if kind == "raw":
        return torch.cat([v.reshape(len(split), -1).float() for v in split.tensors.values()],
                         1).numpy()
    audio = split.tensors["audio"]
    x = audio.float() / AUDIO_INT16_SCALE if audio.dtype == torch.int16 else audio.float()
    n_fft = 256 if x.shape[1] >= 256 else 2 ** int(math.log2(max(x.shape[1], 4)))
    spec = torch.stft(x, n_fft=n_fft, hop_length=n_fft // 2, window=torch.hann_window(n_fft),
                      return_complex=True).abs()  # (N, n_fft/2 + 1, frames)
    spec = torch.log1p(spec)
    pooled = torch.nn.functional.adaptive_avg_pool2d(spec[:, None], (32, 16))  # (N, 1, 32, 16)
    return pooled.reshape(len(split), -1).numpy()


PROBES = {  # arm e's frozen features of the classifier backbone (encoder + processor)
    "mean": "mean over the last level's latents (B, K, D) -> D (the original probe)",
    "flat": "the last level's latents concatenated (B, K*D)",
    "enc": "level 0's latents, mean over each group's K, groups concatenated (B, G*D0)",
    "cat": "mean + enc concatenated", "pre": "the last level's latents before its last "
    "self-attention layer, mean (B, D)", "preflat": "the same, concatenated (B, K*D)"}


def frozen_features(cfg, manifest, split: Split, *, seed: int,
                    init: dict[str, Any] | None, kind: str = "mean") -> np.ndarray:
    """Features of the classifier backbone (encoder + processor), weights frozen: `kind` is
    one of PROBES. Shapes: levels give (B, G, K, D); the processor has G = 1."""
    import torch

    from models import load_mae_weights
    from pipeline.train.batches import input_spec, to_model_input
    from pipeline.train.build import build_model

    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {list(PROBES)}")
    torch.manual_seed(seed)
    spec = input_spec(manifest, cfg.data.audio)
    model = build_model(cfg, manifest)
    if init is not None:
        load_mae_weights(model, init)
    model.eval()
    backbone = model.backbone
    seen: dict[str, torch.Tensor] = {}
    hooks = [backbone.levels[0].register_forward_hook(
        lambda m, i, o: seen.__setitem__("enc", o))]
    last = backbone.levels[-1]
    if len(last.layers):
        hooks.append(last.layers[-1].register_forward_hook(
            lambda m, i, o: seen.__setitem__("pre", i[0])))
    feats = []
    try:
        with torch.no_grad():
            for i in range(0, len(split), 128):
                x = to_model_input(split.batch(slice(i, i + 128)), spec, cfg.data.audio)
                z = backbone(x)  # (B, G, K, D)
                pre = seen.get("pre", z)
                if kind == "mean":
                    f = z.flatten(1, -2).mean(1)
                elif kind == "flat":
                    f = z.flatten(1)
                elif kind in ("enc", "cat"):
                    f = seen["enc"].mean(2).flatten(1)  # (B, G0, K0, D0) -> (B, G0*D0)
                    if kind == "cat":
                        f = torch.cat([z.flatten(1, -2).mean(1), f], 1)
                elif kind == "pre":
                    f = pre.flatten(1, -2).mean(1)
                else:  # preflat
                    f = pre.flatten(1)
                feats.append(f)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats).numpy()


def k_shot(split: Split, k: int, seed: int) -> Split:
    """k examples per class (all of a class that has fewer), drawn with the seed."""
    rng = np.random.default_rng([seed, k])
    y = split.labels.numpy()
    idx = [rng.choice(np.flatnonzero(y == c), min(k, int((y == c).sum())), replace=False)
           for c in np.unique(y)]
    return split.subset(np.sort(np.concatenate(idx)))
