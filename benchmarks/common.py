"""What the benchmark scripts share: the machine line and the quickstart image shards."""

from __future__ import annotations

import os
from pathlib import Path


def machine() -> str:
    """One line for the report: CPUs, RAM, load average (timings depend on all three)."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM; load average {load_avg()}"


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def image_shards(workdir: Path, per_class: int) -> Path:
    """The sample images at 64x64 through `hip preprocess`, made once per workdir and size."""
    from hip_pipeline import main as cli
    from pipeline.data.sample_data import write_sample_data

    raw, shards = workdir / f"raw-{per_class}", workdir / f"shards-{per_class}" / "image"
    if not (shards / "manifest.json").exists():
        write_sample_data(raw, per_class=per_class, seed=0, modalities=("image",),
                          image_size=64)
        rc = cli.main(["preprocess", "--modality", "image", "--input",
                       str(raw / "image"), "--output", str(shards),
                       "image.size=64"])
        if rc:
            raise SystemExit(rc)
    return shards
