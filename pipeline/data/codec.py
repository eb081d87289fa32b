"""The shards' tensor codec: fixed-shape arrays <-> raw-byte Arrow columns.

Tensor columns are stored as raw C-order bytes, one fixed_size_binary value per row, with
shape and dtype in the manifest ("columns") and in the Parquet field metadata. Ray's
tensor extension types would be stored as Parquet LISTs with per-element levels: ~4 ms
per 224x224x3 image to write and ~1.4 ms to read on this CPU, vs ~0.15 / 0.1 ms as bytes
(measured when the format was chosen). open_shards turns them back into fixed-shape tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def tensor_to_arrow(arr: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(B, *shape) array -> B raw-byte values (zero-copy when `arr` is C-contiguous)."""
    arr = np.ascontiguousarray(arr)
    row_bytes = arr.nbytes // len(arr) if len(arr) else int(np.prod(arr.shape[1:])) * arr.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(row_bytes), len(arr), [None, pa.py_buffer(arr)]
    )


TensorSchema = dict[str, tuple[np.dtype, tuple[int, ...]]]


def tensor_column_schema(manifest: dict[str, Any]) -> TensorSchema:
    """{column: (dtype, shape)} of the manifest's tensor columns; also the format of
    ray.data.read_parquet(..., tensor_column_schema=) for readers outside this module."""
    return {name: (np.dtype(c["dtype"]), tuple(c["shape"]))
            for name, c in manifest["columns"].items() if c["shape"]}


def tensor_to_numpy(col: pa.Array | pa.ChunkedArray, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
    """A raw-byte tensor column -> (N, *shape) array: a zero-copy, read-only view of the
    value buffer (copy it to write)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n, width = len(col), col.type.byte_width
    if n == 0:
        return np.empty((0, *shape), dtype)
    raw = np.frombuffer(col.buffers()[1], np.uint8, n * width, col.offset * width)
    return raw.view(dtype).reshape(n, *shape)


def tensors_from_arrow(table: pa.Table, tensors: TensorSchema) -> pa.Table:
    """Raw-byte tensor columns present in `table` -> Ray fixed-shape tensor columns
    (B, *shape). Absent columns are skipped, so column projection stays possible (Ray's
    own tensor_column_schema= raises when a projection drops a tensor column, e.g. count())."""
    from ray.data.extensions import ArrowTensorArray

    for name, (dtype, shape) in tensors.items():
        if name not in table.column_names:
            continue
        arr = tensor_to_numpy(table.column(name), dtype, shape)  # one copy into Ray's type
        table = table.set_column(table.schema.get_field_index(name), name,
                                 ArrowTensorArray.from_numpy(arr))
    return table
