"""Synchronous HyperBand and population-based training on the real local Ray, through
`hip sweep` with lean trials (the loop in the Tune trial's own process). Real MLflow (a
SQLite file per test), the tiny model on the sample images. No mocks.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import yaml

from hip_pipeline import main as cli
from pipeline import tracking

ROOT = Path(__file__).resolve().parents[1]


def _sweep(tmp_path: Path, image_shards: Path, spec: dict, **overrides
           ) -> tuple[str, str, str]:
    """Write and run a sweep of the tiny MAE job (dotted `overrides` with "__" for ".");
    -> (MLflow URI, parent run id, stdout)."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "s", "base": str(ROOT / "configs" / "tiny.yaml"), "kind": "pretrain",
        "overrides": {"trainer.num_workers": 1, "trainer.steps": 8, "trainer.eval_every": 2,
                      "trainer.checkpoint_every": 2, "trainer.log_every": 1,
                      "optim.warmup_steps": 0, "data.deterministic": True,
                      **{k.replace("__", "."): v for k, v in overrides.items()}},
        "metric": "val_loss", "mode": "min", **spec}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["sweep", "--config", str(path), f"data.path={image_shards}",
                       f"tracking.uri={uri}", f"storage.path={tmp_path}/ck"])
    assert rc == 0, out.getvalue()[-3000:]
    state = json.loads((tmp_path / "ck" / "s" / "sweep.json").read_text())
    return uri, state["parent_run_id"], out.getvalue()


def _children(uri: str, parent_id: str) -> list:
    c = tracking.client(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return list(c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'"))


def _live(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("hip.superseded") != "true"]


def _outcome(uri: str, parent_id: str, scheduler: str):
    """(client, parent run, child runs, live child runs) after checking the parent records
    the scheduler and every one of the 4 trials has one live run (none lost)."""
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    assert parent.data.params["scheduler.type"] == scheduler
    runs = _children(uri, parent_id)
    live = _live(runs)
    assert len(live) == 4
    return c, parent, runs, live


def test_hyperband_cuts_rungs_synchronously_and_resumes_paused_trials(
        image_shards, ray_session, tmp_path, monkeypatch):
    """4 learning rates, 8 steps, grace 2, halving: rungs at steps 2 and 4. Two trials run at
    a time, so the first two wait PAUSED at step 2 until the other two have reached it
    (a synchronous cut: no first-arrival promotion); the better half resumes from its Tune
    checkpoint, the better of those runs all 8 steps, and the rest are stopped. The rungs
    rank by cooled_val_loss (a 1-step cooldown probe at each rung).

    The first trial to finish step 3 dies (its process exits): Tune recovers it from its
    step-2 checkpoint (sweep.max_failures 1), and the rung at step 4 waits for it. (Tune
    tells the scheduler "error" then "added" for a recovered trial: taking that for an end
    once cut the rung without it, and the trial then ran to the end unranked.)"""
    marker = tmp_path / "fault"
    monkeypatch.setenv("HIP_TEST_FAULT", f"0:3:{marker}")
    uri, parent_id, _ = _sweep(tmp_path, image_shards, {
        "space": {"optim.lr": {"grid": [3e-3, 1e-3, 1e-5, 1e-6]}},
        "scheduler": {"type": "hyperband", "grace_period": 2, "reduction_factor": 2},
        "resources": {"max_concurrent": 2}, "metric": "cooled_val_loss"},
        trainer__eval_cooldown_steps=1)
    c, parent, runs, live = _outcome(uri, parent_id, "hyperband")
    assert marker.exists()  # a trial did die at step 3
    assert parent.data.params["resources.lean"] == "true"
    status = {float(r.data.params["optim.lr"]): r.data.tags["hip.sweep_status"] for r in live}
    assert sorted(status.values()) == ["EARLY_STOPPED"] * 3 + ["FINISHED"], status
    stopped_at = {float(r.data.params["optim.lr"]): int(r.data.tags["hip.stopped_at_step"])
                  for r in live if r.data.tags["hip.sweep_status"] == "EARLY_STOPPED"}
    assert sorted(stopped_at.values()) == [2, 2, 4], stopped_at  # halved at each rung
    assert stopped_at.get(1e-6) == 2 and stopped_at.get(1e-5) == 2  # untrained: cut first
    # Trials that waited at a rung came back from their checkpoint, not from step 0.
    resumed = [r for r in live if "hip.resumed_from_step" in r.data.tags]
    assert resumed, [r.data.tags for r in live]
    for r in resumed:
        start = int(r.data.tags["hip.resumed_from_step"])
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        assert start in (2, 4) and min(steps) == start + 1, (start, steps)
    (best,) = [r for r in live if r.data.tags["hip.sweep_status"] == "FINISHED"]
    assert parent.data.tags["hip.best_run_id"] == best.info.run_id
    assert [m.step for m in c.get_metric_history(best.info.run_id, "val_loss")][-1] == 8
    # Probes run only where the scheduler reads the metric (rungs 2 and 4, and the end),
    # logged beside the run's own val_loss; at the last step the two are equal.
    probed, differ = set(), False
    for r in runs:
        h = {k: {m.step: m.value for m in c.get_metric_history(r.info.run_id, k)}
             for k in ("val_loss", "cooled_val_loss")}
        probed |= set(h["cooled_val_loss"])
        differ |= any(v != h["val_loss"][s] for s, v in h["cooled_val_loss"].items() if s < 8)
        if 8 in h["cooled_val_loss"]:
            assert h["cooled_val_loss"][8] == h["val_loss"][8]
    assert probed == {2, 4, 8} and differ, probed


def test_pbt_exploits_a_better_trials_checkpoint_with_a_perturbed_learning_rate(
        image_shards, ray_session, tmp_path):
    """4 trials at once, learning rates log-uniform in [1e-6, 3e-3]; every 2 steps the
    worst quarter (one trial) loads the best trial's checkpoint and goes on with its
    learning rate perturbed (x0.8 / x1.2, or resampled). All four run to step 16.

    Ray's asynchronous PBT exploits only a donor that saved a checkpoint at its own last
    perturbation point while in the top quantile ("no checkpoint for trial ...: skip
    exploit" otherwise), and with trials at different steps the top changes often: 8 steps
    (3 perturbation points) once ended with every exploit skipped, so the run has 7."""
    uri, parent_id, _ = _sweep(tmp_path, image_shards, {
        "space": {"optim.lr": {"loguniform": [1e-6, 3e-3]}}, "num_samples": 4,
        "scheduler": {"type": "pbt", "perturbation_interval": 2, "resample_probability": 0.0},
        "resources": {"max_concurrent": 4}}, trainer__steps=16)
    c, parent, runs, live = _outcome(uri, parent_id, "pbt")
    assert parent.data.params["scheduler.mutate"] == "optim.lr"
    assert all(r.data.tags["hip.sweep_status"] == "FINISHED" for r in live)
    first = {r.data.tags["hip.trial_id"]: float(r.data.params["optim.lr"])
             for r in sorted(runs, key=lambda r: r.info.start_time, reverse=True)}
    # Asynchronous PBT also pauses trials (any trial waiting to start makes the one reporting
    # at a perturbation point yield), so a resumed run is not always an exploit; an exploited
    # one goes on with another trial's checkpoint and a perturbed copy of its learning rate.
    exploited = [r for r in live
                 if float(r.data.params["optim.lr"]) != first[r.data.tags["hip.trial_id"]]]
    assert exploited, "no trial exploited another's checkpoint"
    for r in exploited:
        lr = float(r.data.params["optim.lr"])
        assert all(abs(lr - v) > 1e-12 for v in first.values()), (lr, first)
        assert 1e-6 <= lr <= 3e-3  # kept inside the space
        assert int(r.data.tags["hip.resumed_from_step"]) >= 2
        # The exploited run started from the clone's step, not from step 0.
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "loss")]
        assert min(steps) == int(r.data.tags["hip.resumed_from_step"]) + 1
