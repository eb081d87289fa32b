"""The output folder of `hip preprocess`: one run at a time (the lock), one generation per run.

Generations: a run writes its shards into <output>/gen-<run_id>/ beside the live dataset,
then switches <output>/manifest.json to them (one atomic write), then removes the older
generations and the root-level train/ val/ rejects/ of datasets written before generations.
Until the switch, readers (who go through the manifest) see the old dataset, complete; a run
that fails or is killed leaves it untouched, and the next run removes the generation it left.

Lock: <output>/.hip-preprocess.lock, JSON {host, pid, started, run_id}, created only if
absent and removed when the run ends (also on failure or Ctrl-C). A run that finds it is
refused before Ray starts, unless the holder is a process of this host that no longer
exists: that lock is stale and taken over with a warning. Locks of other hosts are never
judged stale (their pids mean nothing here); the message names the file to delete.
- Local: open(path, "x") (O_CREAT | O_EXCL), atomic on local filesystems.
- GCS: an existence check, then one object upload with the precondition ifGenerationMatch=0
  (gcsfs: pipe(mode="create"); a failed precondition, HTTP 412, is FileExistsError), which
  GCS applies atomically, so of two runs racing for the lock exactly one wins.
  gcp-storage-emulator (2026.7, the tests' GCS) ignores the precondition: a second create
  succeeds and overwrites (HTTP 200). Against it only the existence check holds, so the tests
  check that a run is refused while a lock exists, and the 412 path with a simulated error.
Taking over a stale lock is remove-then-create; two runs taking over the same stale lock at
the same moment could both proceed (the window is the time between one's read and the
other's create), which needs a dead run and two new ones started within milliseconds.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
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
# The lock
# --------------------------------------------------------------------------------------


@contextmanager
def locked(output: str, run_id: str, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold <output>/.hip-preprocess.lock for the body of the block (PreflightError if
    another live run holds it). The output folder must exist (local) or be writable."""
    fs, path = storage.resolve(output)
    lock = f"{path}/{LOCK}"
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": now(),
            "run_id": run_id}
    lock_uri = storage.join(output, LOCK)
    _acquire(fs, lock, lock_uri, output, mine, warn)
    try:
        yield
    finally:
        _release(fs, lock, lock_uri, run_id, warn)


def _acquire(fs, lock: str, lock_uri: str, output: str, mine: dict[str, Any],
             warn: Callable[[str], None]) -> None:
    text = json.dumps(mine) + "\n"
    holder: dict[str, Any] = {}
    for _ in range(3):
        if _create(fs, lock, text):
            return
        holder = _holder(fs, lock)
        if holder is None:  # released between our create and our read: try again
            holder = {}
            continue
        if not _stale(holder):
            break
        warn(f"taking over the lock of a dead run ({_who(holder)}): {lock_uri}")
        with suppress(FileNotFoundError):
            fs.rm(lock)
    raise PreflightError(f"{output} is being written by another run ({_who(holder)}); "
                         f"if that run is dead, delete {lock_uri}")


def _create(fs, lock: str, text: str) -> bool:
    """Create the lock file only if absent; False if it exists."""
    try:
        if isinstance(fs, LocalFileSystem):
            with open(lock, "x") as f:
                f.write(text)
            return True
        if fs.exists(lock):  # the emulator ignores the precondition below (module doc)
            return False
        fs.pipe(lock, text.encode(), mode="create")  # ifGenerationMatch=0
        return True
    except FileExistsError:
        return False


def _holder(fs, lock: str) -> dict[str, Any] | None:
    """The lock's JSON; None if the lock is gone, {} if it is unreadable (a holder that died
    between creating and writing it, or a file that is not ours)."""
    try:
        with fs.open(lock, "r") as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict[str, Any]) -> bool:
    """Held by a process of this host that no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _who(holder: dict[str, Any]) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('started', '?')}")


def _release(fs, lock: str, lock_uri: str, run_id: str, warn: Callable[[str], None]) -> None:
    """Remove the lock if it is still ours (someone may have deleted a lock they judged
    dead, and another run taken it)."""
    try:
        holder = _holder(fs, lock)
        if holder and holder.get("run_id") == run_id:
            fs.rm(lock)
    except OSError as e:  # never hide the run's own outcome behind a cleanup error
        warn(f"could not remove the lock {lock_uri}: {e}")


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
