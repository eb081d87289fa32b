"""Storage URIs: local paths and gs:// (any fsspec protocol) behind one small API.

`resolve(uri)` gives (fsspec filesystem, path); `join`, `exists`, `read_json`, `write_json`
work on either; `storage_kwargs` turns a URI into what Ray's RunConfig and Checkpoint take.

Credentials come only from the environment: Google default credentials for gs://, or,
when STORAGE_EMULATOR_HOST is set, anonymous access to that emulator endpoint. Nothing
here reads credentials from configs or prints them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

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
