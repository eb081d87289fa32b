"""Layout of a preprocessed dataset (written by pipeline/data/preprocess.py):

    <root>/manifest.json                    written last; lists every shard file (path
                                            relative to <root>, rows, bytes)
    <root>/gen-<run_id>/train/*.parquet     the shards of one `hip preprocess` run
    <root>/gen-<run_id>/val/*.parquet
    <root>/gen-<run_id>/rejects/*.parquet
    <root>/.hip-preprocess.lock             present while a run writes

One generation per run (pipeline/data/output.py): a run writes a new gen-<run_id>/ beside
the live one, switches the manifest to it in one atomic write, then removes the other
generations. Datasets written before generations have their shards directly in
<root>/train/ val/ rejects/ (manifest paths "train/part-...parquet"); they read the same way.

Readers go through the manifest, never through a listing of the folders, so files of an
unfinished run (a generation the manifest does not name) are never read. `validate` checks,
with one listing per shard folder, that the manifest is of this code's format and that its
files are all there with the recorded sizes.
"""

from __future__ import annotations

import posixpath
from typing import Any

from pipeline.storage import exists, join, read_json, resolve

MANIFEST = "manifest.json"
FORMAT = "hip-shards/1"  # the manifest format this code writes and reads
SPLITS = ("train", "val")
REJECTS = "rejects"


class DatasetError(ValueError):
    """A manifest this code cannot read, or shard files that differ from it (one line)."""


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


def validate(uri: str, manifest: dict[str, Any]) -> None:
    """Raise DatasetError (one line) unless the manifest is of FORMAT and every file it
    lists exists with the byte size it recorded. One listing per shard folder (sizes come
    with it); only a file of the wrong size is opened, to read its Parquet footer."""
    found = manifest.get("format")
    if found != FORMAT:
        raise DatasetError(f"{uri} holds shards of format {found!r}, this code reads "
                           f"{FORMAT!r}")
    fs, base = resolve(uri)
    listed = [f for files in manifest.get("files", {}).values() for f in files]
    sizes: dict[str, dict[str, int]] = {}  # folder (relative) -> file name -> bytes
    for entry in listed:
        folder, name = posixpath.split(entry["path"])
        if folder not in sizes:
            sizes[folder] = _sizes(fs, posixpath.join(base, folder) if folder else base)
        size = sizes[folder].get(name)
        if size is None:
            raise DatasetError(f"shard {entry['path']} is missing")
        want = entry.get("bytes")
        if want is not None and size != want:
            why = _why(fs, posixpath.join(base, entry["path"]), entry.get("rows"))
            raise DatasetError(f"shard {entry['path']} is {size} bytes, the manifest says "
                               f"{want} ({why})")


def _sizes(fs, folder: str) -> dict[str, int]:
    try:
        listing = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
            for e in listing if e.get("type") != "directory"}


def _why(fs, path: str, rows: int | None) -> str:
    """Truncated (no readable Parquet footer) or replaced (another file, maybe other rows)."""
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            actual = pq.read_metadata(f).num_rows
    except Exception:  # any unreadable footer means a cut-off file
        return "truncated: no readable Parquet footer"
    if rows is not None and actual != rows:
        return f"replaced: {actual} rows, the manifest says {rows}"
    return "truncated or replaced"
