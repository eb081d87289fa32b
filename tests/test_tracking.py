"""MLflow conventions on a real SQLite store: the experiment opens in MLflow's training-runs
view, each run names the `hip` command that made it and its shards as a dataset input."""

from __future__ import annotations

from pipeline import tracking

MANIFEST = {"modality": "image", "splits": {"train": 90, "val": 10}, "classes": ["a", "b"],
            "columns": {"image": {"shape": [16, 16, 3], "dtype": "uint8"}}}


def test_experiments_are_tagged_as_model_development(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    new = tracking.experiment_id(uri, "fresh")
    assert c.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made before the tag existed gets it; a user's own kind is kept.
    old = c.create_experiment("old")
    assert tracking.experiment_id(uri, "old") == old
    assert c.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    mine = c.create_experiment("mine", tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})
    tracking.experiment_id(uri, "mine")
    assert c.get_experiment(mine).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


def test_runs_record_their_source_and_shards_as_a_dataset(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", run_name="r", params={"a": 1},
                                tags=tracking.source_tags("hip pretrain"))
    tracking.log_dataset(uri, run_id, MANIFEST, "gs://bucket/shards/image")
    run = tracking.client(uri).get_run(run_id)
    assert run.data.tags["mlflow.source.name"] == "hip pretrain"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "image" and inp.dataset.source_type == "gs"
    assert inp.dataset.digest == tracking.manifest_hash(MANIFEST)
    assert "gs://bucket/shards/image" in inp.dataset.source
    assert '"train": 90' in inp.dataset.profile and "uint8" in inp.dataset.schema
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]


def test_ui_links_open_the_runs_table(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.experiment_id(uri, "exp")
    link = tracking.ui_link(uri, "exp")
    assert f"mlflow ui --backend-store-uri {uri}" in link
    assert link.endswith(f"/#/experiments/{exp}/runs?workflowType=machine_learning")
