"""pipeline.data.sample_data: layout, determinism, and that every file decodes to its class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import media
from pipeline.data.sample_data import CLASSES, write_sample_data

SMALL = {"image_size": 32, "sample_rate": 8_000, "audio_seconds": 0.5, "video_size": 32}


def files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def peak_hz(x: np.ndarray, rate: int) -> float:
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(np.abs(np.fft.rfft(x)))])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    counts = write_sample_data(root, per_class=2, seed=0, **SMALL)
    assert counts == {"image": 20, "audio": 20, "video": 20}
    return root


def test_classes():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert all(name.isidentifier() and name.islower() for name in CLASSES)


def test_layout(dataset):
    expected = [
        Path(modality, name, f"{name}_{i:03d}{suffix}")
        for modality, suffix in [("audio", ".wav"), ("image", ".png"), ("video", ".mp4")]
        for name in CLASSES
        for i in range(2)
    ]
    assert files(dataset) == sorted(expected)
    assert all((dataset / path).stat().st_size > 100 for path in expected)


def test_files_decode_with_media(dataset):
    image = media.decode_image((dataset / "image/ring/ring_001.png").read_bytes(), size=32)
    assert image.shape == (32, 32, 3) and image.std() > 10  # a pattern, not a flat colour
    audio = media.decode_audio(
        (dataset / "audio/dots/dots_000.wav").read_bytes(), sample_rate=8_000, num_samples=4_000
    )
    assert audio.shape == (4_000,) and 0.2 < np.abs(audio).max() <= 0.75
    frames, track, has_audio = media.decode_video(
        (dataset / "video/cross/cross_001.mp4").read_bytes(),
        num_frames=8,
        size=32,
        with_audio=True,
        sample_rate=8_000,
        num_samples=8_000,
    )
    assert frames.shape == (8, 32, 32, 3) and has_audio
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1  # the shape moves
    assert 0.2 < np.abs(track).max() <= 0.75


@pytest.mark.parametrize(("name", "hz"), [("circle", 330), ("triangle", 880)])
def test_audio_and_video_sound_carry_the_class(dataset, name, hz):
    wav = media.decode_audio(
        (dataset / f"audio/{name}/{name}_000.wav").read_bytes(), sample_rate=8_000
    )
    _, track, _ = media.decode_video(
        (dataset / f"video/{name}/{name}_000.mp4").read_bytes(),
        size=8,
        with_audio=True,
        sample_rate=8_000,
        num_samples=8_000,
    )
    for sound in (wav[:4_000], track):  # pitch is jittered by at most 8%
        assert abs(peak_hz(sound, 8_000) / hz - 1) < 0.09


def test_images_of_a_class_differ(dataset):
    a, b = (dataset / f"image/circle/circle_00{i}.png" for i in range(2))
    assert a.read_bytes() != b.read_bytes()


def test_same_seed_same_data(dataset, tmp_path):
    write_sample_data(tmp_path, per_class=2, seed=0, **SMALL)
    assert files(tmp_path) == files(dataset)
    for path in files(dataset):
        if path.suffix in (".png", ".wav"):
            assert (tmp_path / path).read_bytes() == (dataset / path).read_bytes(), path
    for path in [Path("video/checker/checker_000.mp4"), Path("video/gradient/gradient_001.mp4")]:
        ours, theirs = (
            media.decode_video((root / path).read_bytes(), size=32, with_audio=True)
            for root in (tmp_path, dataset)
        )
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])


def test_other_seed_other_data(dataset, tmp_path):
    write_sample_data(tmp_path, per_class=2, seed=1, modalities=("image", "audio"), **SMALL)
    for path in files(tmp_path):
        assert (tmp_path / path).read_bytes() != (dataset / path).read_bytes(), path


def test_a_file_does_not_depend_on_what_else_is_written(dataset, tmp_path):
    counts = write_sample_data(tmp_path, per_class=1, seed=0, modalities=("audio",), **SMALL)
    assert counts == {"audio": 10}
    assert {p.parts[0] for p in files(tmp_path)} == {"audio"}
    for path in files(tmp_path):
        assert (tmp_path / path).read_bytes() == (dataset / path).read_bytes(), path


@pytest.mark.parametrize(
    "kwargs",
    [
        {"modalities": ("image", "text")},
        {"per_class": 0},
        {"video_size": 33},
        {"audio_seconds": 0},
        {"sample_rate": 10_000},  # not an AAC rate
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_sample_data(tmp_path, **kwargs)
    assert files(tmp_path) == []  # checked before anything is written
