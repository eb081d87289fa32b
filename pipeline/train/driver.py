"""The training driver: validate, open the MLflow run, build the TorchTrainer, fit, record.

Everything that can be checked without Ray is checked first (config, manifest, the model
builds for the data's shapes, the init checkpoint exists), so a bad job fails in a second
with one line instead of after a cluster start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipeline import run_logger, storage, tracking
from pipeline.config import config_to_dict
from pipeline.data import layout, reader
from pipeline.runtime import init_ray, process_started_at
from pipeline.train import checkpoints, inprocess, resume
from pipeline.train.batches import TENSOR_COLUMNS, dataset_modality
from pipeline.train.build import build_model
from pipeline.train.config import TrainConfig, resolve_paths
from pipeline.train.faults import TEST_ENVS
from pipeline.train.inprocess import InProcess
from pipeline.train.loop import WorkerArgs, train_fn_per_worker
from pipeline.train.pg_reaper import PlacementGroupReaper, install_reaper


class JobError(ValueError):
    """A job that cannot start (bad data path, model/data mismatch, missing init)."""


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    checkpoint: str | None
    metrics: dict[str, Any]
    elapsed_s: float


def preflight(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Resolve paths, read and validate the manifest (layout.validate: its format, every
    shard file present with its recorded size), build the model once on the meta device."""
    cfg = resolve_paths(cfg)
    try:
        manifest = layout.read_manifest(cfg.data.path)
        layout.validate(cfg.data.path, manifest)  # format, and every shard's size
    except FileNotFoundError as e:
        raise JobError(f"data.path: {e}") from None
    except layout.DatasetError as e:
        raise JobError(f"data.path: {e}; rerun hip preprocess") from None
    modality = dataset_modality(manifest)
    if cfg.data.modality and cfg.data.modality != modality:
        raise JobError(f"data.modality is {cfg.data.modality!r} but {cfg.data.path} holds "
                       f"{modality!r}")
    if cfg.data.augment.time_shift and modality == "audio+video":
        raise JobError("data.augment.time_shift would move the sound against the pictures "
                       f"of {cfg.data.path} (audio+video); set it to 0")
    if not manifest.get("splits", {}).get(cfg.data.train_split):
        raise JobError(f"{cfg.data.path} has no {cfg.data.train_split!r} rows")
    rows = manifest["splits"][cfg.data.train_split]
    per_worker = rows // max(1, cfg.trainer.max_workers)
    if per_worker < cfg.optim.batch_size:
        raise JobError(f"{rows} train rows over {cfg.trainer.max_workers} workers give "
                       f"{per_worker} per worker, fewer than optim.batch_size="
                       f"{cfg.optim.batch_size}")
    if cfg.task == "classify" and len(manifest.get("classes") or []) < 2:
        raise JobError(f"{cfg.data.path} has no labels (fewer than 2 classes): "
                       "fine-tuning needs a labelled dataset")
    try:
        with torch.device("meta"):  # shape checks without allocating 100M parameters
            build_model(cfg, manifest)
    except (ValueError, TypeError) as e:
        raise JobError(f"model {cfg.model.preset!r} does not fit this data: {e}") from None
    return cfg, manifest


def _init_weights(cfg: TrainConfig, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load `finetune.init_from` (run id / checkpoint URI) and check it fits the model."""
    from models import load_mae_weights

    try:
        with tempfile.TemporaryDirectory(prefix="hip-init-") as tmp:
            path = checkpoints.resolve_init(cfg.finetune.init_from, cfg.tracking.uri, tmp)
            weights = checkpoints.load_state(path)["model"]
    except (FileNotFoundError, KeyError) as e:
        raise JobError(f"finetune.init_from: {e}") from None
    with torch.device("meta"):
        model = build_model(cfg, manifest)
    try:
        load_mae_weights(model, weights, dry_run=True)
    except ValueError as e:
        raise JobError(f"finetune.init_from {cfg.finetune.init_from}: {e}") from None
    return weights


def _run_name(cfg: TrainConfig) -> str:
    return cfg.tracking.run_name or (
        f"{'pretrain' if cfg.task == 'mae' else 'finetune'}-{cfg.model.preset}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}")


# Every pass over the train split is a new Ray Data execution, and its start (read tasks,
# the split coordinator's epoch barrier) stalls every worker for ~0.4 s. Small splits are
# chained so that one execution covers at least this many optimizer steps.
STEPS_PER_EXECUTION = 200


def train_passes(rows: int, cfg: TrainConfig) -> int:
    """How many passes over the train split one Ray Data execution chains (>= 1)."""
    # Local mode (num_workers=0) runs one loop in the driver: one worker's batches.
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum * max(1, cfg.trainer.max_workers)
    needed = -(-cfg.trainer.steps * per_step // max(rows, 1))  # passes the whole run needs
    wanted = -(-STEPS_PER_EXECUTION * per_step // max(rows, 1))
    return max(1, min(needed, wanted))


def pass_seed(seed: int, index: int) -> int:
    """The file-order seed of pass `index` of one execution (trainer.seed -> 32 bits)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big")


def _datasets(cfg: TrainConfig, manifest: dict[str, Any], *, in_process: bool = False
              ) -> dict[str, Any]:
    """Train: `passes` copies of the train split chained with union, each reading its files
    in its own random order, a new one every execution (epoch), all derived from
    trainer.seed (open_shards' file_seed): the same rows in the same orders on every run of
    a config, which data.deterministic (preserve_order) turns into the same batches.
    Rows are mixed further by the local shuffle buffer of loop._batches; the shards
    themselves hold rows in a random order (preprocess.shuffled)."""
    columns = [*TENSOR_COLUMNS[dataset_modality(manifest)], "label"]
    passes = train_passes(int(manifest.get("splits", {}).get(cfg.data.train_split, 0)), cfg)
    copies = [reader.open_shards(cfg.data.path, cfg.data.train_split,
                                 file_seed=pass_seed(cfg.trainer.seed, i)).select_columns(columns)
              for i in range(passes)]
    out = {"train": copies[0].union(*copies[1:]) if passes > 1 else copies[0]}
    if manifest.get("splits", {}).get(cfg.data.val_split):
        out["val"] = reader.open_shards(cfg.data.path, cfg.data.val_split).select_columns(columns)
    if in_process or cfg.trainer.num_workers == 0:
        # Ray Train's local mode (and a lean trial) hands the datasets over as they are: no
        # DataConfig, so its
        # preserve_order would never apply, and the chained passes' blocks would interleave
        # by timing (the same config gave other batches from step 2 on, 1 run in 3).
        for ds in out.values():
            ds.context.execution_options.preserve_order = cfg.data.deterministic
    return out


def _data_config(cfg: TrainConfig):
    """Ray Train's ingest options; data.deterministic keeps block order fixed run to run.

    Datasets are split across workers only when there are several: a lone worker iterates
    the whole dataset and runs its Ray Data execution itself, so no SplitCoordinator actor
    (one per dataset, a process start plus 2-5 s before the first batch on 2 cores) is
    started. Single-worker runs are what sweeps and fine-tunes mostly are."""

    # Ray 2.60 warns about its own default (exclude_resources); nothing for a user to do.
    warnings.filterwarnings("ignore", message=".*exclude_resources` is deprecated")
    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = cfg.data.deterministic
    split = "all" if cfg.trainer.max_workers > 1 else []
    return ray.train.DataConfig(datasets_to_split=split, execution_options=opts)


def run_training(cfg: TrainConfig, *, parent_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None, callbacks: list | None = None,
                 restart: bool = False, in_process: InProcess | None = None,
                 started_at: float | None = None, log=print) -> TrainResult:
    """Run one pretrain/finetune job on the current (or a new local) Ray cluster.

    trainer.num_workers=0 runs the loop in this process (Ray Train's local mode: no
    controller or worker actors, no DDP, no worker restarts); checkpoints are then written
    by the loop itself under storage.path/<run name>/, and a rerun of the same run name
    resumes from the newest. Ray Train callbacks do not run in local mode.

    A run name that already holds checkpoints resumes them only if they are the same job
    (pipeline/train/resume.py, else JobError); restart=True removes them first. A run that
    already reached trainer.steps returns its last result without training.

    in_process: run the loop in this process under Tune (a lean sweep trial,
    pipeline/train/inprocess.py) instead of a TorchTrainer. started_at: when this job's
    process started for startup_s (default: this process's start).

    Once its MLflow run is open, the run is always ended: FINISHED; FAILED if anything
    raises; KILLED on Ctrl-C, SIGTERM or a Tune stop (SystemExit; in the main thread:
    see _sigterm_raises)."""
    cfg, manifest = preflight(cfg)
    run_name = _run_name(cfg)
    done = _resume_or_restart(cfg, manifest, run_name, restart, log)
    if done is not None:
        return done
    init_weights = _init_weights(cfg, manifest) if cfg.finetune.init_from else None

    init_ray()
    # Progress bars from Ray Data's split coordinators only garble a log file.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    reaper: list = []
    if in_process is None:
        # The built-in cleaner needs the State API (dashboard): see pipeline/train/pg_reaper.py.
        reaper = [] if install_reaper() else [PlacementGroupReaper()]
        # Through the object store, so workers on other nodes get the weights too.
        if init_weights is not None:
            init_weights = ray.put(init_weights)
    resolved = config_to_dict(cfg)
    tags = {"hip.task": cfg.task, "hip.preset": cfg.model.preset,
            "hip.manifest_hash": tracking.manifest_hash(manifest),
            "hip.data": cfg.data.path, "mlflow.source.git.commit": tracking.git_commit(),
            **tracking.source_tags("hip pretrain" if cfg.task == "mae" else "hip finetune"),
            **cfg.tracking.tags, **(extra_tags or {})}
    run_id = tracking.start_run(
        cfg.tracking.uri, cfg.tracking.experiment, run_name=run_name, params=resolved,
        tags=tags, parent_run_id=parent_run_id,
        artifacts={"config/resolved.yaml": tracking.config_yaml(resolved),
                   "data/manifest.json": _json(manifest)})
    try:  # from here on the run is ended whatever happens
        with _sigterm_raises():
            args = WorkerArgs(cfg, manifest, run_id, init_weights=init_weights,
                              init_from=cfg.finetune.init_from,
                              run_dir=storage.join(cfg.storage.path, run_name),
                              started_at=started_at or process_started_at())
            return _train_in_run(args, run_name, callbacks, reaper, in_process, log)
    except BaseException as e:  # Ctrl-C and SIGTERM: KILLED; anything else: FAILED
        stopped = isinstance(e, KeyboardInterrupt | SystemExit)
        run_logger.end_run(cfg.tracking.uri, run_id, "KILLED" if stopped else "FAILED")
        raise


def _train_in_run(args: WorkerArgs, run_name: str, callbacks: list | None, reaper: list,
                  in_process: InProcess | None, log) -> TrainResult:
    """run_training once its MLflow run is open: record the dataset, fit, log the final
    checkpoint and end the run FINISHED (run_training ends it if this raises)."""
    cfg, manifest, run_id = args.cfg, args.manifest, args.run_id
    tracking.log_dataset(cfg.tracking.uri, run_id, manifest, cfg.data.path)
    log(f"[hip] MLflow run {run_id} ({run_name}) in experiment {cfg.tracking.experiment!r} "
        f"at {cfg.tracking.uri}")
    log(f"[hip] checkpoints under {storage.join(cfg.storage.path, run_name)}")
    log("[hip] runs in the MLflow UI: "
        f"{tracking.ui_link(cfg.tracking.uri, cfg.tracking.experiment)}")
    start = time.time()
    if in_process is not None:  # the loop writes its own checkpoints (no Ray Train)
        data = inprocess.datasets(cfg, manifest,
                                  lambda: _datasets(cfg, manifest, in_process=True))
        metrics, checkpoint = inprocess.fit(
            replace(args, splits=tuple(data), local_dir=args.run_dir), data, in_process)
        return _finish(cfg, run_id, run_name, checkpoint, metrics, time.time() - start)
    datasets = _datasets(cfg, manifest)
    # Local mode: the loop writes its own checkpoints (Ray keeps only a temp folder).
    local_dir = args.run_dir if cfg.trainer.num_workers == 0 else None
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"args": replace(args, splits=tuple(datasets), local_dir=local_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.trainer.num_workers,  # (min, max): Train V2's elastic policy
            elastic_resize_monitor_interval_s=cfg.trainer.elastic_check_s,
            use_gpu=cfg.trainer.use_gpu,
            resources_per_worker=cfg.trainer.resources_per_worker or None),
        run_config=ray.train.RunConfig(
            name=run_name, **storage.storage_kwargs(cfg.storage.path),
            callbacks=[*(callbacks or []), *reaper],
            worker_runtime_env=_worker_env(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep)),
        datasets=datasets, dataset_config=_data_config(cfg))
    result = trainer.fit()
    return _finish(cfg, run_id, run_name, result.checkpoint, dict(result.metrics or {}),
                   time.time() - start)


def _finish(cfg: TrainConfig, run_id: str, run_name: str, checkpoint, metrics: dict[str, Any],
            elapsed: float) -> TrainResult:
    """Log the final checkpoint's state file, tag where it lives, end the run FINISHED."""
    ckpt_uri = _checkpoint_uri(cfg, checkpoint)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            # checkpoint/state.pt: what `hip finetune --init-from RUN_ID` loads.
            tracking.client(cfg.tracking.uri).log_artifact(
                run_id, str(Path(d) / checkpoints.STATE_FILE), "checkpoint")
    tracking.set_tags(cfg.tracking.uri, run_id, {tracking.CHECKPOINT_TAG: ckpt_uri or ""})
    tracking.end_run(cfg.tracking.uri, run_id, "FINISHED")
    return TrainResult(run_id=run_id, run_name=run_name, checkpoint=ckpt_uri, metrics=metrics,
                       elapsed_s=elapsed)


class Terminated(SystemExit):
    """SIGTERM during a run (what a cluster scheduler sends before it kills a job), raised
    in the driver's main thread like Ctrl-C's KeyboardInterrupt; exit code 128 + 15."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated, so `finally` blocks and run_training's
    handler close the run as KILLED; the previous handler (Ray's: sys.exit) is restored
    after. Only in the main thread: Tune runs trials' training in other threads, where
    Python cannot set signal handlers (Tune stops those trials itself).

    The SIGINT handler is restored too: Ray Train's fit() (2.60) installs one that holds the
    run's controller actor and never removes it, so the controller and its dataset actors
    outlived the run in a long-lived driver (a test session: a later run's data ingest then
    found no free CPU and hung)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        signal.signal(signal.SIGINT, signal.SIG_DFL if sigint is None else sigint)


def _resume_or_restart(cfg: TrainConfig, manifest: dict[str, Any], run_name: str,
                       restart: bool, log) -> TrainResult | None:
    """Checks on the run name's existing checkpoints (before Ray): a TrainResult if the run
    is already complete, JobError if they belong to another job, None to go on."""
    if restart:
        if resume.clear(cfg, run_name):
            log(f"[hip] --restart: removed the checkpoints of run {run_name!r}")
        return None
    try:
        prev = resume.check(cfg, tracking.manifest_hash(manifest), run_name)
    except resume.ResumeMismatch as e:
        raise JobError(str(e)) from None
    if prev is None or prev.step < cfg.trainer.steps:
        return None
    log(f"[hip] run {run_name!r} is already complete (step {prev.step} of "
        f"{cfg.trainer.steps}, MLflow run {prev.run_id}): nothing to train; pass --restart "
        "to train it again")
    return TrainResult(run_id=prev.run_id or "", run_name=run_name,
                       checkpoint=prev.folder,
                       metrics={**prev.metrics, "step": prev.step}, elapsed_s=0.0)


def _worker_env() -> dict[str, Any] | None:
    # The test-only hooks must reach workers of an already running cluster.
    env = {k: os.environ[k] for k in TEST_ENVS if os.environ.get(k)}
    return {"env_vars": env} if env else None


def _checkpoint_uri(cfg: TrainConfig, checkpoint) -> str | None:
    if checkpoint is None:
        return None
    if storage.is_local(cfg.storage.path):
        return checkpoint.path
    return "gs://" + checkpoint.path.lstrip("/")


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
