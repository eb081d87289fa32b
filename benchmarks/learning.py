"""Learning quality of the quickstart training configs: floors, HiP, MAE, label scarcity.

    python -m benchmarks.learning [--data DIR] [--modality image|audio] [--size S]
        [--seeds N] [--quick] [--arms a,b,c,d,e,f] [--pretrain-steps N] [--finetune-steps N]
        [--pretrain-config YAML] [--finetune-config YAML] [--pre K=V] [--ft K=V]
        [--cache-mae] [--json PATH] [key=value ...]

A class-folder set (ImageFolder layout; default: the embedded sample data, written once under
--workdir) goes once through the real `run_preprocess` (Ray Data; reused when its manifest
exists), then the train and val shards are read into memory with pyarrow. Training runs the
pipeline's own pieces (build_model from a TrainConfig, make_optimizer, lr_factor,
to_model_input, load_mae_weights) in a plain in-process CPU loop: one fixed seed per run,
batches from a seeded per-epoch permutation, global batch = optim.batch_size x
max(1, trainer.num_workers) x optim.grad_accum (what the quickstart's workers see together).

Arms (val accuracy on the full val split, mean +- std over seeds):
  a  logistic regression on the raw inputs (standardised); audio: log-spectrogram features
     (the floor) and raw samples
  b  HiP from scratch, full labels (fine-tune config)
  c  HiP fine-tuned from its MAE run (pretrain config on the train split, no labels)
  d  label-scarce: k = 5 and 20 labels per class (seeded subset of train), MAE init (c's MAE
     model) vs scratch
  e  linear probe (logistic regression) on frozen features: mean of the classifier backbone's
     latents (B, ..., K, D) -> (B, D); MAE encoder vs a randomly initialised one
  f  the Perceiver with Fourier features from scratch (--perceiver-preset), fine-tune config
b and c evaluate every ~10% of the steps; "swing" is the largest drop of val accuracy between
consecutive evaluations after warm-up. Overrides: key=value for both configs, --pre / --ft for
one of them (e.g. mae.masking=groupwise, mae.target_norm=group, optim.lr=1e-3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine

ROOT = Path(__file__).resolve().parents[1]
ARMS = "abcdef"
TARGET_SWING = 0.10
TARGET_D_GAIN = 0.05
TARGET_E_GAIN = 0.10


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
    from pipeline.sample_data import write_sample_data

    raw = workdir / f"sample-{per_class}"
    done = raw / f".done-{modality}"
    if not done.exists():
        write_sample_data(raw, per_class=per_class, seed=0, modalities=(modality,),
                          image_size=64, sample_rate=16_000, audio_seconds=1.0)
        done.write_text("ok\n")
    return raw / modality


def preprocess(data: Path, out: Path, modality: str, overrides: list[str],
               log: Callable[[str], None]) -> dict[str, Any]:
    """Shards of `data` at `out` through the real run_preprocess; reused if a manifest exists."""
    from pipeline import shards

    if (out / shards.MANIFEST).exists():
        log(f"reusing shards {out}")
        return shards.read_manifest(str(out))
    import ray

    from pipeline.config import PreprocessConfig, load_config
    from pipeline.preprocess import run_preprocess

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
    """All rows of a split from the manifest's shard files; tensor columns decoded by hand
    from their fixed-size-binary bytes (dtype and shape from the manifest)."""
    import pyarrow.parquet as pq
    import torch

    from pipeline import shards

    schema = shards.tensor_column_schema(manifest)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in schema}
    labels: list[np.ndarray] = []
    for uri in shards.shard_uris(str(root), split, manifest):
        fs, path = shards.resolve(uri)
        table = pq.read_table(path, columns=[*schema, "label"],
                              filesystem=shards.arrow_filesystem(fs))
        for name, (dtype, shape) in schema.items():
            col = table.column(name).combine_chunks()
            n, width = len(col), col.type.byte_width
            raw = np.frombuffer(col.buffers()[1], np.uint8, n * width, col.offset * width)
            parts[name].append(raw.view(dtype).reshape(n, *shape).copy())
        labels.append(table.column("label").to_numpy().astype(np.int64))
    if not labels:
        raise ValueError(f"split {split!r} of {root} has no shard files")
    y = torch.from_numpy(np.concatenate(labels))
    if bool((y < 0).any()):
        raise ValueError(f"split {split!r} of {root} has unlabelled rows (label -1): the "
                         "input must be class folders")
    return Split({k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}, y)


def shards_tag(args: argparse.Namespace, data: Path) -> str:
    if args.data is None:
        name = f"sample{args.per_class}"
    else:
        digest = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:8]
        name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', data.name)}-{digest}"
    if args.modality == "image":
        return f"{name}-image-s{args.size}"
    return f"{name}-audio-{args.sample_rate}hz-{args.seconds:g}s"


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
    return cfg.optim.batch_size * max(1, cfg.trainer.num_workers) * cfg.optim.grad_accum


def evaluate(model, cfg, spec, val: Split, batch_size: int = 128) -> tuple[float, float]:
    """-> (val loss, val accuracy) (MAE: fixed masks, accuracy nan)."""
    import torch
    import torch.nn.functional as F

    from pipeline.batches import to_model_input

    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same MAE masks at every evaluation
    loss_sum = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(val), batch_size):
            b = val.batch(slice(i, i + batch_size))
            x = to_model_input(b, spec)
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
          init: dict[str, Any] | None = None, evals: int = 0) -> RunResult:
    """cfg.trainer.steps optimizer steps; `evals` evaluations spread over them (plus the final
    one). Returns final val metrics, the eval history and (MAE) the trained state dict."""
    import torch
    import torch.nn.functional as F

    from models import load_mae_weights
    from pipeline.batches import input_spec, to_model_input
    from pipeline.train import build_model, lr_factor, make_optimizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    spec = input_spec(manifest)
    model = build_model(cfg, manifest)
    if init is not None:
        load_mae_weights(model, init)
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
        x = to_model_input(b, spec)
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


def raw_features(split: Split, kind: str) -> np.ndarray:
    """Raw inputs as a (N, F) float matrix: pixels / samples, or log-spectrogram features."""
    import torch

    from pipeline.config import AUDIO_INT16_SCALE

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


def frozen_features(cfg, manifest, split: Split, *, seed: int,
                    init: dict[str, Any] | None) -> np.ndarray:
    """Mean over the classifier backbone's latents (B, ..., K, D) -> (N, D), weights frozen."""
    import torch

    from models import load_mae_weights
    from pipeline.batches import input_spec, to_model_input
    from pipeline.train import build_model

    torch.manual_seed(seed)
    spec = input_spec(manifest)
    model = build_model(cfg, manifest)
    if init is not None:
        load_mae_weights(model, init)
    model.eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(split), 128):
            x = to_model_input(split.batch(slice(i, i + 128)), spec)
            feats.append(model.backbone(x).flatten(1, -2).mean(1))
    return torch.cat(feats).numpy()


def k_shot(split: Split, k: int, seed: int) -> Split:
    """k examples per class (all of a class that has fewer), drawn with the seed."""
    rng = np.random.default_rng([seed, k])
    y = split.labels.numpy()
    idx = [rng.choice(np.flatnonzero(y == c), min(k, int((y == c).sum())), replace=False)
           for c in np.unique(y)]
    return split.subset(np.sort(np.concatenate(idx)))


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], digits: int = 3) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def pretrain(cfg, manifest, tr: Split, va: Split, seed: int, args: argparse.Namespace,
             shards_dir: Path) -> tuple[RunResult, Path | None]:
    """The MAE run of a seed; with --cache-mae kept in and reused from <workdir>/mae-cache,
    keyed by the pretrain config, the seed and the shards' manifest."""
    import torch

    from pipeline.config import config_hash

    if not args.cache_mae:
        return train(cfg, manifest, tr, va, seed=seed), None
    key = hashlib.sha1(json.dumps([config_hash(cfg), seed, str(shards_dir.resolve()),
                                   manifest.get("files")], sort_keys=True).encode())
    path = args.workdir / "mae-cache" / f"{key.hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return RunResult(**saved), path
    res = train(cfg, manifest, tr, va, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: getattr(res, k) for k in ("train_loss", "val_loss", "wall_s", "state",
                                              "history")}, tmp)
    os.replace(tmp, path)
    return res, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="class folders (ImageFolder layout); default: "
                   "the embedded sample data")
    p.add_argument("--modality", choices=("image", "audio"), default="image")
    p.add_argument("--size", type=int, help="image.size (default 32; --quick 16)")
    p.add_argument("--sample-rate", type=int, help="audio.sample_rate (default 16000; "
                   "--quick 8000)")
    p.add_argument("--seconds", type=float, help="audio.seconds (default 1.0; --quick 0.5)")
    p.add_argument("--per-class", type=int, help="sample files per class (default 100; "
                   "--quick 20)")
    p.add_argument("--preprocess-set", action="append", default=[], metavar="K=V",
                   help="extra preprocess override, e.g. split.val_fraction=0.2")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3; --quick 1)")
    p.add_argument("--arms", default=ARMS, help="subset of the arms, e.g. a,b,c")
    p.add_argument("--k", default="5,20", help="labels per class in arm d")
    p.add_argument("--pretrain-config", type=Path,
                   default=ROOT / "configs" / "quickstart-pretrain.yaml")
    p.add_argument("--finetune-config", type=Path,
                   default=ROOT / "configs" / "quickstart-finetune.yaml")
    p.add_argument("--pretrain-steps", type=int, help="default: the config's (--quick 20)")
    p.add_argument("--finetune-steps", type=int, help="default: the config's (--quick 20)")
    p.add_argument("--pre", action="append", default=[], metavar="K=V",
                   help="override for the pretrain config only")
    p.add_argument("--ft", action="append", default=[], metavar="K=V",
                   help="override for the fine-tune configs only (b, c, d, e, f)")
    p.add_argument("--perceiver-preset", default="perceiver_tiny",
                   help="arm f's model (perceiver_tiny or perceiver_io_tiny)")
    p.add_argument("--cache-mae", action="store_true",
                   help="keep each seed's MAE weights under <workdir>/mae-cache and reuse "
                   "them when the pretrain config, seed and shards match (for fine-tune "
                   "sweeps; the MAE wall time shown is then the original run's)")
    p.add_argument("--evals", type=int, default=10, help="evaluations in b and c (swing)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch.set_num_threads")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-learning")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small data and size, 20 steps, 1 seed (~1 min)")
    p.add_argument("--json", type=Path, help="save settings, per-seed results and targets")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for both training configs (dotted keys)")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"size": 16 if q else 32, "sample_rate": 8000 if q else 16_000,
                "seconds": 0.5 if q else 1.0, "per_class": 20 if q else 100,
                "seeds": 1 if q else 3, "pretrain_steps": 20 if q else None,
                "finetune_steps": 20 if q else None}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.arms = "".join(sorted(set(args.arms.replace(",", "").lower())))
    if not args.arms or set(args.arms) - set(ARMS):
        p.error(f"--arms must be letters of {ARMS}, got {args.arms!r}")
    args.k = [int(k) for k in str(args.k).split(",") if k.strip()]
    return args


def load_configs(args: argparse.Namespace):
    from pipeline.config import load_config
    from pipeline.train_config import TrainConfig

    def cfg(path, task, extra, steps, values=None):
        vals = {"task": task, **({"trainer.steps": steps} if steps else {}), **(values or {})}
        return load_config(TrainConfig, path, [*args.overrides, *extra], vals)

    pre = cfg(args.pretrain_config, "mae", args.pre, args.pretrain_steps)
    ft = cfg(args.finetune_config, "classify", args.ft, args.finetune_steps)
    perceiver = cfg(args.finetune_config, "classify", args.ft, args.finetune_steps,
                    {"model.preset": args.perceiver_preset, "model.overrides": {},
                     "model.head": None})
    return pre, ft, perceiver


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {msg}", flush=True)

    pre_cfg, ft_cfg, pc_cfg = load_configs(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.data or sample_folder(args.workdir, args.modality, args.per_class)
    pp = ([f"image.size={args.size}"] if args.modality == "image" else
          [f"audio.sample_rate={args.sample_rate}", f"audio.seconds={args.seconds}"])
    out = args.workdir / "shards" / shards_tag(args, data)
    manifest = preprocess(data, out, args.modality, [*pp, *args.preprocess_set], log)
    tr, va = read_split(out, manifest, "train"), read_split(out, manifest, "val")
    classes = manifest.get("classes") or []
    log(f"data: {len(tr)} train / {len(va)} val rows, {len(classes)} classes, "
        f"columns { {k: tuple(v.shape[1:]) for k, v in tr.tensors.items()} }")
    if len(va) == 0:
        raise SystemExit("the val split is empty: add data or raise split.val_fraction")

    seeds = list(range(args.seeds))
    R: dict[str, dict[str, Any]] = {}  # row key -> {"acc": [...], "swing": [...], ...}

    def add(key: str, res: RunResult | None = None, **kw: Any) -> None:
        row = R.setdefault(key, {"acc": [], "swing": [], "wall": [], "train_loss": [],
                                 "val_loss": []})
        if res is not None:
            row["acc"].append(res.accuracy)
            row["swing"].append(res.swing)
            row["wall"].append(res.wall_s)
            row["train_loss"].append(res.train_loss)
            row["val_loss"].append(res.val_loss)
            if res.history:
                row.setdefault("history", []).append(res.history)
        for k, v in kw.items():
            row.setdefault(k, []).append(v)

    # (a) the floor: deterministic, so once
    ytr, yva = tr.labels.numpy(), va.labels.numpy()
    if "a" in args.arms:
        kinds = ["raw"] if args.modality == "image" else ["logspec", "raw"]
        for kind in kinds:
            t0 = time.perf_counter()
            acc = logreg_accuracy(raw_features(tr, kind), ytr, raw_features(va, kind), yva)
            add(f"a:{kind}", acc=acc, wall=time.perf_counter() - t0)
            log(f"a ({kind}): logistic regression val acc {acc:.3f}")
    ks = [(k, k_shot(tr, k, 0)) for k in args.k]  # sizes only; each seed draws its own
    for seed in seeds:
        mae_state = None
        if set(args.arms) & set("cde"):
            res, cached = pretrain(pre_cfg, manifest, tr, va, seed, args, out)
            mae_state = res.state
            add("mae", res)
            log(f"seed {seed} MAE: {pre_cfg.trainer.steps} steps, train loss "
                f"{res.train_loss:.4f}, val loss {res.val_loss:.4f} ({res.wall_s:.0f} s)"
                + (f"; cached {cached}" if cached else ""))
        if "b" in args.arms:
            res = train(ft_cfg, manifest, tr, va, seed=seed, evals=args.evals)
            add("b", res)
            log(f"seed {seed} b scratch: acc {res.accuracy:.3f}, swing {res.swing:.3f} "
                f"({res.wall_s:.0f} s); evals {[round(a, 3) for _, a in res.history]}")
        if "c" in args.arms:
            res = train(ft_cfg, manifest, tr, va, seed=seed, init=mae_state, evals=args.evals)
            add("c", res)
            log(f"seed {seed} c from MAE: acc {res.accuracy:.3f}, swing {res.swing:.3f} "
                f"({res.wall_s:.0f} s); evals {[round(a, 3) for _, a in res.history]}")
        if "d" in args.arms:
            for k in args.k:
                sub = k_shot(tr, k, seed)
                for name, init in (("mae", mae_state), ("scratch", None)):
                    res = train(ft_cfg, manifest, sub, va, seed=seed, init=init)
                    add(f"d:{k}:{name}", res)
                    log(f"seed {seed} d k={k} {name}: acc {res.accuracy:.3f} "
                        f"({res.wall_s:.0f} s)")
        if "e" in args.arms:
            for name, init in (("mae", mae_state), ("random", None)):
                t0 = time.perf_counter()
                acc = logreg_accuracy(
                    frozen_features(ft_cfg, manifest, tr, seed=seed, init=init), ytr,
                    frozen_features(ft_cfg, manifest, va, seed=seed, init=init), yva, seed)
                add(f"e:{name}", acc=acc, wall=time.perf_counter() - t0)
                log(f"seed {seed} e probe {name}: acc {acc:.3f}")
        if "f" in args.arms:
            res = train(pc_cfg, manifest, tr, va, seed=seed)
            add("f", res)
            log(f"seed {seed} f {args.perceiver_preset}: acc {res.accuracy:.3f} "
                f"({res.wall_s:.0f} s)")
    total = time.perf_counter() - began

    # ---------------- report ----------------
    chance = 1 / max(1, len(classes))
    print(f"\nmachine: {machine()}; torch threads {args.threads}")
    print(f"data: {data} -> {out}: {len(tr)} train / {len(va)} val, {len(classes)} classes "
          f"(chance {chance:.3f}); {' '.join(pp + args.preprocess_set)}")
    print(f"pretrain: {args.pretrain_config.name} {' '.join(args.overrides + args.pre)}; "
          f"{pre_cfg.model.preset}, mae.masking={pre_cfg.mae.masking}, mask_ratio "
          f"{pre_cfg.mae.mask_ratio}, target_norm={pre_cfg.mae.target_norm}, lr "
          f"{pre_cfg.optim.lr:g}, {pre_cfg.trainer.steps} steps x batch {global_batch(pre_cfg)}")
    print(f"finetune: {args.finetune_config.name} {' '.join(args.overrides + args.ft)}; "
          f"{ft_cfg.model.preset}, head {ft_cfg.model.head}, lr {ft_cfg.optim.lr:g}, warmup "
          f"{ft_cfg.optim.warmup_steps}, {ft_cfg.trainer.steps} steps x batch "
          f"{global_batch(ft_cfg)}, label smoothing {ft_cfg.optim.label_smoothing}")
    print(f"seeds {seeds}; in-process CPU loop; total wall {total:.0f} s\n")
    print("| arm | run | labels | val accuracy | swing (max) | wall s / seed |")
    print("|---|---|---|---:|---:|---:|")
    full = f"all ({len(tr)})"
    labels_k = {k: f"{k}/class ({len(s)})" for k, s in ks}
    rows = [("a:raw", "a", "logreg, raw " + ("pixels" if args.modality == "image"
                                              else "samples"), full),
            ("a:logspec", "a", "logreg, log-spectrogram (floor)", full),
            ("b", "b", "HiP from scratch", full),
            ("c", "c", "HiP from MAE", full)]
    for k in args.k:
        rows += [(f"d:{k}:mae", "d", "HiP from MAE", labels_k[k]),
                 (f"d:{k}:scratch", "d", "HiP from scratch", labels_k[k])]
    rows += [("e:mae", "e", "linear probe, MAE encoder", full),
             ("e:random", "e", "linear probe, random encoder", full),
             ("f", "f", f"{args.perceiver_preset} from scratch", full)]
    for key, arm, what, labels in rows:
        if key not in R:
            continue
        r = R[key]
        swings = [s for s in r["swing"] if s is not None]
        sw = f"{statistics.fmean(swings):.3f} ({max(swings):.3f})" if swings else "-"
        print(f"| {arm} | {what} | {labels} | {fmt(r['acc'])} | {sw} | "
              f"{statistics.fmean(r['wall']):.0f} |")
    if "mae" in R:
        m = R["mae"]
        print(f"\nMAE pretrain ({pre_cfg.trainer.steps} steps): final train loss "
              f"{fmt(m['train_loss'], 4)} (mean of the last 10% of steps), val loss "
              f"{fmt(m['val_loss'], 4)}, wall {statistics.fmean(m['wall']):.0f} s / seed")

    # ---------------- targets ----------------
    def acc(key: str) -> float:
        return mean_std(R[key]["acc"])[0] if key in R else float("nan")

    def paired(a: str, b: str) -> float:
        if a not in R or b not in R:
            return float("nan")
        return statistics.fmean(x - y for x, y in zip(R[a]["acc"], R[b]["acc"], strict=True))

    floor = "a:raw" if args.modality == "image" else "a:logspec"
    k0 = 5 if 5 in args.k else (args.k[0] if args.k else None)
    targets = [
        ("(b) >= (a) with full labels", acc("b") - acc(floor), 0.0,
         f"b {acc('b'):.3f} vs a {acc(floor):.3f}"),
        ("(c) >= (b)", acc("c") - acc("b"), 0.0, f"c {acc('c'):.3f} vs b {acc('b'):.3f}"),
        (f"(d) MAE beats scratch by >= {100 * TARGET_D_GAIN:.0f} points at k = {k0}",
         paired(f"d:{k0}:mae", f"d:{k0}:scratch"), TARGET_D_GAIN, "paired mean difference"),
        (f"(e) MAE probe beats random features by >= {100 * TARGET_E_GAIN:.0f} points",
         paired("e:mae", "e:random"), TARGET_E_GAIN, "paired mean difference"),
    ]
    for arm in "bc":
        sw = [s for s in R.get(arm, {}).get("swing", []) if s is not None]
        targets.append((f"({arm}) no val-accuracy swing > {100 * TARGET_SWING:.0f} points "
                        "after warm-up", TARGET_SWING - max(sw) if sw else float("nan"), 0.0,
                        f"max swing {max(sw):.3f}" if sw else ""))
    print("\ntargets:")
    verdicts = []
    for name, value, need, note in targets:
        if math.isnan(value):
            verdict = "n/a (arm not run)"
        else:
            verdict = "met" if value >= need - 1e-9 else "MISSED"
            verdicts.append(verdict == "met")
        shown = "" if math.isnan(value) or "swing" in name else f" ({value:+.3f})"
        note = f"; {note}" if note and not verdict.startswith("n/a") else ""
        print(f"  {name}: {verdict}{shown}{note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({
            "machine": machine(), "settings": settings, "wall_s": total,
            "train_rows": len(tr), "val_rows": len(va), "classes": classes,
            "configs": {"pretrain": pre_cfg.model_dump(mode="json"),
                        "finetune": ft_cfg.model_dump(mode="json")},
            "results": R,
            "targets": [{"target": n, "margin": v, "need": need, "note": note}
                        for n, v, need, note in targets]}, indent=2, default=str) + "\n")
        print(f"saved {args.json}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
