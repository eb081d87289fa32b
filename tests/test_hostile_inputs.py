"""Inputs that used to hang or end `hip preprocess`: every one now ends as a row.

A FIFO and a link to /dev/zero (reading blocks / never ends), a dangling link, a file name
that is not UTF-8, a class folder named "²", a file over read.max_file_mb, and decoders that
crash or hang (the test-only fault hook of pipeline/data/isolate.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from hip_pipeline import main as cli
from pipeline.data import layout, reader
from pipeline.data.config import PreprocessConfig
from pipeline.data.decode import DecodeSpec, decode_batch
from pipeline.data.isolate import DECODE_FAULT_ENV
from pipeline.data.listing import escape_path, list_inputs, unescape_path

NAMES = ["plain.png", "caf\udce9.png", "a\\b.png", "a\\xe9.png", "é²", "\udcff\\\udc80x",
         "tab\t\udcc3(.png", ""]


@pytest.mark.parametrize("name", NAMES)
def test_file_names_round_trip_losslessly_through_utf8(name):
    text = escape_path(name)
    text.encode("utf-8")  # valid UTF-8: what Arrow string columns need
    assert unescape_path(text) == name
    if "\\" not in name and name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") \
            == name:
        assert text == name  # ordinary names are stored as they are


def png(path: Path, colour=(10, 20, 30)) -> None:
    Image.new("RGB", (20, 20), colour).save(path)


@pytest.fixture
def hostile(tmp_path) -> Path:
    """12 good images in classes "cats" and "²", plus one input of every hostile kind."""
    root = tmp_path / "in"
    for cls, colour in (("cats", (200, 30, 30)), ("²", (30, 30, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            png(root / cls / f"{i}.png", colour)
    bad = root / "cats"
    os.mkfifo(bad / "fifo.png")
    os.symlink("/dev/zero", bad / "zero.png")
    os.symlink(root / "missing.png", bad / "dangling.png")
    png(Path(os.fsdecode(bytes(bad) + b"/caf\xe9.png")))  # a good image, non-UTF-8 name
    (bad / "text.png").write_text("not an image\n")
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)
    Image.fromarray(noise).save(bad / "huge.png")  # ~120 kB: over read.max_file_mb below
    png(bad / "crashme.png")
    png(bad / "hangme.png")
    return root


def test_listing_rejects_special_files_and_oversized_ones_without_reading(hostile):
    cfg = PreprocessConfig(modality="image", input=str(hostile), read={"max_file_mb": 0.002})
    listing = list_inputs(cfg)
    by_name = {Path(unescape_path(r["path"])).name: r for r in listing.rows}
    assert {n: by_name[n]["reject"] for n in ("fifo.png", "zero.png", "dangling.png")} == \
        dict.fromkeys(("fifo.png", "zero.png", "dangling.png"), "not_a_file")
    assert by_name["huge.png"]["reject"] == "too_large"
    assert "read.max_file_mb" in by_name["huge.png"]["detail"]
    assert by_name["caf\udce9.png"]["reject"] == "" and "caf\\xe9.png" in by_name[
        "caf\udce9.png"]["source"]
    assert listing.classes == ["cats", "²"]  # "²" is a name, not the number 2
    assert listing.count == 20


def test_a_crashing_or_hanging_decoder_costs_only_its_file(monkeypatch, tmp_path):
    """In-process (no Ray): the batch finishes; the culprits are rejects with the reason."""
    names = ["a", "crashme", "b", "hangme", "c"]
    for n in names:
        png(tmp_path / f"{n}.png")
    monkeypatch.setenv(DECODE_FAULT_ENV, "crash:crashme;hang:hangme")
    spec = DecodeSpec.from_config(PreprocessConfig(
        modality="image", image={"size": 8}, read={"file_timeout_s": 2}))
    n = len(names)
    batch = {"path": np.array([str(tmp_path / f"{x}.png") for x in names]),
             "id": np.array(names), "label_name": np.array([""] * n),
             "source": np.array(names), "split": np.array(["train"] * n),
             "label": np.full(n, -1), "size": np.zeros(n, int),
             "reject": np.array([""] * n), "detail": np.array([""] * n)}
    start = time.monotonic()
    table = decode_batch(batch, spec, fsspec.filesystem("file"))
    assert time.monotonic() - start < 60
    rows = {r["id"]: r for r in table.select(["id", "split", "reason", "detail"]).to_pylist()}
    assert {k: r["reason"] for k, r in rows.items()} == {
        "a": "", "crashme": "crashed", "b": "", "hangme": "timeout", "c": ""}
    assert "SIGABRT" in rows["crashme"]["detail"]
    assert "file_timeout_s=2" in rows["hangme"]["detail"]
    images = table.column("image")
    assert all(images[i].as_py() != bytes(len(images[i].as_py())) for i in (0, 2, 4))


@pytest.mark.integration
def test_preprocess_finishes_on_a_hostile_folder(hostile, tmp_path, monkeypatch, ray_session,
                                                 capsys):
    monkeypatch.setenv(DECODE_FAULT_ENV, "crash:crashme;hang:hangme")
    out = tmp_path / "shards"
    start = time.monotonic()
    code = cli.main(["preprocess", "--modality", "image", "--input", str(hostile),
                     "--output", str(out), "image.size=16", "read.file_timeout_s=3",
                     "read.max_file_mb=0.002", "split.val_fraction=0"])
    assert code == 0, capsys.readouterr().err
    assert time.monotonic() - start < 180
    manifest = layout.read_manifest(str(out))
    assert manifest["inputs"] == 20 and manifest["accepted"] == 13
    assert manifest["rejects_by_reason"] == {"not_a_file": 3, "too_large": 1, "not_media": 1,
                                             "crashed": 1, "timeout": 1}
    assert manifest["classes"] == ["cats", "²"]
    rejects = {Path(r["source"]).name: r["reason"] for r in
               reader.open_shards(str(out), layout.REJECTS).take_all()}
    assert rejects == {"fifo.png": "not_a_file", "zero.png": "not_a_file",
                       "dangling.png": "not_a_file", "huge.png": "too_large",
                       "text.png": "not_media", "crashme.png": "crashed",
                       "hangme.png": "timeout"}
    sources = {r["source"] for r in reader.open_shards(str(out), "train").take_all()}
    assert any(s.endswith("caf\\xe9.png") for s in sources)


def test_remote_fetch_waves_stay_within_the_byte_budget():
    from pipeline.data.decode import _waves

    sizes = [40, 30, 50, 200, 10, 10, 90]
    waves = list(_waves(sizes, 100))
    assert [i for w in waves for i in w] == list(range(len(sizes)))  # each once, in order
    assert waves == [[0, 1], [2], [3], [4, 5], [6]]
    assert all(sum(sizes[i] for i in w) <= 100 for w in waves if len(w) > 1)
