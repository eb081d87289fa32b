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


def test_learning_benchmark_on_audio_events_uses_log_spectrogram_floors(ray_session, tmp_path,
                                                                        capsys):
    """benchmarks/audio_events.py's clips (deterministic per seed) through the audio arms:
    the quickstart configs feed log-spectrogram frames, and a and d report the regression on
    log-spectrograms."""
    import numpy as np

    from benchmarks import audio_events, learning

    rng = [np.random.default_rng(np.random.SeedSequence([0, 3, 1])) for _ in range(2)]
    clips = [audio_events.make_clip(r, 3, 10, 4000, 0.5) for r in rng]
    assert clips[0].dtype == np.float32 and clips[0].shape == (2000,)
    assert np.array_equal(clips[0], clips[1]) and 0.5 < np.abs(clips[0]).max() <= 0.9 + 1e-6
    audio_events.write(tmp_path / "raw", per_class=3, sample_rate=4000, seconds=0.5, seed=0)
    learning.main(["--modality", "audio", "--data", str(tmp_path / "raw" / "audio"),
                   "--sample-rate", "4000", "--seconds", "0.5", "--arms", "a,d",
                   "--seeds", "1", "--pretrain-steps", "2", "--finetune-steps", "2", "--k", "1",
                   "--threads", "1", "--workdir", str(tmp_path / "work"),
                   "--preprocess-set", "split.val_fraction=0.3", "optim.warmup_steps=1"])
    text = capsys.readouterr().out
    assert "logreg, log-spectrogram (floor)" in text and "| d | logreg, log-spectrogram |" in text
    pre, ft, _ = learning.load_configs(learning.parse_args(["--modality", "audio"]))
    assert pre.data.audio.kind == ft.data.audio.kind == "log_spectrogram"


def test_glyphs_are_deterministic_grey_shapes_that_name_their_class(tmp_path):
    """benchmarks/glyphs.py: same seed, same image; grey strokes on black; the class is in
    the shape: nearest class mean over 30 images per digit names 10 unseen ones per digit
    far above chance (0.46 at 16 px vs 0.1), though every image is moved, turned and
    scaled."""
    import numpy as np

    from benchmarks import glyphs

    def draw(label: int, i: int, size: int = 16) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([9, label, i]))
        return glyphs.make_glyph(rng, label, size)

    one, again = draw(3, 0, 32), draw(3, 0, 32)
    assert one.dtype == np.uint8 and one.shape == (32, 32, 3) and np.array_equal(one, again)
    assert (one[..., 0] == one[..., 1]).all() and (one[..., 1] == one[..., 2]).all()
    assert 0.02 < (one[..., 0] > 150).mean() < 0.4  # strokes, not a filled patch
    train = np.array([[draw(c, i)[..., 0].ravel() / 255 for i in range(30)] for c in range(10)])
    test = np.array([[draw(c, i)[..., 0].ravel() / 255 for i in range(30, 40)]
                     for c in range(10)])
    means = train.mean(1)  # (10, S*S)
    hits = [np.argmin(((means - x) ** 2).sum(1)) == c for c in range(10) for x in test[c]]
    assert np.mean(hits) > 0.35, np.mean(hits)

    assert glyphs.write(tmp_path / "a", per_class=2, size=16, seed=0) == 20
    glyphs.write(tmp_path / "b", per_class=2, size=16, seed=0)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert [f.parent.name for f in files] == [str(c) for c in range(10) for _ in range(2)]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files)
