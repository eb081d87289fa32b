"""Training throughput and data-wait fraction, 1 vs 2 Ray Train workers.

    python -m benchmarks.train_speed [--steps 30] [--per-class 16] [--workdir /tmp/hip-bench]

Generates the sample images (64x64), preprocesses them with `hip preprocess`, then runs
the quickstart MAE pretraining config for --steps steps with 1 and with 2 workers on the
local Ray. samples/s and data_wait_frac are read back from the runs' MLflow step metrics
(median and mean over the steps after the first 20%, which include warm-up). Target: data wait < 5%
of step time.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import image_shards, machine

ROOT = Path(__file__).resolve().parents[1]



def run(shards: Path, workdir: Path, workers: int, steps: int) -> dict[str, float]:
    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.train.config import TrainConfig
    from pipeline.train.driver import run_training

    uri = f"sqlite:///{workdir}/mlflow.db"
    cfg = load_config(TrainConfig, ROOT / "configs" / "quickstart-pretrain.yaml", [
        f"data.path={shards}", f"tracking.uri={uri}", f"storage.path={workdir}/ckpt",
        "tracking.experiment=bench-train-speed", f"trainer.num_workers={workers}",
        f"trainer.steps={steps}", "trainer.log_every=1", f"trainer.eval_every={steps}",
        f"trainer.checkpoint_every={steps}"])
    result = run_training(cfg, log=lambda *_: None)
    c = tracking.client(uri)
    skip = max(1, steps // 5)

    def history(key: str) -> list[float]:
        return [m.value for m in c.get_metric_history(result.run_id, key) if m.step > skip]

    wait = history("data_wait_frac")
    return {"samples_per_s": statistics.median(history("samples_per_s")),
            "data_wait": statistics.median(wait), "data_wait_mean": statistics.fmean(wait),
            "data_wait_max": max(wait), "wall_s": result.elapsed_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hip-bench-train"))
    args = p.parse_args(argv)
    from pipeline.runtime import init_ray

    info = init_ray()
    print(f"machine: {machine()}; Ray: {info.cpus:.0f} logical CPUs", flush=True)
    shards = image_shards(args.workdir, args.per_class)
    rows = []
    for workers in (1, 2):
        r = run(shards, args.workdir, workers, args.steps)
        rows.append((workers, r))
        print(f"  workers={workers}: {r['samples_per_s']:.1f} samples/s, data wait "
              f"{100 * r['data_wait']:.2f}%, fit {r['wall_s']:.0f} s", flush=True)
    print(f"\nquickstart MAE config, {args.steps} steps, batch 16 per worker; medians and means "
          "over the steps after the first 20%\n")
    print("| workers | samples/s (median) | data wait % of step: median | mean | max "
          "| fit wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for workers, r in rows:
        print(f"| {workers} | {r['samples_per_s']:.1f} | {100 * r['data_wait']:.2f} | "
              f"{100 * r['data_wait_mean']:.2f} | {100 * r['data_wait_max']:.1f} | "
              f"{r['wall_s']:.0f} |")
    worst = max(r["data_wait_mean"] for _, r in rows)
    print(f"\nmean data wait <= {100 * worst:.2f}% of step time (target < 5%): "
          f"{'met' if worst < 0.05 else 'MISSED'}")
    return 0 if worst < 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
