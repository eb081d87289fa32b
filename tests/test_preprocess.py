"""`hip preprocess` end to end through the CLI on real files and a real local Ray."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hip_pipeline import main as cli
from pipeline.data import codec, layout, reader
from pipeline.data.output import LOCK

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- bad input files


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header declaring side x side pixels over a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def wav(samples: int, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(samples, np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def frameless(mp4: bytes) -> bytes:
    """A valid MP4 container whose media data is zeroed: no frame decodes."""
    i = mp4.find(b"mdat")
    size = struct.unpack(">I", mp4[i - 4 : i])[0]
    return mp4[: i + 4] + b"\0" * (size - 8) + mp4[i - 4 + size :]


def first(folder: Path, pattern: str) -> bytes:
    return sorted(folder.rglob(pattern))[0].read_bytes()


def bad_files(kind: str, src: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected reject reason) for the bad inputs of one modality."""
    if kind == "image":
        png = first(src, "*.png")
        return {"zero.png": (b"", "empty_file"), "text.png": (b"just some text\n", "not_media"),
                "truncated.png": (png[: len(png) // 2], "corrupt"),
                "bomb.png": (png_bomb(), "too_large")}
    if kind == "audio":  # min_seconds=0.25 at 8 kHz: 100 samples are too short
        return {"zero.wav": (b"", "empty_file"), "short.wav": (wav(100), "too_short"),
                "nosamples.wav": (wav(0), "no_samples")}
    mp4 = first(src, "*.mp4")
    return {"zero.mp4": (b"", "empty_file"), "frameless.mp4": (frameless(mp4), "no_frames"),
            "text.mp4": (b"not a video\n", "not_media")}


@pytest.fixture(scope="module")
def inputs(sample_dir, tmp_path_factory) -> dict[str, tuple[Path, dict[str, str]]]:
    """kind -> (input folder = sample files + bad files, {bad file name: reason})."""
    out = {}
    for kind in ("image", "audio", "video"):
        folder = tmp_path_factory.mktemp(f"raw-{kind}")
        shutil.copytree(sample_dir / kind, folder, dirs_exist_ok=True)
        expected = {}
        for name, (data, reason) in bad_files(kind, folder).items():
            (folder / name).write_bytes(data)  # top level: unlabeled, not a class folder
            expected[name] = reason
        (folder / "README.txt").write_text("not an input: wrong extension\n")
        out[kind] = (folder, expected)
    return out


# Tiny normalisation keeps the suite fast on 2 cores; val_fraction 0.3 gives both splits
# rows from 40 files.
TINY = ["image.size=32", "audio.sample_rate=8000", "audio.seconds=0.5", "video.frames=4",
        "video.size=32", "split.val_fraction=0.3", "audio.min_seconds=0.25"]


def preprocess(capsys, *args: str, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """`hip preprocess ARGS TINY EXTRA` in-process; later overrides win."""
    rc = cli.main(["preprocess", *args, *TINY, *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_split(out: Path, split: str) -> dict[str, np.ndarray]:
    """All rows of the split's files (as the manifest lists them) via ray.data.read_parquet;
    tensor columns are raw bytes on disk, rebuilt as (B, *shape) arrays from the manifest's
    shapes."""
    import ray.data

    manifest = layout.read_manifest(str(out))
    tensors = codec.tensor_column_schema(manifest)
    ds = ray.data.read_parquet(layout.shard_uris(str(out), split, manifest),
                               tensor_column_schema=tensors if split != "rejects" else None)
    return ds.take_batch(10_000, batch_format="numpy")


# ---------------------------------------------------------------------- every modality

SHAPES = {
    "image": {"image": ((32, 32, 3), np.uint8)},
    "audio": {"audio": ((4000,), np.int16)},  # audio.dtype's default
    "video": {"video": ((4, 32, 32, 3), np.uint8)},
    "audio+video": {"video": ((4, 32, 32, 3), np.uint8), "audio": ((4000,), np.int16),
                    "has_audio": ((), np.bool_)},
}


@pytest.mark.parametrize("modality", ["image", "audio", "video", "audio+video"])
def test_preprocess_modality(modality, inputs, ray_session, tmp_path, capsys):
    folder, bad = inputs["video" if modality == "audio+video" else modality]
    out = tmp_path / "shards"
    rc, stdout, _ = preprocess(capsys, "--modality", modality, "--input", str(folder),
                               "--output", str(out))
    assert rc == 0
    m = layout.read_manifest(str(out))
    good = len(list(folder.glob("*/*.*")))  # sample files live in class folders
    assert good == 40 and m["inputs"] == good + len(bad)
    assert m["accepted"] == good and m["rejected"] == len(bad)
    assert m["accepted"] + m["rejected"] == m["inputs"] and m["ignored_files"] == 1
    assert m["splits"]["train"] > 0 and m["splits"]["val"] > 0
    assert len(m["classes"]) == 10 and sum(m["label_counts"].values()) == good
    assert not (out / LOCK).exists()
    assert f"{m['inputs']} inputs -> {good} accepted" in stdout
    assert str(out / m["generation"] / "train") in stdout

    for split in ("train", "val"):
        rows = read_split(out, split)
        assert len(rows["id"]) == m["splits"][split]
        assert set(rows["split"]) == {split}
        # The split is a pure function of the id (a hash of the relative path).
        assert all((int(str(i)[:8], 16) / 2**32 < 0.3) == (split == "val") for i in rows["id"])
        for column, (shape, dtype) in SHAPES[modality].items():
            assert rows[column].shape == (len(rows["id"]), *shape) and rows[column].dtype == dtype
        names = [str(n) for n in rows["label_name"]]
        assert list(rows["label"]) == [m["classes"].index(n) for n in names]
        parents = [Path(str(s)).parent.name for s in rows["source"]]
        assert parents == names
    first_tensor = next(iter(SHAPES[modality]))
    assert read_split(out, "train")[first_tensor].any()  # real pixels / samples, not zeros
    if modality == "audio+video":
        assert read_split(out, "train")["has_audio"].all()  # sample clips carry a tone

    rejects = read_split(out, "rejects")
    assert set(rejects) == {"source", "id", "reason", "detail"}
    sources = [Path(str(s)).name for s in rejects["source"]]
    got = dict(zip(sources, (str(r) for r in rejects["reason"]), strict=True))
    assert got == bad
    assert m["rejects_by_reason"] == {r: list(bad.values()).count(r) for r in set(bad.values())}


@pytest.mark.parametrize("write", ["fused", "separate"])
def test_manifest_records_config_and_files(inputs, ray_session, tmp_path, capsys, write):
    import ray.data

    folder, _ = inputs["image"]
    out = tmp_path / "out"
    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    code, text, _ = preprocess(capsys, "--modality", "image", "--input", str(folder),
                               "--output", str(out), "shards.max_rows_per_file=5",
                               f"shards.write={write}",
                               f"read.op_reservation={str(write == 'separate').lower()}")
    assert code == 0 and f"5 rows/file, {write} write" in text
    # The job's Ray Data setting does not leak into later jobs of this process.
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled == before
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["image"]["size"] == 32 and m["config"]["shards"]["max_rows_per_file"] == 5
    assert m["config"]["shards"]["write"] == write
    assert m["columns"]["image"] == {"shape": [32, 32, 3], "dtype": "uint8"}
    assert "image: fixed_size_binary[3072]" in m["schema"]["rows"]
    assert "reason" in m["schema"]["rejects"]
    import pyarrow.parquet as pq

    field = pq.read_schema(out / m["files"]["train"][0]["path"]).field("image")
    assert field.metadata == {b"hip.shape": b"[32, 32, 3]", b"hip.dtype": b"uint8"}
    assert len(m["config_hash"]) == 64 and len(m["input_fingerprint"]) == 64
    gen = m["generation"]
    assert sorted(p.name for p in out.iterdir()) == [gen, "manifest.json"]
    for split in ("train", "val"):  # every file listed, none over the row bound
        listed = sorted(f["path"] for f in m["files"][split])
        on_disk = sorted(f"{gen}/{split}/{p.name}" for p in (out / gen / split).glob("*"))
        assert listed == on_disk and all(0 < f["rows"] <= 5 for f in m["files"][split])
        assert sum(f["rows"] for f in m["files"][split]) == m["splits"][split]
    # open_shards reads exactly the listed files: a stray file in train/ is not read.
    shutil.copy(out / m["files"]["train"][0]["path"], out / gen / "train" / "stray.parquet")
    ds = reader.open_shards(str(out), "train")
    assert ds.count() == m["splits"]["train"]
    assert ds.take_batch(1, batch_format="numpy")["image"].shape == (1, 32, 32, 3)


def test_labels_csv_and_unlabeled(inputs, ray_session, tmp_path, capsys):
    folder, _ = inputs["audio"]
    wavs = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.wav"))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{i % 2}\n" for i, p in enumerate(wavs[:6]))
                   + "missing.wav,1\n")
    out = tmp_path / "out"
    assert preprocess(capsys, "--modality", "audio", "--input", str(folder), "--output",
                      str(out), "--labels", str(csv))[0] == 0
    m = layout.read_manifest(str(out))
    assert m["classes"] == ["0", "1"] and m["labels_unmatched"] == 1
    assert m["label_counts"] == {"0": 3, "1": 3, "(unlabeled)": 34}
    labels = {}
    for split in ("train", "val"):
        rows = read_split(out, split)
        sources = [str(s) for s in rows["source"]]
        labels.update(zip(sources, (int(x) for x in rows["label"]), strict=True))
    assert labels[str(folder / wavs[0])] == 0 and labels[str(folder / wavs[1])] == 1
    assert labels[str(folder / wavs[10])] == -1


def test_int16_audio_shards_hold_the_float32_decode_to_half_a_step(inputs, ray_session,
                                                                 tmp_path, capsys):
    import torch

    from pipeline.config import load_config
    from pipeline.data.config import PreprocessConfig
    from pipeline.data.decode import DecodeSpec
    from pipeline.train.batches import input_spec, to_model_input

    folder, _ = inputs["audio"]
    out = tmp_path / "out"
    assert preprocess(capsys, "--modality", "audio", "--input", str(folder), "--output",
                      str(out))[0] == 0
    m = layout.read_manifest(str(out))
    assert m["columns"]["audio"]["dtype"] == "int16" and m["config"]["audio"]["dtype"] == "int16"
    rows = read_split(out, "train")
    assert rows["audio"].dtype == np.int16 and rows["audio"].shape[1:] == (4000,)
    assert np.abs(rows["audio"]).max() > 1000  # real signal, not silence
    # Training's view of the int16 rows equals the float32 decode of the same files.
    cfg = load_config(PreprocessConfig, None, [*TINY, "audio.dtype=float32"],
                      {"modality": "audio"})
    spec = DecodeSpec.from_config(cfg)
    assert spec.tensors == {"audio": ((4000,), "float32")}
    want = np.stack([spec.decode(Path(s).read_bytes())["audio"] for s in rows["source"][:8]])
    got = to_model_input({"audio": torch.from_numpy(rows["audio"][:8])}, input_spec(m))["audio"]
    assert got.shape == (8, 4000, 1)
    assert np.abs(got[..., 0].numpy() - np.clip(want, -1, 1)).max() <= 0.5 / 32767 + 1e-7


# ---------------------------------------------------------------------- reruns and crashes


def test_rerun_overwrite_and_crash_recovery(inputs, ray_session, tmp_path, capsys):
    folder, _ = inputs["image"]
    out = tmp_path / "out"
    args = ("--modality", "image", "--input", str(folder), "--output", str(out))
    assert preprocess(capsys, *args)[0] == 0
    first = layout.read_manifest(str(out))
    files = sorted(p.name for p in out.rglob("*.parquet"))

    rc, stdout, _ = preprocess(capsys, *args)  # same inputs + config: skipped
    assert rc == 0 and "up to date" in stdout
    assert layout.read_manifest(str(out))["created"] == first["created"]
    assert sorted(p.name for p in out.rglob("*.parquet")) == files

    assert preprocess(capsys, *args, "--overwrite")[0] == 0  # rewritten, not appended
    again = layout.read_manifest(str(out))
    assert again["splits"] == first["splits"] and again["rejected"] == first["rejected"]
    assert len(read_split(out, "train")["id"]) == first["splits"]["train"]
    assert not set(files) & {p.name for p in out.rglob("*.parquet")}  # new run, new files

    # A finished output that lost a shard file is not "up to date": it is rebuilt.
    (out / again["files"]["val"][0]["path"]).unlink()
    rc, stdout, _ = preprocess(capsys, *args)
    assert rc == 0 and "up to date" not in stdout and "is missing" in stdout
    assert len(read_split(out, "val")["id"]) == first["splits"]["val"]

    # A different config without --overwrite is refused.
    rc, _, err = preprocess(capsys, *args, extra=("image.size=16",))
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1

    # Crashes: no manifest, the generation of a run that never switched to it, and what a
    # crash of the layout before generations left (its marker, a partial train/ file).
    # Not "done"; no duplicates; all of it removed.
    m = layout.read_manifest(str(out))
    (out / "manifest.json").unlink()
    (out / "_HIP_INCOMPLETE").write_text("{}")
    (out / "train").mkdir()
    shutil.copy(out / m["files"]["train"][0]["path"], out / "train" / "part-crashed.parquet")
    rc, stdout, _ = preprocess(capsys, *args)
    assert rc == 0 and "up to date" not in stdout
    m = layout.read_manifest(str(out))
    assert len(read_split(out, "train")["id"]) == m["splits"]["train"] == first["splits"]["train"]
    assert sorted(p.name for p in out.iterdir()) == [m["generation"], "manifest.json"]


def test_foreign_folder_is_not_overwritten(inputs, tmp_path, capsys):
    folder, _ = inputs["image"]
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "precious.parquet").write_bytes(b"not ours")
    rc, _, err = preprocess(capsys, "--modality", "image", "--input", str(folder),
                            "--output", str(out))
    assert rc == 2 and "no manifest.json" in err
    assert (out / "train" / "precious.parquet").exists()


# ---------------------------------------------------------------------- pre-flight errors

PREFLIGHT = r"""
import contextlib, io, json, os, sys
import ray
from hip_pipeline import main as cli
tmp = sys.argv[1]
os.makedirs(f"{tmp}/empty/cls"); open(f"{tmp}/empty/cls/notes.txt", "w").write("x")
os.makedirs(f"{tmp}/ok/cls"); open(f"{tmp}/ok/cls/a.png", "wb").write(b"x")
open(f"{tmp}/afile", "w").write("x")
cases = {
    "missing": ["--input", f"{tmp}/nope", "--output", f"{tmp}/o1"],
    "empty": ["--input", f"{tmp}/empty", "--output", f"{tmp}/o2"],
    "unwritable": ["--input", f"{tmp}/ok", "--output", f"{tmp}/afile/sub"],
    "bad_override": ["--input", f"{tmp}/ok", "--output", f"{tmp}/o3", "image.size=big"],
    "unknown_key": ["--input", f"{tmp}/ok", "--output", f"{tmp}/o4", "image.sise=32"],
    "overlap": ["--input", f"{tmp}/ok", "--output", f"{tmp}/ok/out"],
}
result = {}
for name, args in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["preprocess", "--modality", "image", *args])
    result[name] = [rc, err.getvalue()]
result["ray_initialized"] = ray.is_initialized()
print(json.dumps(result))
"""


def test_preflight_errors_exit_2_before_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("ray_initialized") is False
    expected = {"missing": "does not exist", "empty": "no image files",
                "unwritable": "not writable", "bad_override": "image.size",
                "unknown_key": "did you mean image.size", "overlap": "overlap"}
    for name, (rc, err) in result.items():
        assert rc == 2, (name, err)
        assert err.startswith("hip: error: ") and err.count("\n") == 1, (name, err)
        assert expected[name] in err, (name, err)
        assert "Traceback" not in err


# ---------------------------------------------------------------------- the console script


def test_console_script(sample_dir, tmp_path):
    """The installed `hip` entry point, its own Ray, a tiny input."""
    hip = Path(sys.executable).parent / "hip"
    raw = tmp_path / "raw"
    for cls in sorted((sample_dir / "image").iterdir())[:2]:
        shutil.copytree(cls, raw / cls.name)
        for extra in sorted((raw / cls.name).iterdir())[2:]:
            extra.unlink()  # 2 classes x 2 files
    out = tmp_path / "out"
    cmd = [str(hip), "preprocess", "--config", str(REPO / "configs/preprocess-default.yaml"),
           "--modality", "image", "--input", str(raw), "--output", str(out), "image.size=16",
           "read.concurrency=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = layout.read_manifest(str(out))
    assert m["inputs"] == m["accepted"] == 4 and m["rejected"] == 0
    assert "done: 4 inputs -> 4 accepted" in proc.stdout
    assert m["config"]["image"]["size"] == 16 and m["config"]["read"]["concurrency"] == 2
    bad = subprocess.run([str(hip), "preprocess", "--modality", "image"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr == "hip: error: --input is required\n"


def test_sample_data_command(tmp_path, capsys):
    assert cli.main(["sample-data", "--out", str(tmp_path), "--per-class", "1"]) == 0
    assert "10 image, 10 audio, 10 video" in capsys.readouterr().out
    assert len(list(tmp_path.glob("image/*/*.png"))) == 10
    assert len(list(tmp_path.glob("video/*/*.mp4"))) == 10
    assert cli.main(["sample-data", "--out", str(tmp_path), "--per-class", "0"]) == 2
