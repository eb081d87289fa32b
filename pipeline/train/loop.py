"""Ray Train jobs: MAE pretraining and classification fine-tuning of the models/ presets.

`train_fn_per_worker(config)` is the per-worker loop (reads its dataset shard, steps,
reports); `run_training(cfg)` is the driver that validates, opens the MLflow run, builds the
TorchTrainer and fits it. Only world rank 0 logs to MLflow; `ray.train.report` is called by
every worker at the same steps (it is a barrier), with rank 0 passing the checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models import create_model, load_mae_weights
from pipeline import storage, tracking
from pipeline.train import checkpoints
from pipeline.train.batches import input_spec, to_model_input, to_pixels
from pipeline.train.config import TrainConfig

FAULT_ENV = "HIP_TEST_FAULT"  # test-only: "rank:step:marker_path" exits that rank once
INIT_TENSORS_TAG = "hip.initialised_tensors"  # how many tensors finetune.init_from supplied


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> torch.nn.Module:
    num_classes = max(1, len(manifest.get("classes") or []))
    return create_model(cfg.model.preset, inputs=input_spec(manifest), task=cfg.task,
                        num_classes=num_classes, head=cfg.model.head,
                        mask_ratio=cfg.mae.mask_ratio, masking=cfg.mae.masking,
                        target_norm=cfg.mae.target_norm, **cfg.model.overrides)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to min_lr_ratio (or constant)."""
    o, total = cfg.optim, cfg.trainer.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, latent and position tables (as in MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.endswith(".table"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def _maybe_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if rank == int(fault_rank) and step == int(fault_step) and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        # Ray Train registers a reported checkpoint at the controller's next poll of the
        # workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a group that
        # dies inside that window resumes from the checkpoint before. Wait it out so the
        # test pins down resume-from-latest rather than that race.
        time.sleep(6)
        os._exit(17)  # a hard worker death, as a preempted node would give


@dataclass
class _Ctx:
    cfg: TrainConfig
    manifest: dict[str, Any]
    run_id: str | None
    rank: int
    world: int
    device: torch.device
    local_dir: str | None = None  # set in local mode (trainer.num_workers=0): see _report

    @property
    def logs(self) -> bool:
        return self.rank == 0 and self.run_id is not None


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
        shuffle = dict(local_shuffle_buffer_size=256,
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


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one optimizer step on one rank. Reseeding every step makes MAE
    masks, dropout and latent subsampling a function of (trainer.seed, rank, step), so a
    resumed run (any rank, any worker restart) draws what an uninterrupted run would."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:8], "big")


def _forward(model, batch, spec, ctx: _Ctx, generator=None):
    x = to_model_input(batch, spec)
    use_bf16 = ctx.device.type == "cuda" and ctx.cfg.trainer.bf16
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        if ctx.cfg.task == "mae":
            return model(x, generator=generator) if generator is not None else model(x), x
        return model(x), x


def _loss(out, batch, ctx: _Ctx) -> torch.Tensor:
    if ctx.cfg.task == "mae":
        return out[0]
    return F.cross_entropy(out.float(), batch["label"].long(),
                           label_smoothing=ctx.cfg.optim.label_smoothing)


def _all_sum(values: list[float], ctx: _Ctx) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def evaluate(model, val_ds, spec, ctx: _Ctx, step: int) -> dict[str, float]:
    """Validation over this worker's val shard, summed across workers."""
    if val_ds is None:
        return {}
    model.eval()
    columns = [*spec, "label"]
    gen = torch.Generator(device=ctx.device).manual_seed(1234)  # same masks every eval
    loss_sum = correct = count = 0.0
    first = None
    with torch.no_grad():
        for batch in _batches(val_ds, ctx, columns, train=False):
            out, x = _forward(model, batch, spec, ctx, generator=gen)
            n = batch["label"].shape[0]
            loss_sum += float(_loss(out, batch, ctx)) * n
            count += n
            if ctx.cfg.task == "classify":
                correct += float((out.argmax(-1) == batch["label"]).sum())
            elif first is None:
                first = (x, out)
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], ctx)
    model.train()
    metrics = {"val_loss": loss_sum / max(count, 1)}
    if ctx.cfg.task == "classify":
        metrics["val_accuracy"] = correct / max(count, 1)
    if ctx.logs and first is not None and "image" in spec:
        _log_reconstructions(first, spec, ctx, step)
    return metrics


def _log_reconstructions(first, spec, ctx: _Ctx, step: int) -> None:
    x, (_, pred, mask) = first
    shape = tuple(ctx.manifest["columns"]["image"]["shape"][:2])
    png = tracking.reconstruction_grid(
        to_pixels(x["image"], shape).cpu().numpy(),
        mask["image"].reshape(-1, *shape).cpu().numpy(),
        to_pixels(pred["image"], shape).cpu().numpy())
    tracking.log_bytes(ctx.cfg.tracking.uri, ctx.run_id, f"reconstructions/step_{step:06d}.png",
                       png)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop. config: {"cfg": dict, "manifest": dict, "run_id": str | None,
    "init_weights": ObjectRef of a state dict | None, "init_from": str, "splits": [...]}."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    tctx = ray.train.get_context()
    ctx = _Ctx(cfg, config["manifest"], config.get("run_id"), tctx.get_world_rank(),
               tctx.get_world_size(), ray.train.torch.get_device(),
               local_dir=config.get("local_dir"))
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.trainer.seed + ctx.rank)
    spec = input_spec(ctx.manifest)
    model = build_model(cfg, ctx.manifest)
    if config.get("init_weights") is not None:
        import ray

        report = load_mae_weights(model, ray.get(config["init_weights"]))
        if ctx.rank == 0:
            print(f"[hip] initialised {len(report.loaded)} tensors from {config['init_from']}; "
                  f"new: {', '.join(sorted({k.split('.')[0] for k in report.missing}))}",
                  flush=True)
        if ctx.logs:
            tracking.set_tags(cfg.tracking.uri, ctx.run_id,
                              {INIT_TENSORS_TAG: str(len(report.loaded))})
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    step = 0
    position = {"epoch": 0, "batch": 0}  # where the train data stream is: see _batches
    ckpt = ray.train.get_checkpoint()
    persisted = checkpoints.latest_persisted(ctx.local_dir) if ctx.local_dir else None
    if ckpt is not None or persisted:  # resume after a failure or a rerun of the same name
        if persisted:  # local mode: our own checkpoint folders (Ray's local mode has none)
            state = checkpoints.load_state(persisted)
        else:
            with ckpt.as_directory() as d:
                state = checkpoints.load_state(Path(d) / checkpoints.STATE_FILE)
        checkpoints.unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        # Every rank has consumed as many batches as rank 0 (equal splits, same steps).
        # Checkpoints from before the data position was saved restart the stream.
        position.update(state.get("data") or {})
        if ctx.rank == 0:
            print(f"[hip] resumed from step {step}", flush=True)
        if ctx.logs:
            tracking.set_tags(cfg.tracking.uri, ctx.run_id, {"hip.resumed_from_step": str(step)})
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val") if "val" in config.get("splits", ()) else None
    columns = list(spec) + (["label"] if cfg.task == "classify" else [])
    data = _batches(train_ds, ctx, columns, train=True, position=position)
    mh = tracking.manifest_hash(ctx.manifest)
    model.train()
    while step < cfg.trainer.steps:
        t0 = time.perf_counter()
        wait = 0.0
        loss_value = 0.0
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(step_seed(cfg.trainer.seed, ctx.rank, step))
        for _ in range(cfg.optim.grad_accum):
            tw = time.perf_counter()
            batch = next(data)
            wait += time.perf_counter() - tw
            out, _ = _forward(model, batch, spec, ctx)
            loss = _loss(out, batch, ctx) / cfg.optim.grad_accum
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} on rank "
                                         f"{ctx.rank}; lower optim.lr or enable clipping")
            loss.backward()
            loss_value += loss.item()
        if cfg.optim.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        opt.step()
        sched.step()
        step += 1
        _maybe_fault(ctx.rank, step)
        dt = time.perf_counter() - t0
        samples = cfg.optim.batch_size * cfg.optim.grad_accum * ctx.world
        metrics = {"loss": loss_value, "lr": sched.get_last_lr()[0],
                   "samples_per_s": samples / dt, "data_wait_frac": wait / dt}
        if ctx.logs and (step % cfg.trainer.log_every == 0 or step == cfg.trainer.steps):
            tracking.log_metrics(cfg.tracking.uri, ctx.run_id, metrics, step)
        last = step == cfg.trainer.steps
        evaluated = step % cfg.trainer.eval_every == 0 or last
        if evaluated:
            val = evaluate(model, val_ds, spec, ctx, step)
            metrics.update(val)
            if ctx.logs and val:
                tracking.log_metrics(cfg.tracking.uri, ctx.run_id, val, step)
        save = step % cfg.trainer.checkpoint_every == 0 or last
        if evaluated or save:  # every worker reaches this at the same steps (a barrier)
            _report(model, opt, sched, step, metrics, config["cfg"], mh, ctx, save=save,
                    position=position)


def _report(model, opt, sched, step, metrics, cfg_dict, mh, ctx: _Ctx, *, save: bool,
            position: dict[str, int]) -> None:
    """ray.train.report at eval and checkpoint steps: Tune schedulers (ASHA) see every eval;
    rank 0 attaches the checkpoint at checkpoint steps."""
    import ray.train

    metrics = {**metrics, "step": step}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if save and ctx.rank == 0:
            state = checkpoints.make_state(model, opt, sched, step=step, config=cfg_dict,
                                           manifest_hash=mh, data_position=position)
            if ctx.local_dir:  # local mode: Ray Train would keep only a temp folder
                where = storage.storage_kwargs(checkpoints.persist_state(
                    state, ctx.local_dir, step, ctx.cfg.trainer.num_to_keep))
                checkpoint = ray.train.Checkpoint(where["storage_path"],
                                                  filesystem=where.get("storage_filesystem"))
            else:
                checkpoints.save_state(state, tmp)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


__all__ = ["build_model", "lr_factor", "make_optimizer", "train_fn_per_worker"]
