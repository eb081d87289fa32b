"""MLflow tracking: runs, params, metrics, artifacts. Only the driver and world rank 0 call it.

Everything goes through an explicit `MlflowClient(tracking_uri)` and a run id, never the
fluent API's process-global active run: Ray workers, Tune trials and the driver each talk to
the same run without sharing state. Any tracking URI works (sqlite:////abs/path.db or an
`mlflow server` URL); credentials come from MLflow's own environment variables only.

These functions use MLflow's own HTTP retries (7 over ~4 minutes, 120 s per request): the
driver waits out a short outage of a tracking server. World rank 0 logs during training
through pipeline/run_logger.py instead, which never stops training.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

MAX_PARAM_LEN = 500  # MLflow rejects longer param values
CHECKPOINT_TAG = "hip.checkpoint_uri"
# MLflow 3's UI opens an experiment in its GenAI (traces) overview unless the experiment is
# tagged as model development; ours hold training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SOURCE_NAME_TAG = "mlflow.source.name"  # the UI's Source column
SOURCE_TYPE_TAG = "mlflow.source.type"
FINAL_MODEL_ARTIFACT = "checkpoint/state.pt"  # final checkpoint of a run


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values made MLflow-param safe (<= 500 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if not isinstance(v, str) else v
            out[key] = text if len(text) <= MAX_PARAM_LEN else text[:MAX_PARAM_LEN - 3] + "..."
    return out


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    blob = json.dumps(manifest, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version: never overridden
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database (runs/mlflow.db -> runs/artifacts/), not in
        # ./mlruns of whichever working directory happened to create the experiment.
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / "artifacts" / name).resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another trial: read it back
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str], artifacts: Mapping[str, str | bytes] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a run, log flattened params, tags and small text artifacts; return its id."""
    c = client(uri)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
    from mlflow.entities import Param

    try:
        flat = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # log_batch takes at most 100 params per call
            c.log_batch(run.info.run_id, params=flat[i:i + 100])
        for name, content in (artifacts or {}).items():
            log_bytes(uri, run.info.run_id, name, content)
    except BaseException:  # never leave a half-made run RUNNING
        with contextlib.suppress(Exception):  # the error being raised says more
            c.set_terminated(run.info.run_id, status="FAILED")
        raise
    return run.info.run_id


def ui_link(uri: str, experiment: str) -> str:
    """Where to see an experiment's runs. MLflow 3.17's UI picks GenAI or model-training
    views per browser (its GenAI / Model training toggle, GenAI by default), not from the
    experiment; `workflowType=machine_learning` in the link opens the runs table."""
    exp = client(uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{exp.experiment_id if exp else ''}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def source_tags(command: str) -> dict[str, str]:
    """Tags that fill the UI's Source column with the `hip` command that made the run."""
    return {SOURCE_NAME_TAG: command, SOURCE_TYPE_TAG: "LOCAL"}


def log_dataset(uri: str, run_id: str, manifest: Mapping[str, Any], data_path: str,
                context: str = "training") -> None:
    """Record the shards as the run's MLflow dataset input (the UI's Dataset column):
    name = the shards folder's name, digest = the manifest hash, source = the shards URI,
    schema = the tensor columns, profile = rows per split."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    source_type = data_path.split("://", 1)[0] if "://" in data_path else "local"
    dataset = Dataset(
        name=data_path.rstrip("/").rsplit("/", 1)[-1] or data_path,
        digest=manifest_hash(manifest), source_type=source_type,
        source=json.dumps({"uri": data_path}),
        schema=json.dumps({"columns": manifest.get("columns", {})}, default=str),
        profile=json.dumps({"splits": manifest.get("splits", {}),
                            "classes": len(manifest.get("classes") or [])}))
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    try:
        client(uri).log_inputs(run_id, datasets=inputs)
    except MlflowException as e:
        # Runs starting together (a sweep's first trials) race to create the experiment's
        # dataset row in a SQL store: the loser's insert breaks the unique key (measured:
        # SQLite, 2 of 12 trials). The row exists now, and a second call links it.
        if not any(word in str(e).lower() for word in ("unique", "duplicate")):
            raise
        client(uri).log_inputs(run_id, datasets=inputs)


def log_bytes(uri: str, run_id: str, artifact_path: str, content: str | bytes) -> None:
    """Write `content` to a temp file and log it as artifact `artifact_path` (a/b/c.ext)."""
    data = content.encode() if isinstance(content, str) else content
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_path).name
        path.write_bytes(data)
        folder = str(Path(artifact_path).parent)
        client(uri).log_artifact(run_id, str(path), None if folder == "." else folder)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client(uri).log_batch(run_id, metrics=batch)


def set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def download_artifact(uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Fetch one artifact of a run into `dst`; FileNotFoundError if the run has none."""
    from mlflow.artifacts import download_artifacts

    try:
        return Path(download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                       dst_path=str(dst), tracking_uri=uri))
    except Exception as e:  # MlflowException for a missing run or artifact
        raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path}: {e}") from None


def config_yaml(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)


def reconstruction_grid(inputs: np.ndarray, masks: np.ndarray, preds: np.ndarray) -> bytes:
    """PNG of rows (input | masked input | reconstruction) for up to 8 images.

    inputs/preds (N, H, W, 3) float in [0, 1]; masks (N, H, W) with 1 = hidden (grey).
    """
    from PIL import Image

    n = min(8, len(inputs))
    masked = np.where(masks[:n, :, :, None] > 0, 0.5, inputs[:n])
    rows = [np.concatenate([inputs[i], masked[i], preds[i]], axis=1) for i in range(n)]
    grid = np.concatenate(rows, axis=0)  # (n*H, 3*W, 3)
    img = Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8))
    scale = max(1, 96 // inputs.shape[1])  # upscale tiny images so the grid is readable
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
