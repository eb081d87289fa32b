"""Loopback helpers for tests that start real servers (MLflow, Ray head, GCS emulator)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_logged(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start a server with stdout and stderr in `log_path`. Not a pipe: servers log every
    request, and a pipe nobody reads fills up (64 KB) and freezes the server mid-test."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)
    proc.log_path = log_path  # for wait_http's error message
    return proc


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    """Poll `url` until it answers; fail fast if `proc` dies, and after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            out = Path(log).read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextmanager
def serving(cmd: list[str], log_path: Path, health_url: str, *, start_timeout: float,
            stop_timeout: float = 10) -> Iterator[subprocess.Popen]:
    """A server (start_logged) that answers `health_url` for the body of the block, then
    is terminated (killed after `stop_timeout` s)."""
    proc = start_logged(cmd, log_path)
    try:
        wait_http(health_url, start_timeout, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_ray_node(ray: Path, args: list[str], log_path: Path, env: dict[str, str], *,
                   object_store_mb: int = 200) -> subprocess.Popen:
    """One `ray start --block` node on loopback, in its own session (stop_ray_nodes stops it
    with its process group). Its agent, metrics and runtime-env ports are free ones: the
    defaults (52365...) may be held by the test session's Ray, and a head whose job agent
    cannot bind accepts no jobs. Since Ray 2.5x a node drains on SIGTERM for up to
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) until it is idle, which a head with job or
    dashboard actors never is; these clusters are their test's alone, so the drain is off."""
    return start_logged(
        [str(ray), "start", "--block", "--node-ip-address", "127.0.0.1",
         "--dashboard-agent-listen-port", str(free_port()),
         "--dashboard-agent-grpc-port", str(free_port()),
         "--metrics-export-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()),
         "--object-store-memory", str(object_store_mb * 1024**2), *args],
        log_path, env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        start_new_session=True)


def stop_ray_nodes(*procs: subprocess.Popen | None, grace: float = 30) -> None:
    """Stop nodes from start_ray_node: SIGTERM to each `ray start` process, which stops its
    own raylet, GCS and workers (signalling the group would stop the GCS first); whatever
    is left after `grace` seconds is killed with its process group."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for proc in live:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in live:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a node that stopped, or not
        proc.wait(timeout=30)
