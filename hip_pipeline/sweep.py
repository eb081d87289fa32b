"""`hip sweep` and `hip compare`: parsers and command functions (wired in main.py).

sweeps/ and pipeline/ are imported inside the commands, so `hip --help` does not load Ray.
"""

from __future__ import annotations

import argparse
import os

from hip_pipeline.errors import UsageError
from pipeline.constants import DEFAULT_TRACKING_URI


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sweep", help="Ray Tune sweep of training jobs (ASHA), tracked in MLflow",
        description="Run the sweep defined by a sweeps/*.yaml file: one Ray Train job per "
        "trial, ASHA early stopping, an MLflow parent run with one child run per trial. "
        "key=value pairs override the job config when the key starts with a job-config "
        "section (data.path=..., trainer.steps=...), else the sweep (num_samples=8, "
        "scheduler.type=none).")
    p.add_argument("--config", required=True, metavar="YAML", help="sweep definition")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of the same name (finished trials "
                        "are not run again); starts it if there is none")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_sweep())

    p = sub.add_parser(
        "compare", help="compare the trials of a sweep: table + plots",
        description="Print the trials of a sweep sorted by its metric (swept params, steps, "
        "wall time, status) and write PNG plots (metric vs each swept parameter, loss "
        "curves) to --out; the plots are also logged to the sweep's MLflow parent run.")
    p.add_argument("--experiment", required=True, metavar="NAME", help="MLflow experiment")
    p.add_argument("--sweep", metavar="PARENT_RUN_ID",
                   help="the sweep's parent run (default: the newest sweep)")
    p.add_argument("--metric", metavar="M", help="default: the sweep's metric")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: "
                   f"$MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    p.add_argument("--out", metavar="DIR", help="plot folder (default: "
                   "runs/compare/PARENT_RUN_ID)")
    p.add_argument("--no-log", action="store_true", help="do not log the plots to MLflow")
    p.set_defaults(func=_compare())


def _sweep():
    def run(args: argparse.Namespace) -> int:
        from pipeline.train.driver import JobError
        from sweeps.driver import SweepError, run_sweep
        from sweeps.plan import plan_sweep

        plan = plan_sweep(args.config, args.overrides)  # ConfigError: one line, exit 2
        for bad in plan.invalid:
            print(f"[hip] sweep {plan.sweep.name}: will prune {bad.point}: {bad.reason}")
        try:
            result = run_sweep(plan, resume=args.resume)
        except (SweepError, JobError) as e:
            raise UsageError(str(e)) from None
        s = plan.sweep
        print(f"[hip] sweep {s.name} {'interrupted' if result.interrupted else 'done'} in "
              f"{result.elapsed_s:.0f} s: {len(result.trials)} trials, "
              f"{result.count('FINISHED')} finished, {result.count('EARLY_STOPPED')} stopped "
              f"early, {result.count('PRUNED')} pruned, {result.count('FAILED')} failed; "
              f"MLflow parent run {result.parent_run_id}")
        for t in result.trials:
            metric = f"{t.metric:.4f}" if t.metric is not None else "-"
            print(f"  {t.trial_id}  {t.status:<13} {s.metric}={metric}  step={t.step}  "
                  + ", ".join(f"{k}={v}" for k, v in t.values.items())
                  + (f"  ({t.error})" if t.error else ""))
        if result.best is not None:
            print(f"[hip] best: trial {result.best.trial_id} {s.metric}="
                  f"{result.best.metric:.4f} run {result.best.run_id}; config logged to the "
                  f"parent run as best/config.yaml. Compare: hip compare --experiment "
                  f"{plan.experiment} --sweep {result.parent_run_id} --tracking-uri "
                  f"{plan.uri}")
        if result.interrupted:
            print(f"[hip] resume with: hip sweep --config {args.config} --resume "
                  + " ".join(args.overrides))
            return 130
        return 0 if result.best is not None else 1

    return run


def _compare():
    def run(args: argparse.Namespace) -> int:
        from pipeline.config import load_config
        from pipeline.train.config import TrainConfig, resolve_paths
        from sweeps.compare import CompareError, compare

        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        cfg = load_config(TrainConfig, None, values={"tracking.uri": uri})  # no credentials
        uri = resolve_paths(cfg).tracking.uri  # relative sqlite paths -> absolute
        try:
            result = compare(uri, args.experiment, sweep_run_id=args.sweep,
                             metric=args.metric, out_dir=args.out, log_to_run=not args.no_log)
        except CompareError as e:
            raise UsageError(str(e)) from None
        print(f"[hip] sweep {result.sweep} (parent run {result.parent_run_id}): "
              f"{len(result.rows)} trials by {result.metric} ({result.mode})")
        print(result.table)
        print(f"[hip] plots: {', '.join(str(p) for p in result.plots)}")
        return 0

    return run
