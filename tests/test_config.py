"""Config loading: YAML + dotted overrides, one-line errors, hashing, shipped YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from hip_pipeline import main as cli
from pipeline.config import ConfigError, config_hash, config_to_dict, load_config, parse_override
from pipeline.data.config import PreprocessConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(*overrides: str, path: Path | None = None, **values) -> PreprocessConfig:
    return load_config(PreprocessConfig, path, ["modality=image", *overrides], values)


def test_defaults_match_the_hip_presets():
    cfg = load()
    assert cfg.image.size == 224 and cfg.video.frames == 8 and cfg.split.val_fraction == 0.1
    assert cfg.audio.sample_rate == 48_000 and cfg.audio.num_samples == 122_880


@pytest.mark.parametrize("text, expected", [
    ("image.size=32", ("image.size", 32)),
    ("audio.seconds=0.5", ("audio.seconds", 0.5)),
    ("labels=null", ("labels", None)),
    ("labels=", ("labels", None)),
    ("output=gs://b/x=y", ("output", "gs://b/x=y")),
    ("modality=audio+video", ("modality", "audio+video")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["image.size", "=3", "image..size=3", "1x=2", "a b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(bad)


def test_file_then_overrides_then_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modality: audio\nimage: {size: 64}\naudio: {sample_rate: 16000}\n")
    cfg = load_config(PreprocessConfig, path, ["image.size=96", "audio.seconds=1"],
                      {"input": "yes", "image.size": 128})
    assert cfg.modality == "audio" and cfg.audio.sample_rate == 16_000
    assert cfg.audio.num_samples == 16_000
    assert cfg.image.size == 128  # typed values win over overrides, overrides over the file
    assert cfg.input == "yes"  # a flag value is never YAML-parsed into True


def test_unknown_key_names_the_dotted_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        load("image.sise=32")
    msg = str(e.value)
    assert "image.sise: unknown key (did you mean image.size?)" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"colour: unknown key \(known: .*modality"):
        load("colour=1")


def test_bad_values_are_all_reported_on_one_line():
    with pytest.raises(ConfigError) as e:
        load("image.size=big", "split.val_fraction=1.5", "read.strategy=threads")
    msg = str(e.value)
    assert "\n" not in msg and msg.count(";") == 2
    assert "image.size: " in msg and "'big'" in msg
    assert "split.val_fraction: " in msg and "1.5" in msg
    assert "read.strategy: " in msg


def test_missing_modality_is_named():
    with pytest.raises(ConfigError, match="modality: required"):
        load_config(PreprocessConfig, None, [])


@pytest.mark.parametrize("overrides, message", [
    (["audio.min_seconds=3"], "min_seconds"),
    (["audio.seconds=0.00001"], "whole number of samples"),
    (["shards.target_mb_per_file=null"], "max_rows_per_file or target_mb_per_file"),
    (["image=3", "image.size=4"], "image is a value, not a section"),
])
def test_cross_field_checks_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(*overrides)


def test_yaml_problems_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path=bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load(path=bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load(path=tmp_path / "missing.yaml")


def test_assignment_is_validated():
    cfg = load()
    with pytest.raises(ValidationError):
        cfg.image.size = "big"
    with pytest.raises(ValidationError):
        cfg.image.colour = 3


def test_config_hash_is_canonical():
    a, b = load("image.size=64"), load("image.size=64")
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 64
    assert config_hash(a) != config_hash(load("image.size=65"))
    moved = load("image.size=64", input="/elsewhere", output="gs://b/o")
    exclude = set(PreprocessConfig.LOCATION_KEYS)
    assert config_hash(moved) != config_hash(a)
    assert config_hash(moved, exclude=exclude) == config_hash(a, exclude=exclude)
    # The dict round-trips: what the manifest stores rebuilds the same config.
    assert PreprocessConfig.model_validate(config_to_dict(moved)) == moved


def test_every_shipped_preprocess_yaml_validates():
    """configs/preprocess*.yaml, and any YAML whose keys are all preprocess keys."""
    checked = 0
    for path in sorted(CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if path.name.startswith("preprocess") or set(data) <= set(PreprocessConfig.model_fields):
            load_config(PreprocessConfig, path, [])
            checked += 1
    assert checked >= 1
    default = load_config(PreprocessConfig, CONFIGS / "preprocess-default.yaml", [])
    assert default == load()  # the documented defaults are the real defaults


def test_cli_config_errors_are_one_line(capsys):
    assert cli.main(["preprocess", "--modality", "image", "--input", "a", "--output", "b",
                     "image.size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hip: error: invalid config: image.size: ") and err.count("\n") == 1
    assert cli.main(["preprocess", "--modality", "sound"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert cli.main([]) == 2


def test_decode_batch_rows_bounds():
    """Files per decode task: batch_size, block_mb, >= 2 tasks per worker, one file."""
    from pipeline.data.preprocess import TASKS_PER_WORKER, batch_rows

    cfg = load()
    image, audio, video = 224 * 224 * 3 + 200, 122_880 * 4 + 200, 8 * 224 * 224 * 3 + 200
    assert batch_rows(cfg, image, 20_000, 4, None) == cfg.read.batch_size == 128
    assert batch_rows(cfg, video, 20_000, 4, None) == 55  # 64 MB of 1.2 MB rows
    # 500 clips on 4 workers: 8 tasks, not 4 (one straggler no longer idles 3 workers).
    assert batch_rows(cfg, audio, 500, 4, None) == 63 == -(-500 // (TASKS_PER_WORKER * 4))
    assert batch_rows(cfg, image, 20_000, 4, rows_per_file=40) == 40
    assert batch_rows(cfg, image, 3, 4, None) == 1
