"""Storage URIs (local paths and gs:// through fsspec), manifests, and opening shards.

Layout of a preprocessed dataset (written by pipeline/preprocess.py):
    <root>/train/*.parquet  <root>/val/*.parquet  <root>/rejects/*.parquet
    <root>/manifest.json    written last; lists every shard file (relative to <root>)

Credentials come only from the environment: Google default credentials for gs://, or,
when STORAGE_EMULATOR_HOST is set, anonymous access to that emulator endpoint. Nothing
here reads credentials from configs or prints them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

if TYPE_CHECKING:
    import ray.data
    from ray.data._internal.execution.interfaces import TaskContext

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
REJECTS = "rejects"
_GCS_SCHEMES = ("gs://", "gcs://")
_ARROW_LOCAL = pafs.LocalFileSystem()


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI -> (fsspec filesystem, path within it). Local paths become absolute."""
    if is_local(uri):
        path = uri.removeprefix("file://")
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if uri.startswith(_GCS_SCHEMES):
        fs, path = _gcs(), uri.split("://", 1)[1].rstrip("/")
    else:
        fs, path = fsspec.core.url_to_fs(uri)  # any other installed fsspec protocol
    # fsspec reuses one instance per protocol+options and caches its listings; objects
    # written by Ray workers (other processes) must be visible to the next listing here.
    fs.invalidate_cache()
    return fs, path.rstrip("/")


def _gcs() -> fsspec.AbstractFileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator:
        # The core class, not gcsfs' default export: that one may be the zonal/HNS variant
        # whose gRPC bucket probe hangs against an emulator (see docs/ray-notes.md).
        from gcsfs.core import GCSFileSystem

        endpoint = emulator if emulator.startswith(("http://", "https://")) else (
            f"http://{emulator}"
        )
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "test")
        return GCSFileSystem(endpoint_url=endpoint, token="anon", project=project)
    import gcsfs

    # token=None: gcsfs' own chain (google default credentials, gcloud cache, anonymous).
    # The instance pickles without secrets; each Ray worker re-reads its own environment.
    return gcsfs.GCSFileSystem(token=None)


def storage_kwargs(uri: str) -> dict[str, Any]:
    """URI -> Ray's `storage_path` (+ `storage_filesystem`, a pyarrow wrapper of the fsspec
    filesystem, for remote URIs), as RunConfig and Checkpoint take them. Local folders are
    created."""
    if is_local(uri):
        os.makedirs(resolve(uri)[1], exist_ok=True)
        return {"storage_path": uri}
    fs, path = resolve(uri)
    return {"storage_path": path, "storage_filesystem": arrow_filesystem(fs)}


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view of an fsspec filesystem: pyarrow's own for local files (no Python
    in the I/O path: through fsspec's Python file object every Parquet page crosses into
    Python, ~0.25 ms more per 0.5 MB audio row; docs/benchmarks.md), else a wrapper."""
    if isinstance(fs, LocalFileSystem):
        return _ARROW_LOCAL
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(uri: str, *parts: str) -> str:
    """Join URI parts with "/" (os.path.join is for local paths only)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.exists(path)


def read_json(uri: str) -> dict[str, Any]:
    fs, path = resolve(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, obj: dict[str, Any]) -> None:
    """Write JSON so readers see the old file or the whole new one, never half of it."""
    fs, path = resolve(uri)
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:  # one object upload: atomic on GCS
            f.write(text)


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a dataset root (or of a path to its manifest.json)."""
    path = uri if uri.endswith(".json") else join(uri, MANIFEST)
    if not exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST} in {uri}: not a preprocessed dataset, or its run did not finish"
        )
    return read_json(path)


# Tensor columns are stored as raw C-order bytes, one fixed_size_binary value per row, with
# shape and dtype in the manifest ("columns") and in the Parquet field metadata. Ray's
# tensor extension types would be stored as Parquet LISTs with per-element levels: ~4 ms
# per 224x224x3 image to write and ~1.4 ms to read on this CPU, vs ~0.15 / 0.1 ms as bytes
# (measured when the format was chosen). open_shards turns them back into fixed-shape tensors.


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


def shard_uris(uri: str, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """URIs of the shard files of `split` ("train", "val" or "rejects") as listed by the
    manifest, so files left by a crashed later run are never read."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    files = manifest.get("files", {})
    if split not in files:
        raise ValueError(f"unknown split {split!r}; {uri} has {sorted(files)}")
    return [join(uri, f["path"]) for f in files[split]]


def open_shards(uri: str, split: str = "train", *, file_seed: int | None = None
                ) -> ray.data.Dataset:
    """The rows of one split as a Ray Dataset (tensor columns come back as fixed-shape
    tensors: image (H, W, 3) uint8, audio (T,) int16 or float32, video (F, H, W, 3) uint8).

    file_seed: read the files in a random order, a new one on every execution of the
    dataset (every epoch), derived from the seed and the execution's index (Ray's
    FileShuffleConfig with reseed_after_execution), so two datasets opened with one seed go
    through the same sequence of orders. Cheap: only the list of files is permuted."""
    import ray.data

    manifest = read_manifest(uri)
    uris = shard_uris(uri, split, manifest)
    if not uris:
        raise ValueError(f"split {split!r} of {uri} has no rows")
    tensors = tensor_column_schema(manifest) if split != REJECTS else {}
    fs, _ = resolve(uri)
    paths = [resolve(u)[1] for u in uris]
    # Ray 2.60's default Parquet reader (DataSourceV2) starts 32 footer-reading actors per
    # read_parquet call: ~10 s on a 2-core box. The manifest already lists every file, so
    # the V1 reader (one task per file group, no actors) is used; the plan is fixed at
    # creation, so the flag is only needed during this call.
    ctx = ray.data.DataContext.get_current()
    old, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        # Local: let pyarrow use its native filesystem (faster than the fsspec wrapper).
        shuffle = None if file_seed is None else ray.data.FileShuffleConfig(
            seed=file_seed, reseed_after_execution=True)
        ds = ray.data.read_parquet(paths, filesystem=None if is_local(uri) else fs,
                                   shuffle=shuffle)
    finally:
        ctx.use_datasource_v2 = old
    # The dataset copies the process's DataContext, execution counter included, and some of
    # Ray's readers (from_items, from_pandas) run on the global context and advance it: the
    # same config would then read another file order depending on what ran before in this
    # process (local-mode training, tests). Every dataset's first execution is number 0.
    ds.context._execution_idx = 0
    if not tensors:
        return ds
    # Fused into the read tasks; row count unchanged, so count() and limits stay cheap.
    return ds.map_batches(tensors_from_arrow, fn_kwargs={"tensors": tensors},
                          batch_format="pyarrow", batch_size=None,
                          udf_modifying_row_count=False)


# --------------------------------------------------------------------------------------
# Writing: one streaming pass routes rows to train/ val/ rejects/ by their `split` column
# --------------------------------------------------------------------------------------


class ShardSink(Datasink[dict]):
    """Ray Data sink writing <root>/{train,val,rejects}/part-*.parquet in one pass.

    Rows arrive with a `split` column ("train", "val" or "rejects"). Each write task keeps
    one open Parquet writer per split and rolls to a new file every `rows_per_file` rows,
    so a task holds one block at a time beyond what Ray already bundled for it. Each task
    returns what it wrote (files, rows, label and reject-reason counts); the driver merges
    those in `on_write_complete` into `self.result`, so counting needs no second pass.
    """

    def __init__(
        self,
        root: str,
        *,
        columns: dict[str, list[str]],
        tensors: dict[str, tuple[tuple[int, ...], str]],
        rows_per_file: int,
        compression: str,
        run_id: str,
        bundle_rows: bool = True,
    ):
        self.root = root
        self.fs, self.base = resolve(root)  # pickled into write tasks (no secrets inside)
        self.columns = columns  # split -> columns kept in its files
        self.tensors = tensors  # raw-byte column -> (shape, dtype), kept in field metadata
        self.rows_per_file = rows_per_file
        self.compression = compression
        self.run_id = run_id
        self.bundle_rows = bundle_rows
        self.result: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int | None:
        # Separate write tasks: Ray bundles decoded blocks until a task has about one
        # file's worth of rows. Fused into the decode tasks: each task writes its own rows.
        return self.rows_per_file if self.bundle_rows else None

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict[str, Any]:
        stats = _empty_stats()
        writers: dict[str, _RollingWriter] = {}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            for split in (*SPLITS, REJECTS):
                part = table.filter(pc.equal(table["split"], split))
                if part.num_rows == 0:
                    continue
                key = "reason" if split == REJECTS else "label_name"
                counts = stats["counts"][split]
                for item in pc.value_counts(part[key]).to_pylist():
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
                part = self._describe(part.select(self.columns[split]))
                schema = part.schema.to_string(show_schema_metadata=False)
                stats["schemas"].setdefault(split, schema)
                if split not in writers:
                    name = f"part-{self.run_id}-{ctx.task_idx:05d}"
                    writers[split] = _RollingWriter(self, split, name)
                writers[split].write(part)
        for split, writer in writers.items():
            stats["files"][split] = writer.close()
        return stats

    def _describe(self, table: pa.Table) -> pa.Table:
        """Attach shape/dtype to raw-byte tensor fields, so files explain themselves."""
        fields = []
        for field in table.schema:
            if field.name in self.tensors and pa.types.is_fixed_size_binary(field.type):
                shape, dtype = self.tensors[field.name]
                field = field.with_metadata({"hip.shape": json.dumps(list(shape)),
                                             "hip.dtype": dtype})
            fields.append(field)
        return pa.Table.from_arrays(table.columns, schema=pa.schema(fields))

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        merged = _empty_stats()
        for stats in write_result.write_returns:
            for split, files in stats["files"].items():
                merged["files"][split].extend(files)
            for split, counts in stats["counts"].items():
                for k, n in counts.items():
                    merged["counts"][split][k] = merged["counts"][split].get(k, 0) + n
            for split, schema in stats["schemas"].items():
                merged["schemas"].setdefault(split, schema)
        for files in merged["files"].values():
            files.sort(key=lambda f: f["path"])
        self.result = merged


def _empty_stats() -> dict[str, Any]:
    splits = (*SPLITS, REJECTS)
    return {
        "files": {s: [] for s in splits},
        "counts": {s: {} for s in splits},  # train/val: label_name -> n; rejects: reason -> n
        "schemas": {},
    }


class _RollingWriter:
    """Parquet files `<split>/<name>-NNN.parquet` of at most `rows_per_file` rows each."""

    def __init__(self, sink: ShardSink, split: str, name: str):
        self.sink, self.split, self.name = sink, split, name
        self.done: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None:
                self._open(table.schema)
            take = min(table.num_rows, self.sink.rows_per_file - self.rows)
            self.writer.write_table(table.slice(0, take))
            self.rows += take
            table = table.slice(take)
            if self.rows >= self.sink.rows_per_file:
                self._close_file()

    def close(self) -> list[dict[str, Any]]:
        if self.writer is not None:
            self._close_file()
        return self.done

    def _open(self, schema: pa.Schema) -> None:
        fs = self.sink.fs
        rel = f"{self.split}/{self.name}-{len(self.done):03d}.parquet"
        path = f"{self.sink.base}/{rel}"
        # A retried task reuses the same names (task_idx is stable), so it overwrites
        # rather than duplicates; only files reported by finished tasks reach the manifest.
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        self.writer = pq.ParquetWriter(path, schema, compression=self.sink.compression,
                                       filesystem=arrow_filesystem(fs))
        self.current = (rel, path)
        self.rows = 0

    def _close_file(self) -> None:
        self.writer.close()
        rel, path = self.current
        size = self.sink.fs.size(path)
        self.done.append({"path": rel, "rows": self.rows, "bytes": int(size)})
        self.writer, self.rows = None, 0
