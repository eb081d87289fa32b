"""Tests that fail when the model does not learn or a run does not continue what it loaded.

- A tiny HiP learns a separable synthetic task in-process (no Ray), to well above chance.
- `hip preprocess` + `hip finetune` on the real Ray reach a high validation accuracy.
- A run interrupted and resumed equals the uninterrupted run: per-step losses and weights.
- `hip finetune --init-from` starts from the MAE run's encoder tensors.

Images are "bright quadrant" classes: grey noise with one quadrant brighter, the class.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hip_pipeline import main as cli
from pipeline import tracking
from pipeline.data import layout
from pipeline.train import checkpoints, loop

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
CLASSES = 4  # one per quadrant


def quadrant_images(n: int, size: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images (n, size, size, 3): grey 100 + noise (std 30); quadrant `label` is
    100 brighter. -> (images, labels)."""
    labels = rng.integers(0, CLASSES, n)
    x = 100 + 30 * rng.standard_normal((n, size, size, 3))
    h = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        x[i, r * h:(r + 1) * h, col * h:(col + 1) * h] += 100
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), labels


def run_cli(*args: str) -> None:
    assert cli.main(list(args)) == 0


def loss_history(uri: str, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in tracking.client(uri).get_metric_history(run_id, "loss")}


# ------------------------------------------------------------------------ in-process (no Ray)


@pytest.fixture
def one_thread():
    """One intra-op thread for loops run in this process: on 2 busy cores (other processes,
    Ray workers) torch's spinning OpenMP threads made the 200 small steps of the in-process
    test 30x slower (120 s vs 4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_tiny_hip_learns_a_separable_task_to_well_above_chance(one_thread):
    """Model + input normalisation + AdamW, no Ray: held-out accuracy >= 0.9 (chance 0.25)
    after 200 steps, and the loss falls from ~ln 4. Catches a model whose output ignores its
    input, a broken backward pass or a head that does not train."""
    from models import create_model
    from pipeline.train.batches import to_model_input

    torch.manual_seed(0)
    size = 8
    spec = {"image": (size * size, 3)}
    rng = np.random.default_rng(0)
    images, labels = quadrant_images(768, size, rng)
    x = to_model_input({"image": torch.from_numpy(images)}, spec)["image"]
    y = torch.from_numpy(labels)
    x_train, y_train, x_test, y_test = x[:512], y[:512], x[512:], y[512:]
    model = create_model("hip_tiny", inputs=spec, task="classify", num_classes=CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        idx = torch.randint(0, len(y_train), (32,), generator=g)
        loss = F.cross_entropy(model({"image": x_train[idx]}), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model({"image": x_test}).argmax(-1) == y_test).float().mean().item()
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert first == pytest.approx(math.log(CLASSES), rel=0.3)  # starts near chance
    assert last < 0.25 * first, (first, last)
    assert accuracy >= 0.9, accuracy


def test_a_tiny_hip_learns_sounds_from_log_spectrogram_frames(one_thread):
    """data.audio.kind=log_spectrogram through the pipeline's own input transform: 4 tone
    classes at random phase, level and pitch (+-3%) in noise, int16 as in the shards; held-out
    accuracy >= 0.9 (chance 0.25) after 150 steps."""
    from models import create_model
    from pipeline.train.batches import input_spec, to_model_input
    from pipeline.train.config import AudioFeatures

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sr, n = 8000, 600
    labels = rng.integers(0, CLASSES, n)
    t = np.arange(2000) / sr
    freq = np.array([400.0, 800.0, 1600.0, 3200.0])[labels] * rng.uniform(0.97, 1.03, n)
    level = rng.uniform(0.05, 0.8, n)[:, None]
    clips = level * np.sin(2 * np.pi * freq[:, None] * t + rng.uniform(0, 6.3, (n, 1)))
    clips += 0.05 * rng.standard_normal(clips.shape)
    stored = torch.from_numpy(np.round(np.clip(clips, -1, 1) * 32767).astype(np.int16))
    feats = AudioFeatures(kind="log_spectrogram", window=128, hop=64)
    spec = input_spec({"modality": "audio", "columns": {"audio": {"shape": [2000]}}}, feats)
    x = to_model_input({"audio": stored}, spec, feats)["audio"]  # (n, 32, 65)
    y = torch.from_numpy(labels)
    model = create_model("hip_tiny", inputs=spec, task="classify", num_classes=CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 400, (32,), generator=g)
        loss = F.cross_entropy(model({"audio": x[idx]}), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model({"audio": x[400:]}).argmax(-1) == y[400:]).float().mean().item()
    assert accuracy >= 0.9, accuracy


# ------------------------------------------------------------------------------ on real Ray


@pytest.fixture(scope="module")
def quadrant_shards(ray_session, tmp_path_factory) -> Path:
    """200 8x8 PNGs in 4 class folders (q0..q3) through the real `hip preprocess`."""
    from PIL import Image

    raw = tmp_path_factory.mktemp("quadrants")
    images, labels = quadrant_images(200, 8, np.random.default_rng(1))
    for i, (img, c) in enumerate(zip(images, labels, strict=True)):
        folder = raw / f"q{c}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("quadrant-shards") / "image"
    run_cli("preprocess", "--modality", "image", "--input", str(raw), "--output", str(out),
            "image.size=8", "split.val_fraction=0.25")
    return out


def test_hip_finetune_on_ray_learns_a_separable_task(quadrant_shards, tmp_path):
    """The whole path: PNG class folders -> shards -> Ray Data -> Ray Train worker -> MLflow.
    Catches labels that do not follow their images, broken ingest normalisation, an
    optimizer that does not step, or an LR schedule stuck at 0."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"data: {{path: {quadrant_shards}, deterministic: true}}\n"
        "model: {preset: hip_tiny}\n"
        "optim: {lr: 1.0e-3, warmup_steps: 10, batch_size: 16}\n"
        "trainer: {num_workers: 1, steps: 150, eval_every: 150, checkpoint_every: 150, "
        "log_every: 10}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db', experiment: learning}}\n"
        f"storage: {{path: {tmp_path / 'ck'}}}\n")
    run_cli("finetune", "--config", str(config))
    c = tracking.client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("learning").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "hip finetune"
    assert [d.dataset.name for d in c.get_run(run.info.run_id).inputs.dataset_inputs] == [
        quadrant_shards.name]
    (acc,) = c.get_metric_history(run.info.run_id, "val_accuracy")
    assert acc.step == 150
    assert acc.value > 0.8, acc.value  # chance: 0.25
    losses = loss_history(uri, run.info.run_id)
    assert losses[150] < 0.5 * losses[10], losses


class Interrupted(RuntimeError):
    """Raised by the test's stand-in for loop._maybe_fault: the job dies mid-run."""


def test_a_resumed_run_equals_the_uninterrupted_run(image_shards, tmp_path, monkeypatch, capsys,
                                                     one_thread):
    """Local mode (trainer.num_workers=0), data.deterministic, MAE (random masks every step):
    run 8 steps straight; run the same config again and kill it in step 6 (after the step-4
    checkpoint); rerun it, which resumes from step 4. The resumed run's losses for steps 5-8
    and its final weights must equal the straight run's: it reloaded weights, optimizer and
    schedule, continued the data stream after the batches already consumed and drew the
    same masks. The 8 steps use more batches than one pass over the train split holds, so the
    resumed run also crosses from one pass into the next (each pass reads its files in its
    own order), as the straight one did. From a checkpoint taken inside a later epoch the
    loop's part (position, buffer seed) is test_the_train_stream_resumes_across_epochs; Ray
    Data's per-execution file order restarts then (docs/data-order.md), so such a resume is
    not exact."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["pretrain", "--config", TINY, f"data.path={image_shards}", f"tracking.uri={uri}",
              f"storage.path={tmp_path}/ck", "trainer.num_workers=0", "data.deterministic=true",
              "trainer.steps=8", "trainer.checkpoint_every=4", "trainer.eval_every=4"]
    run_cli(*common, "tracking.run_name=straight")

    real_fault = loop._maybe_fault

    def fault(rank: int, step: int) -> None:
        if step == 6:  # after step 6's update, before its log and report
            raise Interrupted(f"killed in step {step}")
        real_fault(rank, step)

    monkeypatch.setattr(loop, "_maybe_fault", fault)
    with pytest.raises(Interrupted):
        cli.main([*common, "tracking.run_name=resumed"])
    monkeypatch.setattr(loop, "_maybe_fault", real_fault)
    capsys.readouterr()
    run_cli(*common, "tracking.run_name=resumed")
    assert "[hip] resumed from step 4" in capsys.readouterr().out

    c = tracking.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id],
                         order_by=["attributes.start_time ASC"])
    assert [(r.info.run_name, r.info.status) for r in runs] == [
        ("straight", "FINISHED"), ("resumed", "FAILED"), ("resumed", "FINISHED")]
    straight, killed, resumed = (loss_history(uri, r.info.run_id) for r in runs)
    assert runs[2].data.tags["hip.resumed_from_step"] == "4"
    assert sorted(straight) == list(range(1, 9))
    assert sorted(killed) == [1, 2, 3, 4, 5] and sorted(resumed) == [5, 6, 7, 8]
    assert len(set(straight.values())) == 8  # masks and batches change every step
    for step, value in killed.items():
        assert value == pytest.approx(straight[step], rel=1e-6, abs=0), step
    for step, value in resumed.items():
        assert value == pytest.approx(straight[step], rel=1e-6, abs=0), step

    a = checkpoints.load_state(tmp_path / "ck" / "straight" / "checkpoint_000008" / "state.pt")
    b = checkpoints.load_state(tmp_path / "ck" / "resumed" / "checkpoint_000008" / "state.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)
    # The data stream: 8 batches consumed, across an epoch (Ray Data execution) boundary.
    per_epoch = layout.read_manifest(str(image_shards))["splits"]["train"] // 8
    assert b["data"] == a["data"]
    assert a["data"]["epoch"] * per_epoch + a["data"]["batch"] == 8
    assert checkpoints.load_state(tmp_path / "ck" / "resumed" / "checkpoint_000004" /
                                  "state.pt")["data"] == {"epoch": 0, "batch": 4, "world": 1}


def test_data_augment_reaches_the_train_step_and_replays_exactly(image_shards, tmp_path,
                                                                one_thread):
    """Local mode, data.deterministic, classify: with data.augment on and off the first step
    sees the same rows and starts from the same weights, so its loss differs only if the
    loop augmented the batch; a rerun with augmentation logs the same loss (the step seed
    fixes the draw, so a replayed or resumed step augments as before), and the setting is
    an MLflow param."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["finetune", "--config", TINY, f"data.path={image_shards}", f"tracking.uri={uri}",
              f"storage.path={tmp_path}/ck", "trainer.num_workers=0", "data.deterministic=true",
              "trainer.steps=2", "trainer.checkpoint_every=2", "trainer.eval_every=2"]
    on = ["data.augment.shift=3", "data.augment.flip=true"]
    for name, extra in (("plain", []), ("aug", on), ("aug-again", on)):
        run_cli(*common, *extra, f"tracking.run_name={name}")
    c = tracking.client(uri)
    runs = {r.info.run_name: r for r in c.search_runs(
        [c.get_experiment_by_name("hip-tiny").experiment_id])}
    loss = {k: loss_history(uri, r.info.run_id)[1] for k, r in runs.items()}
    assert loss["aug"] != loss["plain"]
    assert loss["aug"] == loss["aug-again"]
    assert runs["aug"].data.params["data.augment.shift"] == "3"


def test_the_train_stream_resumes_across_epochs():
    """loop._batches with a saved position continues exactly where the interrupted stream
    would have: inside an epoch, at an epoch's last batch and in a later epoch (the local
    shuffle seed follows the epoch). A fake shard: batch i of epoch e is (seed, i)."""
    from pipeline.train.config import TrainConfig

    class Shard:
        def iter_torch_batches(self, *, drop_last, batch_size, device, local_shuffle_seed,
                               local_shuffle_buffer_size):
            for i in range(3):  # 3 batches per epoch
                yield {"image": torch.tensor([local_shuffle_seed, i]), "other": torch.zeros(1)}

    ctx = loop._Ctx(TrainConfig(), {}, None, rank=0, world=1, device=torch.device("cpu"))

    def stream(position=None):
        return loop._batches(Shard(), ctx, ["image"], train=True, position=position)

    straight = [tuple(b["image"].tolist()) for _, b in zip(range(10), stream(), strict=False)]
    assert straight[:4] == [(0, 0), (0, 1), (0, 2), (1000, 0)]  # epoch 1's seed differs
    for consumed in range(1, 9):
        pos = {"epoch": 0, "batch": 0}
        it = stream(pos)
        for _ in range(consumed):
            next(it)
        saved = dict(pos)  # what the checkpoint after `consumed` batches holds
        assert saved["epoch"] * 3 + saved["batch"] == consumed
        rest = [tuple(b["image"].tolist()) for _, b in
                zip(range(10 - consumed), stream(saved), strict=False)]
        assert rest == straight[consumed:], consumed


def test_finetune_init_from_an_mae_run_starts_from_its_encoder_tensors(
        image_shards, tmp_path, monkeypatch, capsys, one_thread):
    """Pretrain (trainer.seed 7) then `hip finetune --init-from <run id>` (seed 0), both in
    local mode: the classifier's weights when the optimizer is built (before step 1) equal
    the MAE run's final checkpoint for every tensor they share, and the job says how many
    tensors it loaded. The seeds differ so that an unloaded classifier cannot match."""
    from pipeline.train.config import TrainConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"data.path={image_shards}", f"tracking.uri={uri}", f"storage.path={tmp_path}/ck",
              "trainer.num_workers=0"]
    run_cli("pretrain", "--config", TINY, *common, "tracking.run_name=mae", "trainer.seed=7",
            "trainer.steps=2", "trainer.checkpoint_every=2", "trainer.eval_every=2")
    c = tracking.client(uri)
    (pre,) = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id])
    mae = checkpoints.load_state(tmp_path / "ck" / "mae" / "checkpoint_000002" / "state.pt")
    capsys.readouterr()

    at_start = {}
    real_make_optimizer = loop.make_optimizer

    def spy(model, cfg):  # called once the model is built, loaded and prepared
        at_start.update({k: v.detach().clone()
                         for k, v in checkpoints.unwrap(model).state_dict().items()})
        return real_make_optimizer(model, cfg)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    run_cli("finetune", "--config", TINY, "--init-from", pre.info.run_id, *common,
            "tracking.run_name=ft", "trainer.steps=1")
    out = capsys.readouterr().out
    shared = sorted(set(at_start) & set(mae["model"]))
    assert len(shared) > 10 and all(k.startswith("backbone.") for k in shared)
    assert all(k.startswith("head.") for k in set(at_start) - set(mae["model"]))
    for k in shared:
        assert torch.equal(at_start[k], mae["model"][k]), k
    m = re.search(r"\[hip\] initialised (\d+) tensors from (\S+);", out)
    assert m, out
    assert int(m.group(1)) == len(shared) and m.group(2) == pre.info.run_id
    (ft,) = c.search_runs([c.get_experiment_by_name("hip-tiny").experiment_id],
                          "tags.`hip.task` = 'classify'")
    assert ft.data.tags[loop.INIT_TENSORS_TAG] == str(len(shared))
    # A classifier that skipped the load would not match: its own init differs.
    torch.manual_seed(0)  # as the finetune's loop seeds before building (trainer.seed 0)
    fresh = loop.build_model(TrainConfig(task="classify"),
                              layout.read_manifest(str(image_shards))).state_dict()
    differ = [k for k in shared if not torch.equal(fresh[k], mae["model"][k])]
    assert len(differ) > len(shared) // 2
