"""A split that fits in memory, read once with pyarrow: the lean trial path's data.

A Ray Dataset costs every trial that opens one a footer-sampling task, read tasks in pool
workers that first import ray.data, and an executor: ~1.5-4 s of CPU before the first batch
on a 2-core box (docs/benchmarks.md, "Sweeps"). A sweep's trials read the same small split
again and again, so a split of at most `data.in_memory_mb` (the manifest's byte count) is
read here instead: the manifest's files with pyarrow, tensor columns decoded by the shards'
codec (pipeline/data/codec.py), kept as numpy arrays.

`iter_torch_batches` has the signature the loop uses on Ray Datasets. Train passes draw a
full random permutation per epoch from `local_shuffle_seed` (the loop derives it from
trainer.seed, the epoch and the rank): better mixed than a 256-row buffer, and the same
batches on every run of a config whatever data.deterministic says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.codec import tensor_column_schema, tensor_to_numpy
from pipeline.data.layout import shard_uris


def split_bytes(manifest: dict[str, Any], split: str) -> int:
    """Bytes of a split's shard files as the manifest recorded them."""
    return sum(int(f.get("bytes") or 0) for f in manifest.get("files", {}).get(split, []))


class MemorySplit:
    """The rows of one split: {column: (N, ...) numpy array}."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns
        self.rows = len(next(iter(columns.values()))) if columns else 0

    @classmethod
    def read(cls, uri: str, split: str, manifest: dict[str, Any],
             columns: list[str]) -> MemorySplit:
        """Read `columns` of `split` from the files the manifest lists, in its order."""
        tensors = tensor_column_schema(manifest)
        fs, _ = storage.resolve(uri)
        parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        for file_uri in shard_uris(uri, split, manifest):
            path = storage.resolve(file_uri)[1]
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=columns)
            for c in columns:
                if c in tensors:
                    parts[c].append(tensor_to_numpy(table.column(c), *tensors[c]))
                else:
                    parts[c].append(table.column(c).to_numpy(zero_copy_only=False))
        return cls({c: np.concatenate(v) for c, v in parts.items() if v})

    def iter_torch_batches(self, *, batch_size: int, device: torch.device | str = "cpu",
                           drop_last: bool = False, local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None):
        """Dicts of (B, ...) tensors on `device`; shuffled when a shuffle seed is given."""
        del local_shuffle_buffer_size  # the whole split is the buffer
        order = np.arange(self.rows)
        if local_shuffle_seed is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(self.rows)
        stop = self.rows - self.rows % batch_size if drop_last else self.rows
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {c: torch.from_numpy(a[idx]).to(device) for c, a in self.columns.items()}


__all__ = ["MemorySplit", "split_bytes"]
