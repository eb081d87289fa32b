"""Cooled-down evaluation (pipeline/train/cooldown.py): the probe reports what an annealed
copy scores and leaves the run exactly as it was.

The loop runs in this process through a TuneSession (the lean trial path) on in-memory
splits, with no Tune: reports are collected, not sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.train import build, loop
from pipeline.train.config import TrainConfig
from pipeline.train.cooldown import Lookahead, lr_scales, probe_length
from pipeline.train.driver import preflight
from pipeline.train.inprocess import datasets
from pipeline.train.session import TuneSession

ROOT = Path(__file__).resolve().parents[1]


class Collect(TuneSession):
    """A TuneSession outside Tune: no checkpoint to resume, reports kept in a list."""

    def __init__(self, data, steps: int) -> None:
        super().__init__(torch.device("cpu"), data, steps, to_tune=False)
        self.reports: list[dict] = []

    def resume_checkpoint(self):
        return None

    def report(self, metrics, checkpoint=None) -> None:
        self.reports.append(dict(metrics))


def run_loop(shards: Path, tmp: Path, cooldown: int, steps: int = 8):
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [
        "trainer.num_workers=1", f"trainer.steps={steps}", "trainer.eval_every=4",
        f"trainer.checkpoint_every={steps}", f"trainer.eval_cooldown_steps={cooldown}",
        "optim.lr=3e-3", "optim.warmup_steps=2", "data.deterministic=true",
        f"data.path={shards}", f"tracking.uri=sqlite:///{tmp}/m.db"])
    cfg, manifest = preflight(cfg)
    data = datasets(cfg, manifest, lambda: pytest.fail("the test splits fit in memory"))
    session = Collect(data, steps)
    args = loop.WorkerArgs(cfg=cfg, manifest=manifest, run_id=None, splits=("train", "val"),
                           local_dir=str(tmp / f"ck-{cooldown}"))
    run = loop.setup(args, session)
    losses = []
    orig = loop.train_step

    def spy(r):
        m = orig(r)
        losses.append(m["loss"])
        return m

    loop.train_step = spy
    try:
        loop.train(run)
    finally:
        loop.train_step = orig
    return run, session.reports, losses


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps on 2 busy cores (see test_learning.one_thread)
    yield
    torch.set_num_threads(before)


def test_the_probe_reports_an_annealed_copy_and_leaves_the_run_unchanged(image_shards,
                                                                           tmp_path, one_thread):
    plain, plain_reports, plain_losses = run_loop(image_shards, tmp_path, cooldown=0)
    cooled, reports, losses = run_loop(image_shards, tmp_path, cooldown=3)
    # The run itself: the same losses at every step and the same final weights.
    assert losses == plain_losses and len(losses) == 8
    for (name, a), b in zip(plain.model.state_dict().items(),
                            cooled.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert cooled.position == plain.position  # the read-ahead batches were all trained on
    # The reports: val_loss as without probes; cooled_val_loss from the annealed copy at
    # step 4 (lower: three more steps of training at a falling rate), the same at the end.
    by_step = {r["step"]: r for r in reports}
    plain_by_step = {r["step"]: r for r in plain_reports}
    assert sorted(by_step) == [4, 8]
    assert all("cooled_val_loss" not in r for r in plain_reports)
    for s in (4, 8):
        assert by_step[s]["val_loss"] == plain_by_step[s]["val_loss"]
    assert by_step[4]["cooled_val_loss"] < by_step[4]["val_loss"]
    assert by_step[8]["cooled_val_loss"] == by_step[8]["val_loss"]


def test_lookahead_hands_out_peeked_batches_in_order_and_tracks_what_was_consumed():
    def make(position):
        while True:
            position["batch"] += 1
            yield position["batch"]

    consumed = {"epoch": 0, "batch": 0}
    it = Lookahead(make, consumed)
    assert next(it) == 1 and consumed["batch"] == 1
    assert it.peek(3) == [2, 3, 4]
    assert consumed["batch"] == 1  # reading ahead consumes nothing
    assert it.peek(2) == [2, 3]
    assert [next(it) for _ in range(4)] == [2, 3, 4, 5]
    assert consumed["batch"] == 5


def test_the_cooldown_rate_falls_linearly_to_the_floor():
    assert lr_scales(3, 0.0) == pytest.approx([0.75, 0.5, 0.25])
    s = lr_scales(4, 0.1)
    assert s == sorted(s, reverse=True) and 0.1 < s[-1] < s[0] < 1.0


def test_probes_grow_with_the_step_and_shrink_as_the_schedule_decays():
    cfg = load_config(TrainConfig, None, [
        "data.path=/x", "trainer.steps=1000", "optim.warmup_steps=100",
        "trainer.eval_cooldown_steps=25"])
    assert [probe_length(s, cfg) for s in (50, 200, 800)] == [25, 25, 25]
    cfg.trainer.eval_cooldown_fraction = 0.5
    k50, k200, k800, k990 = (probe_length(s, cfg) for s in (50, 200, 800, 990))
    assert k50 == 25  # warm-up: 0.5 x 50 x 0.51 = 13 < the floor
    assert k200 == round(0.5 * 200 * build.lr_factor(200, cfg)) and 95 <= k200 <= 100
    assert 25 < k800 < k200  # the cosine has already shed ~90% of the rate
    assert k990 == 10  # never past the end of the run


def test_a_growing_probe_needs_probes_switched_on():
    with pytest.raises(ConfigError, match="eval_cooldown_fraction needs eval_cooldown_steps"):
        load_config(TrainConfig, None, ["data.path=/x", "trainer.eval_cooldown_fraction=0.5"])
