"""Training checkpoints: one `state.pt` per checkpoint, loadable with weights_only=True.

Content: model (unwrapped state dict), optimizer, scheduler, step, torch RNG state, the
position in the train data stream ({"epoch", "batch"}: see _batches in
pipeline/train/loop.py), the resolved config (plain dict) and the dataset manifest hash.
Only tensors, numbers, strings, lists and dicts, so `torch.load(..., weights_only=True)` can
read it: no pickled code.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline import storage, tracking

STATE_FILE = "state.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module


def make_state(model, optimizer, scheduler, *, step: int, config: Mapping[str, Any],
               manifest_hash: str, data_position: Mapping[str, int] | None = None
               ) -> dict[str, Any]:
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step,
            "rng": torch.get_rng_state(), "data": dict(data_position or {}),
            "config": dict(config), "manifest_hash": manifest_hash}


def save_state(state: Mapping[str, Any], folder: str | Path) -> Path:
    path = Path(folder) / STATE_FILE
    torch.save(dict(state), path)
    return path


def persist_state(state: Mapping[str, Any], root: str, step: int, keep: int) -> str:
    """Write `state` to `root`/checkpoint_<step>/state.pt (local or gs://) and drop all but
    the `keep` newest such folders; -> the new folder's URI. For runs without Ray Train's
    own persistence (trainer.num_workers=0 runs the loop in the driver: Ray's local mode)."""
    fs, base = storage.resolve(root)
    dest = f"{base}/checkpoint_{step:06d}"
    fs.makedirs(dest, exist_ok=True)
    with fs.open(f"{dest}/{STATE_FILE}", "wb") as f:
        torch.save(dict(state), f)
    for old in _step_folders(fs, base)[:-keep]:
        fs.rm(old, recursive=True)
    return storage.join(root, f"checkpoint_{step:06d}")


def latest_persisted(root: str) -> str | None:
    """The newest `persist_state` checkpoint under `root` (its state file's URI), if any."""
    fs, base = storage.resolve(root)
    if not fs.exists(base):
        return None
    folders = [f for f in _step_folders(fs, base) if fs.exists(f"{f}/{STATE_FILE}")]
    if not folders:
        return None
    return storage.join(root, folders[-1].rsplit("/", 1)[-1], STATE_FILE)


def _step_folders(fs, base: str) -> list[str]:
    return sorted(p for p in fs.ls(base, detail=False)
                  if p.rsplit("/", 1)[-1].startswith("checkpoint_"))


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
