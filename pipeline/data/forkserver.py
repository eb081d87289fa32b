"""The fork server behind pipeline/data/isolate.py: one clean helper process per Ray worker
that has the decoders imported and forks decode children on request, in milliseconds.

A decode child that crashes or times out must be replaced. A fresh interpreter that imports
the decoders costs ~1.5 CPU-s; a fork of a process that already has them costs milliseconds.
The Ray worker itself must not fork (it runs many threads: a fork keeps only the calling one,
and any lock another thread held stays locked in the child), so the worker starts the server
once with subprocess (`python -m pipeline.data.isolate FD MODULE...`, a fresh interpreter,
not a fork), and the server forks. The server runs a single thread: its environment turns
off the thread pools that imports would start (OpenMP / OpenBLAS, the background thread of
pyarrow's jemalloc), and it warns on stderr if it still finds more than one thread.

Protocol, over a Unix SOCK_SEQPACKET socket pair (one pickled message per packet):

    worker -> server          server -> worker
    ("fork", modules)         ("forked", pid) + the worker's end of the child's socket pair
                              (SCM_RIGHTS); the server imports `modules` first, once
    ("kill" | "wait", pid)    ("status", exit code | None): SIGKILL first for "kill";
                              "wait" gives the child REAP_WAIT_S to exit, then kills it

The server reaps a child only when asked, so a child's pid stays its own until then (a zombie
keeps it) and the worker learns what ended a crashed child (the signal, for the reject). The
server exits when the worker's end of its socket closes (the worker is gone); a child exits
when the worker's end of the child's socket closes.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection

START_TIMEOUT_S = 120.0  # the server must say "ready" within this (imports on a busy box)
REPLY_TIMEOUT_S = 30.0  # any other answer of the server (a fork, a reap) takes milliseconds
REAP_WAIT_S = 5.0  # how long a "wait" lets a child finish exiting before it is killed
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "JE_ARROW_MALLOC_CONF": "background_thread:false"}


class Child:
    """A forked decode child, seen from the worker: its pid and the worker's end of its
    (duplex) socket."""

    def __init__(self, server: Server, pid: int, fd: int) -> None:
        self.server, self.pid = server, pid
        self.conn = Connection(fd)

    def close(self) -> None:
        """Let the child go: it reads EOF and exits (no longer the server's: not reaped)."""
        self.conn.close()

    def kill(self) -> None:
        self.conn.close()
        self.server.reap(self.pid, kill=True)

    def death(self) -> str:
        """What ended the child (it closed its socket), for the reject's detail."""
        self.conn.close()
        code = self.server.reap(self.pid, kill=False)
        if code is None:
            return "the decoder's process ended (its exit status is unknown)"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the decoder killed its process: {name}{hint}"
        return f"the decoder's process exited with code {code}"


class Server:
    """The worker's handle on its fork server. Started at once; `ready()` waits for it."""

    def __init__(self, modules: Iterable[str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, **SINGLE_THREADED,
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.data.isolate", str(theirs.fileno()),
                 *modules], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self.pid = self.process.pid
        self.sock = ours
        self._ready = False

    def ready(self) -> Server:
        if not self._ready:
            self.sock.settimeout(START_TIMEOUT_S)
            try:
                reply = pickle.loads(self.sock.recv(4096) or pickle.dumps(None))
            except (OSError, pickle.UnpicklingError):
                reply = None
            if reply != ("ready", self.pid):
                self.close()
                raise RuntimeError(f"the decode fork server did not start within "
                                   f"{START_TIMEOUT_S:g} s")
            self.sock.settimeout(REPLY_TIMEOUT_S)
            self._ready = True
        return self

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, modules: Iterable[str]) -> Child:
        """A new decode child; OSError or EOFError if the server does not answer."""
        self.ready().sock.send(pickle.dumps(("fork", tuple(modules))))
        msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        if not msg or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise EOFError("the decode fork server closed its socket")
        _, pid = pickle.loads(msg)
        return Child(self, pid, fds[0])

    def reap(self, pid: int, kill: bool) -> int | None:
        """The child's exit code (negative: the signal), None if unknown."""
        try:
            self.sock.send(pickle.dumps(("kill" if kill else "wait", pid)))
            msg = self.sock.recv(4096)
            return pickle.loads(msg)[1] if msg else None
        except OSError:  # the server is gone (or too slow: a late answer would be read as
            self.sock.close()  # the next one's, so it goes); its orphans are not ours to wait for
            if kill:
                _signal(pid)
            return None

    def close(self) -> None:
        self.sock.close()  # the server reads EOF and exits
        try:
            self.process.wait(1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _signal(pid: int) -> None:
    with contextlib.suppress(OSError):  # already gone
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------ the server side


def serve(fd: int, modules: list[str], child_main: Callable[[Connection], None],
          warm: Callable[[], None] | None = None) -> None:
    """The server's loop (a single thread): answer fork / kill / wait until EOF. `warm` runs
    once after the imports (what the children would otherwise each do on first use)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the job; children inherit
    for module in modules:  # warm: every child is forked with the decoders' imports done
        importlib.import_module(module)
    if warm is not None:
        warm()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        print(f"pipeline.data.isolate: the fork server runs {threads} threads after its "
              f"imports; forking it may be unsafe", file=sys.stderr, flush=True)
    sock = socket.socket(fileno=fd)
    sock.send(pickle.dumps(("ready", os.getpid())))
    while True:
        try:
            msg = sock.recv(65536)
        except OSError:
            return
        if not msg:  # the worker is gone
            return
        op, arg = pickle.loads(msg)
        if op == "fork":
            _fork(sock, arg, child_main)
        else:
            sock.send(pickle.dumps(("status", _reap(arg, kill=op == "kill"))))


def _fork(sock: socket.socket, modules: tuple[str, ...],
          child_main: Callable[[Connection], None]) -> None:
    for module in modules:  # imported here once, not in every child
        importlib.import_module(module)
    ours, theirs = socket.socketpair()
    gc.freeze()  # the children's collections leave the server's objects (and pages) alone
    pid = os.fork()
    if pid == 0:  # the child: only its own end of its own socket
        code = 0
        try:
            sock.close()
            ours.close()
            child_main(Connection(theirs.detach()))
        except BaseException:  # noqa: BLE001 - never return into the server's loop
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    try:
        socket.send_fds(sock, [pickle.dumps(("forked", pid))], [ours.fileno()])
    finally:
        ours.close()


def _reap(pid: int, kill: bool) -> int | None:
    if kill:
        _signal(pid)
    deadline = time.monotonic() + REAP_WAIT_S
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            if kill:
                return None
            kill = True
            _signal(pid)
            deadline = time.monotonic() + REAP_WAIT_S
        time.sleep(0.002)
