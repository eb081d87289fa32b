"""Reading shards: one split of a preprocessed dataset as a Ray Dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.codec import tensor_column_schema, tensors_from_arrow
from pipeline.data.layout import REJECTS, read_manifest, shard_uris
from pipeline.storage import is_local, resolve

if TYPE_CHECKING:
    import ray.data


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
        # One read task per file: Ray would otherwise derive the task count from the CPUs
        # free at the time, so the same config could cut the rows into other blocks (and
        # the shuffle buffer, filled block by block, would give other batches) depending
        # on what else runs on the cluster.
        ds = ray.data.read_parquet(paths, filesystem=None if is_local(uri) else fs,
                                   shuffle=shuffle, override_num_blocks=len(paths))
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
