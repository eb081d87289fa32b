"""Placement-group reaper: Ray Train's PlacementGroupCleaner without the State API.

A worker group's placement group is scoped to the job. When a Train controller is killed
from outside (ASHA stopping a Tune trial kills the trial actor, the controller and workers
die with it) the group would keep its CPUs until the job ends. Ray Train 2.60's own
PlacementGroupCleaner asks the State API whether the controller lives: that needs the
dashboard (off in our local Ray) and a single Ray instance on the machine; otherwise it
never cleans, logs "Failed to query Ray Train Controller actor state" every second and its
detached actor never exits. Measured here: each early stop leaked a worker's CPU until a
sweep deadlocked. The reaper pings the controllers instead, and `install_reaper` puts it in
place of the built-in cleaner for TorchTrainers built in this process.

One reaper actor per cluster (named REAPER_NAME in namespace REAPER_NAMESPACE, detached,
no CPUs) watches every run's group: a sweep trial starts no process of its own for this
(one per run cost ~1.8 s of CPU per trial on 2 cores). It exits after IDLE_EXIT_S with
nothing to watch; the next run starts it again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import ray
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2.api import data_parallel_trainer as dpt
from ray.util.placement_group import placement_group_table, remove_placement_group

PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 10.0  # a controller busy for longer than this still counts as alive
IDLE_EXIT_S = 600.0
REAPER_NAME = "hip-pg-reaper"
REAPER_NAMESPACE = "hip"

log = logging.getLogger(__name__)


class PlacementGroupReaper(WorkerGroupCallback):
    """Have the cluster's reaper remove this worker group's placement group if the
    controller dies (a group removed normally is simply forgotten)."""

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        watch(ray.get_runtime_context().current_actor, pg)
        return super().after_worker_group_start(worker_group)


def install_reaper() -> bool:
    """Make TorchTrainers built in this process (a Tune trial actor) use PlacementGroupReaper
    instead of Ray Train's State-API-based PlacementGroupCleanerCallback. False if this Ray
    has no such hook (then pass PlacementGroupReaper() in the run's callbacks instead)."""

    if not hasattr(dpt, "PlacementGroupCleanerCallback"):
        return False
    dpt.PlacementGroupCleanerCallback = PlacementGroupReaper
    return True


def watch(controller, pg, *, attempts: int = 10) -> None:
    """Register (controller actor handle, placement group) with the cluster's reaper,
    starting the reaper if there is none."""

    for attempt in range(attempts):
        # DEFAULT scheduling: otherwise the reaper is captured into the Tune trial's
        # placement group and dies with the trial whose group it is meant to remove.
        reaper = _reaper_class().options(
            name=REAPER_NAME, namespace=REAPER_NAMESPACE, get_if_exists=True,
            lifetime="detached", num_cpus=0, max_concurrency=4,
            scheduling_strategy="DEFAULT").remote()
        try:
            if ray.get(reaper.watch.remote(controller, pg)):
                reaper.run.remote()  # returns at once when the loop is already running
                return
        except ActorDiedError:
            pass
        time.sleep(0.2 * (attempt + 1))  # a reaper exiting idle: wait for its name to free
    raise RuntimeError(f"could not register placement group {pg.id.hex()} with the "
                       f"{REAPER_NAME} actor")


@functools.cache
def _reaper_class():
    return ray.remote(_Reaper)


class _Reaper:
    """The watching actor: one loop (`run`) over every registered group; `watch` and
    `watching` run beside it on the actor's other threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watched: dict[str, tuple] = {}  # placement group id -> (controller, pg)
        self._running = False
        self._closing = False

    def watch(self, controller, pg) -> bool:
        """False if this reaper is exiting (the caller then starts a new one)."""
        with self._lock:
            if self._closing:
                return False
            self._watched[pg.id.hex()] = (controller, pg)
            return True

    def watching(self) -> list[str]:
        with self._lock:
            return sorted(self._watched)

    def run(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
        idle = 0.0
        while True:
            time.sleep(PING_INTERVAL_S)
            with self._lock:
                if not self._watched:
                    idle += PING_INTERVAL_S
                    if idle >= IDLE_EXIT_S:
                        self._closing = True
                        break
                    continue
                items = dict(self._watched)
            idle = 0.0
            try:
                gone = _reap(items)
            except Exception:  # the loop must outlive any one bad round
                log.exception("placement-group reaper round failed")
                continue
            with self._lock:
                for key in gone:
                    self._watched.pop(key, None)
        ray.actor.exit_actor()


def _reap(items: dict[str, tuple]) -> list[str]:
    """Ping every watched controller at once; remove the groups of dead ones. -> keys no
    longer to watch (group removed, by us or by its run)."""

    done = [k for k, (_, pg) in items.items()
            if placement_group_table(pg).get("state", "REMOVED") == "REMOVED"]
    live = {k: v for k, v in items.items() if k not in done}
    if not live:
        return done
    pings = {c.__ray_ready__.remote(): k for k, (c, _) in live.items()}
    ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_TIMEOUT_S)
    for ref in ready:  # not ready within the timeout: a busy controller is alive
        try:
            ray.get(ref)
        except ActorDiedError:
            key = pings[ref]
            remove_placement_group(live[key][1])
            done.append(key)
        except Exception:  # e.g. ActorUnavailableError (restarting): ask again next round
            pass
    return done


__all__ = ["PlacementGroupReaper", "install_reaper", "watch"]
