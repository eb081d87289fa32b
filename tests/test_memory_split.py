"""The lean trial path's in-memory split (pipeline/train/memory_split.py) against the shards
Ray Data reads, and the PBT explore clip (sweeps/schedulers.py)."""

from __future__ import annotations

import numpy as np

from pipeline.data import layout, reader
from pipeline.train.memory_split import MemorySplit, split_bytes


def test_the_memory_split_holds_exactly_the_rows_ray_data_reads(image_shards, ray_session):
    manifest = layout.read_manifest(str(image_shards))
    mem = MemorySplit.read(str(image_shards), "train", manifest, ["image", "label"])
    rows = reader.open_shards(str(image_shards), "train").take_all()
    assert mem.rows == len(rows) == manifest["splits"]["train"] > 0
    assert split_bytes(manifest, "train") > 0
    key = lambda img, label: (int(label), img.tobytes())  # noqa: E731
    ours = sorted(key(i, lab) for i, lab in zip(mem.columns["image"], mem.columns["label"],
                                                 strict=True))
    theirs = sorted(key(np.asarray(r["image"]), r["label"]) for r in rows)
    assert ours == theirs
    assert mem.columns["image"].shape[1:] == tuple(manifest["columns"]["image"]["shape"])


def test_memory_batches_are_a_seeded_permutation_per_epoch(image_shards, ray_session):
    manifest = layout.read_manifest(str(image_shards))
    mem = MemorySplit.read(str(image_shards), "train", manifest, ["label"])

    def labels(seed, drop_last=True):
        return [b["label"].tolist() for b in mem.iter_torch_batches(
            batch_size=8, drop_last=drop_last, local_shuffle_seed=seed)]

    a, b, c = labels(1), labels(1), labels(2)
    assert a == b and a != c  # the same seed, the same batches; another seed, others
    assert all(len(x) == 8 for x in a) and len(a) == mem.rows // 8
    flat = sorted(v for x in labels(1, drop_last=False) for v in x)
    assert flat == sorted(mem.columns["label"].tolist())  # every row once per epoch
    plain = [b["label"].tolist() for b in mem.iter_torch_batches(batch_size=mem.rows)]
    assert plain[0] == mem.columns["label"].tolist()  # no seed: the stored order (eval)
