"""MLflow outages and interruptions (issue 18): training goes on while the tracking server is
down and sends what it buffered when the server is back; a run is never left RUNNING by a
failure, Ctrl-C or SIGTERM after its MLflow run was opened.

The outage test runs `hip pretrain` in local mode (trainer.num_workers=0: the loop runs in
this process) against a real `mlflow server` on loopback, and stops and restarts the server
at fixed steps of the run (a wrapper around loop.train_step) so the outage always falls in
the middle of training, however fast or slow the machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import free_port, start_logged, wait_http

from hip_pipeline import main as cli
from pipeline import tracking
from pipeline.config import load_config
from pipeline.train import driver, loop
from pipeline.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS, EVAL_EVERY = 24, 6
DOWN_AT, UP_AT, READY_BY = 4, 6, 20  # steps done when the server is stopped / restarted


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_training_survives_an_mlflow_server_restart(image_shards, tmp_path, monkeypatch,
                                                    capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    # No job runner (4 more processes; only MLflow's GenAI features use it): boots faster.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    servers: list[subprocess.Popen] = []
    outage: list[str] = []

    def start() -> None:
        servers.append(start_logged(cmd, tmp_path / f"server{len(servers)}.log", env=env))

    real_step = loop.train_step

    def step_with_outage(run):
        if run.step == DOWN_AT:  # steps 1..4 are in MLflow; 5.. are logged while it is down
            _stop(servers[-1])
            outage.append("down")
        elif run.step == UP_AT:  # same port, same SQLite store; it boots while training goes on
            start()
        elif run.step == READY_BY:
            wait_http(f"{url}/health", 120, servers[-1])
            outage.append("up")
        return real_step(run)

    monkeypatch.setattr(loop, "train_step", step_with_outage)
    start()
    try:
        wait_http(f"{url}/health", 120, servers[-1])
        rc = cli.main(["pretrain", "--config", TINY, f"data.path={image_shards}",
                       f"tracking.uri={url}", f"storage.path={tmp_path / 'ck'}",
                       "trainer.num_workers=0", f"trainer.steps={STEPS}", "trainer.log_every=1",
                       f"trainer.eval_every={EVAL_EVERY}", "trainer.checkpoint_every=12"])
        out, err = capsys.readouterr()
        assert rc == 0, err[-3000:]
        assert outage == ["down", "up"] and servers[0].returncode is not None
        c = tracking.client(url)
        (run,) = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id])
        assert run.info.status == "FINISHED"
        # Every step once, in order: the points logged during the outage were sent later.
        assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == \
            list(range(1, STEPS + 1))
        evals = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))  # 6, 12, 18 during the outage
        assert [m.step for m in c.get_metric_history(run.info.run_id, "val_loss")] == evals
        pngs = {a.path for a in c.list_artifacts(run.info.run_id, "reconstructions")}
        assert pngs == {f"reconstructions/step_{s:06d}.png" for s in evals}
        assert run.data.tags[tracking.CHECKPOINT_TAG].endswith(f"checkpoint_{STEPS:06d}")
        # One warning line for the outage, not one (or a traceback) per step.
        warned = [line for line in err.splitlines() if "unreachable" in line]
        assert len(warned) == 1 and "Connection refused" in warned[0], warned
        assert "answers again" in err  # and one line when the buffer was sent
        assert "Traceback" not in err
    finally:
        for proc in servers:
            _stop(proc)


# ------------------------------------------------ runs are ended whatever happens after start


def _cfg(image_shards: Path, tmp_path: Path) -> TrainConfig:
    return load_config(TrainConfig, TINY, [
        f"data.path={image_shards}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"storage.path={tmp_path / 'ck'}", "trainer.num_workers=0"], {"task": "mae"})


def _only_run(tmp_path: Path):
    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id])
    return run


def test_a_failure_after_the_run_opened_ends_it_failed(image_shards, tmp_path, monkeypatch):
    def broken(uri, experiment):
        raise RuntimeError("ui link broke")

    monkeypatch.setattr(tracking, "ui_link", broken)  # called after start_run, before fit
    with pytest.raises(RuntimeError, match="ui link broke"):
        driver.run_training(_cfg(image_shards, tmp_path), log=lambda msg: None)
    assert _only_run(tmp_path).info.status == "FAILED"


def test_ctrl_c_ends_the_run_killed(image_shards, tmp_path, monkeypatch):
    def interrupted(cfg, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_datasets", interrupted)
    with pytest.raises(KeyboardInterrupt):
        driver.run_training(_cfg(image_shards, tmp_path), log=lambda msg: None)
    assert _only_run(tmp_path).info.status == "KILLED"


def test_sigterm_ends_the_run_killed_and_restores_the_handler(image_shards, tmp_path,
                                                              monkeypatch):
    def terminated(cfg, manifest):  # what a cluster scheduler sends before killing the job
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not delivered")

    def before(signum, frame):
        raise AssertionError("the job's own handler should have run")

    previous = signal.signal(signal.SIGTERM, before)
    try:
        monkeypatch.setattr(driver, "_datasets", terminated)
        with pytest.raises(SystemExit) as exc:
            driver.run_training(_cfg(image_shards, tmp_path), log=lambda msg: None)
        assert exc.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _only_run(tmp_path).info.status == "KILLED"
