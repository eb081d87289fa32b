"""Decoding only what the crop keeps (issue 17): long files built here are decoded in a fresh
process whose peak RSS growth must stay far below the whole file as float32 (which decoding
everything needed, several times over), and the output is the centre crop of the known
signal. Whole-file float32 sizes: 369 MB (FLAC), 230 MB (AAC)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from media_files import TILE_RATE, assert_reason, tiled_aac, tiled_reference

from pipeline.data import media
from pipeline.data.config import PreprocessConfig
from pipeline.data.decode import DecodeSpec

REPO = Path(__file__).resolve().parents[1]
RATE, CHANNELS = 48_000, 8
HZ = 220 + 97.3 * np.arange(CHANNELS)  # one tone per channel
T = 122_880  # the default crop: 2.56 s at 48 kHz
BOUND = 0.25  # of the whole file as float32

# ru_maxrss would not do: Linux carries the parent's peak across fork + exec into the child.
# VmHWM is the peak of this process's own memory map, reset once the file's bytes are read.
_CHILD = """
import json, sys
import numpy as np
from pipeline.data import media
kind, path, out, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def vm(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
data = open(path, "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = vm("VmRSS:")
result = getattr(media, "decode_" + kind)(data, **kwargs)
np.save(out, result if kind == "audio" else result[1])
print(json.dumps({"growth": vm("VmHWM:") - before}))
"""


def decode_in_child(tmp_path: Path, kind: str, data: bytes, **kwargs) -> tuple[np.ndarray, int]:
    """media.decode_<kind>(data, **kwargs) in a fresh process -> (audio (T,), growth of its
    peak RSS in bytes over the RSS once the file's bytes are in memory)."""
    src, out = tmp_path / "input", tmp_path / "audio.npy"
    src.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(src), str(out), json.dumps(kwargs)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out), json.loads(done.stdout.splitlines()[-1])["growth"]


def tones(start: int, n: int, rate: int = RATE) -> np.ndarray:
    """(n, CHANNELS) float32: the 8 tones from sample `start` on."""
    t = np.arange(start, start + n)[:, None] / rate
    return (0.3 * np.sin(2 * np.pi * HZ * t)).astype(np.float32)


def flac_8ch(seconds: int) -> bytes:
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", RATE, CHANNELS, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, seconds * RATE, 10 * RATE):
            f.write(tones(start, 10 * RATE))
    return buffer.getvalue()


def assert_bounded(growth: int, samples: int) -> None:
    whole = samples * 4  # float32 bytes
    assert growth < BOUND * whole, f"peak RSS grew {growth / 2**20:.0f} MiB decoding a file of " \
        f"{whole / 2**20:.0f} MiB as float32"


def test_long_8_channel_flac_decodes_only_the_window(tmp_path):
    seconds = 240
    data = flac_8ch(seconds)
    n = seconds * RATE
    # resampled to 16 kHz in the child: the crop of the mixed tones at the same times
    out, growth = decode_in_child(tmp_path, "audio", data, sample_rate=16_000, num_samples=T)
    assert_bounded(growth, n * CHANNELS)
    start = (n // 3 - T) // 2  # in 16 kHz samples
    t = (start + np.arange(T)) / 16_000
    want = (0.3 * np.sin(2 * np.pi * HZ[None, :] * t[:, None])).mean(1)
    np.testing.assert_allclose(out, want, atol=2e-3)
    # at the file's rate, without resampling: exact up to the 16-bit quantisation
    out = media.decode_audio(data, sample_rate=RATE, num_samples=T)
    np.testing.assert_allclose(out, tones((n - T) // 2, T).mean(1), atol=5e-5)
    assert_reason("too_large", media.decode_audio, data, max_channels=CHANNELS - 1)


def test_long_m4a_seeks_to_the_window(tmp_path):
    data = tiled_aac(1200)  # MP4: the header gives the length in samples
    n = 1200 * TILE_RATE
    out, growth = decode_in_child(tmp_path, "audio", data, sample_rate=TILE_RATE, num_samples=T)
    assert_bounded(growth, n)
    np.testing.assert_allclose(out, tiled_reference((n - T) // 2, T), atol=1e-5)


def test_long_matroska_aac_is_counted_then_decoded_to_the_window(tmp_path):
    data = tiled_aac(1200, fmt="matroska")  # no length in samples in the header: two passes
    n = 1200 * TILE_RATE
    out, growth = decode_in_child(tmp_path, "audio", data, sample_rate=TILE_RATE, num_samples=T)
    assert_bounded(growth, n)
    np.testing.assert_allclose(out, tiled_reference((n - T) // 2, T), atol=1e-5)


def test_video_with_a_long_audio_track_decodes_only_its_window(tmp_path):
    data = tiled_aac(1200, fmt="mp4", video_frames=8)
    with av.open(io.BytesIO(data)) as container:
        n = container.streams.audio[0].duration  # the edit list's length, rounded to ms
    out, growth = decode_in_child(tmp_path, "video", data, num_frames=4, size=16,
                                  with_audio=True, sample_rate=TILE_RATE, num_samples=T)
    assert_bounded(growth, n)
    np.testing.assert_allclose(out, tiled_reference((n - T) // 2, T), atol=1e-5)


def test_max_channels_comes_from_the_config():
    cfg = PreprocessConfig.model_validate(
        {"modality": "audio", "input": "in", "output": "out", "audio": {"max_channels": 2}})
    spec = DecodeSpec.from_config(cfg)
    assert spec.audio["max_channels"] == 2
    data = flac_8ch(1)
    assert_reason("too_large", spec.decode, data)
