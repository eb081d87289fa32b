"""One run at a time per folder: a lock file created only if absent (local and gs://).

Used by `hip preprocess` (pipeline/data/output.py, on the output folder) and `hip sweep`
(sweeps/driver.py, on the sweep's folder).

A lock is <folder>/<name>, JSON {host, pid, started, run_id}, created only if
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
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline import storage


class LockHeld(ValueError):
    """Another live run holds the lock: one line naming it and the file to delete."""


@contextmanager
def locked(folder: str, name: str, run_id: str, warn: Callable[[str], None],
           activity: str = "written") -> Iterator[None]:
    """Hold <folder>/<name> for the body of the block (LockHeld if another live run holds
    it: "<folder> is being <activity> by another run ..."). The folder must exist (local)."""
    fs, path = storage.resolve(folder)
    lock = f"{path}/{name}"
    mine = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": run_id}
    lock_uri = storage.join(folder, name)
    _acquire(fs, lock, lock_uri, f"{folder} is being {activity}", mine, warn)
    try:
        yield
    finally:
        _release(fs, lock, lock_uri, run_id, warn)


def _acquire(fs, lock: str, lock_uri: str, busy: str, mine: dict[str, Any],
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
    raise LockHeld(f"{busy} by another run ({_who(holder)}); if that run is dead, delete "
                   f"{lock_uri}")


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


__all__ = ["LockHeld", "locked"]
