"""Ray Train jobs end to end through the CLI on a real local Ray and a real MLflow server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from netutil import free_port, serving

from hip_pipeline import main as cli
from pipeline import tracking
from pipeline.train.loop import INIT_TENSORS_TAG

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with its own SQLite store and artifact folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            root / "server.log", f"{url}/health", start_timeout=120, stop_timeout=20):
        yield url


def run_cli(*args: str) -> None:
    assert cli.main(list(args)) == 0


def test_pretrain_then_finetune_tracked_in_a_real_mlflow_server(
        image_shards, mlflow_server, tmp_path, capsys):
    common = [f"data.path={image_shards}", f"tracking.uri={mlflow_server}",
              f"storage.path={tmp_path / 'ckpt'}", "tracking.experiment=train-test"]
    run_cli("pretrain", "--config", TINY, *common)
    out = capsys.readouterr().out
    assert "[hip] MLflow run" in out and "pretrain done" in out
    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name("train-test")
    (pre,) = c.search_runs([exp.experiment_id], "tags.`hip.task` = 'mae'")
    assert pre.info.status == "FINISHED"
    assert pre.data.params["trainer.num_workers"] == "2"
    assert pre.data.params["model.preset"] == "hip_tiny"
    assert pre.data.tags["hip.preset"] == "hip_tiny"
    assert len(pre.data.tags["hip.manifest_hash"]) == 16
    assert pre.data.tags["mlflow.source.git.commit"]
    losses = c.get_metric_history(pre.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]  # every step, from rank 0 only
    for key in ("lr", "samples_per_s", "data_wait_frac", "val_loss"):
        assert key in pre.data.metrics, key
    arts = {a.path for d in ("config", "data", "reconstructions", "checkpoint")
            for a in c.list_artifacts(pre.info.run_id, d)}
    assert {"config/resolved.yaml", "data/manifest.json", "checkpoint/state.pt",
            "reconstructions/step_000003.png", "reconstructions/step_000006.png"} <= arts

    run_cli("finetune", "--config", TINY, "--init-from", pre.info.run_id, *common,
            "trainer.steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2")
    out = capsys.readouterr().out
    assert "finetune done" in out
    (ft,) = c.search_runs([exp.experiment_id], "tags.`hip.task` = 'classify'")
    assert ft.info.status == "FINISHED"
    assert ft.data.params["finetune.init_from"] == pre.info.run_id
    # Rank 0 (a worker: its "[hip] initialised" line is not this process's output) loaded
    # the MAE run's encoder; test_learning checks the tensors themselves in local mode.
    assert int(ft.data.tags[INIT_TENSORS_TAG]) > 10
    acc = c.get_metric_history(ft.info.run_id, "val_accuracy")
    assert [m.step for m in acc] == [2, 4] and all(0.0 <= m.value <= 1.0 for m in acc)


def test_a_killed_worker_resumes_from_its_last_checkpoint(image_shards, tmp_path, capsys):
    marker = tmp_path / "fault-happened"
    os.environ["HIP_TEST_FAULT"] = f"1:5:{marker}"  # rank 1 dies once, right after step 5
    try:
        run_cli("pretrain", "--config", TINY, f"data.path={image_shards}",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"storage.path={tmp_path}/ck",
                "trainer.steps=8", "trainer.checkpoint_every=4", "trainer.max_failures=1")
    finally:
        del os.environ["HIP_TEST_FAULT"]
    assert marker.exists()  # the fault really fired
    out = capsys.readouterr().out
    assert "step 8," in out  # the exact final step count
    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id])
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
    # Resumed from the step-4 checkpoint: steps 5.. ran again, and the run ends at step 8.
    assert steps[-1] == 8 and sorted(set(steps)) == list(range(1, 9))
    assert run.data.tags["hip.resumed_from_step"] == "4"


@pytest.mark.parametrize("modality", ["audio", "video", "audio+video"])
def test_every_modality_feeds_the_model(modality, sample_dir, ray_session, tmp_path):
    """Shards of each modality -> Ray Data torch batches -> model input -> MAE and classify
    (audio as raw samples and as log-spectrogram frames, data.audio.kind)."""
    import torch

    from pipeline.data.layout import read_manifest
    from pipeline.data.reader import open_shards
    from pipeline.train.batches import TENSOR_COLUMNS, input_spec, to_model_input
    from pipeline.train.build import build_model
    from pipeline.train.config import TrainConfig

    src = "video" if modality == "audio+video" else modality
    out = tmp_path / "shards"
    run_cli("preprocess", "--modality", modality, "--input", str(sample_dir / src),
            "--output", str(out), "audio.sample_rate=8000", "audio.seconds=0.25",
            "video.frames=2", "video.size=16", "split.val_fraction=0")
    manifest = read_manifest(str(out))
    columns = [*TENSOR_COLUMNS[modality], "label"]
    batch = next(iter(open_shards(str(out), "train").select_columns(columns)
                      .iter_torch_batches(batch_size=4)))
    spec = input_spec(manifest)
    x = to_model_input(batch, spec)
    assert {k: tuple(v.shape) for k, v in x.items()} == {k: (4, m, c) for k, (m, c) in
                                                         spec.items()}
    if "audio" in x:  # int16 shards (audio.dtype's default) reach the model in [-1, 1]
        assert batch["audio"].dtype == torch.int16 and x["audio"].dtype == torch.float32
        assert 0 < x["audio"].abs().max() <= 1
    if modality == "audio+video":  # a time shift would move the sound against the pictures
        from pipeline.train.driver import JobError, preflight

        shifted = TrainConfig.model_validate({"data": {"path": str(out),
                                                       "augment": {"time_shift": 0.1}}})
        with pytest.raises(JobError, match="time_shift would move the sound against"):
            preflight(shifted)
    kinds = ("raw", "log_spectrogram") if "audio" in x else ("raw",)
    for task, kind in [(t, k) for t in ("mae", "classify") for k in kinds]:
        cfg = TrainConfig.model_validate({"task": task, "model": {"preset": "hip_tiny"},
                                          "data": {"audio": {"kind": kind}}})
        spec = input_spec(manifest, cfg.data.audio)
        x = to_model_input(batch, spec, cfg.data.audio)
        if kind == "log_spectrogram":  # 2,000 samples -> 1 + 2000 // 128 frames of 129 bins
            assert x["audio"].shape == (4, 16, 129)
        model = build_model(cfg, manifest)
        out_ = model(x)
        value = out_[0] if task == "mae" else torch.nn.functional.cross_entropy(
            out_, batch["label"].long())
        assert torch.isfinite(value)


def test_deterministic_data_gives_the_same_run_twice(image_shards, tmp_path):
    """data.deterministic: fixed block order + seeded shuffle + seeded masks and init, so two
    runs of one config log the same losses (what a sweep comparing configurations needs)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name in ("first", "second"):
        run_cli("pretrain", "--config", TINY, f"data.path={image_shards}", f"tracking.uri={uri}",
                f"storage.path={tmp_path}/ck", f"tracking.run_name={name}",
                "trainer.num_workers=1", "trainer.steps=4", "data.deterministic=true")
    c = tracking.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id])
    curves = {r.info.run_name: [m.value for m in c.get_metric_history(r.info.run_id, "loss")]
              for r in runs}
    assert len(curves["first"]) == 4
    assert curves["first"] == curves["second"]


def _alive(actor_class: str) -> list:
    import ray

    # The State API (ray.util.state) needs the dashboard, which the session's Ray lacks.
    return [a for a in ray._private.state.actors().values()
            if a["ActorClassName"] == actor_class and a["State"] == "ALIVE"]


def test_a_finished_run_leaves_no_train_controller_behind(image_shards, ray_session,
                                                          tmp_path):
    """Ray Train's fit() in the main thread installs a SIGINT handler holding its controller
    actor and never removes it: after `hip pretrain` in a long-lived driver the controller
    and its DatasetManager stayed alive, and in one CI run the next test's data ingest then
    found no free CPU and hung. run_training restores the handler."""
    import time

    before = {a["ActorID"] for a in _alive("TrainController")}
    run_cli("pretrain", "--config", TINY, f"data.path={image_shards}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"storage.path={tmp_path}/ck",
            "trainer.num_workers=1", "trainer.steps=2")
    deadline = time.monotonic() + 30
    while [a for a in _alive("TrainController") if a["ActorID"] not in before]:
        assert time.monotonic() < deadline, "the run's TrainController is still alive"
        time.sleep(1)


def test_local_mode_keeps_checkpoints_and_resumes(image_shards, tmp_path, capsys):
    """trainer.num_workers=0 runs the loop in the driver (Ray Train's local mode, which keeps
    no checkpoints of its own): the loop persists them, keeps num_to_keep, and a rerun of the
    same run name continues from the newest."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["pretrain", "--config", TINY, f"data.path={image_shards}", f"tracking.uri={uri}",
              f"storage.path={tmp_path}/ck", "tracking.run_name=local", "trainer.num_workers=0",
              "trainer.checkpoint_every=2", "trainer.num_to_keep=2"]
    run_cli(*common, "trainer.steps=6")
    out = capsys.readouterr().out
    folder = tmp_path / "ck" / "local"
    assert sorted(p.name for p in folder.glob("checkpoint_*")) == [
        "checkpoint_000004", "checkpoint_000006"]
    assert f"checkpoint {folder / 'checkpoint_000006'}" in out
    c = tracking.client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id])
    assert run.data.tags[tracking.CHECKPOINT_TAG] == str(folder / "checkpoint_000006")
    run_cli(*common, "trainer.steps=8")
    assert "resumed from step 6" in capsys.readouterr().out
    assert (folder / "checkpoint_000008" / "state.pt").is_file()
