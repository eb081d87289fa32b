"""Decoding memory (issue 17): the 2.56 s window of a long file, decoded whole vs windowed.

    python -m benchmarks.decode_memory [--minutes 10] [--aac-minutes 60] [--repeat 2]
        [--workdir DIR]

Files made here (no downloads): a FLAC of --minutes x 8 channels x 48 kHz (one tone per
channel); --aac-minutes of mono 48 kHz AAC as M4A (the header gives the length: seek) and as
Matroska (no length: count, then decode to the window), made by muxing one encoded 10.24 s
period again and again; and an MP4 with 8 video frames and that AAC track (decode_video).
Each decode runs in a fresh process: peak RSS growth is VmHWM (reset once the file's bytes
are in memory) minus VmRSS then (the largest of --repeat runs), and time is the decode
call's wall time (the best of --repeat runs: the machine is shared). "whole" is what
decode_audio did before: every sample as (T, C) float32, then the same crop; "windowed" is
pipeline.data.media today. Output: a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from benchmarks.common import machine
from pipeline.data import media
from pipeline.data.media.audio import _Crop

RATE, T = 48_000, 122_880  # the default crop: 2.56 s at 48 kHz


def whole_file(data: bytes) -> np.ndarray:
    """The old decode_audio: decode every sample to (T_in, C) float32, mix, crop -> (T,)."""
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.LibsndfileError:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            to_float, chunks = av.AudioResampler(format="fltp"), []  # each (C, n)
            for frame in container.decode(stream):
                chunks += [out.to_ndarray() for out in to_float.resample(frame)]
            wave = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)
            rate = stream.codec_context.sample_rate
    mono = wave.mean(axis=1, dtype=np.float32)  # (T_in,): the old mix came before the crop
    window = _Crop(RATE, T, 1).window(len(mono), rate)
    return window.fit(mono[window.lo : window.hi, None])


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def child(path: str, how: str) -> None:
    """Decode `path` once (how: whole | audio | video) and print {growth, seconds} as JSON."""
    data = Path(path).read_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the parent's and the import's peaks do not count
    before, start = _vm("VmRSS:"), time.perf_counter()
    if how == "whole":
        whole_file(data)
    elif how == "audio":
        media.decode_audio(data, sample_rate=RATE, num_samples=T)
    else:
        media.decode_video(data, num_frames=8, size=64, with_audio=True,
                           sample_rate=RATE, num_samples=T)
    seconds = time.perf_counter() - start
    print(json.dumps({"growth": _vm("VmHWM:") - before, "seconds": seconds}))


def measure(path: Path, how: str, repeat: int) -> dict[str, float]:
    """-> {growth: largest, seconds: best} over `repeat` fresh processes."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-m", "benchmarks.decode_memory", "--child",
                               str(path), how], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    return {"growth": max(r["growth"] for r in runs),
            "seconds": min(r["seconds"] for r in runs)}


# ---------------------------------------------------------------------------- the files


def flac_8ch(minutes: int) -> bytes:
    hz = 220 + 97.3 * np.arange(8)
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", RATE, 8, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, minutes * 60 * RATE, 10 * RATE):
            t = np.arange(start, start + 10 * RATE)[:, None] / RATE
            f.write((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32))
    return buffer.getvalue()


def tiled_aac(minutes: int, fmt: str, video_frames: int = 0) -> bytes:
    """Mono 48 kHz AAC: two 480-packet periods of a tone encoded, the second muxed again and
    again (as tests/media_files.tiled_aac)."""
    period = 480
    n = np.arange((2 * period + 4) * 1024)
    x = (0.3 * np.sin(2 * np.pi * 4506 * n / (period * 1024))).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        video = container.add_stream("mpeg4", rate=8) if video_frames else None
        audio = container.add_stream("aac", rate=RATE, layout="mono")
        packets = []
        for i in range(0, len(x), 1024):
            frame = av.AudioFrame.from_ndarray(x[None, i : i + 1024], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = RATE, i
            packets += audio.encode(frame)
        if video:
            video.width, video.height = 320, 240
            for i in range(video_frames):
                image = np.full((240, 320, 3), 20 * i, np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
        container.mux(packets[0])  # priming
        for j in range(minutes * 60 * RATE // 1024):
            packet = packets[j + 1 if j < period + 2 else period + 3 + (j - 2) % period]
            packet.pts = packet.dts = j * 1024
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=int, default=10, help="length of the 8-channel FLAC")
    ap.add_argument("--aac-minutes", type=int, default=60, help="length of the AAC files")
    ap.add_argument("--repeat", type=int, default=2, help="fresh processes per measurement")
    ap.add_argument("--workdir", default="/tmp/hip-bench-decode-memory")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    m, a = args.minutes, args.aac_minutes
    files = [  # name, maker, samples x channels, decode call
        (f"FLAC, {m} min x 8 ch x 48 kHz", lambda: flac_8ch(m), m * 60 * RATE * 8, "audio"),
        (f"M4A (AAC), {a} min mono", lambda: tiled_aac(a, "ipod"), a * 60 * RATE, "audio"),
        (f"Matroska (AAC), {a} min mono", lambda: tiled_aac(a, "matroska"), a * 60 * RATE,
         "audio"),
        (f"MP4, 8 frames 320x240 + {a} min AAC (decode_video)",
         lambda: tiled_aac(a, "mp4", video_frames=8), a * 60 * RATE, "video"),
    ]
    print(f"machine: {machine()}", flush=True)
    print("| file | file MB | whole as float32 MB | path | peak RSS growth MB | time s |")
    print("|---|---:|---:|---|---:|---:|")
    for i, (name, make, samples, how) in enumerate(files):
        path = root / f"file{i}"
        path.write_bytes(make())
        size = path.stat().st_size / 1e6
        for label, mode in (("whole", "whole"), ("windowed", how)):
            r = measure(path, mode, args.repeat)
            print(f"| {name} | {size:.0f} | {samples * 4 / 1e6:.0f} | {label} | "
                  f"{r['growth'] / 1e6:.0f} | {r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
