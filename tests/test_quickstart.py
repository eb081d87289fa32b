"""`hip quickstart --small` end to end on the session's local Ray: every stage leaves its
output, MLflow holds the stage runs and the sweep's parent and child runs, and a rerun
reuses all of it instead of training again."""

from __future__ import annotations

import json

from hip_pipeline import main as cli
from hip_pipeline.quickstart import EXPERIMENT, STAGE_TAG
from pipeline import tracking


def test_quickstart_small_runs_every_stage_and_reuses_them(ray_session, tmp_path, capsys):
    assert cli.main(["quickstart", "--small", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out

    data, runs = tmp_path / "data", tmp_path / "runs"
    for modality in ("image", "audio", "video"):
        assert any((data / "raw" / modality).rglob("*.*")), modality
    for modality in ("image", "audio", "video", "audio+video"):
        manifest = json.loads((data / "shards" / modality / "manifest.json").read_text())
        assert manifest["accepted"] > 0 and manifest["rejected"] == 0, modality
        assert manifest["accepted"] + manifest["rejected"] == manifest["inputs"]
    assert sorted(p.name for p in (runs / "compare").glob("*.png"))  # hip compare's plots

    c = tracking.client(f"sqlite:///{runs / 'mlflow.db'}")
    exp = c.get_experiment_by_name(EXPERIMENT)
    every = c.search_runs([exp.experiment_id], "", max_results=1000)
    stage_runs = {r.data.tags[STAGE_TAG]: r for r in every if STAGE_TAG in r.data.tags}
    assert set(stage_runs) == {"pretrain", "finetune-mae", "finetune-scratch"}
    assert all(r.info.status == "FINISHED" for r in stage_runs.values())
    assert (stage_runs["finetune-mae"].data.params["finetune.init_from"]
            == stage_runs["pretrain"].info.run_id)
    assert "val_accuracy" in stage_runs["finetune-scratch"].data.metrics
    arts = {a.path for a in c.list_artifacts(stage_runs["pretrain"].info.run_id,
                                             "reconstructions")}
    assert arts, "no MAE reconstruction grid"

    (parent,) = [r for r in every if r.data.tags.get("hip.role") == "sweep"]
    assert parent.info.status == "FINISHED"
    children = [r for r in every
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # --small sweeps the mask ratio only (2 trials); the full scale adds 2 group layouts.
    assert sorted(float(r.data.params["mae.mask_ratio"]) for r in children) == [0.5, 0.85]
    for stage in ("sample data", "preprocess image", "MAE pretrain",
                  "finetune from MAE + from scratch", "sweep (sweeps/quickstart.yaml)"):
        assert f"=== {stage}: " in out, stage
    assert "finetune val accuracy: from MAE" in out and "mlflow ui --backend-store-uri" in out
    assert "quickstart wall time: " in out

    # A rerun reuses the data, the shards, the three training runs and the finished sweep.
    assert cli.main(["quickstart", "--small", "--workdir", str(tmp_path)]) == 0
    again = capsys.readouterr().out
    for stage in ("sample data", "MAE pretrain", "finetune from MAE + from scratch"):
        line = again.split(f"=== {stage}: ")[1].splitlines()[0]
        assert line.count("(reused)") == (2 if "+" in stage else 1), (stage, line)
    assert len(every) == 3 + 1 + 2
    assert len(c.search_runs([exp.experiment_id], "", max_results=1000)) == len(every)
