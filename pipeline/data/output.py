"""The output folder of `hip preprocess`: one run at a time (the lock), one generation per run.

Generations: a run writes its shards into <output>/gen-<run_id>/ beside the live dataset,
then switches <output>/manifest.json to them (one atomic write), then removes the older
generations and the root-level train/ val/ rejects/ of datasets written before generations.
Until the switch, readers (who go through the manifest) see the old dataset, complete; a run
that fails or is killed leaves it untouched, and the next run removes the generation it left.

Lock: <output>/.hip-preprocess.lock (pipeline/locks.py): one run per output at a time.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from pipeline import locks, storage
from pipeline.data import layout

LOCK = ".hip-preprocess.lock"
GEN_PREFIX = "gen-"
LEGACY = (*layout.SPLITS, layout.REJECTS)  # shard folders of the layout before generations
LEGACY_MARKER = "_HIP_INCOMPLETE"  # left by a crashed run of the layout before generations


class PreflightError(ValueError):
    """A problem found before any Ray work; the message is one line for the user."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def generation(run_id: str) -> str:
    """The folder (relative to the output) of one run's shards."""
    return f"{GEN_PREFIX}{run_id}"


# --------------------------------------------------------------------------------------
# The lock (pipeline/locks.py)
# --------------------------------------------------------------------------------------


@contextmanager
def locked(output: str, run_id: str, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold <output>/.hip-preprocess.lock for the body of the block (PreflightError if
    another live run holds it). The output folder must exist (local) or be writable."""
    try:
        with locks.locked(output, LOCK, run_id, warn):
            yield
    except locks.LockHeld as e:
        raise PreflightError(str(e)) from None


# --------------------------------------------------------------------------------------
# Generations
# --------------------------------------------------------------------------------------


def live_generations(manifest: dict[str, Any] | None) -> set[str]:
    """Generation folders the manifest's files are in (empty for the old layout)."""
    out = set()
    for files in (manifest or {}).get("files", {}).values():
        for f in files:
            top = f["path"].split("/", 1)[0]
            if top.startswith(GEN_PREFIX):
                out.add(top)
    return out


def generations(output: str) -> list[str]:
    """Every gen-* folder in the output (one listing)."""
    fs, path = storage.resolve(output)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = {posixpath.basename(n.rstrip("/")) for n in names}
    return sorted(n for n in found if n.startswith(GEN_PREFIX))


def remove_generations(output: str, *, keep: set[str]) -> list[str]:
    """Remove every generation not in `keep`; the names removed."""
    fs, path = storage.resolve(output)
    gone = [g for g in generations(output) if g not in keep]
    for name in gone:
        _rm(fs, f"{path}/{name}")
    return gone


def remove_legacy(output: str) -> list[str]:
    """Remove root-level train/ val/ rejects/ (and a crash marker) of the old layout."""
    fs, path = storage.resolve(output)
    gone = []
    for name in (*LEGACY, LEGACY_MARKER):
        if fs.exists(f"{path}/{name}"):
            _rm(fs, f"{path}/{name}")
            gone.append(f"{name}/" if name in LEGACY else name)
    return gone


def _rm(fs, path: str) -> None:
    with suppress(FileNotFoundError):  # object stores: an empty "folder" is no object
        fs.rm(path, recursive=True)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
