"""Sweep definitions without Ray: every shipped YAML validates, overrides route to the sweep
or the job, invalid spaces are refused with one line, concurrency and the best trial."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from sweeps.config import Dim, load_sweep
from sweeps.driver import all_lean, ingest_warning, max_concurrent_trials, trial_resources
from sweeps.outcomes import TrialOutcome, pick_best
from sweeps.plan import SweepPlan, plan_sweep
from sweeps.space import grid_size, points

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def fake_shards(root: Path, side: int, rows: int = 1000) -> Path:
    """A manifest with the shapes a sweep is meant for: preflight reads only the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "format": "hip-shards/1", "modality": "image",
        "columns": {"image": {"dtype": "uint8", "shape": [side, side, 3]}},
        "splits": {"train": rows, "val": rows // 10},
        "classes": [f"c{i}" for i in range(10)]}))
    return root


def test_the_shipped_sweeps_are_the_studies_of_the_issue():
    names = {p.stem for p in SWEEPS}
    assert {"tiny", "group-counts", "width", "mask-ratio"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_validates(path, tmp_path):
    """Parse, load the base config with the sweep's overrides, and build the model of every
    enumerable point (grid/choice values, bounds of sampled ranges) for 64x64 images."""
    data = fake_shards(tmp_path / "shards", side=64)
    plan = plan_sweep(path, [f"data.path={data}", f"storage.path={tmp_path / 'ck'}",
                             f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    assert plan.invalid == [], plan.invalid
    assert plan.sweep.name == path.stem
    assert points(plan.sweep.space)
    scored = plan.scored_config()
    assert scored.task == ("mae" if plan.sweep.kind == "pretrain" else "classify")
    if plan.sweep.scheduler.type == "asha":
        assert plan.sweep.scheduler.grace_period < scored.trainer.steps


def test_overrides_go_to_the_job_or_to_the_sweep():
    sweep, job = load_sweep(ROOT / "sweeps" / "tiny.yaml",
                            ["num_samples=3", "scheduler.type=none", "trainer.steps=4",
                             "data.path=/x"])
    assert sweep.num_samples == 3 and sweep.scheduler.type == "none"
    assert job == ["trainer.steps=4", "data.path=/x"]


@pytest.mark.parametrize("space, message", [
    ({"optim.lr": {"uniform": [1.0, 0.1]}}, "low < high"),
    ({"optim.lr": {"grid": [0.1], "choice": [0.2]}}, "exactly one"),
    ({"tracking.uri": {"choice": ["a", "b"]}}, "cannot be swept"),
    ({"optim.lr": {"loguniform": [0.0, 1.0]}}, "low > 0"),
])
def test_a_malformed_space_names_the_key(tmp_path, space, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "base": str(ROOT / "configs/tiny.yaml"),
                                    "space": space}))
    with pytest.raises(ConfigError, match=message) as e:
        load_sweep(path)
    assert "\n" not in str(e.value)


def test_points_cross_grids_and_check_the_bounds_of_ranges():
    sweep, _ = load_sweep(ROOT / "sweeps" / "tiny.yaml")
    sweep.space["mae.mask_ratio"] = Dim(uniform=(0.5, 0.9))
    pts = points(sweep.space)
    assert len(pts) == 4 * 2 and grid_size(sweep.space) == 4
    assert {p["mae.mask_ratio"] for p in pts} == {0.5, 0.9}


@pytest.mark.parametrize("key, values, reason", [
    ("model.overrides.width_mult", [1.0, 0.3], "heads do not divide"),
    ("model.overrides.groups", [[4, 1, 4], [512, 1, 512]], "shorter than its group count 512"),
    ("mae.mask_ratio", [0.5, 1.5], "mae.mask_ratio"),
])
def test_an_invalid_space_is_refused_before_the_sweep_starts(tmp_path, key, values, reason):
    data = fake_shards(tmp_path / "shards", side=16)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "base": str(ROOT / "configs/tiny.yaml"),
        "overrides": {"trainer.num_workers": 1, "model.overrides.latents": [8, 512, 8]},
        "space": {key: {"grid": values}}}))
    with pytest.raises(ConfigError, match=reason) as e:
        plan_sweep(path, [f"data.path={data}"])
    assert "1 of 2 checked points cannot run" in str(e.value)
    assert "invalid: prune" in str(e.value)  # the way out is named
    # invalid: prune keeps the sweep and records the point for pruning at trial time
    plan = plan_sweep(path, [f"data.path={data}", "invalid=prune"])
    assert [i.point[key] for i in plan.invalid] == [values[1]]


def test_the_cli_rejects_an_invalid_space_in_one_line_without_starting_ray(tmp_path):
    data = fake_shards(tmp_path / "shards", side=16)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "base": str(ROOT / "configs/tiny.yaml"),
        "space": {"model.overrides.width_mult": {"grid": [1.0, 0.3]}}}))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hip_pipeline.main", "sweep", "--config", str(path),
         f"data.path={data}", f"storage.path={tmp_path / 'ck'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hip: error: sweep bad: 1 of 2 checked"), lines
    assert "width_mult=0.3" in lines[0] and "heads do not divide" in lines[0]
    assert "Ray" not in proc.stdout + proc.stderr  # no cluster was started
    assert not (tmp_path / "ck").exists()
    assert time.monotonic() - start < 60


def test_local_mode_trials_run_lean_and_are_refused_on_the_train_path(tmp_path):
    data = fake_shards(tmp_path / "shards", side=16)
    lean = plan_sweep(ROOT / "sweeps" / "tiny.yaml", [f"data.path={data}",
                                                       "trainer.num_workers=0"])
    assert all_lean(lean) and trial_resources(lean) == {"CPU": 1.0}
    with pytest.raises(ConfigError, match=r"num_workers=0 .* cannot run inside a Tune trial"):
        plan_sweep(ROOT / "sweeps" / "tiny.yaml", [f"data.path={data}", "trainer.num_workers=0",
                                                   "resources.lean=false"])


def test_a_missing_data_path_is_named_once_not_per_point(tmp_path):
    with pytest.raises(ConfigError, match=r"no point of the space can run: data.path: ") as e:
        plan_sweep(ROOT / "sweeps" / "tiny.yaml", [f"data.path={tmp_path / 'nothing'}"])
    assert str(e.value).count("data.path") == 1


def _plan(tmp_path, *overrides: str) -> SweepPlan:
    data = fake_shards(tmp_path / "shards", side=16)
    return plan_sweep(ROOT / "sweeps" / "tiny.yaml", [f"data.path={data}", *overrides])


@pytest.mark.parametrize("cluster, overrides, expected", [
    ({"CPU": 4.0}, [], 3),  # lean: (4 - 1 reserved) // 1 CPU (the trial trains itself)
    ({"CPU": 4.0}, ["resources.lean=false"], 2),  # (4 - 1) // (0.25 driver + 1 worker)
    ({"CPU": 2.0}, [], 1),  # never 0
    ({"CPU": 64.0}, ["trainer.num_workers=2"], 28),  # 63 // 2.25: Train path
    ({"CPU": 64.0, "GPU": 4.0}, ["trainer.num_workers=2", "trainer.use_gpu=true"], 2),
    ({"CPU": 64.0, "GPU": 1.0}, ["trainer.use_gpu=true"], 1),  # a whole GPU per lean trial
    # fractional GPUs pack lean trials: 4 per GPU
    ({"CPU": 64.0, "GPU": 2.0}, ["trainer.use_gpu=true", "resources.gpus_per_trial=0.25"], 8),
    ({"CPU": 4.0}, ["resources.max_concurrent=3"], 3),
])
def test_max_concurrent_trials_follows_the_cluster(tmp_path, cluster, overrides, expected):
    plan = _plan(tmp_path, "resources.max_concurrent=null", *overrides)
    assert max_concurrent_trials(plan, cluster) == expected


def test_a_lean_trial_holds_its_own_cpu_and_its_gpu_fraction(tmp_path):
    plan = _plan(tmp_path, "trainer.use_gpu=true", "resources.gpus_per_trial=0.25")
    assert trial_resources(plan) == {"CPU": 1.0, "GPU": 0.25}
    assert trial_resources(_plan(tmp_path)) == {"CPU": 1.0}
    assert trial_resources(_plan(tmp_path, "trainer.num_workers=2")) == {"CPU": 0.25}


def test_a_concurrency_that_starves_ray_data_ingest_is_warned_about(tmp_path):
    plan = _plan(tmp_path, "resources.max_concurrent=3", "resources.lean=false")
    warning = ingest_warning(plan, {"CPU": 4.0}, max_concurrent_trials(plan, {"CPU": 4.0}))
    assert warning is not None and "3.75 of the cluster's 4 CPUs" in warning
    assert "leaving 0.25" in warning
    assert ingest_warning(plan, {"CPU": 4.0}, 2) is None  # the derived default leaves 1.5
    assert ingest_warning(plan, {"CPU": 8.0}, 3) is None
    assert "leave it unset" in warning
    # A 2-CPU cluster with the derived default (1 trial) leaves 0.75: warned, with other advice.
    small = _plan(tmp_path, "resources.max_concurrent=null", "resources.lean=false")
    warning = ingest_warning(small, {"CPU": 2.0}, max_concurrent_trials(small, {"CPU": 2.0}))
    assert warning is not None and "leaving 0.75" in warning and "more CPUs" in warning


def test_the_best_trial_ignores_trials_without_a_metric():
    t = [TrialOutcome("a", "FINISHED", {}, 0.5, 6, "r1"),
         TrialOutcome("b", "EARLY_STOPPED", {}, 0.9, 2, "r2"),
         TrialOutcome("c", "PRUNED", {}, None, None, "r3"),
         TrialOutcome("d", "FINISHED", {}, float("nan"), 6, "r4")]
    assert pick_best(t, "min").trial_id == "a"
    assert pick_best(t, "max").trial_id == "b"
    assert pick_best(t[2:], "min") is None


def test_resume_refuses_a_sweep_whose_base_config_changed(tmp_path):
    from pipeline.config import config_to_dict
    from sweeps.driver import SweepError, _check_same_sweep, _definition, _space_json

    plan = _plan(tmp_path)
    state = {"space": _space_json(plan.sweep), "definition": _definition(plan.sweep),
             "base": config_to_dict(plan.base)}
    _check_same_sweep(plan, state)  # the same sweep: fine
    changed = _plan(tmp_path, "trainer.steps=77", "optim.lr=0.5")
    with pytest.raises(SweepError) as e:
        _check_same_sweep(changed, state)
    msg = str(e.value)
    assert "base.optim.lr: " in msg and "-> 0.5" in msg and "base.trainer.steps: " in msg
    _check_same_sweep(changed, {"space": state["space"]})  # an old sweep.json: space only


def test_a_second_sweep_of_the_same_name_is_refused_while_one_runs(tmp_path, capsys):
    import os
    import socket

    from hip_pipeline import main as cli
    from sweeps.driver import LOCK

    data = fake_shards(tmp_path / "shards", side=16)
    args = ["sweep", "--config", str(ROOT / "sweeps" / "tiny.yaml"), f"data.path={data}",
            f"storage.path={tmp_path / 'ck'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    plan = plan_sweep(ROOT / "sweeps" / "tiny.yaml", args[3:])
    Path(plan.sweep_dir).mkdir(parents=True)
    held = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "run_id": "a"}
    (Path(plan.sweep_dir) / LOCK).write_text(json.dumps(held))
    assert cli.main(args) == 2  # refused before Ray starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is being used by another run" in err and LOCK in err
    assert not (Path(plan.sweep_dir) / "sweep.json").exists()


def test_the_rayjob_entrypoint_resumes_its_sweep():
    import yaml

    job = yaml.safe_load((ROOT / "infra" / "kuberay-rayjob.yaml").read_text())
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["hip", "sweep"] and "--resume" in entry


def test_schedulers_are_built_from_the_sweep_and_checked_before_ray(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    from sweeps.halving import Halving
    from sweeps.schedulers import _Clip, make_scheduler, scheduler_params, warmup_warning

    hb = _plan(tmp_path, "scheduler.type=hyperband", "scheduler.brackets=2")
    sync = make_scheduler(hb)
    assert isinstance(sync, Halving) and sync.synchronous
    assert sync.rungs == [[2, 4], [4]]  # grace 2 x rf 2^(b + k), below 6 steps
    assert sync.size == [2, 2]  # 4 grid points dealt round-robin
    assert scheduler_params(hb)["scheduler.max_t"] == 6
    # ASHA: the paper's promotion rule when trials can pause (tiny: lean, checkpoint at
    # every eval), Ray's stopping rule when they cannot; an explicit promote is checked.
    asha = _plan(tmp_path)
    assert asha.sweep.scheduler.asha_rule == "promote"
    promote = make_scheduler(asha)
    assert isinstance(promote, Halving) and not promote.synchronous
    assert promote.rungs == [[2, 4]] and scheduler_params(asha)["scheduler.asha_rule"] == \
        "promote"
    for why in ("trainer.checkpoint_every=6", "resources.lean=false"):
        stop = _plan(tmp_path, why)
        assert stop.sweep.scheduler.asha_rule == "stop"
        assert isinstance(make_scheduler(stop), ASHAScheduler)
    with pytest.raises(ConfigError, match=r"asha \(asha_rule promote\) restores trials .*"
                       r"or scheduler.asha_rule: stop"):
        _plan(tmp_path, "scheduler.asha_rule=promote", "trainer.checkpoint_every=6")
    with pytest.raises(ConfigError, match="hyperband needs searcher.type random"):
        _plan(tmp_path, "scheduler.type=hyperband", "searcher.type=optuna",
              "space={optim.lr: {choice: [0.001, 0.01]}}")
    pbt = _plan(tmp_path, "scheduler.type=pbt", "scheduler.perturbation_interval=2")
    assert isinstance(make_scheduler(pbt), PopulationBasedTraining)
    assert scheduler_params(pbt)["scheduler.mutate"] == "optim.lr"
    with pytest.raises(ConfigError, match="checkpoint_every .* = trainer.eval_every"):
        _plan(tmp_path, "scheduler.type=pbt", "trainer.checkpoint_every=6")
    with pytest.raises(ConfigError, match="lean trials give"):
        _plan(tmp_path, "scheduler.type=hyperband", "trainer.num_workers=2")
    with pytest.raises(ConfigError, match="pbt cannot perturb .*model.overrides.width_mult"):
        _plan(tmp_path, "scheduler.type=pbt", "space={model.overrides.width_mult: "
              "{choice: [0.5, 1.0]}, optim.lr: {grid: [0.001]}}",
              "scheduler.mutate=[model.overrides.width_mult]")
    # A first rung inside the warmup is warned about (tiny: warmup 0, then 4 steps).
    assert warmup_warning(_plan(tmp_path)) is None
    assert "still warming up" in warmup_warning(_plan(tmp_path, "optim.warmup_steps=4"))
    # PBT's x1.2 would push a mask ratio out of its range: the explore step clips it.
    clip = _Clip({"mae.mask_ratio": Dim(uniform=(0.5, 0.9)), "x": Dim(randint=(1, 4))})
    assert clip({"mae.mask_ratio": 1.08, "x": 7, "y": 5}) == \
        {"mae.mask_ratio": 0.9, "x": 3, "y": 5}
    assert clip({"mae.mask_ratio": 0.6, "x": 2}) == {"mae.mask_ratio": 0.6, "x": 2}


def test_a_cooled_metric_needs_cooldown_probes(tmp_path):
    """metric cooled_val_loss is only reported when the trials probe (trainer.
    eval_cooldown_steps): refused before Ray otherwise, with the fix in the message."""
    with pytest.raises(ConfigError, match=r"cooled_val_loss is reported only with "
                       r"trainer.eval_cooldown_steps > 0"):
        _plan(tmp_path, "metric=cooled_val_loss")
    plan = _plan(tmp_path, "metric=cooled_val_loss", "overrides.trainer.eval_cooldown_steps=2")
    assert plan.sweep.metric == "cooled_val_loss"
    with pytest.raises(ConfigError, match="cooled_val_accuracy needs a classification stage"):
        _plan(tmp_path, "metric=cooled_val_accuracy",
              "overrides.trainer.eval_cooldown_steps=2")


def test_decision_steps_are_the_evaluations_where_the_scheduler_reads_the_metric(tmp_path):
    """Rungs (ASHA, HyperBand brackets) and perturbation points (PBT), each moved to the first
    evaluation at or after it; None without a scheduler (every report counts)."""
    from sweeps.schedulers import decision_steps

    steps = ["overrides.trainer.steps=40", "overrides.trainer.eval_every=3",
             "overrides.trainer.checkpoint_every=3"]
    assert decision_steps(_plan(tmp_path, *steps)) == (3, 6, 9, 18, 33)  # 2, 4, 8, 16, 32
    assert decision_steps(_plan(tmp_path, *steps, "scheduler.type=hyperband",
                                "scheduler.brackets=2")) == (3, 6, 9, 18, 33)
    assert decision_steps(_plan(tmp_path, *steps, "scheduler.type=pbt",
                                "scheduler.perturbation_interval=12")) == (12, 24, 36)
    assert decision_steps(_plan(tmp_path, "scheduler.type=none")) is None
