"""Getting a Ray runtime: attach to a cluster when one is named, else start a local one.

Order: an already-initialised Ray in this process is reused; an explicit `address`
("auto", "ray://...", "host:port") or the RAY_ADDRESS environment variable attaches to that
cluster (what `ray job submit` sets); otherwise a local Ray is started with explicit
`address="local"`, so a stray /tmp/ray/ray_current_cluster file never attaches us to
someone else's cluster by accident.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Small boxes: Train workers + Data ingest deadlock when logical CPUs == 2 (docs/ray-notes.md),
# so a local Ray gets at least this many logical CPUs.
MIN_LOCAL_CPUS = 4
# Object store cap for local starts; Ray's default (30% of RAM) is more than small jobs
# need and makes memory measurements noisy.
MAX_LOCAL_OBJECT_STORE = 2 * 1024**3
TEST_ENV_PREFIX = "HIP_TEST_"


@dataclass(frozen=True)
class RayInfo:
    address: str
    cpus: float
    started_here: bool


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> RayInfo:
    """Initialise Ray once per process (idempotent) and describe what we got."""
    import ray

    if ray.is_initialized():
        return _info(started_here=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=_test_env())
        return _info(started_here=False)
    # Local clusters default to token auth in Ray 2.60; a single-user local run has no
    # one to authenticate against. An explicit RAY_AUTH_MODE from the user still wins.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train's controller polls its workers every 2 s by default, and every run waits
    # for one poll after its last step; on one machine a 0.5 s poll costs nothing.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray Train 2.60 starts a PreemptionWatcher actor per run to log node drains; a local
    # cluster has no node to drain (one process fewer per run; no wall-time change
    # measurable on 2 cores).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    cpus = num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)
    store = object_store_memory or _default_object_store()
    ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=store,
        include_dashboard=False,
    )
    # Helper processes Ray Train spawns (e.g. its placement-group cleaner) look the cluster
    # up again; with several local clusters on a machine they must be told which one.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    return _info(started_here=True)


def _test_env() -> dict | None:
    """The test-only hooks (HIP_TEST_* variables: pipeline/train/faults.py,
    pipeline/data/isolate.py) of this process, for every worker of the job on a running
    cluster (whose processes do not inherit this process's environment)."""
    env = test_env_vars()
    return {"env_vars": env} if env else None


def test_env_vars() -> dict[str, str]:
    """This process's test-only hook variables (HIP_TEST_*); empty outside tests."""
    return {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}


def _default_object_store() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 512 * 1024**2
    return int(min(MAX_LOCAL_OBJECT_STORE, max(300 * 1024**2, 0.2 * total)))


def _info(*, started_here: bool) -> RayInfo:
    import ray

    ctx = ray.get_runtime_context()
    address = getattr(ctx, "gcs_address", None) or "local"
    return RayInfo(
        address=str(address),
        cpus=float(ray.cluster_resources().get("CPU", 0.0)),
        started_here=started_here,
    )


def cluster_cpus() -> float:
    """Logical CPUs of the running cluster (0 if Ray is not initialised)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0


_IMPORTED_AT = time.time()


def process_started_at() -> float:
    """When this process started (epoch seconds): /proc on Linux, else when this module was
    first imported. What `startup_s` (process start to first optimizer step) is measured from."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT
