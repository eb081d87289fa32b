"""Checkpoints that survive faults: atomic writes, numeric order, fallback past a damaged
one, and resume only for the same job (pipeline/train/checkpoints.py, resume.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hip_pipeline import main as cli
from pipeline import tracking
from pipeline.train import checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "scheduler": {},
            "step": step, "data": {"epoch": 0, "batch": step}, "manifest_hash": "m",
            "config": {"task": "mae", "model": {"preset": "hip_tiny"}}}


def test_a_millionth_step_checkpoint_is_the_newest_not_the_first_pruned(tmp_path):
    root = str(tmp_path / "run")
    for step in (999_998, 999_999, 1_000_000):
        checkpoints.persist_state(state(step), root, step, keep=2)
    names = [Path(f).name for f in checkpoints.step_folders(root)]
    assert names == ["checkpoint_1000000", "checkpoint_999999"]
    assert checkpoints.latest_persisted(root).endswith("checkpoint_1000000/state.pt")


def test_a_write_that_dies_midway_leaves_the_previous_checkpoints_whole(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    checkpoints.persist_state(state(10), root, 10, keep=2)
    real_save = torch.save

    def dies_midway(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")  # what a killed writer leaves behind
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.persist_state(state(20), root, 20, keep=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [Path(f).name for f in checkpoints.step_folders(root)] == ["checkpoint_000010"]
    assert checkpoints.load_state(checkpoints.latest_persisted(root))["step"] == 10


def test_loading_falls_back_past_an_unreadable_newest_checkpoint(tmp_path):
    root = str(tmp_path / "run")
    for step in (10, 20):
        checkpoints.persist_state(state(step), root, step, keep=3)
    newest = Path(root) / "checkpoint_000020" / checkpoints.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a full disk leaves it
    warnings: list[str] = []
    got, folder = checkpoints.load_newest(checkpoints.step_folders(root), warn=warnings.append)
    assert got["step"] == 10 and folder.endswith("checkpoint_000010")
    assert len(warnings) == 1 and "checkpoint_000020 is unreadable" in warnings[0]
    assert checkpoints.read_meta(folder)["step"] == 10


@pytest.mark.integration
def test_resume_is_checked_against_the_job(image_shards, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["pretrain", "--config", TINY, f"data.path={image_shards}", f"tracking.uri={uri}",
              f"storage.path={tmp_path}/ck", "trainer.num_workers=0", "trainer.steps=4",
              "trainer.checkpoint_every=2", "trainer.eval_every=2", "tracking.run_name=r"]
    assert cli.main(common) == 0
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("hip-tiny").experiment_id
    (run,) = c.search_runs([exp])
    # What the job paid before training, and its pace (issue 19), for hip compare.
    assert 0 < run.data.metrics["startup_s"] < 600 and run.data.metrics["steps_per_s"] > 0
    capsys.readouterr()

    # Finished: nothing is trained again, and no new MLflow run is opened.
    assert cli.main(common) == 0
    assert "already complete (step 4 of 4" in capsys.readouterr().out
    assert len(c.search_runs([exp])) == 1

    # Another model config or another dataset under the same run name: refused, one line.
    assert cli.main([*common, "model.overrides={channels: [16, 32, 16]}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model config (model.overrides" in err
    other = tmp_path / "other"
    shutil.copytree(image_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "another run"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main([*common, f"data.path={other}"]) == 2
    assert "was trained on another dataset" in capsys.readouterr().err

    # More steps: resumes from step 4 (not 0), past a damaged newest checkpoint.
    newest = tmp_path / "ck" / "r" / "checkpoint_000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:64])
    assert cli.main([*common, "trainer.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_000004 is unreadable" in out and "resumed from step 2" in out

    # --restart: from step 0, the old checkpoints gone first.
    assert cli.main([*common, "--restart"]) == 0
    out = capsys.readouterr().out
    assert "removed the checkpoints of run 'r'" in out and "resumed from" not in out
