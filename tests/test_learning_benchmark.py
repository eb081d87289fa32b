"""Smoke test of benchmarks/learning.py: every arm runs end to end on a tiny generated set
(3 images per class at 8x8, 2 steps per run) and the table names them all."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_learning_benchmark_prints_every_arm(ray_session, tmp_path, capsys):
    from benchmarks import learning
    from pipeline.data.sample_data import write_sample_data

    write_sample_data(tmp_path / "raw", per_class=3, seed=2, modalities=("image",),
                      image_size=16)
    out = tmp_path / "result.json"
    learning.main(["--data", str(tmp_path / "raw" / "image"), "--size", "8", "--seeds", "1",
                   "--pretrain-steps", "2", "--finetune-steps", "2", "--evals", "2",
                   "--k", "1", "--threads", "1", "--workdir", str(tmp_path / "work"),
                   "--preprocess-set", "split.val_fraction=0.3", "--preprocess-set",
                   "read.concurrency=1", "--json", str(out),
                   "optim.warmup_steps=1"])
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert {line.split("|")[1].strip() for line in table[1:]} == set("abcdef"), text
    assert "linear probe (mean), random encoder" in text and "1/class" in text
    assert "targets:" in text and "MAE pretrain (2 steps)" in text
    saved = json.loads(out.read_text())
    assert {"a:raw", "b", "c", "d:1:mae", "d:1:scratch", "e:mae", "e:random", "f",
            "mae"} <= set(saved["results"])
    assert len(saved["results"]["b"]["history"][0]) == 2  # an eval at each of the 2 steps
