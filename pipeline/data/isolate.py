"""Per-file isolation: decode in a child process, so a file that crashes or hangs its decoder
costs only that file, not the Ray task, the retries and then the job.

Each Ray decode worker process keeps one child (`python -m pipeline.data.isolate`, talking
over two pipes: a fresh interpreter, not a fork of the multi-threaded Ray worker, and not
multiprocessing's spawn, which would re-import the Ray worker's __main__). The worker
sends the child a batch of work items; the child reads (local paths) and decodes them one by
one and sends one result per file. The worker waits at most `timeout_s` for each next
result: on a timeout it kills the child (the file in progress becomes a reject with reason
`timeout`), on the child's death (segfault, abort, the kernel's OOM killer) the file in
progress becomes `crashed`; either way a new child takes the rest of the batch. The culprit
is exactly the file the child was on: results come back in order, one per file.

Test-only fault injection (like training's HIP_TEST_FAULT): DECODE_FAULT_ENV =
"crash:NAME;hang:NAME" makes the child abort / sleep on files whose name contains NAME.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from pipeline.data.media import errors as reasons

DECODE_FAULT_ENV = "HIP_TEST_DECODE_FAULT"
START_TIMEOUT_S = 120.0  # a new child must say "ready" within this (imports on a busy box)

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


def _child_main(inbox: Connection, outbox: Connection) -> None:
    """The child's loop: (decode, read, items, fault) in, one Result per item out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the job, not here
    outbox.send("ready")  # unpickling the first batch imports what decode needs
    while True:
        try:
            decode, read, items, fault = inbox.recv()
        except (EOFError, OSError):  # the worker is gone
            return
        for index, source in items:
            outbox.send((index, decode_one(decode, read, source, fault)))


class _Child:
    """One decode child process and the worker's ends of its two pipes. Started at once;
    `ready()` waits for it (so a spare can warm up in the background)."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        down_r, down_w = os.pipe()  # worker -> child
        up_r, up_w = os.pipe()  # child -> worker
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.data.isolate", str(down_r), str(up_w), *preload],
            pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL, env=env)
        os.close(down_r)
        os.close(up_w)
        self.send = Connection(down_w, readable=False)
        self.conn = Connection(up_r, writable=False)
        self._ready = False

    def ready(self) -> _Child:
        if not self._ready:
            if not self.conn.poll(START_TIMEOUT_S) or self.conn.recv() != "ready":
                self.kill()
                raise RuntimeError(f"the decode child did not start within "
                                   f"{START_TIMEOUT_S:g} s")
            self._ready = True
        return self

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(5)
        self.send.close()
        self.conn.close()

    def death(self) -> str:
        """What ended the child, for the reject's detail."""
        code = self.process.wait(5)
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the decoder killed its process: {name}{hint}"
        return f"the decoder's process exited with code {code}"


# One working child and one warm spare per Ray worker process, reused across tasks: after a
# crash or a timeout the spare takes over at once (a fresh interpreter with the decoders
# imported costs ~1.5 s on 2 cores) and a new spare starts in the background.
_CHILD: _Child | None = None
_SPARE: _Child | None = None


def _child(preload: tuple[str, ...]) -> _Child:
    global _CHILD, _SPARE
    if _CHILD is None or not _CHILD.alive():
        if _SPARE is not None and _SPARE.alive():
            _CHILD, _SPARE = _SPARE, None
        else:
            _CHILD = _Child(preload)
    if _SPARE is None or not _SPARE.alive():
        _SPARE = _Child(preload)
    return _CHILD.ready()


def _discard(child: _Child) -> None:
    global _CHILD
    child.kill()
    if _CHILD is child:
        _CHILD = None


def decode_isolated(items: list[Item], decode: Callable[[bytes], Any],
                    read: Callable[[str], bytes], timeout_s: float) -> Iterator[Result]:
    """One Result per item, in order, whatever the files do to the decoder."""
    fault = os.environ.get(DECODE_FAULT_ENV, "")
    # What the child imports before it says ready: the modules of the callables it runs.
    preload = tuple(sorted({_module_of(decode), _module_of(read)}))
    pending = list(items)
    while pending:
        child = _child(preload)
        try:
            child.send.send((decode, read, pending, fault))
        except (BrokenPipeError, OSError):  # died between batches: a fresh one takes it
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
                detail = child.death()
                _discard(child)
                yield index, ("err", reasons.REASON_CRASHED, detail)
                break
            if got_index != index:  # cannot happen: results come back in order
                raise RuntimeError(f"decode child answered item {got_index}, expected {index}")
            done += 1
            yield index, result
        pending = pending[done + (1 if done < len(pending) else 0):]


def _module_of(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    return type(owner).__module__ if owner is not None else fn.__module__


__all__ = ["decode_isolated", "decode_one", "DECODE_FAULT_ENV"]


if __name__ == "__main__":  # the child: python -m pipeline.data.isolate IN OUT [MODULE ...]
    for module in sys.argv[3:]:  # warm: the decoders' imports before the first file
        importlib.import_module(module)
    _child_main(Connection(int(sys.argv[1]), writable=False),
                Connection(int(sys.argv[2]), readable=False))
