"""Learning quality of the quickstart training configs: floors, HiP, MAE, label scarcity.

    python -m benchmarks.learning [--data DIR | --digits] [--arms a,b,c,d,e,f] [--seeds N]
        [options, see --help] [key=value ...]

The runs (data, training loop, linear models) are in benchmarks/learning_runs.py.

A class-folder set (ImageFolder layout; default: the embedded sample data, written once under
--workdir; --digits: scikit-learn's bundled digits, 1,797 8x8 greyscale scans, written once
as greyscale PNG class folders upscaled bilinearly to --size, default 16) goes once through
the real `run_preprocess` (Ray Data; reused when its manifest exists), then the train and val
shards are read into memory with pyarrow. Training runs the pipeline's own pieces (build_model
from a TrainConfig, make_optimizer, lr_factor, to_model_input, load_mae_weights) in a plain
in-process CPU loop: one fixed seed per run, batches from a seeded per-epoch permutation,
global batch = optim.batch_size x max(1, trainer.num_workers) x optim.grad_accum.

Arms (val accuracy on the full val split, mean +- std over seeds):
  a  logistic regression on the raw inputs (standardised); audio: log-spectrogram features
     (the floor) and raw samples
  b  HiP from scratch, full labels (fine-tune config)
  c  HiP fine-tuned from its MAE run (pretrain config on the train split, no labels)
  d  label-scarce: k = 5 and 20 labels per class (seeded subset of train), MAE init (c's MAE
     model) vs scratch, and a's floor (pixels; audio: log-spectrogram) on the same k inputs
  e  linear probe (logistic regression) on frozen backbone features (--probe: learning_runs.
     PROBES; the first kind is the target's), MAE encoder vs a randomly initialised one
  f  the Perceiver with Fourier features from scratch (--perceiver-preset), fine-tune config
b and c evaluate every ~10% of the steps; "swing" is the largest drop of val accuracy between
consecutive evaluations after warm-up. Overrides: key=value for both configs, --pre / --ft for
one of them (e.g. mae.masking=groupwise, mae.target_norm=group, optim.lr=1e-3).
The digits recipe, where MAE pays (docs/benchmarks.md, "Digits"): --digits --pretrain-steps
1000 --pre optim.lr=1e-3 --pre mae.mask_ratio=0.5, and --llrd 0.75 for the fine-tunes.
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
from pathlib import Path
from typing import Any

import benchmarks.learning_runs as lrun
from benchmarks.common import machine
from benchmarks.learning_runs import DIGITS_RESAMPLE, PROBES, RunResult, Split

ROOT = Path(__file__).resolve().parents[1]
ARMS = "abcdef"
TARGET_SWING = 0.10
TARGET_D_GAIN = 0.05
TARGET_E_GAIN = 0.10


def shards_tag(args: argparse.Namespace, data: Path) -> str:
    if args.digits:
        name = "digits"
    elif args.data is None:
        name = f"sample{args.per_class}"
    else:
        digest = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:8]
        name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', data.name)}-{digest}"
    if args.modality == "image":
        return f"{name}-image-s{args.size}"
    return f"{name}-audio-{args.sample_rate}hz-{args.seconds:g}s"



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
        return lrun.train(cfg, manifest, tr, va, seed=seed), None
    key = hashlib.sha1(json.dumps([config_hash(cfg), seed, str(shards_dir.resolve()),
                                   manifest.get("files")], sort_keys=True).encode())
    path = args.workdir / "mae-cache" / f"{key.hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return RunResult(**saved), path
    res = lrun.train(cfg, manifest, tr, va, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: getattr(res, k) for k in ("train_loss", "val_loss", "wall_s", "state",
                                              "history")}, tmp)
    os.replace(tmp, path)
    return res, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="class folders (default: the sample data)")
    p.add_argument("--digits", action="store_true", help="sklearn's bundled digits (1,797 "
                   f"8x8 greyscale scans, 10 classes) as PNG class folders, {DIGITS_RESAMPLE} "
                   "to --size (default 16), written once under --workdir")
    p.add_argument("--modality", choices=("image", "audio"), default="image")
    p.add_argument("--size", type=int, help="image.size (default 32; --quick and --digits 16)")
    p.add_argument("--sample-rate", type=int, help="audio.sample_rate (16000; --quick 8000)")
    p.add_argument("--seconds", type=float, help="audio.seconds (default 1.0; --quick 0.5)")
    p.add_argument("--per-class", type=int, help="sample files per class (100; --quick 20)")
    p.add_argument("--preprocess-set", action="append", default=[], metavar="K=V",
                   help="extra preprocess override, e.g. split.val_fraction=0.2")
    p.add_argument("--seeds", help="N: seeds 0..N-1 (default 3; --quick 1); or a list, '1,2'")
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
    p.add_argument("--perceiver-preset", default="perceiver_tiny", help="arm f's model")
    p.add_argument("--cache-mae", action="store_true",
                   help="keep each seed's MAE weights under <workdir>/mae-cache and reuse "
                   "them when the pretrain config, seed and shards match (for fine-tune "
                   "sweeps; the MAE wall time shown is then the original run's)")
    p.add_argument("--probe", default="mean", help="arm e's frozen features, comma-separated "
                   f"kinds of {','.join(PROBES)} (the first is the target's)")
    p.add_argument("--llrd", type=float, help="layer-wise lr decay for the fine-tunes from "
                   "MAE (c, d): head x1, processor x F, level 0 x F^2, embeddings x F^3 "
                   "(benchmark-only; scratch runs keep the config's optimizer)")
    p.add_argument("--llrd-all", action="store_true", help="--llrd for scratch (b, d) too")
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
    if args.digits and args.data is not None:
        p.error("--digits and --data are exclusive")
    if args.digits and args.modality != "image":
        p.error("--digits is an image set")
    defaults = {"size": 16 if (q or args.digits) else 32, "sample_rate": 8000 if q else 16_000,
                "seconds": 0.5 if q else 1.0, "per_class": 20 if q else 100,
                "seeds": 1 if q else 3, "pretrain_steps": 20 if q else None,
                "finetune_steps": 20 if q else None}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.arms = "".join(sorted(set(args.arms.replace(",", "").lower())))
    if not args.arms or set(args.arms) - set(ARMS):
        p.error(f"--arms must be letters of {ARMS}, got {args.arms!r}")
    s = str(args.seeds)
    args.seeds = list(range(int(s))) if s.isdigit() else [int(x) for x in s.split(",") if x]
    args.k = [int(k) for k in str(args.k).split(",") if k.strip()]
    args.probe = [k.strip() for k in args.probe.split(",") if k.strip()]
    if not args.probe or set(args.probe) - set(PROBES):
        p.error(f"--probe must be kinds of {list(PROBES)}, got {args.probe}")
    return args


def load_configs(args: argparse.Namespace):
    from pipeline.config import load_config
    from pipeline.train.config import TrainConfig

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
    if args.digits:
        data = lrun.digits_folder(args.workdir, args.size)
    else:
        data = args.data or lrun.sample_folder(args.workdir, args.modality, args.per_class)
    pp = ([f"image.size={args.size}"] if args.modality == "image" else
          [f"audio.sample_rate={args.sample_rate}", f"audio.seconds={args.seconds}"])
    out = args.workdir / "shards" / shards_tag(args, data)
    manifest = lrun.preprocess(data, out, args.modality, [*pp, *args.preprocess_set], log)
    tr, va = lrun.read_split(out, manifest, "train"), lrun.read_split(out, manifest, "val")
    classes = manifest.get("classes") or []
    log(f"data: {len(tr)} train / {len(va)} val rows, {len(classes)} classes, "
        f"columns { {k: tuple(v.shape[1:]) for k, v in tr.tensors.items()} }")
    if len(va) == 0:
        raise SystemExit("the val split is empty: add data or raise split.val_fraction")

    seeds = args.seeds
    R: dict[str, dict[str, Any]] = {}  # row key -> {"acc": [...], "swing": [...], ...}

    def add(key: str, res: RunResult | None = None, **kw: Any) -> None:
        row = R.setdefault(key, {"acc": [], "swing": [], "wall": [], "train_loss": [],
                                 "val_loss": []})
        if res is not None:
            for k, attr in (("acc", "accuracy"), ("swing", "swing"), ("wall", "wall_s"),
                            ("train_loss", "train_loss"), ("val_loss", "val_loss")):
                row[k].append(getattr(res, attr))
            if res.history:
                row.setdefault("history", []).append(res.history)
        for k, v in kw.items():
            row.setdefault(k, []).append(v)

    # (a) the floor: deterministic, so once (audio: log-spectrogram, also d's floor; raw too)
    floor_kinds = ["raw"] if args.modality == "image" else ["logspec", "raw"]
    if "a" in args.arms:
        for kind in floor_kinds:
            t0 = time.perf_counter()
            acc = lrun.raw_accuracy(tr, va, kind)
            add(f"a:{kind}", acc=acc, wall=time.perf_counter() - t0)
            log(f"a ({kind}): logistic regression val acc {acc:.3f}")
    ks = [(k, lrun.k_shot(tr, k, 0)) for k in args.k]  # sizes only; each seed draws its own
    for seed in seeds:
        mae_state = None
        if set(args.arms) & set("cde"):
            res, cached = pretrain(pre_cfg, manifest, tr, va, seed, args, out)
            mae_state = res.state
            add("mae", res)
            log(f"seed {seed} MAE: {pre_cfg.trainer.steps} steps, train loss "
                f"{res.train_loss:.4f}, val loss {res.val_loss:.4f} ({res.wall_s:.0f} s)"
                + (f"; cached {cached}" if cached else ""))
        for arm, init, what in (("b", None, "scratch"), ("c", mae_state, "from MAE")):
            if arm in args.arms:
                res = lrun.train(ft_cfg, manifest, tr, va, seed=seed, init=init, evals=args.evals,
                                 llrd=args.llrd if (init is not None or args.llrd_all) else None)
                add(arm, res)
                log(f"seed {seed} {arm} {what}: acc {res.accuracy:.3f}, swing {res.swing:.3f} "
                    f"({res.wall_s:.0f} s); evals {[round(a, 3) for _, a in res.history]}")
        if "d" in args.arms:
            for k in args.k:
                sub = lrun.k_shot(tr, k, seed)
                acc = lrun.raw_accuracy(sub, va, floor := floor_kinds[0], seed)
                add(f"d:{k}:logreg", acc=acc, wall=0.0)
                log(f"seed {seed} d k={k} logreg {floor}: acc {acc:.3f}")
                for name, init in (("mae", mae_state), ("scratch", None)):
                    llrd = args.llrd if (init is not None or args.llrd_all) else None
                    res = lrun.train(ft_cfg, manifest, sub, va, seed=seed, init=init, llrd=llrd)
                    add(f"d:{k}:{name}", res)
                    log(f"seed {seed} d k={k} {name}: acc {res.accuracy:.3f} "
                        f"({res.wall_s:.0f} s)")
        if "e" in args.arms:
            for kind in args.probe:
                for name, init in (("mae", mae_state), ("random", None)):
                    t0 = time.perf_counter()
                    acc = lrun.probe_accuracy(ft_cfg, manifest, tr, va, seed=seed, init=init,
                                              kind=kind)
                    key = f"e:{name}" if kind == args.probe[0] else f"e:{name}:{kind}"
                    add(key, acc=acc, wall=time.perf_counter() - t0)
                    log(f"seed {seed} e probe ({kind}) {name}: acc {acc:.3f}")
        if "f" in args.arms:
            res = lrun.train(pc_cfg, manifest, tr, va, seed=seed)
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
          f"{pre_cfg.optim.lr:g}, {pre_cfg.trainer.steps} steps x batch "
          f"{lrun.global_batch(pre_cfg)}")
    print(f"finetune: {args.finetune_config.name} {' '.join(args.overrides + args.ft)}; "
          f"{ft_cfg.model.preset}, head {ft_cfg.model.head}, lr {ft_cfg.optim.lr:g}, warmup "
          f"{ft_cfg.optim.warmup_steps}, {ft_cfg.trainer.steps} steps x batch "
          f"{lrun.global_batch(ft_cfg)}, label smoothing {ft_cfg.optim.label_smoothing}"
          + (f", layer-wise lr decay {args.llrd:g}"
             + (" (all fine-tunes)" if args.llrd_all else " (from MAE)") if args.llrd else ""))
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
        rows += [(f"d:{k}:logreg", "d", "logreg, raw pixels" if args.modality == "image"
                  else "logreg, log-spectrogram", labels_k[k]),
                 (f"d:{k}:mae", "d", "HiP from MAE", labels_k[k]),
                 (f"d:{k}:scratch", "d", "HiP from scratch", labels_k[k])]
    for kind in args.probe:
        tail = "" if kind == args.probe[0] else f":{kind}"
        rows += [(f"e:mae{tail}", "e", f"linear probe ({kind}), MAE encoder", full),
                 (f"e:random{tail}", "e", f"linear probe ({kind}), random encoder", full)]
    rows += [("f", "f", f"{args.perceiver_preset} from scratch", full)]
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
