"""Early stopping vs none: the same sweep's wall time, steps run and winners; trial start-up.

    python -m benchmarks.sweep_efficiency [--trials 8] [--steps 192] [--grace 16] [--rf 4]
        [--schedulers asha,asha-stop,hyperband,none] [--path lean|train] [--concurrent 2]
        [--cooldown K] [--cooldown-fraction F] [--per-class 32] [--workdir DIR]
    python -m benchmarks.sweep_efficiency --startup [--trials 8] [--path lean,train]
    ... --save R.json (each half's results), --full-from R.json (the full half of an earlier
    run of the same --trials/--steps, instead of running it again: its trials do not depend on
    the scheduler, so a long full half can run once, or apart from the scheduled halves)

Generates the sample images (64x64), preprocesses them, then runs one learning-rate sweep of
the quickstart MAE pretraining (--trials learning rates sampled log-uniformly in [1e-4, 3e-2]
with seed 0, warmup 10% of the steps, 1 worker per trial, --concurrent trials at once) once
per scheduler on the local Ray: ASHA (time_attr = step; rungs at grace x rf^k below --steps;
`asha` = the paper's promotion rule, trials wait PAUSED at a rung until they rank in the best
n // rf of the n there; `asha-stop` = Ray's ASHAScheduler, first arrivals go on), synchronous
HyperBand (one report every --grace steps; brackets from steps/grace and rf) and
no scheduler (every trial runs all steps). Every run samples the same configurations in the
same order, and `data.deterministic` gives every trial the same batches in the same order, so
a configuration trains identically in every run up to the step it is stopped at.
--path: lean = the loop in the Tune trial's process (the default), train = a nested
TorchTrainer per trial (what every trial was before issue 19).
Reports wall-time ratios, optimizer steps run (a load-independent measure of the compute
saved) and the winners. Targets: each scheduler <= 40% of the full sweep's wall time, its
pick within 1% of the full sweep's best val_loss, hyperband with the same winner.

--startup: per-trial start-up cost instead, for each --path: a sweep of --trials trials of 2
steps, no scheduler; median `startup_s` (MLflow: process start to first optimizer step) and
the whole machine's CPU seconds per trial (/proc/stat, busy time over the sweep; run it on
an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml

from benchmarks.common import image_shards, machine

ROOT = Path(__file__).resolve().parents[1]
LR_RANGE = [1e-4, 3e-2]
WARMUP_FRACTION = 0.1  # of the steps (configs/: HiP-16 5%, the quickstart 7%)
TARGET_WALL = 0.40
TARGET_PICK = 0.01


def warmup_steps(steps: int) -> int:
    """Warmup scaled to the run. A fixed 8-step warmup made a 1000-step sweep's ranking at
    step 50 the reverse of its final one (the high learning rates that end best were still
    unstable at step 50), which is the job's behaviour, not early stopping's."""
    return max(8, round(WARMUP_FRACTION * steps))


def sweep_file(workdir: Path, name: str, scheduler: str, args: argparse.Namespace,
               *, steps: int, lean: bool) -> Path:
    path = workdir / f"bench-{name}.yaml"
    cooled = args.cooldown > 0 and scheduler != "none"  # the full half reads only the end
    kind, _, rule = scheduler.partition("-")  # asha-stop: Ray's ASHAScheduler
    pauses = kind == "hyperband" or (kind == "asha" and rule != "stop")
    path.write_text(yaml.safe_dump({
        "name": f"bench-{name}", "base": str(ROOT / "configs" / "quickstart-pretrain.yaml"),
        "kind": "pretrain",
        "overrides": {"trainer.num_workers": 1, "trainer.steps": steps,
                      "trainer.eval_every": min(args.grace, steps),
                      # HyperBand and ASHA's promotion rule pause trials at rungs: they
                      # resume from that report's checkpoint. The others checkpoint only at
                      # the end.
                      "trainer.checkpoint_every": args.grace if pauses else steps,
                      "trainer.log_every": 8,
                      "trainer.eval_cooldown_steps": args.cooldown if cooled else 0,
                      "trainer.eval_cooldown_fraction": args.cooldown_fraction if cooled
                      else 0.0,
                      "optim.warmup_steps": warmup_steps(steps), "trainer.seed": 0,
                      "data.deterministic": True},
        "space": {"optim.lr": {"loguniform": LR_RANGE}},
        "num_samples": args.trials, "searcher": {"seed": 0},
        "metric": "cooled_val_loss" if cooled else "val_loss", "mode": "min",
        "scheduler": {"type": kind, "grace_period": args.grace, "reduction_factor": args.rf,
                      **({"asha_rule": "stop" if rule == "stop" else "promote"}
                         if kind == "asha" else {})},
        "resources": {"lean": lean, "max_concurrent": args.concurrent}}))
    return path


def cpu_busy_s() -> float:
    """The machine's busy CPU time so far (/proc/stat: user, system, irq, softirq; not
    `nice`, so niced background jobs do not count), in seconds."""
    with open("/proc/stat") as f:
        user, _nice, system, _idle, _iowait, irq, softirq = \
            (int(x) for x in f.readline().split()[1:8])
    return (user + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run(workdir: Path, shards: Path, name: str, scheduler: str, args: argparse.Namespace,
        *, steps: int, lean: bool) -> dict:
    from pipeline import tracking
    from sweeps.driver import run_sweep
    from sweeps.plan import plan_sweep

    uri = f"sqlite:///{workdir}/mlflow.db"
    plan = plan_sweep(sweep_file(workdir, name, scheduler, args, steps=steps, lean=lean), [
        f"data.path={shards}", f"tracking.uri={uri}",
        f"storage.path={workdir}/ck-{name}", "tracking.experiment=bench-sweep"])
    cpu0 = cpu_busy_s()
    result = run_sweep(plan, log=lambda *_: None)
    cpu = cpu_busy_s() - cpu0
    c = tracking.client(uri)
    startups = [c.get_run(t.run_id).data.metrics.get("startup_s") for t in result.trials
                if t.run_id]
    return {"wall_s": result.elapsed_s, "cpu_s": cpu, "trials": len(result.trials),
            "finished": result.count("FINISHED"), "stopped": result.count("EARLY_STOPPED"),
            "failed": result.count("FAILED"), "steps_run": sum(t.step or 0 for t in result.trials),
            "startup_s": [x for x in startups if x is not None],
            "best_lr": result.best.values["optim.lr"] if result.best else None,
            "best_metric": result.best.metric if result.best else None,
            "by_lr": {t.values["optim.lr"]: (t.status, t.step, t.metric) for t in result.trials}}


def startup(workdir: Path, shards: Path, args: argparse.Namespace) -> int:
    """Per-trial start-up: wall (startup_s) and CPU (the machine's, per trial)."""
    print("| trial path | trials | median startup_s (min-max) | machine CPU s per trial | "
          "sweep wall s |")
    print("|---|---|---|---|---|")
    rows = {}
    for path in args.path.split(","):
        r = rows[path] = run(workdir, shards, f"startup-{path}", "none", args, steps=2,
                             lean=path == "lean")
        s = r["startup_s"]
        print(f"| {path} | {r['trials']} | {statistics.median(s):.1f} ({min(s):.1f}-"
              f"{max(s):.1f}) | {r['cpu_s'] / r['trials']:.1f} | {r['wall_s']:.0f} |",
              flush=True)
    if {"lean", "train"} <= set(rows):
        lean, train = rows["lean"], rows["train"]
        wall = statistics.median(lean["startup_s"]) / statistics.median(train["startup_s"])
        cpu = lean["cpu_s"] / train["cpu_s"]
        print(f"\nlean / train: start-up wall {100 * wall:.0f}%, CPU per trial "
              f"{100 * cpu:.0f}% (target <= 33%)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--grace", type=int, default=16, help="ASHA grace period in steps; also "
                   "the eval interval (one report per rung) and HyperBand's time unit")
    p.add_argument("--cooldown", type=int, default=0, help="trainer.eval_cooldown_steps of "
                   "the scheduled halves, which then rank by cooled_val_loss (docs/sweeps.md)")
    p.add_argument("--cooldown-fraction", type=float, default=0.0, help="trainer."
                   "eval_cooldown_fraction: probes grow with the step (pipeline/train/cooldown.py)")
    p.add_argument("--rf", type=int, default=4, help="reduction factor (ASHA, HyperBand)")
    p.add_argument("--schedulers", default="asha,hyperband,none",
                   help="comma-separated; the last one should be none (the reference)")
    p.add_argument("--path", default="lean", help="lean | train (--startup: both)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (2 on 2 cores)")
    p.add_argument("--startup", action="store_true", help="measure per-trial start-up")
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hip-bench-sweep"))
    p.add_argument("--save", type=Path, help="write every half's results here (JSON)")
    p.add_argument("--full-from", type=Path, help="the 'none' half from an earlier --save")
    args = p.parse_args(argv)
    import shutil

    from pipeline.runtime import init_ray

    info = init_ray()
    shards = image_shards(args.workdir, args.per_class)
    for old in args.workdir.glob("ck-*"):
        shutil.rmtree(old)  # a rerun starts fresh (sweeps refuse to overwrite)
    (args.workdir / "mlflow.db").unlink(missing_ok=True)
    print(f"machine: {machine()}; Ray: {info.cpus:.0f} logical CPUs; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.startup:
        if args.path == "lean":
            args.path = "lean,train"
        return startup(args.workdir, shards, args)
    results = {}
    if args.full_from:
        saved = json.loads(args.full_from.read_text())
        if (saved["trials"], saved["steps"]) != (args.trials, args.steps):
            raise SystemExit(f"{args.full_from} is a {saved['trials']} x {saved['steps']} "
                             f"sweep, not {args.trials} x {args.steps}")
        results["none"] = saved["results"]["none"]
        print(f"the full half: {args.full_from} (run {saved['when']})", flush=True)
    for scheduler in args.schedulers.split(","):
        if scheduler in results:
            continue
        r = results[scheduler] = run(args.workdir, shards, scheduler, scheduler, args,
                                     steps=args.steps, lean=args.path == "lean")
        print(f"  {scheduler}: {r['wall_s']:.0f} s, {r['finished']} finished, {r['stopped']} "
              f"stopped early, {r['failed']} failed, {r['steps_run']} steps run, best lr "
              f"{r['best_lr']} (val_loss {r['best_metric']:.4f}); median startup_s "
              f"{statistics.median(r['startup_s'] or [0]):.1f}", flush=True)
        for lr, (status, step, metric) in sorted(r["by_lr"].items()):
            print(f"    lr={lr:<7g} {status:<13} step={step} val_loss={metric}", flush=True)
        if args.save:
            args.save.write_text(json.dumps({
                "trials": args.trials, "steps": args.steps, "when": time.strftime(
                    "%Y-%m-%d %H:%M"), "results": results}, indent=1, default=str))
    print(f"\n{args.trials} trials x {args.steps} steps, lr log-uniform in {LR_RANGE} (seed "
          f"0), quickstart HiP, 64x64 images, 1 worker per trial ({args.path} path), "
          f"{args.concurrent} at once, deterministic data\n")
    print("| scheduler | wall (s) | trials finished / stopped early | optimizer steps run | "
          "median startup_s | best lr | best val_loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']:.0f} | {r['finished']} / {r['stopped']} | "
              f"{r['steps_run']} | {statistics.median(r['startup_s'] or [0]):.1f} | "
              f"{r['best_lr']:.3g} | {r['best_metric']:.4f} |")
    full = results.get("none")
    if full is None:
        return 0
    ok = True
    for name, r in results.items():
        if name == "none":
            continue
        ratio = r["wall_s"] / full["wall_s"]
        gap = (r["best_metric"] - full["best_metric"]) / full["best_metric"]
        same = r["best_lr"] == full["best_lr"]
        met = ratio <= TARGET_WALL and gap <= TARGET_PICK and (same or name != "hyperband")
        ok &= met
        print(f"\n{name}: wall {100 * ratio:.0f}% of the full sweep (target <= "
              f"{100 * TARGET_WALL:.0f}%); steps {100 * r['steps_run'] / full['steps_run']:.0f}%;"
              f" pick {100 * gap:+.2f}% val_loss from the full sweep's best (target <= "
              f"{100 * TARGET_PICK:.0f}%); same winner: {'yes' if same else 'no'} -> "
              f"{'met' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
