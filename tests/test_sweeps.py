"""`hip sweep` / `hip compare` end to end: real local Ray (the session's), real MLflow (a SQLite
file per test), the tiny model on the sample images. No mocks.

The tiny sweep (sweeps/tiny.yaml) runs 4 learning rates, 2 at a time, with ASHA (rungs at
steps 2 and 4 of 6, halving; the paper's promotion rule, as its trials can pause). The first
trial at step 2 waits PAUSED (one result, none promotable); the second makes two, and the
better of them goes on. The two near-zero learning rates start after that: their step-2
val_loss is the untrained model's, worse than both good trials', so the rung, complete at
four results, keeps the good two and stops them at step 2. A trial that waited and went on
resumes as a new MLflow run; the one it left is tagged hip.superseded.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hip_pipeline import main as cli
from pipeline import tracking
from pipeline.config import load_config
from pipeline.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = str(ROOT / "sweeps" / "tiny.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def children(uri: str, parent_id: str) -> list:
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    return list(c.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_id}'"))


def live_children(uri: str, parent_id: str) -> list:
    """One run per trial: the runs a paused trial left when it resumed are superseded."""
    return [r for r in children(uri, parent_id) if r.data.tags.get("hip.superseded") != "true"]


@pytest.fixture(scope="module")
def tiny_sweep(image_shards, ray_session, tmp_path_factory):
    """Run sweeps/tiny.yaml once through the CLI; yields (uri, parent run id, stdout)."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root}/mlflow.db"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["sweep", "--config", TINY_SWEEP, f"data.path={image_shards}",
                       f"tracking.uri={uri}", f"storage.path={root}/ck",
                       "tracking.experiment=sweep-test"])
    text = out.getvalue()
    assert rc == 0, text[-3000:]
    state = json.loads((root / "ck" / "tiny" / "sweep.json").read_text())
    yield uri, state["parent_run_id"], text, root


def test_the_sweep_has_a_parent_run_and_one_child_run_per_trial(tiny_sweep):
    uri, parent_id, text, _ = tiny_sweep
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-tiny"
    p = parent.data.params
    assert p["space.optim.lr"] == "grid [0.003, 0.001, 1e-05, 1e-06]"
    assert (p["scheduler.type"], p["scheduler.grace_period"], p["scheduler.max_t"]) == \
        ("asha", "2", "6")
    assert p["sweep.metric"] == "val_loss" and p["sweep.mode"] == "min"
    assert p["resources.max_concurrent_trials"] == "2"  # (4 CPUs - 1) // (0.25 + 1)
    assert parent.data.metrics["trials_total"] == 4
    runs = live_children(uri, parent_id)
    assert len(runs) == 4
    lrs = set()
    for run in runs:
        trial = run.data.tags["hip.trial_id"]
        assert run.info.run_name == f"tiny-{trial}"  # Train run name from the trial id
        assert run.data.tags["hip.stage"] == "pretrain"
        assert run.data.params["trainer.num_workers"] == "1"
        assert run.data.params["trainer.steps"] == "6"
        # The sampled value reached the job config the child run logs.
        assert float(run.data.params["optim.lr"]) == \
            json.loads(run.data.tags["hip.sweep_params"])["optim.lr"]
        lrs.add(float(run.data.params["optim.lr"]))
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "config")}
        assert "config/resolved.yaml" in arts  # the same content as a `hip pretrain` run
    assert lrs == {3e-3, 1e-3, 1e-5, 1e-6}
    assert "[hip] best: trial" in text


def test_asha_stops_trials_and_they_are_marked_not_lost(tiny_sweep):
    uri, parent_id, _, root = tiny_sweep
    c = tracking.client(uri)
    runs = {float(r.data.params["optim.lr"]): r for r in live_children(uri, parent_id)}
    stopped = [r for r in runs.values() if r.data.tags.get("hip.early_stopped") == "true"]
    assert stopped, {lr: r.data.tags.get("hip.sweep_status") for lr, r in runs.items()}
    assert {1e-5, 1e-6} <= {float(r.data.params["optim.lr"]) for r in stopped}
    for r in stopped:
        assert r.info.status == "KILLED" and r.data.tags["hip.sweep_status"] == "EARLY_STOPPED"
        assert r.info.end_time is not None
    # Halved at each rung: the near-zero rates at step 2, the worse good one at step 4.
    stopped_at = {float(r.data.params["optim.lr"]): int(r.data.tags["hip.stopped_at_step"])
                  for r in stopped}
    assert sorted(stopped_at.values()) == [2, 2, 4], stopped_at
    assert stopped_at[1e-5] == stopped_at[1e-6] == 2
    finished = [r for r in runs.values() if r.data.tags["hip.sweep_status"] == "FINISHED"]
    assert len(finished) == 1 and finished[0].info.status == "FINISHED"
    (winner,) = finished
    assert winner.data.tags[tracking.CHECKPOINT_TAG]  # closed by run_training, not killed
    # Trials that waited at a rung came back from their checkpoint, not from step 0: the
    # trial's runs together evaluated steps 2, 4 and 6 once each.
    waited = [r for r in runs.values() if "hip.resumed_from_step" in r.data.tags]
    assert waited, {lr: r.data.tags for lr, r in runs.items()}
    for r in waited:
        trial = r.data.tags["hip.trial_id"]
        steps = sorted(m.step for run in children(uri, parent_id)
                       if run.data.tags["hip.trial_id"] == trial
                       for m in c.get_metric_history(run.info.run_id, "val_loss"))
        assert steps == [s for s in (2, 4, 6) if s <= int(r.data.tags.get(
            "hip.stopped_at_step", 6))], (trial, steps)
        loss = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        assert min(loss) == int(r.data.tags["hip.resumed_from_step"]) + 1
    parent = c.get_run(parent_id)
    assert parent.data.metrics["trials_early_stopped"] == len(stopped)
    assert parent.data.metrics["trials_finished"] == len(finished)
    assert len(stopped) + len(finished) == 4
    best = min(finished, key=lambda r: r.data.metrics["val_loss"])
    assert parent.data.tags["hip.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["val_loss"])
    # The best config is a job config `hip pretrain --config` accepts, with the best lr.
    path = tracking.download_artifact(uri, parent_id, "best/config.yaml", root / "best")
    cfg = load_config(TrainConfig, path)
    assert cfg.optim.lr == float(best.data.params["optim.lr"]) and cfg.trainer.steps == 6
    assert cfg.tracking.run_name is None


def test_stopped_trials_give_their_workers_cpus_back(tiny_sweep, ray_session):
    """ASHA kills a trial's actor; its Train placement group must not outlive it."""
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + 30
    while True:
        live = [v for v in placement_group_table().values() if v["state"] != "REMOVED"]
        if not live or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert live == []


def test_compare_prints_the_table_and_writes_the_plots(tiny_sweep, tmp_path, capsys):
    uri, parent_id, _, _ = tiny_sweep
    out = tmp_path / "plots"
    assert cli.main(["compare", "--experiment", "sweep-test", "--tracking-uri", uri,
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("#  trial"))
    for col in ("status", "val_loss", "optim.lr", "steps", "wall s"):
        assert col in lines[header]
    rows = [ln.split() for ln in lines[header + 2:header + 6]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    values = [float(r[3]) for r in rows]
    assert values == sorted(values)  # sorted by the metric (min)
    assert {r[2] for r in rows} <= {"FINISHED", "EARLY_STOPPED"}
    assert "EARLY_STOPPED" in {r[2] for r in rows}
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"val_loss_vs_optim_lr.png", "curves.png"}
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    logged = {a.path for a in tracking.client(uri).list_artifacts(parent_id, "compare")}
    assert {"compare/curves.png", "compare/val_loss_vs_optim_lr.png"} <= logged
    # An explicit sweep id and another metric work too; an unknown experiment is one line.
    assert cli.main(["compare", "--experiment", "sweep-test", "--sweep", parent_id,
                     "--metric", "loss", "--tracking-uri", uri, "--out", str(out),
                     "--no-log"]) == 0
    assert "by loss (min)" in capsys.readouterr().out
    assert cli.main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_points_that_cannot_run_are_pruned_with_their_reason(image_shards, ray_session,
                                                             tmp_path, capsys):
    """Sampled widths between valid bounds: 0.8 and 0.6 (seed 0) give channels the heads do
    not divide. The plan passes (bounds 0.5 and 1.0 fit), the trials prune themselves."""
    sweep = tmp_path / "prune.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "prune", "base": str(ROOT / "configs" / "tiny.yaml"),
        "overrides": {"trainer.num_workers": 1},
        "space": {"model.overrides.width_mult": {"uniform": [0.5, 1.0], "q": 0.1}},
        "num_samples": 2, "searcher": {"seed": 0}, "scheduler": {"type": "none"}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = cli.main(["sweep", "--config", str(sweep), f"data.path={image_shards}",
                   f"tracking.uri={uri}", f"storage.path={tmp_path}/ck"])
    out = capsys.readouterr().out
    assert rc == 1, out[-2000:]  # the sweep ran to its end; no trial produced val_loss
    assert "2 pruned" in out
    parent_id = json.loads((tmp_path / "ck" / "prune" / "sweep.json").read_text())[
        "parent_run_id"]
    runs = children(uri, parent_id)
    widths = sorted(float(r.data.params["model.overrides.width_mult"]) for r in runs)
    assert widths == pytest.approx([0.6, 0.8])
    for r in runs:
        assert r.info.status == "KILLED" and r.data.tags["hip.pruned"] == "true"
        assert "heads do not divide" in r.data.tags["hip.prune_reason"]
        assert r.data.tags["hip.sweep_status"] == "PRUNED"
    parent = tracking.client(uri).get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_pruned"] == 2


def _terminated_trials(tune_dir: Path) -> list[str]:
    """Trials Tune's newest experiment state records as TERMINATED. A restore writes a new
    state file beside the old one: reading every file would list a trial twice. Newest by
    the timestamp in the name: the restored driver may touch the old file (its mtime)."""
    files = sorted(glob.glob(str(tune_dir / "experiment_state-*.json")))
    if not files:
        return []
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (OSError, ValueError):  # being rewritten
        return []
    trials = [json.loads(trial) for trial, _ in state["trial_data"]]
    return [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]


def _tree(path: Path) -> dict[str, float]:
    return {str(p.relative_to(path)): p.stat().st_mtime for p in path.rglob("*")}


def _driver_env(ray_session) -> dict[str, str]:
    """A sweep driver in a subprocess that joins the session's Ray, so killing it is what a
    crashed driver looks like to the cluster (its job's actors die), without starting a
    second Ray on 2 cores. Lean trials take seconds: 0.3 s per step (a test hook the driver
    hands its trials) keeps the others running while the test looks."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "RAY_DATA_USE_DATASOURCE_V2": "0", "PYTHONUNBUFFERED": "1",
            "HIP_TEST_STEP_DELAY_S": "0.3"}


def _kill_driver_when(args: list[str], env: dict[str, str], log_path: Path, ready,
                      what: str, linger_s: float = 0.0) -> None:
    """Run the driver until ready() holds (then linger_s more), then SIGKILL its group."""
    log = log_path.open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, what
            time.sleep(0.5)
        time.sleep(linger_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(
        image_shards, ray_session, tmp_path):
    sweep = tmp_path / "resume.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "resume", "base": str(ROOT / "configs" / "tiny.yaml"), "kind": "pretrain",
        "overrides": {"trainer.num_workers": 1, "trainer.steps": 30, "trainer.eval_every": 10,
                      "trainer.checkpoint_every": 10},
        "space": {"optim.lr": {"grid": [2e-3, 1e-3, 5e-4]}},
        "scheduler": {"type": "none"}, "resources": {"max_concurrent": 1}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "hip_pipeline.main", "sweep", "--config", str(sweep),
            f"data.path={image_shards}", f"tracking.uri={uri}", f"storage.path={tmp_path}/ck"]
    env = _driver_env(ray_session)
    tune_dir = tmp_path / "ck" / "resume" / "tune"
    _kill_driver_when(args, env, tmp_path / "first.log", lambda: _terminated_trials(tune_dir),
                      "no trial finished in time")
    # Lean trials are quick: one or two may have finished before the driver died.
    finished = _terminated_trials(tune_dir)
    assert 1 <= len(finished) < 3, finished
    state = json.loads((tmp_path / "ck" / "resume" / "sweep.json").read_text())
    parent_id = state["parent_run_id"]
    first = {}
    for done in finished:
        runs = [r for r in children(uri, parent_id) if r.data.tags["hip.trial_id"] == done]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        train_dir = tmp_path / "ck" / "resume" / "train" / f"resume-{done}"
        first[done] = (runs[0].info.run_id, train_dir, _tree(train_dir))
        assert first[done][2]

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming Tune experiment" in resumed.stdout
    c = tracking.client(uri)
    all_runs = children(uri, parent_id)
    for done, (run_id, train_dir, before) in first.items():
        again = [r for r in all_runs if r.data.tags["hip.trial_id"] == done]
        assert [r.info.run_id for r in again] == [run_id]  # not run again
        assert _tree(train_dir) == before  # no new checkpoints either
    others = [r for r in all_runs if r.data.tags["hip.trial_id"] not in first]
    live = [r for r in others if r.data.tags.get("hip.superseded") != "true"]
    assert len(live) == 3 - len(first) and all(r.info.status == "FINISHED" for r in live)
    live_ids = {r.info.run_id for r in live}
    for r in others:  # a run the killed driver left behind is closed, not left RUNNING:
        # KILLED by the resume, or FAILED when its Train run saw the driver die first
        assert r.info.status in ("FINISHED", "KILLED", "FAILED")
        assert r.info.run_id in live_ids or r.data.tags.get("hip.superseded") == "true"
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "hip.resumed_at" in parent.data.tags
    assert parent.data.metrics["trials_finished"] == 3
    assert sorted(_terminated_trials(tune_dir)) == sorted(
        [*first, *(r.data.tags["hip.trial_id"] for r in live)])


def test_a_resumed_asha_sweep_keeps_its_waiting_trials_waiting(
        image_shards, ray_session, tmp_path):
    """ASHA's promotion rule keeps trials PAUSED at a rung; Tune saves no scheduler state,
    so a resumed sweep used to bring them back as new, running them past the rung unranked.
    3 learning rates one at a time, rung at step 10 of 30 (grace 10, rf 3): the first trial
    (1e-6, the worst) waits at step 10; the driver dies there; the resumed sweep must keep
    it waiting (sweeps/halving.py saves its decisions in the sweep folder), run the other
    two to the rung, and send only the best on."""
    sweep = tmp_path / "wait.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "wait", "base": str(ROOT / "configs" / "tiny.yaml"), "kind": "pretrain",
        "overrides": {"trainer.num_workers": 1, "trainer.steps": 30, "trainer.eval_every": 10,
                      "trainer.checkpoint_every": 10, "optim.warmup_steps": 0},
        "space": {"optim.lr": {"grid": [1e-6, 2e-3, 1e-3]}},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 3},
        "resources": {"max_concurrent": 1}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "hip_pipeline.main", "sweep", "--config", str(sweep),
            f"data.path={image_shards}", f"tracking.uri={uri}", f"storage.path={tmp_path}/ck"]
    env = _driver_env(ray_session)
    state = tmp_path / "ck" / "wait" / "halving.json"
    # Linger: Tune saves its experiment state (the trial PAUSED) soon after.
    _kill_driver_when(args, env, tmp_path / "first.log",
                      lambda: state.exists() and json.loads(state.read_text() or "{}")
                      .get("waiting"), "no trial waited at the rung in time", linger_s=2)
    (waiting,) = json.loads(state.read_text())["waiting"]

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming Tune experiment" in resumed.stdout
    c = tracking.client(uri)
    parent_id = json.loads((tmp_path / "ck" / "wait" / "sweep.json").read_text())[
        "parent_run_id"]
    runs = children(uri, parent_id)
    live = live_children(uri, parent_id)
    status = {float(r.data.params["optim.lr"]): r.data.tags["hip.sweep_status"] for r in live}
    assert sorted(status.values()) == ["EARLY_STOPPED"] * 2 + ["FINISHED"], status
    assert status[1e-6] == "EARLY_STOPPED"
    # No trial trained past the rung unless it was sent on: the waiting one never did.
    last = {}
    for r in runs:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        trial = r.data.tags["hip.trial_id"]
        last[trial] = max([last.get(trial, 0), *steps])
    assert last[waiting] == 10, last
    assert sorted(last.values()) == [10, 10, 30], last
