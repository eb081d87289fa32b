"""The per-worker training loop of Ray Train: set-up, the loop, evaluation, reporting.

`train_fn_per_worker({"args": WorkerArgs})` runs on every Ray Train worker; a lean sweep
trial runs `train(setup(args, TuneSession(...)))` in its own process (sweeps/trial.py). The
loop sees the outside world only through a Session (pipeline/train/session.py):

    setup(args, s)   context (rank, device), model (+ init weights), optimizer, schedule,
                     resume (the session's checkpoint or our own folders), data iterators
    train(run)       optimizer steps until trainer.steps; logs, evaluates and reports
    evaluate(run)    one pass over this worker's val shard, summed across workers (and,
                     with trainer.eval_cooldown_steps, once more after a cooldown probe:
                     cooled_val_loss, pipeline/train/cooldown.py)
    report(run)      session.report at eval and checkpoint steps (a barrier: every worker
                     calls it at the same steps); rank 0 attaches the checkpoint

What differs between MAE and classification lives in one task object (pipeline/train/tasks.py).
Only world rank 0 logs to MLflow.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import torch

from models import load_mae_weights
from pipeline import run_logger, storage, tracking
from pipeline.config import config_to_dict
from pipeline.train import checkpoints
from pipeline.train.augment import augment
from pipeline.train.batches import input_spec, to_model_input, to_pixels
from pipeline.train.build import build_model, lr_factor, make_optimizer, make_scheduler
from pipeline.train.config import TrainConfig
from pipeline.train.cooldown import Lookahead, cooled_eval
from pipeline.train.faults import FAULT_ENV
from pipeline.train.faults import maybe_fault as _maybe_fault
from pipeline.train.session import Session, TrainSession
from pipeline.train.steps import accum_steps, step_seed
from pipeline.train.tasks import Task, make_task

INIT_TENSORS_TAG = "hip.initialised_tensors"  # how many tensors finetune.init_from supplied
RESUMED_TAG = "hip.resumed_from_step"
SHUFFLE_BUFFER_ROWS = 256


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (train_loop_config={"args": WorkerArgs(...)})."""

    cfg: TrainConfig  # resolved: absolute local paths
    manifest: dict[str, Any]
    run_id: str | None  # the MLflow run rank 0 logs to (None: no logging)
    splits: tuple[str, ...] = ("train",)  # datasets given to the trainer
    init_weights: Any = None  # state dict (or its ObjectRef) of finetune.init_from, or None
    init_from: str | None = None  # where init_weights came from, for the log line
    local_dir: str | None = None  # no Ray Train persistence (local mode, lean trials):
    # where the loop writes its own checkpoints
    run_dir: str | None = None  # storage.path/<run name>: the run's checkpoint folders
    started_at: float | None = None  # when the job's process started (startup_s), epoch s


@dataclass
class _Ctx:
    cfg: TrainConfig
    manifest: dict[str, Any]
    run_id: str | None
    rank: int
    world: int
    device: torch.device
    local_dir: str | None = None  # set in local mode (trainer.num_workers=0): see report
    run_dir: str | None = None  # where every checkpoint of this run lives (fallbacks)
    mlflow: run_logger.RunLogger | None = None  # world rank 0's logger (survives outages)
    session: Session | None = None  # where reports, checkpoints and datasets go
    manifest_hash: str = ""  # hashed once per run, not at every report (a long file list)

    @property
    def logs(self) -> bool:
        return self.rank == 0 and self.run_id is not None


@dataclass
class Run:
    """What set-up builds and the loop advances."""

    ctx: _Ctx
    task: Task
    spec: dict[str, Any]  # model inputs: name -> InputSpec
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train_data: Any  # endless Lookahead over _batches (a cooldown probe reads ahead)
    val_ds: Any  # this worker's val shard, or None
    step: int = 0
    started_at: float | None = None  # WorkerArgs.started_at (startup_s)
    position: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "batch": 0})
    accum: int = 1  # micro-batches per optimizer step on each worker (accum_steps)


def _batches(ds, ctx: _Ctx, columns: list[str], *, train: bool,
             position: dict[str, int] | None = None):
    """Endless (train) or one-pass (eval) iterator of raw tensor batches from a shard.

    position (train): {"epoch": e, "batch": b}, kept up to date with what has been handed
    out (b batches of epoch e) and saved in checkpoints. Given a saved one, iteration starts
    in epoch e after its first b batches, so a resumed run continues with the batches an
    uninterrupted run would see next (with data.deterministic) instead of the first ones
    again. Skipping reads those b batches (no forward pass): at most one epoch's reading."""
    kw = dict(batch_size=ctx.cfg.optim.batch_size, device=ctx.device)
    pos = position if position is not None else {"epoch": 0, "batch": 0}
    skip = pos["batch"]
    while True:
        # Seeded per rank and epoch: the same rows in the same order give the same batches.
        shuffle = dict(local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                       local_shuffle_seed=ctx.cfg.trainer.seed + 1000 * pos["epoch"] + ctx.rank)
        it = ds.iter_torch_batches(drop_last=train, **kw, **(shuffle if train else {}))
        n = 0
        for b in it:
            n += 1
            if n <= skip:
                continue
            pos["batch"] = n
            yield {k: b[k] for k in columns}
        if not train:
            return
        if n == 0:  # an empty epoch would loop forever: the shard is smaller than a batch
            raise ValueError(f"rank {ctx.rank}'s train shard holds fewer rows than "
                             f"optim.batch_size={ctx.cfg.optim.batch_size}")
        skip = 0
        pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0


# ----------------------------------------------------------------------------- set-up


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop: config = {"args": WorkerArgs}."""
    train(setup(config["args"], TrainSession()))


def setup(args: WorkerArgs, session: Session) -> Run:
    cfg = args.cfg
    ctx = _Ctx(cfg, args.manifest, args.run_id, session.rank, session.world, session.device,
               local_dir=args.local_dir, run_dir=args.run_dir or args.local_dir,
               session=session, manifest_hash=tracking.manifest_hash(args.manifest))
    ctx.mlflow = run_logger.RunLogger(cfg.tracking.uri, args.run_id) if ctx.logs else None
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.trainer.seed + ctx.rank)
    task = make_task(cfg.task, label_smoothing=cfg.optim.label_smoothing)
    spec = input_spec(ctx.manifest, cfg.data.audio)
    model = build_model(cfg, ctx.manifest)
    if args.init_weights is not None:
        _init_weights(model, args, ctx)
    model = session.prepare_model(model)
    opt = make_optimizer(model, cfg)
    run = Run(ctx, task, spec, model, opt, make_scheduler(opt, cfg), None, None,
              accum=accum_steps(cfg, ctx.world), started_at=args.started_at)
    run.position["world"] = ctx.world
    _resume(run)
    run.val_ds = session.dataset("val") if "val" in args.splits else None
    train_ds, columns = session.dataset("train"), task.columns(list(spec))
    run.train_data = Lookahead(
        lambda position: _batches(train_ds, ctx, columns, train=True, position=position),
        run.position)
    return run


def _init_weights(model: torch.nn.Module, args: WorkerArgs, ctx: _Ctx) -> None:
    weights = args.init_weights
    report = load_mae_weights(model, ray.get(weights) if isinstance(weights, ray.ObjectRef)
                              else weights)
    if ctx.rank == 0:
        print(f"[hip] initialised {len(report.loaded)} tensors from {args.init_from}; "
              f"new: {', '.join(sorted({k.split('.')[0] for k in report.missing}))}",
              flush=True)
    if ctx.logs:
        ctx.mlflow.set_tags({INIT_TENSORS_TAG: str(len(report.loaded))})


def _resume(run: Run) -> None:
    """Continue from Ray's checkpoint (after a worker-group restart or a rerun of the same run
    name) or, in local mode, from our own newest checkpoint folder: weights, optimizer,
    schedule, step and data position. An unreadable checkpoint (a truncated write) is
    skipped with a warning for the one before it."""
    ctx = run.ctx
    say = (lambda m: print(m, flush=True)) if ctx.rank == 0 else (lambda m: None)
    state = checkpoints.newest_state(ctx.session.resume_checkpoint(), local_dir=ctx.local_dir,
                                     run_dir=ctx.run_dir, warn=say)
    if state is None:
        return
    bases = [group["initial_lr"] for group in run.opt.param_groups]  # optim.lr x layer decay
    checkpoints.unwrap(run.model).load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.step = int(state["step"])
    # This config's learning rates, not the checkpoint's: a PBT exploit resumes another
    # trial's state with a perturbed optim.lr (the same values otherwise).
    run.sched.base_lrs = bases
    for group, base in zip(run.opt.param_groups, bases, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * lr_factor(run.sched.last_epoch, ctx.cfg)
    # Every rank has consumed as many batches as rank 0 (equal splits, same steps).
    # Checkpoints from before the data position was saved restart the stream.
    saved = dict(state.get("data") or {})
    if saved.get("world", ctx.world) != ctx.world:  # elastic: the split changed size
        # The same number of rows consumed this epoch, in batches of the new per-rank split.
        saved["batch"] = saved.get("batch", 0) * saved["world"] // ctx.world
        if ctx.rank == 0:
            print(f"[hip] world size {saved['world']} -> {ctx.world}: {run.accum} micro-batches "
                  "per step keep the global batch", flush=True)
    saved["world"] = ctx.world
    run.position.update(saved)
    if ctx.rank == 0:
        print(f"[hip] resumed from step {run.step}", flush=True)
    if ctx.logs:
        ctx.mlflow.set_tags({RESUMED_TAG: str(run.step)})


# ----------------------------------------------------------------------------- the loop


def _autocast(ctx: _Ctx):
    use_bf16 = ctx.device.type == "cuda" and ctx.cfg.trainer.bf16
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train(run: Run) -> None:
    """Optimizer steps until trainer.steps: log every log_every, evaluate every eval_every,
    report (and checkpoint) every checkpoint_every and at the end. Rank 0 logs through
    ctx.mlflow (pipeline/run_logger.py), and finally sends what an MLflow outage held back."""
    cfg, ctx = run.ctx.cfg, run.ctx
    t = cfg.trainer
    run.model.train()
    first_step_done, first_step = None, run.step
    try:
        while run.step < t.steps:
            metrics = train_step(run)
            _maybe_fault(ctx.rank, run.step)
            now = time.time()
            if first_step_done is None:  # what a job pays before it trains (issue 19)
                first_step_done = now
                if run.started_at is not None and ctx.logs:
                    ctx.mlflow.log_metrics({"startup_s": now - run.started_at}, run.step)
            elif run.step > first_step + 1:
                metrics["steps_per_s"] = (run.step - first_step - 1) / (now - first_step_done)
            if ctx.logs and (run.step % t.log_every == 0 or run.step == t.steps):
                ctx.mlflow.log_metrics(metrics, run.step)
            last = run.step == t.steps
            evaluated = run.step % t.eval_every == 0 or last
            if evaluated:
                val = evaluate(run)
                if t.eval_cooldown_steps and (last or not t.eval_cooldown_at
                                              or run.step in t.eval_cooldown_at):
                    # The last step's schedule has already decayed: no probe there.
                    cooled = val if last else cooled_eval(
                        run, _optimizer_step, lambda r: evaluate(r, samples=False))
                    val.update({f"cooled_{k}": v for k, v in cooled.items()})
                metrics.update(val)
                if ctx.logs and val:
                    ctx.mlflow.log_metrics(val, run.step)
            save = run.step % t.checkpoint_every == 0 or last
            if evaluated or save:  # every worker reaches this at the same steps (a barrier)
                report(run, metrics, save=save)
    finally:
        if ctx.logs:
            ctx.mlflow.flush()


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step (run.accum micro-batches per worker); returns its metrics."""
    cfg, ctx = run.ctx.cfg, run.ctx
    t0 = time.perf_counter()
    wait = 0.0
    micro = []
    for _ in range(run.accum):
        tw = time.perf_counter()
        micro.append(next(run.train_data))
        wait += time.perf_counter() - tw
    loss_value = _optimizer_step(run, micro, step_seed(cfg.trainer.seed, ctx.rank, run.step))
    run.sched.step()
    run.step += 1
    dt = time.perf_counter() - t0
    samples = cfg.optim.batch_size * run.accum * ctx.world
    return {"loss": loss_value, "lr": run.sched.get_last_lr()[0],
            "samples_per_s": samples / dt, "data_wait_frac": wait / dt,
            "world_size": ctx.world}


def _optimizer_step(run: Run, micro: list[dict[str, Any]], seed: int) -> float:
    """Forward, backward (summed over the micro-batches), clip, optimizer step; -> loss."""
    cfg, ctx = run.ctx.cfg, run.ctx
    run.opt.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss_value = 0.0
    for batch in micro:
        with _autocast(ctx):
            x = to_model_input(augment(batch, cfg.data.augment), run.spec, cfg.data.audio)
            out = run.task.forward(run.model, x)
        loss = run.task.loss(out, batch) / len(micro)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {run.step} on "
                                     f"rank {ctx.rank}; lower optim.lr or enable clipping")
        loss.backward()
        loss_value += loss.item()
    if cfg.optim.clip_norm:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_norm)
    run.opt.step()
    return loss_value


# ----------------------------------------------------------------------------- evaluation


def evaluate(run: Run, *, samples: bool = True) -> dict[str, float]:
    """Validation over this worker's val shard, summed across workers: val_loss and what the
    task adds (val_accuracy); MAE logs reconstructions of the first batch (samples=True)."""
    if run.val_ds is None:
        return {}
    ctx, task = run.ctx, run.task
    run.model.eval()
    gen = torch.Generator(device=ctx.device).manual_seed(1234)  # same masks every eval
    sums = dict.fromkeys(("loss", "count", *task.sum_keys), 0.0)
    first = True
    with torch.no_grad():
        for batch in _batches(run.val_ds, ctx, task.columns(list(run.spec)), train=False):
            x = to_model_input(batch, run.spec, ctx.cfg.data.audio)
            with _autocast(ctx):
                out = task.forward(run.model, x, generator=gen)
            n = next(iter(batch.values())).shape[0]
            sums["loss"] += float(task.loss(out, batch)) * n
            sums["count"] += n
            for k, v in task.eval_sums(out, batch).items():
                sums[k] += v
            if first and samples:
                task.on_first_eval_batch(x, out, lambda x, out: _log_sample(run, x, out))
                first = False
    sums = dict(zip(sums, _all_sum(list(sums.values()), ctx), strict=True))
    run.model.train()
    return {"val_loss": sums["loss"] / max(sums["count"], 1),
            **task.eval_metrics(sums, sums["count"])}


def _all_sum(values: list[float], ctx: _Ctx) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _log_sample(run: Run, x, out) -> None:
    """MAE: a PNG of inputs, visible pixels and reconstructions (images only, rank 0)."""
    ctx = run.ctx
    if not ctx.logs or "image" not in run.spec:
        return
    _, pred, mask = out
    shape = tuple(ctx.manifest["columns"]["image"]["shape"][:2])
    png = tracking.reconstruction_grid(
        to_pixels(x["image"], shape).cpu().numpy(),
        mask["image"].reshape(-1, *shape).cpu().numpy(),
        to_pixels(pred["image"], shape).cpu().numpy())
    ctx.mlflow.log_bytes(f"reconstructions/step_{run.step:06d}.png", png)


# ----------------------------------------------------------------------------- reporting


def report(run: Run, metrics: dict[str, float], *, save: bool) -> None:
    """session.report at eval and checkpoint steps: Tune schedulers (ASHA) see every eval;
    rank 0 attaches the checkpoint at checkpoint steps."""

    ctx = run.ctx
    metrics = {**metrics, "step": run.step}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if save and ctx.rank == 0:
            state = checkpoints.make_state(
                run.model, run.opt, run.sched, step=run.step, config=config_to_dict(ctx.cfg),
                manifest_hash=ctx.manifest_hash, data_position=run.position)
            if ctx.local_dir:  # no Ray Train persistence: our own folders
                where = storage.storage_kwargs(checkpoints.persist_state(
                    state, ctx.local_dir, run.step, ctx.cfg.trainer.num_to_keep, ctx.run_id,
                    metrics))
                checkpoint = ray.train.Checkpoint(where["storage_path"],
                                                  filesystem=where.get("storage_filesystem"))
            else:
                checkpoints.save_state(state, tmp, ctx.run_id, metrics)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ctx.session.report(metrics, checkpoint=checkpoint)


__all__ = ["WorkerArgs", "Run", "train_fn_per_worker", "setup", "train", "train_step",
           "evaluate", "report", "step_seed", "FAULT_ENV", "INIT_TENSORS_TAG"]
