"""`hip preprocess` against a real GCS JSON API on loopback (gcp-storage-emulator).

Both URI directions: gs:// input -> gs:// output (read and write through gcsfs), then a
gs:// rerun that must be "up to date", an --overwrite rerun that switches to a new generation
and removes the old one, then gs:// input -> local output. The output lock on gs://: a held
lock refuses a run; so does a lost race for it (the emulator ignores the ifGenerationMatch=0
precondition, so the HTTP 412 that GCS would answer is simulated). The session Ray's
workers see GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (set in conftest before Ray starts);
the emulator endpoint travels inside the pickled gcsfs filesystem, so workers need no
STORAGE_EMULATOR_HOST of their own.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from netutil import free_port, serving

from hip_pipeline import main as cli
from pipeline import storage
from pipeline.data import layout, reader
from pipeline.data.output import LOCK

pytestmark = pytest.mark.integration
BUCKET = "hip-test"
TINY = ["image.size=32", "split.val_fraction=0.3"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    port = free_port()
    with serving(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
             "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
            tmp_path_factory.mktemp("gcs") / "emulator.log",
            f"http://127.0.0.1:{port}/storage/v1/b/{BUCKET}", start_timeout=30):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def gcs(emulator, monkeypatch):
    """gcsfs pointed at the emulator (credentials: anonymous, from the environment only)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    fs, _ = storage.resolve(f"gs://{BUCKET}")
    return fs


def test_preprocess_gcs_both_directions(gcs, sample_dir, ray_session, tmp_path, capsys):
    raw, out = f"gs://{BUCKET}/raw", f"gs://{BUCKET}/shards"
    gcs.put(str(sample_dir / "image"), f"{BUCKET}/raw", recursive=True)
    gcs.pipe(f"{BUCKET}/raw/notes/broken.png", b"this is not a png")
    n_good = len(list((sample_dir / "image").glob("*/*.png")))
    assert len(gcs.find(f"{BUCKET}/raw")) == n_good + 1

    args = ["preprocess", "--modality", "image", "--input", raw, "--output", out, *TINY]
    assert cli.main(args) == 0
    m = layout.read_manifest(out)
    assert (m["inputs"], m["accepted"], m["rejected"]) == (n_good + 1, n_good, 1)
    assert m["rejects_by_reason"] == {"not_media": 1}
    assert not gcs.exists(f"{BUCKET}/shards/{LOCK}")
    listed = {f"{BUCKET}/shards/{f['path']}" for s in m["files"].values() for f in s}
    assert listed == set(gcs.find(f"{BUCKET}/shards", withdirs=False)) - {
        f"{BUCKET}/shards/manifest.json"}

    import ray.data

    train = reader.open_shards(out, "train").take_batch(100, batch_format="numpy")
    assert train["image"].shape == (m["splits"]["train"], 32, 32, 3)
    assert train["image"].dtype == np.uint8 and train["image"].any()
    assert all(str(s).startswith(f"{raw}/") for s in train["source"])
    gen = f"{BUCKET}/shards/{m['generation']}"
    val = ray.data.read_parquet(f"{gen}/val", filesystem=gcs).to_pandas()
    assert len(val) == m["splits"]["val"] > 0
    rejects = ray.data.read_parquet(f"{gen}/rejects", filesystem=gcs).to_pandas()
    assert list(rejects["source"]) == [f"{raw}/notes/broken.png"]

    capsys.readouterr()
    assert cli.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert cli.main([*args, "--overwrite"]) == 0
    new = layout.read_manifest(out)
    layout.validate(out, new)
    assert new["generation"] != m["generation"] and new["splits"] == m["splits"]
    assert {p.rsplit("/", 1)[-1] for p in gcs.ls(f"{BUCKET}/shards", detail=False)} == {
        new["generation"], "manifest.json"}

    local = tmp_path / "local"
    assert cli.main(["preprocess", "--modality", "image", "--input", raw, "--output",
                     str(local), *TINY]) == 0
    again = layout.read_manifest(str(local))
    # ids and splits hash the path relative to the input root: same rows on disk as in GCS.
    assert again["splits"] == m["splits"] and again["config_hash"] == m["config_hash"]
    ids = sorted(reader.open_shards(str(local), "val").to_pandas()["id"])
    assert ids == sorted(val["id"])


def test_gcs_lock_refuses_a_second_run(gcs, sample_dir, capsys, monkeypatch):
    import pipeline.data.preprocess as preprocess

    def no_ray():
        raise AssertionError("Ray started")

    monkeypatch.setattr(preprocess, "init_ray", no_ray)
    out, lock = f"gs://{BUCKET}/locked", f"{BUCKET}/locked/{LOCK}"
    holder = {"host": "other-host", "pid": 4242, "started": "2026-01-02T03:04:05+00:00",
              "run_id": "0123abcd"}
    refused = (f"hip: error: {out} is being written by another run (host other-host, pid "
               f"4242, since 2026-01-02T03:04:05+00:00); if that run is dead, delete "
               f"{out}/{LOCK}\n")
    args = ["preprocess", "--modality", "image", "--input", str(sample_dir / "image"),
            "--output", out, *TINY]
    gcs.pipe(lock, json.dumps(holder).encode())
    assert cli.main(args) == 2 and capsys.readouterr().err == refused
    assert json.loads(gcs.cat(lock)) == holder  # another host's lock is never taken over

    # The race: the lock is absent when checked, another run creates it first, and GCS
    # answers our create (ifGenerationMatch=0) with 412, which gcsfs raises as FileExistsError.
    gcs.rm(lock)
    pipe = gcs.pipe

    def racing(path, value=None, **kwargs):
        assert kwargs.get("mode") == "create"  # the precondition is requested
        pipe(path, json.dumps(holder).encode())
        raise FileExistsError(path)

    monkeypatch.setattr(gcs, "pipe", racing)
    assert cli.main(args) == 2 and capsys.readouterr().err == refused
    monkeypatch.undo()
    assert json.loads(gcs.cat(lock)) == holder
