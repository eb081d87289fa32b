"""Training checkpoints: one `state.pt` per checkpoint, loadable with weights_only=True.

Content: model (unwrapped state dict), optimizer, scheduler, step, torch RNG state, the
position in the train data stream ({"epoch", "batch"}: see _batches in
pipeline/train/loop.py), the resolved config (plain dict) and the dataset manifest hash.
Only tensors, numbers, strings, lists and dicts, so `torch.load(..., weights_only=True)` can
read it: no pickled code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline import storage, tracking

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module


def make_state(model, optimizer, scheduler, *, step: int, config: Mapping[str, Any],
               manifest_hash: str, data_position: Mapping[str, int] | None = None
               ) -> dict[str, Any]:
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step,
            "rng": torch.get_rng_state(), "data": dict(data_position or {}),
            "config": dict(config), "manifest_hash": manifest_hash}


def meta_of(state: Mapping[str, Any], run_id: str | None = None,
            metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The small JSON beside state.pt (META_FILE): what resume checks need without loading
    the weights (pipeline/train/resume.py): step, manifest hash, task and model config, data
    position, the MLflow run and its last reported metrics."""
    config = state.get("config") or {}
    return {"step": int(state["step"]), "manifest_hash": state.get("manifest_hash"),
            "task": config.get("task"), "model": config.get("model"),
            "data": dict(state.get("data") or {}), "run_id": run_id,
            "metrics": {k: v for k, v in (metrics or {}).items()
                        if isinstance(v, int | float | str)}}


def save_state(state: Mapping[str, Any], folder: str | Path, run_id: str | None = None,
               metrics: Mapping[str, Any] | None = None) -> Path:
    """state.pt + meta.json in a local folder (Ray Train uploads the folder as one
    checkpoint and registers it only once the upload is complete)."""
    path = Path(folder) / STATE_FILE
    torch.save(dict(state), path)
    (Path(folder) / META_FILE).write_text(json.dumps(meta_of(state, run_id, metrics)) + "\n")
    return path


def persist_state(state: Mapping[str, Any], root: str, step: int, keep: int,
                  run_id: str | None = None, metrics: Mapping[str, Any] | None = None) -> str:
    """Write `state` to `root`/checkpoint_<step>/ (local or gs://) so that a reader sees the
    whole checkpoint or none of it, then drop all but the `keep` newest; -> the folder's
    URI. For runs without Ray Train's own persistence (trainer.num_workers=0: local mode).

    Local: each file written to a temporary name, fsync'ed and renamed (atomic on POSIX).
    gs://: an object appears only when its upload completes, so a listed state.pt is whole.
    Either way a crash mid-write leaves the previous checkpoints as they were."""
    fs, base = storage.resolve(root)
    dest = f"{base}/{CHECKPOINT_PREFIX}{step:06d}"
    fs.makedirs(dest, exist_ok=True)
    meta = json.dumps(meta_of(state, run_id, metrics)) + "\n"
    if storage.is_local(root):
        _atomic_write(Path(dest) / STATE_FILE, lambda f: torch.save(dict(state), f))
        _atomic_write(Path(dest) / META_FILE, lambda f: f.write(meta.encode()))
    else:
        with fs.open(f"{dest}/{STATE_FILE}", "wb") as f:
            torch.save(dict(state), f)
        with fs.open(f"{dest}/{META_FILE}", "w") as f:
            f.write(meta)
    for old in step_folders(root)[keep:]:
        fs.rm(storage.resolve(old)[1], recursive=True)
    return storage.join(root, f"{CHECKPOINT_PREFIX}{step:06d}")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _order(name: str) -> tuple[int, int, str]:
    """Newest-first sort key of a checkpoint folder name: our checkpoint_<step> by the step
    as a number (checkpoint_1000000 is newer than checkpoint_999999), Ray Train's
    checkpoint_<timestamp> by the timestamp."""
    tail = name.removeprefix(CHECKPOINT_PREFIX)
    return (1, int(tail), "") if tail.isdigit() else (0, 0, tail)


def step_folders(root: str) -> list[str]:
    """URIs of the checkpoint folders under `root` that hold a state file, newest first."""
    fs, base = storage.resolve(root)
    if not fs.exists(base):
        return []
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
    found = [n for n in names
             if n.startswith(CHECKPOINT_PREFIX) and fs.exists(f"{base}/{n}/{STATE_FILE}")]
    return [storage.join(root, n) for n in sorted(found, key=_order, reverse=True)]


def latest_persisted(root: str) -> str | None:
    """The newest checkpoint's state file under `root`, if any (it may still be unreadable:
    load_newest falls back)."""
    folders = step_folders(root)
    return storage.join(folders[0], STATE_FILE) if folders else None


def read_meta(folder: str) -> dict[str, Any] | None:
    """meta.json of a checkpoint folder (None for checkpoints from before it existed, or an
    unreadable one)."""
    try:
        return storage.read_json(storage.join(folder, META_FILE))
    except (OSError, ValueError):
        return None


def load_newest(folders: list[str], warn=print) -> tuple[dict[str, Any], str] | None:
    """The first of `folders` (newest first) whose state file loads, and its folder; an
    unreadable one (a truncated write, a half-copied file) is skipped with a warning."""
    for folder in folders:
        try:
            return load_state(storage.join(folder, STATE_FILE)), folder
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
            warn(f"[hip] warning: checkpoint {folder} is unreadable "
                 f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); trying the one "
                 "before it")
    return None


def newest_state(ckpt, *, local_dir: str | None, run_dir: str | None, warn=print
                 ) -> dict[str, Any] | None:
    """The state a run resumes from: with Ray Train, Ray's latest registered checkpoint
    `ckpt`, then the older folders of the run; without Ray Train's persistence (local mode,
    a lean sweep trial: `local_dir`) the checkpoint Tune hands the trial (a PBT exploit of
    another trial's, a paused HyperBand trial's) if any, else the newest readable folder of
    our own. RuntimeError when there are checkpoints and none loads."""
    if local_dir and ckpt is not None:  # from Tune: whose it is, the scheduler decided
        with ckpt.as_directory() as d:
            return load_state(Path(d) / STATE_FILE)
    if local_dir:  # our own checkpoint folders (Ray Train's local mode has none)
        folders = step_folders(local_dir)
    elif ckpt is not None:
        folders = step_folders(run_dir) if run_dir else []
        names = [f.rsplit("/", 1)[-1] for f in folders]
        name = ckpt.path.rstrip("/").rsplit("/", 1)[-1]
        if name not in names:  # not where we expected it: Ray's own copy, no fallback
            with ckpt.as_directory() as d:
                return load_state(Path(d) / STATE_FILE)
        folders = folders[names.index(name):]  # newer folders are not registered: skipped
    else:
        return None
    if not folders:
        return None
    found = load_newest(folders, warn=warn)
    if found is None:
        raise RuntimeError(f"no readable checkpoint in {run_dir or local_dir} "
                           f"({len(folders)} tried); pass --restart to train this run from "
                           "step 0")
    return found[0]


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state file (local path or fsspec URI) with weights_only=True."""
    fs, p = storage.resolve(str(path))
    with fs.open(p, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def resolve_init(init_from: str, tracking_uri: str, workdir: str | Path) -> Path:
    """`--init-from` -> a local state file: an MLflow run id, a checkpoint folder or file
    (local or gs://). Raises FileNotFoundError with what was tried."""
    if "/" not in init_from and not Path(init_from).exists():
        # An MLflow run id: its final model artifact.
        return tracking.download_artifact(tracking_uri, init_from,
                                          tracking.FINAL_MODEL_ARTIFACT, workdir)
    target = init_from.rstrip("/")
    if not target.endswith(".pt"):
        target = storage.join(target, STATE_FILE)
    if not storage.exists(target):
        raise FileNotFoundError(f"--init-from {init_from}: no checkpoint at {target}")
    if storage.is_local(target):
        return Path(target)
    local = Path(tempfile.mkdtemp(dir=workdir)) / STATE_FILE
    fs, p = storage.resolve(target)
    fs.get(p, str(local))
    return local
