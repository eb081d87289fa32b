"""Elastic training on a real two-node Ray cluster on this machine (`ray start --head` plus a
second `ray start --address` node): trainer.num_workers=[1, 2] loses the second node mid-run,
goes on with one worker, grows back to two when the node returns, and completes its steps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import free_port, start_logged, start_ray_node, stop_ray_nodes

from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def _node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return start_ray_node(BIN / "ray", args, log, env)


def _kill(proc: subprocess.Popen) -> None:
    """A preempted node: its raylet, GCS and workers gone at once."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the head's GCS accepts connections: a node started before that may give up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the Ray head did not listen on {port} (rc {proc.poll()})")


def _wait_nodes(port: int, n: int, env: dict[str, str], timeout: float = 120) -> None:
    probe = ("import ray, sys, time\n"
             f"ray.init(address='127.0.0.1:{port}', logging_level='ERROR')\n"
             f"t = time.time() + {timeout}\n"
             f"while sum(x['Alive'] for x in ray.nodes()) < {n} and time.time() < t:\n"
             "    time.sleep(0.5)\n"
             f"sys.exit(sum(x['Alive'] for x in ray.nodes()) < {n})\n")
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=timeout + 60)


def _world_sizes(uri: str, experiment: str) -> list[tuple[int, float]]:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return []
    return sorted((m.step, m.value) for m in c.get_metric_history(runs[0].info.run_id,
                                                                  "world_size"))


def _wait_for(what: str, check, job: subprocess.Popen, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := check()):
            return got
        if job.poll() is not None:
            raise AssertionError(f"job ended (rc {job.returncode}) before {what}:\n"
                                 + log.read_text()[-3000:])
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-3000:])


def test_elastic_run_survives_losing_a_node_and_grows_back(image_shards, tmp_path):
    port = free_port()
    temp = Path(f"/tmp/hipel-{port}")  # short: Ray's unix socket paths have a length limit
    # The GCS marks a killed node dead after health_check_period x failure_threshold (3 s x 5
    # by default): until then Train sees room for two workers, tries, and waits out
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) before settling for one. 0.5 s x 3 here,
    # and a 10 s start timeout as the fallback (the timeout only bounds waiting for the
    # placement group, which live nodes grant at once).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_health_check_period_ms": "500",
           "RAY_health_check_failure_threshold": "3",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    env.pop("RAY_ADDRESS", None)
    head = _node(["--head", "--port", str(port), "--num-cpus", "3", "--resources",
                  '{"slot": 1}', "--include-dashboard", "false", "--temp-dir", str(temp)],
                 tmp_path / "head.log", env)
    second = third = job = None
    try:
        _wait_port(port, head)
        second = _node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--resources",
                        '{"slot": 1}'], tmp_path / "node2.log", env)
        _wait_nodes(port, 2, env)  # so the run starts with two workers, not one
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        log = tmp_path / "job.log"
        job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "HIP_TEST_STEP_DELAY_S": "0.25"}
        job = start_logged(
            [str(BIN / "hip"), "pretrain", "--config", "configs/tiny.yaml",
             f"data.path={image_shards}", f"tracking.uri={uri}", "tracking.experiment=el",
             f"storage.path={tmp_path}/ck", "trainer.num_workers=[1, 2]",
             "trainer.max_failures=-1", "trainer.elastic_check_s=2",
             "trainer.resources_per_worker={CPU: 1, slot: 1}", "optim.batch_size=4",
             "trainer.steps=100", "trainer.checkpoint_every=5", "trainer.eval_every=5",
             "trainer.log_every=1"], log, env=job_env, cwd=ROOT)

        def reached(world: int, after: int = 0):
            if "[hip] MLflow run" not in log.read_text():  # the job creates the store first
                return []
            return [s for s, w in _world_sizes(uri, "el") if w == world and s > after]

        two = _wait_for("two workers", lambda: reached(2), job, 240, log)
        _kill(second)
        one = _wait_for("training on one worker", lambda: reached(1, max(two)), job, 240, log)
        third = _node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--resources",
                       '{"slot": 1}'], tmp_path / "node3.log", env)
        _wait_for("two workers again", lambda: reached(2, max(one)), job, 240, log)
        assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        stop_ray_nodes(third, second, head)
    sizes = _world_sizes(uri, "el")
    steps = [s for s, _ in sizes]
    assert set(steps) == set(range(1, 101))  # every step, to the end
    # A restart replays the steps since the last checkpoint (every 5), no more.
    assert len(steps) - 100 <= 2 * 5
    worlds = [w for _, w in sizes]
    shrunk = worlds.index(1, worlds.index(2))  # two workers, then one ...
    assert 2 in worlds[shrunk:] and worlds[-1] == 2  # ... then two again, to the end
    c = tracking.client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("el").experiment_id])
    assert run.info.status == "FINISHED"
