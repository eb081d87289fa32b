"""`ray job submit` of `hip pretrain` to a real local cluster (`ray start --head` on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import free_port, start_ray_node, stop_ray_nodes, wait_http

from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_cluster(tmp_path):
    """`ray start --head --block` (2 CPUs, loopback); SIGTERM stops exactly this cluster,
    leaving the test session's own Ray alone (`ray stop` would kill every Ray here)."""
    port, dash = free_port(), free_port()
    temp = Path(f"/tmp/hipray-{port}")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = start_ray_node(
        BIN / "ray", ["--head", "--port", str(port), "--num-cpus", "2",
                      "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                      "--include-dashboard", "true", "--temp-dir", str(temp)],
        tmp_path / "ray-head.log", env, object_store_mb=300)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 120, proc)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_ray_nodes(proc)


def test_ray_job_submit_runs_hip_pretrain(ray_cluster, image_shards, tmp_path):
    address, env = ray_cluster
    shards = image_shards
    db = tmp_path / "mlflow.db"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address,
           "--runtime-env", "infra/runtime_env.yaml", "--",
           "hip", "pretrain", "--config", "configs/tiny.yaml", f"data.path={shards}",
           f"tracking.uri=sqlite:///{db}", f"storage.path={tmp_path}/ckpt",
           "tracking.experiment=job-submit", "trainer.steps=4", "trainer.checkpoint_every=2",
           "trainer.resources_per_worker={CPU: 0.5}"]
    start = time.monotonic()
    for _ in range(20):  # the head answers HTTP before its job agent is up: bounded retry
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        if "No available agent" not in out:
            break
        time.sleep(3)
    assert r.returncode == 0, out[-3000:]
    assert "succeeded" in out, out[-3000:]
    assert "pretrain done" in out
    c = tracking.client(f"sqlite:///{db}")
    (run,) = c.search_runs([c.get_experiment_by_name("job-submit").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert time.monotonic() - start < 600
