"""A harder audio class-folder set for `benchmarks.learning`: sound events in a noisy clip.

    python -m benchmarks.audio_events --out DIR [--per-class 100] [--sample-rate 8000]
    python -m benchmarks.learning --modality audio --data DIR/audio --sample-rate 8000

The sample audio (pipeline/data/sample_data.py) fills the whole clip with one sound pattern,
so its spectrum alone names the class: a logistic regression on log-spectrograms scores 1.0
even from 5 labels per class, and every model arm saturates. Here each 1 s clip holds the
class's pattern as a short event (0.2-0.4 s at a random time) plus a quieter event of
another class (0.3-0.6x the level, elsewhere in the clip) and background noise (SNR of the
class event 0-10 dB): what the class is takes knowing which event is the louder one, as a
spoken word is the word over background speech and noise. Deterministic under --seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_clip(rng: np.random.Generator, label: int, classes: int, sample_rate: int,
              seconds: float) -> np.ndarray:
    """(T,) float32 in [-1, 1]: event `label`, a quieter other-class event, noise."""
    from pipeline.data.sample_data import make_audio

    total = round(sample_rate * seconds)
    clip = np.zeros(total)
    other = int(rng.integers(0, classes - 1))
    other += other >= label  # any class but the label
    for cls, level in ((label, 1.0), (other, rng.uniform(0.3, 0.6))):
        n = round(sample_rate * rng.uniform(0.2, 0.4))
        event = make_audio(rng, cls, sample_rate=sample_rate, num_samples=n).astype(np.float64)
        event *= np.hanning(n) ** 0.25 * level / max(np.abs(event).max(), 1e-9)
        start = int(rng.integers(0, total - n + 1))
        clip[start:start + n] += event
    signal_power = np.mean(clip**2)
    snr_db = rng.uniform(0.0, 10.0)
    clip += rng.normal(0.0, np.sqrt(signal_power / 10 ** (snr_db / 10)), total)
    return (0.9 * clip / max(np.abs(clip).max(), 1e-9)).astype(np.float32)


def write(out: Path, *, per_class: int, sample_rate: int, seconds: float, seed: int) -> int:
    from pipeline.data.sample_data import CLASSES, encode_wav

    for label, name in enumerate(CLASSES):
        folder = out / "audio" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, label, i]))
            clip = make_clip(rng, label, len(CLASSES), sample_rate, seconds)
            (folder / f"{name}_{i:03d}.wav").write_bytes(encode_wav(clip, sample_rate))
    return per_class * len(CLASSES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--sample-rate", type=int, default=8000)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = write(args.out, per_class=args.per_class, sample_rate=args.sample_rate,
              seconds=args.seconds, seed=args.seed)
    print(f"wrote {n} clips under {args.out / 'audio'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
