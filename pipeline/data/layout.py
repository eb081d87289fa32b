"""Layout of a preprocessed dataset (written by pipeline/data/preprocess.py):

    <root>/train/*.parquet  <root>/val/*.parquet  <root>/rejects/*.parquet
    <root>/manifest.json    written last; lists every shard file (relative to <root>)

Readers go through the manifest, never through a listing of the folders, so files left by a
crashed later run are never read.
"""

from __future__ import annotations

from typing import Any

from pipeline.storage import exists, join, read_json

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
REJECTS = "rejects"


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a dataset root (or of a path to its manifest.json)."""
    path = uri if uri.endswith(".json") else join(uri, MANIFEST)
    if not exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST} in {uri}: not a preprocessed dataset, or its run did not finish"
        )
    return read_json(path)




def shard_uris(uri: str, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """URIs of the shard files of `split` ("train", "val" or "rejects") as listed by the
    manifest, so files left by a crashed later run are never read."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    files = manifest.get("files", {})
    if split not in files:
        raise ValueError(f"unknown split {split!r}; {uri} has {sorted(files)}")
    return [join(uri, f["path"]) for f in files[split]]
