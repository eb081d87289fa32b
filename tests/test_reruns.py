"""Reruns of `hip preprocess` that cannot lose data: generations, the output lock, validation
of a dataset on read (by preprocess's "up to date" and by training's pre-flight)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from hip_pipeline import main as cli
from pipeline.data import layout, reader, writer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
LOCK = ".hip-preprocess.lock"
TINY = ["image.size=32", "split.val_fraction=0.2", "shards.max_rows_per_file=8"]


class RayStarted(Exception):
    """Raised by a patched init_ray: the command got past its pre-flight."""


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """30 PNGs in 10 class folders (enough train rows for configs/tiny.yaml: 2 x batch 8)."""
    from pipeline.data.sample_data import write_sample_data

    out = tmp_path_factory.mktemp("reruns-raw")
    write_sample_data(out, per_class=3, seed=2, modalities=("image",), image_size=32)
    return out / "image"


def started(*_args, **_kwargs):
    raise RayStarted


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if a command starts Ray (preprocess) or Ray Train (pretrain)."""
    import pipeline.data.preprocess as preprocess
    import pipeline.train.driver as driver

    monkeypatch.setattr(preprocess, "init_ray", started)
    monkeypatch.setattr(driver, "init_ray", started)


def hip(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def preprocess(capsys, raw: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return hip(capsys, "preprocess", "--modality", "image", "--input", raw, "--output", out,
               *TINY, *extra)


def pretrain(capsys, out: Path) -> tuple[int, str, str]:
    return hip(capsys, "pretrain", "--config", REPO / "configs" / "tiny.yaml",
               f"data.path={out}")


def snapshot(out: Path) -> dict[str, str]:
    """The manifest's text and a hash of every file it lists."""
    text = (out / "manifest.json").read_text()
    files = [f["path"] for fs in json.loads(text)["files"].values() for f in fs]
    return {"manifest.json": text,
            **{p: hashlib.sha256((out / p).read_bytes()).hexdigest() for p in files}}


def listed(out: Path, split: str) -> list[dict]:
    return layout.read_manifest(str(out))["files"][split]


def test_failed_rerun_keeps_the_dataset_and_a_good_one_replaces_it(raw, ray_session, tmp_path,
                                                                    capsys, monkeypatch):
    out = tmp_path / "out"
    assert preprocess(capsys, raw, out)[0] == 0
    before = snapshot(out)
    rows = layout.read_manifest(str(out))["splits"]["train"]

    def boom(self, write_result):  # every shard of the rerun is written, then it fails
        raise RuntimeError("injected failure after the shards were written")

    monkeypatch.setattr(writer.ShardSink, "on_write_complete", boom)
    with pytest.raises(Exception, match="injected failure"):
        preprocess(capsys, raw, out, "--overwrite")
    monkeypatch.undo()
    assert snapshot(out) == before  # the old manifest and every one of its shards, unchanged
    assert reader.open_shards(str(out), "train").count() == rows
    assert not (out / LOCK).exists()

    # A run killed mid-write leaves a generation the manifest does not name.
    (out / "gen-deadbeef" / "train").mkdir(parents=True)
    (out / "gen-deadbeef" / "train" / "part-x.parquet").write_bytes(b"partial")
    rc, stdout, _ = preprocess(capsys, raw, out, "--overwrite")
    assert rc == 0
    m = layout.read_manifest(str(out))
    gen = m["files"]["train"][0]["path"].split("/")[0]
    assert gen.startswith("gen-") and all(
        f["path"].startswith(f"{gen}/") for fs in m["files"].values() for f in fs)
    assert sorted(p.name for p in out.iterdir()) == [gen, "manifest.json"]
    assert not any((out / p).exists() for p in before if p != "manifest.json")
    assert reader.open_shards(str(out), "train").count() == rows == m["splits"]["train"]
    assert f"{out / gen / 'train'}/" in stdout and "removed" in stdout


def test_a_held_lock_refuses_a_second_run_before_ray(raw, tmp_path, capsys, no_ray):
    out = tmp_path / "out"
    out.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": "2026-01-02T03:04:05+00:00", "run_id": "0123abcd"}
    (out / LOCK).write_text(json.dumps(holder))
    rc, _, err = preprocess(capsys, raw, out)
    assert rc == 2
    assert err == (f"hip: error: {out} is being written by another run (host "
                   f"{holder['host']}, pid {os.getpid()}, since 2026-01-02T03:04:05+00:00); "
                   f"if that run is dead, delete {out / LOCK}\n")
    assert json.loads((out / LOCK).read_text()) == holder  # not taken, not released
    assert sorted(p.name for p in out.iterdir()) == [LOCK]


def test_the_lock_is_released_on_ctrl_c_and_only_if_still_ours(raw, tmp_path, capsys,
                                                              monkeypatch):
    import pipeline.data.preprocess as prep
    from pipeline.data import output

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "init_ray", lambda: None)
    monkeypatch.setattr(prep, "_execute", interrupted)  # Ctrl-C during the Ray job
    out = tmp_path / "out"
    rc, _, err = preprocess(capsys, raw, out)
    assert rc == 130 and err == "hip: interrupted\n"
    assert sorted(p.name for p in out.iterdir()) == []  # no lock, no manifest

    # A lock someone replaced (they judged ours dead) is theirs: not removed at our end.
    with output.locked(str(out), "aaaa0000", print):
        assert json.loads((out / LOCK).read_text())["run_id"] == "aaaa0000"
        (out / LOCK).write_text(json.dumps({"run_id": "bbbb0000"}))
    assert json.loads((out / LOCK).read_text()) == {"run_id": "bbbb0000"}


def test_a_dead_runs_lock_is_taken_over(raw, ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(["true"])
    proc.wait()  # its pid is now free: a run that died without releasing its lock
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid,
                                        "started": "2026-01-01T00:00:00+00:00",
                                        "run_id": "dead0000"}))
    rc, _, err = preprocess(capsys, raw, out)
    assert rc == 0
    assert f"taking over the lock of a dead run (host {socket.gethostname()}, pid {proc.pid}" \
        in err
    assert not (out / LOCK).exists() and layout.read_manifest(str(out))["accepted"] == 30


def test_a_truncated_shard_is_rebuilt_and_refused_by_training(raw, ray_session, tmp_path,
                                                               capsys, monkeypatch):
    out = tmp_path / "out"
    assert preprocess(capsys, raw, out)[0] == 0
    entry = listed(out, "train")[1]
    data = (out / entry["path"]).read_bytes()
    (out / entry["path"]).write_bytes(data[: len(data) // 2])

    import pipeline.train.driver as driver

    monkeypatch.setattr(driver, "init_ray", started)  # pretrain only
    rc, _, err = pretrain(capsys, out)
    assert rc == 2 and err.count("\n") == 1, err
    assert err == (f"hip: error: data.path: shard {entry['path']} is {len(data) // 2} bytes, "
                   f"the manifest says {entry['bytes']} (truncated: no readable Parquet "
                   "footer); rerun hip preprocess\n")

    rc, stdout, _ = preprocess(capsys, raw, out)
    assert rc == 0 and "up to date" not in stdout
    assert f"shard {entry['path']} is {len(data) // 2} bytes" in stdout  # the reason
    m = layout.read_manifest(str(out))
    layout.validate(str(out), m)
    assert reader.open_shards(str(out), "train").count() == m["splits"]["train"]


def test_a_manifest_of_another_format_is_refused_and_rebuilt(raw, ray_session, tmp_path,
                                                             capsys, monkeypatch):
    out = tmp_path / "out"
    assert preprocess(capsys, raw, out)[0] == 0
    m = layout.read_manifest(str(out))
    (out / "manifest.json").write_text(json.dumps({**m, "format": "hip-shards/0"}))

    import pipeline.train.driver as driver

    monkeypatch.setattr(driver, "init_ray", started)  # pretrain only
    rc, _, err = pretrain(capsys, out)
    assert rc == 2 and err.count("\n") == 1, err
    assert "'hip-shards/0'" in err and "'hip-shards/1'" in err and "rerun hip preprocess" in err

    rc, stdout, _ = preprocess(capsys, raw, out)
    assert rc == 0 and "up to date" not in stdout and "'hip-shards/0'" in stdout
    assert layout.read_manifest(str(out))["format"] == "hip-shards/1"


def test_old_layout_is_read_and_replaced(raw, ray_session, tmp_path, capsys):
    """Datasets written before generations (shards in <out>/train/) stay readable; the first
    rerun that succeeds removes their folders."""
    out = tmp_path / "out"
    assert preprocess(capsys, raw, out)[0] == 0
    m = layout.read_manifest(str(out))
    gen = m["files"]["train"][0]["path"].split("/")[0]
    for split in os.listdir(out / gen):
        shutil.move(out / gen / split, out / split)
    (out / gen).rmdir()
    for files in m["files"].values():
        for f in files:
            f["path"] = f["path"].removeprefix(f"{gen}/")
    (out / "manifest.json").write_text(json.dumps(m))
    layout.validate(str(out), m)
    assert reader.open_shards(str(out), "train").count() == m["splits"]["train"]

    rc, stdout, _ = preprocess(capsys, raw, out)
    assert rc == 0 and "up to date" in stdout
    assert preprocess(capsys, raw, out, "--overwrite")[0] == 0
    new = layout.read_manifest(str(out))["files"]["train"][0]["path"].split("/")[0]
    assert sorted(p.name for p in out.iterdir()) == [new, "manifest.json"]


def test_a_symlink_cannot_hide_an_overlap(tmp_path, capsys, no_ray):
    src = tmp_path / "in"
    (src / "cls").mkdir(parents=True)
    (src / "cls" / "a.png").write_bytes(b"x")
    (src / "inside").mkdir()
    (tmp_path / "out-link").symlink_to(src / "inside")  # output inside the input
    rc, _, err = hip(capsys, "preprocess", "--modality", "image", "--input", src,
                     "--output", tmp_path / "out-link")
    assert rc == 2 and "overlap" in err and err.count("\n") == 1, err

    out = tmp_path / "out"
    (out / "raw" / "cls").mkdir(parents=True)
    (out / "raw" / "cls" / "a.png").write_bytes(b"x")
    (tmp_path / "in-link").symlink_to(out / "raw")  # input inside the output
    rc, _, err = hip(capsys, "preprocess", "--modality", "image", "--input",
                     tmp_path / "in-link", "--output", out)
    assert rc == 2 and "overlap" in err and err.count("\n") == 1, err
