"""Shared fixtures: ONE real local Ray per test session, and the sample dataset on disk.

Environment set at import time, i.e. before any Ray worker or gcsfs import exists:
- RAY_AUTH_MODE=disabled: local clusters default to token auth in Ray 2.60.
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs >= 2026 otherwise probes every bucket over
  gRPC, which hangs ~60 s against the GCS emulator (docs/ray-notes.md). gcsfs reads it on import,
  and Ray workers inherit the driver's environment when the session Ray starts.
- RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5: see below.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Ray Train's controller polls its workers every 2 s by default; every run waits for the
# poll after its last step. 0.5 s saves ~1-2 s on each of the suite's ~25 training runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

SAMPLE_PER_CLASS = 4  # x 10 classes = 40 files per modality


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (4 logical CPUs on 2 cores, see docs/ray-notes.md), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=300 * 1024**2,
            include_dashboard=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray 2.60's default Parquet reader starts 32 footer-reading actors per read_parquet
    # call (~10 s each on 2 cores); the V1 reader reads these small test shards in ~0.3 s.
    ctx.use_datasource_v2 = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The embedded sample dataset (real PNG / WAV / MP4 files), written once per session:
    <dir>/image/<class>/*.png, <dir>/audio/<class>/*.wav, <dir>/video/<class>/*.mp4."""
    from pipeline.data.sample_data import write_sample_data

    out = tmp_path_factory.mktemp("sample")
    counts = write_sample_data(out, per_class=SAMPLE_PER_CLASS, seed=0, image_size=48,
                               sample_rate=8000, audio_seconds=0.5, video_frames=6,
                               video_size=32)
    assert all(n > 0 for n in counts.values()), counts
    return out


@pytest.fixture(scope="session")
def image_shards(ray_session, tmp_path_factory) -> Path:
    """60 sample images preprocessed to 16x16 shards (train + val) for the training tests:
    enough rows for 2 workers x batch 8."""
    from hip_pipeline import main as cli
    from pipeline.data.sample_data import write_sample_data

    raw = tmp_path_factory.mktemp("train-sample")
    write_sample_data(raw, per_class=6, seed=1, modalities=("image",), image_size=16)
    out = tmp_path_factory.mktemp("shards") / "image"
    rc = cli.main(["preprocess", "--modality", "image", "--input", str(raw / "image"),
                   "--output", str(out), "image.size=16", "split.val_fraction=0.25"])
    assert rc == 0
    return out

