"""Placement-group reaper: Ray Train's PlacementGroupCleaner without the State API.

A worker group's placement group is scoped to the job. When a Train controller is killed
from outside (ASHA stopping a Tune trial kills the trial actor, the controller and workers
die with it) the group would keep its CPUs until the job ends. Ray Train 2.60's own
PlacementGroupCleaner asks the State API whether the controller lives: that needs the
dashboard (off in our local Ray) and a single Ray instance on the machine; otherwise it
never cleans, logs "Failed to query Ray Train Controller actor state" every second and its
detached actor never exits. Measured here: each early stop leaked a worker's CPU until a
sweep deadlocked. The reaper pings the controller instead, and `install_reaper` puts it in
place of the built-in cleaner for TorchTrainers built in this process.
"""

from __future__ import annotations

import time

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

PING_INTERVAL_S = 1.0


class PlacementGroupReaper(WorkerGroupCallback):
    """Start a detached watchdog per worker group that removes its placement group when the
    controller dies (and exits by itself once the group is removed normally)."""

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        # DEFAULT scheduling: otherwise the watchdog is captured into the Tune trial's
        # placement group and dies with the trial it is meant to outlive.
        watchdog = ray.remote(num_cpus=0)(_Watchdog).options(
            lifetime="detached", scheduling_strategy="DEFAULT").remote(controller, pg)
        watchdog.watch.remote()
        return super().after_worker_group_start(worker_group)


def install_reaper() -> bool:
    """Make TorchTrainers built in this process (a Tune trial actor) use PlacementGroupReaper
    instead of Ray Train's State-API-based PlacementGroupCleanerCallback. False if this Ray
    has no such hook (then pass PlacementGroupReaper() in the run's callbacks instead)."""
    from ray.train.v2.api import data_parallel_trainer as dpt

    if not hasattr(dpt, "PlacementGroupCleanerCallback"):
        return False
    dpt.PlacementGroupCleanerCallback = PlacementGroupReaper
    return True


class _Watchdog:
    def __init__(self, controller, pg):
        self.controller = controller
        self.pg = pg

    def watch(self) -> None:
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError
        from ray.util.placement_group import placement_group_table, remove_placement_group

        while True:
            if placement_group_table(self.pg).get("state", "REMOVED") == "REMOVED":
                break
            try:
                ray.get(self.controller.__ray_ready__.remote(), timeout=10)
            except ActorDiedError:
                remove_placement_group(self.pg)
                break
            except GetTimeoutError:
                pass  # a busy controller is alive
            time.sleep(PING_INTERVAL_S)
        ray.actor.exit_actor()


__all__ = ["PlacementGroupReaper", "install_reaper"]
