"""MLflow logging that survives tracking-server outages: world rank 0's RunLogger during
training, and a bounded end_run for a driver that is already failing.

pipeline/tracking.py's functions use MLflow's own HTTP retries (7 retries over ~4 minutes,
each request waiting up to 120 s) and raise after that: right for the driver before and
after training, wrong inside the training loop, where one exception ends the job and a
4-minute wait per logged step stalls it. Here every call has a budget of seconds, and what
cannot be sent waits in a bounded buffer.

The driver's other calls (start_run, set_tags, end_run of a finished run; the sweep code's
calls) stay on tracking.py: a driver waits out a short outage and reports a long one.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from pipeline import tracking

RETRY_BUDGET_S = 15.0  # one call: attempts 1, 2, 4, 8 s apart while within this many seconds
REQUEST_TIMEOUT_S = 5.0  # one HTTP request of such an attempt (MLflow's own default: 120 s)
PROBE_INTERVAL_S = 10.0  # while MLflow is unreachable: one attempt at most this often
FLUSH_BUDGET_S = 30.0  # RunLogger.flush at the end of training keeps trying this long
MAX_BUFFERED_POINTS = 10_000  # metric points kept while unreachable (then the oldest go)
MAX_BUFFERED_ARTIFACTS = 50  # artifacts kept while unreachable (then the oldest go)
BATCH_POINTS = 1000  # MLflow's log_batch limit
# Errors about the request itself (a bad value, a deleted run): retrying cannot help.
REJECTED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})

_http = threading.local()  # this thread's cap on MLflow's HTTP retries (see _bounded_http)


class RunLogger:
    """World rank 0's MLflow logging during training: an outage costs warnings, not the run.

    Each call (log_metrics, set_tags, log_bytes) is tried for up to RETRY_BUDGET_S, with
    exponential back-off (1, 2, 4, 8 s) between attempts of one HTTP request each (at most
    REQUEST_TIMEOUT_S; MLflow's own retry loop is off for these calls). If MLflow still does
    not answer, ONE warning line says so and training goes on: metric points are buffered
    (the newest MAX_BUFFERED_POINTS; one more line when older ones start being dropped),
    tags and artifacts are kept for a retry, and later calls only add to the buffer, except
    for one attempt every PROBE_INTERVAL_S. The first attempt that gets through sends
    everything buffered, metric points in the order they were logged (log_batch, with their
    original timestamps: MLflow skips exact duplicates, so a batch resent after a lost answer
    is not counted twice), and says so in one line. flush(), at the end of training, tries
    for up to FLUSH_BUDGET_S and names what could not be sent.

    A call MLflow rejects (REJECTED: an invalid value, a deleted run) is dropped with a
    warning line and not retried. One RunLogger per run, used from one thread.
    """

    def __init__(self, uri: str, run_id: str, *, warn=None):
        self.uri, self.run_id = uri, run_id
        self._warn = warn or _warn
        self._points: deque = deque()  # mlflow.entities.Metric, in logging order
        self._tags: dict[str, str] = {}
        self._artifacts: dict[str, bytes] = {}  # artifact path -> content, oldest first
        self._dropped = 0  # points and artifacts dropped in the current outage
        self._down_since: float | None = None  # monotonic time of the first failed call
        self._next_try = 0.0

    @property
    def pending(self) -> dict[str, int]:
        """What is buffered, not yet in MLflow: {"points": n, "tags": n, "artifacts": n}."""
        return {"points": len(self._points), "tags": len(self._tags),
                "artifacts": len(self._artifacts)}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> bool:
        """Log one step's metrics (now, or when MLflow answers again); True if sent now."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._points.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._drop(len(self._points) - MAX_BUFFERED_POINTS, self._points.popleft)
        return self._send()

    def set_tags(self, tags: Mapping[str, str]) -> bool:
        self._tags.update({k: str(v) for k, v in tags.items()})
        return self._send()

    def log_bytes(self, artifact_path: str, content: str | bytes) -> bool:
        """A small artifact (a/b/c.png); kept in memory until MLflow has it."""
        self._artifacts.pop(artifact_path, None)
        self._artifacts[artifact_path] = content.encode() if isinstance(content, str) \
            else content
        self._drop(len(self._artifacts) - MAX_BUFFERED_ARTIFACTS,
                   lambda: self._artifacts.pop(next(iter(self._artifacts))))
        return self._send()

    def flush(self, budget: float | None = None) -> bool:
        """Send what is buffered, trying for up to `budget` s (FLUSH_BUDGET_S); True if
        nothing is left."""
        if not any(self.pending.values()):
            return True
        budget = FLUSH_BUDGET_S if budget is None else budget
        if self._send(budget=budget, force=True):
            return True
        self._warn(f"[hip] warning: MLflow at {self.uri} still unreachable after "
                   f"{budget:.0f} s more: {_describe(self.pending)} of run {self.run_id} "
                   "were not logged")
        return False

    def _drop(self, excess: int, pop) -> None:
        if excess <= 0:
            return
        if not self._dropped:
            self._warn(f"[hip] warning: MLflow buffer full ({MAX_BUFFERED_POINTS} metric "
                       f"points, {MAX_BUFFERED_ARTIFACTS} artifacts): dropping the oldest")
        for _ in range(excess):
            pop()
        self._dropped += excess

    def _send(self, budget: float | None = None, force: bool = False) -> bool:
        down = self._down_since is not None
        if down and not force and time.monotonic() < self._next_try:
            return False  # buffered; the next attempt is due later
        before, started = self.pending, time.monotonic()
        budget = RETRY_BUDGET_S if budget is None else budget
        error = _retrying(self._drain, 0.0 if down and not force else budget)
        if error is not None:
            if not down:
                self._down_since = started
                self._warn(f"[hip] warning: MLflow at {self.uri} unreachable "
                           f"({_one_line(error)}); training goes on, and what it logs is "
                           "buffered and sent when MLflow answers (next try in "
                           f"{PROBE_INTERVAL_S:.0f} s)")
            self._next_try = time.monotonic() + PROBE_INTERVAL_S
            return False
        if down:
            dropped = f"; {self._dropped} older ones were dropped" if self._dropped else ""
            self._warn(f"[hip] MLflow at {self.uri} answers again after "
                       f"{time.monotonic() - self._down_since:.0f} s: sent the "
                       f"{_describe(before)} held{dropped}")
            self._down_since, self._dropped = None, 0
        return True

    def _drain(self) -> None:
        """Send everything pending, oldest first; what was sent leaves the buffer at once."""
        from mlflow.entities import RunTag

        c = tracking.client(self.uri)
        while self._points:
            batch = [self._points[i] for i in range(min(BATCH_POINTS, len(self._points)))]
            self._rejectable(functools.partial(c.log_batch, self.run_id, metrics=batch),
                             "metrics")
            for _ in batch:
                self._points.popleft()
        if self._tags:
            tags = [RunTag(k, v) for k, v in self._tags.items()]
            self._rejectable(functools.partial(c.log_batch, self.run_id, tags=tags), "tags")
            self._tags.clear()
        while self._artifacts:
            path, content = next(iter(self._artifacts.items()))
            self._rejectable(functools.partial(tracking.log_bytes, self.uri, self.run_id, path,
                                               content), f"artifact {path}")
            del self._artifacts[path]

    def _rejectable(self, call, what: str) -> None:
        try:
            call()
        except Exception as e:
            if getattr(e, "error_code", None) not in REJECTED:
                raise
            self._warn(f"[hip] warning: MLflow rejected {what} of run {self.run_id} "
                       f"({_one_line(e)}); not retried")


def end_run(uri: str, run_id: str, status: str, budget: float | None = None) -> bool:
    """Close a run, trying for up to `budget` s (RETRY_BUDGET_S; not MLflow's ~4 minutes: a
    job being stopped has seconds left); on failure one warning line, and False."""
    error = _retrying(lambda: tracking.end_run(uri, run_id, status),
                      RETRY_BUDGET_S if budget is None else budget)
    if error is not None:
        _warn(f"[hip] warning: could not mark MLflow run {run_id} {status}: "
              f"{_one_line(error)}")
    return error is None


def _retrying(call, budget: float) -> Exception | None:
    """call() until it returns, retrying for up to `budget` s (0: one attempt) with back-off
    1, 2, 4, 8 s, each attempt one HTTP request of at most REQUEST_TIMEOUT_S (a hung server
    costs at most about budget + REQUEST_TIMEOUT_S). Returns None, or the last error."""
    deadline = time.monotonic() + budget
    delay = 1.0
    while True:
        try:
            with _bounded_http(REQUEST_TIMEOUT_S):
                call()
            return None
        except Exception as e:  # noqa: BLE001 - MLflow, requests, sqlite: all mean "not now"
            error = e
        if time.monotonic() + delay > deadline:
            return error
        time.sleep(delay)
        delay = min(2 * delay, 8.0)


@contextmanager
def _bounded_http(timeout: float) -> Iterator[None]:
    """In this thread only: MLflow's HTTP requests are not retried by MLflow and time out
    after `timeout` s, so _retrying's budget holds.

    MLflow reads MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT from the
    environment at every request. The environment is process-wide (the driver shares it in
    local mode) and setting it races with other threads reading it, so instead the readers
    of these two variables are wrapped, once, to consult a thread-local value first. If a
    future MLflow lacks them, nothing is wrapped: the logger still works, an attempt can only
    take longer."""
    try:
        from mlflow import environment_variables as ev

        for var, key in ((ev.MLFLOW_HTTP_REQUEST_MAX_RETRIES, "retries"),
                         (ev.MLFLOW_HTTP_REQUEST_TIMEOUT, "timeout")):
            if not getattr(var.get, "hip_thread_local", False):
                var.get = _thread_local_get(var.get, key)
    except (ImportError, AttributeError):
        pass
    _http.retries, _http.timeout = 0, timeout
    try:
        yield
    finally:
        del _http.retries, _http.timeout


def _thread_local_get(default_get, key: str):
    def get():
        value = getattr(_http, key, None)
        return default_get() if value is None else value

    get.hip_thread_local = True
    return get


def _describe(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {'metric points' if k == 'points' else k}"
                     for k, n in counts.items() if n) or "nothing"


def _one_line(error: BaseException) -> str:
    """The innermost cause names the problem (ConnectionRefusedError, a timeout) better than
    MLflow's wrapper around requests' wrapper around urllib3's."""
    for _ in range(10):
        cause = error.__cause__ or error.__context__
        if cause is None:
            break
        error = cause
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = ["RunLogger", "end_run", "RETRY_BUDGET_S", "PROBE_INTERVAL_S", "FLUSH_BUDGET_S",
           "MAX_BUFFERED_POINTS"]
