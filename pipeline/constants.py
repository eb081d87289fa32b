"""Names shared by several jobs, defined once."""

from __future__ import annotations

from typing import Literal

# What a dataset holds: the tensor columns of its rows (pipeline/train/batches.py).
Modality = Literal["image", "audio", "video", "audio+video"]
MODALITIES: tuple[str, ...] = Modality.__args__

# The embedded default setup: MLflow in a SQLite file, checkpoints on local disk (both
# relative to the working directory; resolved to absolute paths at job start).
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
DEFAULT_CHECKPOINTS = "runs/checkpoints"

# MLflow stores a tag value (and a param value) of at most this many characters on every
# backend we use; longer texts (error lines, JSON of a point) are cut to it.
MLFLOW_TAG_LIMIT = 4000
