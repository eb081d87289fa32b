"""Training pieces that need no Ray: configs, schedule, batches, checkpoints, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config, read_yaml
from pipeline.train.batches import input_spec, log_spectrogram, to_model_input, to_pixels
from pipeline.train.build import build_model, layer_depth, lr_factor, make_optimizer
from pipeline.train.checkpoints import load_state, make_state, save_state
from pipeline.train.config import AudioFeatures, TrainConfig, resolve_paths

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
                 if "task" in read_yaml(p)]
MANIFEST = {"modality": "image", "classes": ["a", "b", "c"],
            "columns": {"image": {"shape": [8, 8, 3], "dtype": "uint8"}}}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_train_config_validates_and_builds(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.model.preset
    # The model must build for the data the config names (meta device: no allocation).
    side = 224 if "imagenet" in path.name else 64
    manifest = {"modality": "image", "classes": [str(i) for i in range(10)],
                "columns": {"image": {"shape": [side, side, 3], "dtype": "uint8"}}}
    if cfg.data.modality == "audio+video":
        manifest = {"modality": "audio+video", "classes": ["x", "y"], "columns": {
            "video": {"shape": [8, 224, 224, 3], "dtype": "uint8"},
            "audio": {"shape": [122880], "dtype": "float32"}}}
    with torch.device("meta"):
        build_model(cfg, manifest)


def test_train_configs_were_found():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"tiny.yaml", "quickstart-pretrain.yaml", "hip16-imagenet.yaml",
            "hip256-audioset.yaml"} <= names


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.num_wokers: unknown key \(did you mean "
                                          r"trainer\.num_workers\?\)"):
        load_config(TrainConfig, None, ["trainer.num_wokers=2"])
    with pytest.raises(ConfigError, match=r"mae\.mask_ratio: .*less than 1"):
        load_config(TrainConfig, None, ["mae.mask_ratio=1.0"])
    with pytest.raises(ConfigError, match="model.preset 'hip17' is not one of"):
        load_config(TrainConfig, None, ["model.preset=hip17"])
    with pytest.raises(ConfigError, match="credentials in the tracking URI"):
        load_config(TrainConfig, None, ["tracking.uri=http://bob:pw@host:5000"])


def test_resolve_paths_makes_local_paths_absolute(tmp_path):
    cfg = resolve_paths(TrainConfig(), base=tmp_path)
    assert cfg.data.path == str(tmp_path / "data/shards/image")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    remote = TrainConfig.model_validate({"storage": {"path": "gs://b/ckpt"}})
    assert resolve_paths(remote, base=tmp_path).storage.path == "gs://b/ckpt"


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig.model_validate({"optim": {"warmup_steps": 4, "min_lr_ratio": 0.1},
                                      "trainer": {"steps": 20}})
    f = [lr_factor(s, cfg) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=0.01)


def test_weight_decay_skips_biases_norms_and_tables():
    cfg = TrainConfig()
    model = build_model(cfg, MANIFEST)
    opt = make_optimizer(model, cfg)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and not name.endswith(".table")), name


def test_layer_decay_scales_each_level_below_the_head():
    """optim.layer_decay 0.5 on a 2-level HiP classifier: head x1, last level x0.5, level 0
    x0.25, input adapter x0.125; weight-decay split unchanged; MAE ignores it."""
    manifest = {**MANIFEST, "classes": ["a", "b"]}
    cfg = TrainConfig(task="classify", optim={"lr": 1e-3, "layer_decay": 0.5})
    model = build_model(cfg, manifest)
    levels = len(model.backbone.levels)
    assert levels >= 2
    lr_of = {id(p): g["lr"] for g in make_optimizer(model, cfg).param_groups
             for p in g["params"]}
    for name, p in model.named_parameters():
        depth = layer_depth(name, levels)
        assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** depth), name
        if name.startswith("head."):
            assert depth == 0
        elif name.startswith("backbone.levels.0."):
            assert depth == levels
        elif name.startswith("backbone.adapter."):
            assert depth == levels + 1
    mae = TrainConfig(optim={"lr": 1e-3, "layer_decay": 0.5})
    assert {g["lr"] for g in make_optimizer(build_model(mae, MANIFEST), mae).param_groups} \
        == {1e-3}


def test_batches_become_normalised_model_inputs_and_back():
    spec = input_spec(MANIFEST)
    assert spec == {"image": (64, 3)}
    img = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = to_model_input({"image": img}, spec)["image"]
    assert x.shape == (2, 64, 3) and x.dtype == torch.float32
    torch.testing.assert_close(to_pixels(x, (8, 8)), img.float() / 255, atol=1e-5, rtol=0)
    av = {"modality": "audio+video", "columns": {"video": {"shape": [2, 4, 4, 3]},
                                                 "audio": {"shape": [100]}}}
    assert input_spec(av) == {"video": (32, 3), "audio": (100, 1)}


def test_log_spectrogram_tokens_hold_each_frames_spectrum():
    """data.audio.kind=log_spectrogram: (B, T) -> (B, 1 + T // hop, window // 2 + 1) frames,
    standardised per clip; a tone's energy sits in its own bin in every frame, and int16
    shards give the features float shards give (tones in a little noise, like recordings:
    a pure tone's -100 dB floor bins would differ by int16 rounding)."""
    sr, window, hop = 8000, 256, 128
    feats = AudioFeatures(kind="log_spectrogram", window=window, hop=hop)
    t = torch.arange(2000) / sr
    tones = torch.stack([0.5 * torch.sin(2 * torch.pi * f * t) for f in (500.0, 1500.0)])
    tones += 0.01 * torch.randn(tones.shape, generator=torch.Generator().manual_seed(0))
    manifest = {"modality": "audio", "columns": {"audio": {"shape": [2000]}}}
    spec = input_spec(manifest, feats)
    assert spec == {"audio": (1 + 2000 // hop, window // 2 + 1)} == {"audio": (16, 129)}
    x = to_model_input({"audio": tones}, spec, feats)["audio"]
    assert x.shape == (2, 16, 129)
    # Bin k holds k * sr / window Hz: 500 Hz -> bin 16, 1500 Hz -> bin 48, in every frame
    # (the first, centred on the reflected clip start, within one bin).
    assert (x[:, 1:].argmax(-1) == torch.tensor([[16], [48]])).all()
    assert ((x[:, 0].argmax(-1) - torch.tensor([16, 48])).abs() <= 1).all()
    torch.testing.assert_close(x.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(1, 2)), torch.ones(2), atol=1e-4, rtol=0)
    # Louder is the same clip after per-clip standardisation (level is not a feature).
    torch.testing.assert_close(log_spectrogram(0.1 * tones, window, hop),
                               log_spectrogram(tones, window, hop), atol=1e-2, rtol=0)
    stored = torch.round(tones * 32767).to(torch.int16)
    diff = (to_model_input({"audio": stored}, spec, feats)["audio"] - x).abs()
    assert diff.mean() < 1e-3 and diff.max() < 0.1  # rounding moves only near-empty bins
    assert input_spec(manifest) == {"audio": (2000, 1)}  # raw samples stay the default


def test_audio_feature_settings_are_checked():
    with pytest.raises(ValueError, match="hop .* must not exceed window"):
        AudioFeatures(kind="log_spectrogram", window=64, hop=128)
    manifest = {"modality": "audio", "columns": {"audio": {"shape": [100]}}}
    with pytest.raises(ValueError, match="window=256 is longer than the clips"):
        input_spec(manifest, AudioFeatures(kind="log_spectrogram"))
    cfg = TrainConfig.model_validate({"data": {"audio": {"kind": "log_spectrogram"}}})
    # preflight builds the model on the meta device and turns this into a JobError
    with pytest.raises(ValueError, match="longer than the clips"), torch.device("meta"):
        build_model(cfg, {**manifest, "classes": ["a", "b"]})


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    cfg = TrainConfig()
    model = build_model(cfg, MANIFEST)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    loss, _, _ = model(to_model_input({"image": torch.zeros(2, 8, 8, 3, dtype=torch.uint8)},
                                      input_spec(MANIFEST)))
    loss.backward()
    opt.step()
    sched.step()
    state = make_state(model, opt, sched, step=7, config=cfg.model_dump(mode="json"),
                       manifest_hash="abc")
    path = save_state(state, tmp_path)
    back = load_state(path)  # weights_only=True inside
    assert back["step"] == 7 and back["manifest_hash"] == "abc"
    assert back["config"]["model"]["preset"] == "hip_tiny"
    fresh = build_model(cfg, MANIFEST)
    fresh.load_state_dict(back["model"])
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    opt2 = make_optimizer(fresh, cfg)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def _hip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hip_pipeline.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_bad_train_configs_fail_fast_with_one_line_and_no_ray(tmp_path):
    r = _hip("pretrain", "--config", str(ROOT / "configs/tiny.yaml"), "optim.lr=-1",
             cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"hip: error: invalid config ({ROOT / 'configs/tiny.yaml'}): optim.lr: Input should "
        "be greater than 0, got -1"]
    r = _hip("pretrain", "data.path=nowhere", cwd=tmp_path)
    assert r.returncode == 2 and "no manifest.json in" in r.stderr
    assert "Ray" not in r.stderr + r.stdout  # failed before any Ray start
    assert not (tmp_path / "runs").exists()


def test_small_train_splits_are_chained_so_an_execution_spans_many_steps():
    from pipeline.train.driver import STEPS_PER_EXECUTION, train_passes

    cfg = TrainConfig.model_validate({"optim": {"batch_size": 16},
                                      "trainer": {"num_workers": 1, "steps": 60}})
    assert train_passes(149, cfg) == 7  # the whole run (960 rows) in one execution
    cfg.trainer.steps = 10_000
    assert train_passes(149, cfg) == -(-STEPS_PER_EXECUTION * 16 // 149)  # capped
    assert train_passes(1_281_167, cfg) == 1  # ImageNet-sized: plain epochs
    assert train_passes(0, cfg) >= 1
    cfg.trainer.num_workers = 0  # local mode: one loop in the driver, chained like 1 worker
    assert train_passes(149, cfg) == -(-STEPS_PER_EXECUTION * 16 // 149)


@pytest.mark.parametrize("workers,split", [(0, []), (1, []), (2, "all")])
def test_datasets_are_split_only_across_several_workers(workers, split):
    """A lone worker reads the whole dataset itself (no SplitCoordinator actors to start)."""
    from pipeline.train.driver import _data_config

    cfg = TrainConfig.model_validate({"trainer": {"num_workers": workers},
                                      "data": {"deterministic": True}})
    dc = _data_config(cfg)
    assert dc._datasets_to_split == split
    assert dc._user_execution_options.preserve_order is True


def test_tasks_own_columns_loss_and_eval_metrics():
    from pipeline.train.tasks import ClassifyTask, MaeTask, make_task

    assert isinstance(make_task("mae"), MaeTask)
    clf = make_task("classify", label_smoothing=0.1)
    assert clf.columns(["image"]) == ["image", "label"]
    assert make_task("mae").columns(["image"]) == ["image"]
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    batch = {"label": torch.tensor([0, 1, 1])}
    assert clf.eval_sums(logits, batch) == {"correct": 2.0}
    assert clf.eval_metrics({"correct": 2.0}, 4) == {"val_accuracy": 0.5}
    expected = torch.nn.functional.cross_entropy(logits, batch["label"], label_smoothing=0.1)
    torch.testing.assert_close(clf.loss(logits, batch), expected)
    assert float(clf.loss(logits, batch)) != float(ClassifyTask().loss(logits, batch))
    assert set(ClassifyTask.sum_keys) == set(clf.eval_sums(logits, batch))
    with pytest.raises(ValueError, match="unknown task"):
        make_task("segment")


@pytest.mark.parametrize(("grad_accum", "workers", "world", "expected"), [
    (1, 4, 4, 1), (1, 4, 2, 2), (1, 4, 1, 4), (2, 4, 3, 3), (3, 1, 1, 3)])
def test_elastic_runs_keep_the_global_batch_of_max_workers(grad_accum, workers, world,
                                                           expected):
    from pipeline.train.loop import accum_steps

    cfg = TrainConfig.model_validate({"optim": {"grad_accum": grad_accum}, "trainer": {
        "num_workers": [1, workers] if workers > 1 else 1, "max_failures": -1}})
    assert accum_steps(cfg, world) == expected
    assert accum_steps(cfg, world) * world >= grad_accum * workers  # never a smaller batch


def test_elastic_worker_ranges_are_validated():
    with pytest.raises(ConfigError, match=r"trainer.num_workers: .*1 <= min <= max"):
        load_config(TrainConfig, None, ["trainer.num_workers=[3, 2]", "trainer.max_failures=-1"])
    with pytest.raises(ConfigError, match="needs trainer.max_failures > 0 or -1"):
        load_config(TrainConfig, None, ["trainer.num_workers=[1, 2]"])
    cfg = load_config(TrainConfig, None, ["trainer.num_workers=[2, 8]", "trainer.max_failures=3"])
    assert (cfg.trainer.min_workers, cfg.trainer.max_workers, cfg.trainer.elastic) == (2, 8, True)
