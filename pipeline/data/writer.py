"""Writing shards: one streaming pass routes rows to train/ val/ rejects/ by their `split`
column (a Ray Data Datasink)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from pipeline.data.layout import REJECTS, SPLITS
from pipeline.storage import arrow_filesystem, resolve

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext


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
