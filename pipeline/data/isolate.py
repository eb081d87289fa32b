"""Per-file isolation: decode in a child process, so a file that crashes or hangs its decoder
costs only that file, not the Ray task, the retries and then the job.

Each Ray decode worker process starts one fork server (pipeline/data/forkserver.py: `python
-m pipeline.data.isolate`, a fresh single-threaded interpreter that imports the decoders
once; not a fork of the multi-threaded Ray worker, and not multiprocessing's spawn, which
would re-import the Ray worker's __main__) and has it fork one decode child, connected to
the worker by a socket. The worker sends the child a batch of work items; the child reads
(local paths) and decodes them one by one and sends one result per file. The worker waits
at most `timeout_s` for each next result: on a timeout it has the child killed (the file in
progress becomes a reject with reason `timeout`), on the child's death (segfault, abort, the
kernel's OOM killer) the file in progress becomes `crashed`, with the signal the server
reaped; either way the server forks a new child (milliseconds) for the rest of the batch.
The culprit is exactly the file the child was on: results come back in order, one per file.

Test-only fault injection (like training's HIP_TEST_FAULT): DECODE_FAULT_ENV =
"crash:NAME;hang:NAME" makes the child abort / sleep on files whose name contains NAME.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from pipeline.data.forkserver import Child, Server, serve
from pipeline.data.media import errors as reasons

DECODE_FAULT_ENV = "HIP_TEST_DECODE_FAULT"

# One work item: (index in the batch, local path to read | the file's bytes).
Item = tuple[int, str | bytes]
# One result: (index, ("ok", value) | ("err", reason, detail)).
Result = tuple[int, tuple]


def decode_one(decode: Callable[[bytes], Any], read: Callable[[str], bytes],
               source: str | bytes, fault: str = "") -> tuple:
    """("ok", decode(bytes)) or ("err", reason, detail); never raises. Used in the child and,
    without isolation, in the worker itself."""
    try:
        if fault and isinstance(source, str):
            _maybe_fault(fault, source)
        try:
            data = read(source) if isinstance(source, str) else source
        except Exception as e:  # noqa: BLE001 - any read failure is this file's
            return ("err", "unreadable", f"{type(e).__name__}: {e}"[:500])
        return ("ok", decode(data))
    except MemoryError:
        return ("err", reasons.REASON_TOO_LARGE, "out of memory while decoding")
    except Exception as e:  # noqa: BLE001 - quarantine every failure as a reject
        detail = getattr(e, "detail", "") or f"{type(e).__name__}: {e}"
        return ("err", getattr(e, "reason", "decode_error"), detail[:500])


def read_local(path: str) -> bytes:
    """A local file's bytes (picklable, unlike bound fsspec methods of async filesystems)."""
    with open(path, "rb") as f:
        return f.read()


def fault_remote_args() -> dict[str, Any]:
    """Ray remote args that carry DECODE_FAULT_ENV to the decode workers when the driver has
    it set (tests; workers of an already running cluster do not see the driver's env)."""
    fault = os.environ.get(DECODE_FAULT_ENV)
    return {"runtime_env": {"env_vars": {DECODE_FAULT_ENV: fault}}} if fault else {}


def _maybe_fault(spec: str, path: str) -> None:
    for part in spec.split(";"):
        kind, _, name = part.partition(":")
        if name and name in os.path.basename(path):
            if kind == "crash":
                os.abort()
            if kind == "hang":
                time.sleep(3600)


def _child_main(conn: Connection) -> None:
    """A forked child's loop: (decode, read, items, fault) in, one Result per item out."""
    while True:
        try:
            decode, read, items, fault = conn.recv()
        except (EOFError, OSError):  # the worker is gone, or let this child go
            return
        for index, source in items:
            conn.send((index, decode_one(decode, read, source, fault)))


def _warm_decoders() -> None:
    """In the fork server, after its imports: what the decoders load lazily on first use,
    done once there instead of in every forked child (PIL's image format plugins)."""
    image = sys.modules.get("PIL.Image")
    if image is not None:
        image.init()


# One fork server and one working child per Ray worker process, reused across batches and
# tasks. After a crash or a timeout the server forks the replacement (milliseconds, decoders
# already imported); if the server itself has died, a new one is started.
_SERVER: Server | None = None
_CHILD: Child | None = None


def _child(preload: tuple[str, ...]) -> Child:
    global _SERVER, _CHILD
    if _SERVER is not None and not _SERVER.alive():  # replace it, and its child with it (a
        shutdown()  # child of a dead server could not be waited for: no signal name)
    if _CHILD is None:
        for attempt in (1, 2):
            if _SERVER is None:
                _SERVER = Server(preload)
            try:
                _CHILD = _SERVER.fork(preload)
                break
            except (OSError, EOFError) as e:  # the server died or hung: once more, anew
                _SERVER.close()
                _SERVER = None
                if attempt == 2:
                    raise RuntimeError(f"the decode fork server failed: {e}") from e
    return _CHILD


def _discard(child: Child, kill: bool = True) -> str:
    """Forget the working child: killed (timeout, broken socket) or, kill=False, dead
    (crash); -> what ended it."""
    global _CHILD
    if _CHILD is child:
        _CHILD = None
    if kill:
        child.kill()
        return ""
    return child.death()


def shutdown() -> None:
    """Let the child and the server go (they exit on EOF); the next batch starts anew."""
    global _SERVER, _CHILD
    if _CHILD is not None:
        _CHILD.close()
    if _SERVER is not None:
        _SERVER.close()
    _SERVER = _CHILD = None


def decode_isolated(items: list[Item], decode: Callable[[bytes], Any],
                    read: Callable[[str], bytes], timeout_s: float) -> Iterator[Result]:
    """One Result per item, in order, whatever the files do to the decoder."""
    fault = os.environ.get(DECODE_FAULT_ENV, "")
    # What the server imports before it forks: the modules of the callables the child runs.
    preload = tuple(sorted({_module_of(decode), _module_of(read)}))
    pending = list(items)
    while pending:
        child = _child(preload)
        try:
            child.conn.send((decode, read, pending, fault))
        except OSError:  # died between batches: a new fork takes it
            _discard(child)
            continue
        done = 0
        for index, _ in pending:
            if not child.conn.poll(timeout_s):
                _discard(child)
                yield index, ("err", reasons.REASON_TIMEOUT,
                              f"read + decode took longer than read.file_timeout_s="
                              f"{timeout_s:g}")
                break
            try:
                got_index, result = child.conn.recv()
            except (EOFError, OSError):
                yield index, ("err", reasons.REASON_CRASHED, _discard(child, kill=False))
                break
            if got_index != index:  # cannot happen: results come back in order
                raise RuntimeError(f"decode child answered item {got_index}, expected {index}")
            done += 1
            try:
                yield index, result
            except GeneratorExit:  # the caller stopped early: the child's further answers
                if done < len(pending):  # must not reach the next batch
                    _discard(child)
                raise
        pending = pending[done + (1 if done < len(pending) else 0):]


def _module_of(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    return type(owner).__module__ if owner is not None else fn.__module__


__all__ = ["decode_isolated", "decode_one", "DECODE_FAULT_ENV"]


if __name__ == "__main__":  # the fork server: python -m pipeline.data.isolate FD [MODULE ...]
    serve(int(sys.argv[1]), sys.argv[2:], _child_main, warm=_warm_decoders)
