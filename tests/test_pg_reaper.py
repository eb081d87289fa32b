"""The cluster's placement-group reaper (pipeline/train/pg_reaper.py) on a real local Ray: one
named actor watches every registered group, removes the group of a controller that died,
and forgets a group its run removed normally."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from pipeline.train import pg_reaper  # noqa: E402


@ray.remote(num_cpus=0)
class _Controller:
    """Stands in for a Ray Train controller: the reaper only pings it."""


def _state(pg) -> str:
    from ray.util.placement_group import placement_group_table

    return placement_group_table(pg).get("state", "REMOVED")


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_one_reaper_removes_the_group_of_a_dead_controller(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group([{"CPU": 0.01}]) for _ in range(2)]
    ray.get([g.ready() for g in groups])
    controllers = [_Controller.remote() for _ in groups]
    ray.get([c.__ray_ready__.remote() for c in controllers])
    for c, g in zip(controllers, groups, strict=True):
        pg_reaper.watch(c, g)

    reaper = ray.get_actor(pg_reaper.REAPER_NAME, namespace=pg_reaper.REAPER_NAMESPACE)
    ids = sorted(g.id.hex() for g in groups)
    assert set(ids) <= set(ray.get(reaper.watching.remote()))  # one actor watches both

    # A live controller's group is left alone for several rounds ...
    time.sleep(3 * pg_reaper.PING_INTERVAL_S)
    assert [_state(g) for g in groups] == ["CREATED", "CREATED"]
    # ... a dead one's is removed, and the other stays.
    ray.kill(controllers[0])
    assert _wait(lambda: _state(groups[0]) == "REMOVED")
    assert _state(groups[1]) == "CREATED"
    assert groups[0].id.hex() not in ray.get(reaper.watching.remote())

    # A group its run removed normally is forgotten; its controller's death changes nothing.
    remove_placement_group(groups[1])
    assert _wait(lambda: groups[1].id.hex() not in ray.get(reaper.watching.remote()))
    ray.kill(controllers[1])
