"""`hip quickstart`: the whole product on the embedded default, stage by stage.

sample data -> preprocess every modality -> MAE pretrain a small HiP on the images ->
fine-tune it and a from-scratch twin -> a tiny sweep over mask ratio and group count ->
a short report. Local Ray started in-process, MLflow in runs/mlflow.db, data under data/.
Rerunning reuses what exists: shards whose manifest matches, and MLflow runs of the same
stage and config that finished. Part of the CLI layer (it drives sweeps/).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.constants import MODALITIES

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "hip-quickstart"
STAGE_TAG = "hip.quickstart_stage"
KEY_TAG = "hip.quickstart_key"

# (full, small): the small scale keeps the end-to-end test fast on CI.
SCALES: dict[str, dict[str, Any]] = {
    # Images: 1,000 files drawn at 64 px, trained at 32 px (1,024 pixel tokens); fewer
    # images or steps leave the fine-tuned classifier near chance.
    "full": {"per_class": 30, "image_per_class": 100, "image_size": 32,
             "audio": ["audio.sample_rate=16000", "audio.seconds=1.0"],
             "video": ["video.frames=8", "video.size=32"],
             "pretrain_steps": 200, "finetune_steps": 200, "batch": 16, "sweep_steps": 20,
             "workers": 2, "sweep": []},
    "small": {"per_class": 6, "image_per_class": 6, "image_size": 16,
              "audio": ["audio.sample_rate=8000",
              "audio.seconds=0.5"], "video": ["video.frames=4", "video.size=16"],
              "pretrain_steps": 6, "finetune_steps": 4, "batch": 8, "sweep_steps": 4,
              "workers": 1,
              # 2 trials (mask ratio only) instead of the 2 x 2 grid: CI time.
              "sweep": ["space={mae.mask_ratio: {grid: [0.5, 0.85]}}"]},
}


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on the embedded sample data",
                       description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("."),
                   help="where data/ and runs/ go (default: the current folder)")
    p.add_argument("--small", action="store_true",
                   help="a much smaller scale for the tests: fewer files and steps, 1 worker, "
                   "a 2-trial sweep over the mask ratio only")
    p.set_defaults(func=lambda args: run_quickstart(args.workdir, small=args.small))


class _Stages:
    """Times each stage and prints a line per stage."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.times: list[tuple[str, float, str]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"\n=== {name} ===")
        start = time.time()
        out = fn()
        took = time.time() - start
        note = out[1] if isinstance(out, tuple) and len(out) == 2 else ""
        self.times.append((name, took, note))
        self.log(f"=== {name}: {took:.1f} s {note}".rstrip())
        return out[0] if isinstance(out, tuple) and len(out) == 2 else out


def run_quickstart(workdir: Path, *, small: bool = False, log=print) -> int:
    from pipeline.runtime import init_ray

    began = time.time()
    scale = SCALES["small" if small else "full"]
    workdir = workdir.resolve()
    data, runs = workdir / "data", workdir / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    runs.mkdir(parents=True, exist_ok=True)
    stages = _Stages(log)
    stages.run("sample data", lambda: _sample_data(data / "raw", scale))
    init_ray()
    for modality in MODALITIES:
        stages.run(f"preprocess {modality}", lambda m=modality: _preprocess(data, m, scale))
    common = [f"data.path={data / 'shards' / 'image'}", f"tracking.uri={uri}",
              f"storage.path={runs / 'checkpoints'}", f"tracking.experiment={EXPERIMENT}",
              f"optim.batch_size={scale['batch']}"]
    workers = f"trainer.num_workers={scale['workers']}"
    pre = stages.run("MAE pretrain", lambda: _train(
        "pretrain", "quickstart-pretrain.yaml",
        [*common, workers, f"trainer.steps={scale['pretrain_steps']}"], uri))
    # The two fine-tunes run at the same time, one Train worker each (same global batch):
    # their start-up (controller, worker, ingest actors) overlaps instead of adding up.
    ft_args = [*common, "trainer.num_workers=1",
               f"optim.batch_size={scale['batch'] * scale['workers']}",
               f"trainer.steps={scale['finetune_steps']}",
               f"trainer.eval_every={max(2, scale['finetune_steps'] // 4)}"]
    ft_mae, ft_scratch = stages.run("finetune from MAE + from scratch", lambda: _both(
        lambda: _train("finetune-mae", "quickstart-finetune.yaml",
                       [*ft_args, f"finetune.init_from={pre['run_id']}"], uri),
        lambda: _train("finetune-scratch", "quickstart-finetune.yaml", ft_args, uri)))
    sweep = stages.run("sweep (sweeps/quickstart.yaml)",
                       lambda: _sweep(common, scale, uri, runs / "compare"))
    _report(stages, pre, ft_mae, ft_scratch, sweep, uri, runs, log)
    log(f"quickstart wall time: {time.time() - began:.1f} s (stages + Ray start-up)")
    return 0


def _both(first: Callable[[], tuple], second: Callable[[], tuple]):
    """Run two stages at once (threads: Ray Train's fit() supports a non-main thread);
    -> ((out1, out2), note). The first error, if any, is raised after both ended."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2, thread_name_prefix="hip-stage") as pool:
        futures = [pool.submit(first), pool.submit(second)]
        (a, note_a), (b, note_b) = (f.result() for f in futures)
    return (a, b), " ".join(n for n in (note_a, note_b) if n)


def _sample_data(out: Path, scale: dict[str, Any]):
    from pipeline.data.sample_data import write_sample_data

    if (out / "image").is_dir() and any((out / "image").iterdir()):
        return None, "(reused)"
    counts = write_sample_data(out, per_class=scale["image_per_class"], seed=0,
                               modalities=["image"], image_size=max(scale["image_size"], 64))
    counts.update(write_sample_data(out, per_class=scale["per_class"], seed=0,
                                    modalities=["audio", "video"]))
    return counts, f"({sum(counts.values())} files)"


def _preprocess(data: Path, modality: str, scale: dict[str, Any]):
    from pipeline.config import load_config
    from pipeline.data.config import PreprocessConfig
    from pipeline.data.preprocess import PreflightError, run_preprocess

    src = "video" if modality == "audio+video" else modality
    overrides = [f"image.size={scale['image_size']}", *scale["audio"], *scale["video"]]
    cfg = load_config(PreprocessConfig, None, overrides, {
        "modality": modality, "input": str(data / "raw" / src),
        "output": str(data / "shards" / modality)})
    try:
        run_preprocess(cfg, overwrite=False)
    except PreflightError as e:
        if "different config" not in str(e):
            raise
        # The quickstart owns data/shards: shards of an older config (e.g. written before
        # rows were shuffled) are rebuilt rather than refused.
        run_preprocess(cfg, overwrite=True)
        return None, "(rebuilt: the config changed)"
    return None, ""


def _train(stage: str, config: str, overrides: list[str], uri: str):
    """Run a training stage unless a finished run of the same stage and config exists."""
    from pipeline import tracking
    from pipeline.config import config_hash, load_config
    from pipeline.train.config import TrainConfig
    from pipeline.train.driver import run_training

    cfg = load_config(TrainConfig, ROOT / "configs" / config, overrides)
    key = config_hash(cfg)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        done = c.search_runs([exp.experiment_id], f"tags.`{STAGE_TAG}` = '{stage}' and "
                             f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                             max_results=1)
        if done:
            r = done[0]
            return {"run_id": r.info.run_id, "metrics": r.data.metrics}, "(reused)"
    cfg.tracking.run_name = f"quickstart-{stage}"
    result = run_training(cfg, extra_tags={STAGE_TAG: stage, KEY_TAG: key})
    return {"run_id": result.run_id, "metrics": result.metrics}, ""


def _sweep(common: list[str], scale: dict[str, Any], uri: str, out_dir: Path):
    from sweeps.quickstart import run_quickstart_sweep

    return run_quickstart_sweep([*common, *scale["sweep"]], steps=scale["sweep_steps"],
                                tracking_uri=uri, out_dir=out_dir)


def _report(stages, pre, ft_mae, ft_scratch, sweep, uri, runs: Path, log) -> None:
    from pipeline import tracking

    acc_mae = ft_mae["metrics"].get("val_accuracy", float("nan"))
    acc_scratch = ft_scratch["metrics"].get("val_accuracy", float("nan"))
    log("\n=== quickstart report ===")
    for name, took, note in stages.times:
        log(f"  {name:36s} {took:7.1f} s {note}")
    log(f"  total {sum(t for _, t, _ in stages.times):.1f} s")
    log(f"\nMAE pretrain: val loss {pre['metrics'].get('val_loss', float('nan')):.4f} "
        f"(run {pre['run_id']})")
    log(f"finetune val accuracy: from MAE {acc_mae:.3f} vs from scratch {acc_scratch:.3f}")
    if sweep:
        log(f"\n{sweep}")
    log(f"\nreconstructions: MLflow run {pre['run_id']}, artifacts reconstructions/*.png")
    log(f"plots: {runs / 'compare'}")
    log(f"MLflow UI: {tracking.ui_link(uri, EXPERIMENT)}")


__all__ = ["add_parser", "run_quickstart", "argparse"]
