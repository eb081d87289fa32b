"""`hip pretrain` and `hip finetune`: parsers and command functions (wired in main.py)."""

from __future__ import annotations

import argparse

from hip_pipeline.errors import UsageError


def add_parsers(sub) -> None:
    for name, task, help_text in (
        ("pretrain", "mae", "MAE pretraining with Ray Train"),
        ("finetune", "classify", "classification fine-tuning with Ray Train"),
    ):
        p = sub.add_parser(name, help=help_text, description=(
            f"{help_text}. key=value pairs override the config (dotted keys, e.g. "
            "trainer.num_workers=4 optim.lr=3e-4)."))
        p.add_argument("--config", metavar="YAML", help="job config (configs/*.yaml)")
        if name == "finetune":
            p.add_argument("--init-from", metavar="RUN_ID_OR_URI",
                           help="MLflow run id or checkpoint folder/URI of an MAE run "
                                "(omit to train from scratch)")
        p.add_argument("--restart", action="store_true",
                       help="remove the checkpoints of this run name and train from step 0 "
                            "(without it, a rerun of a run name resumes its checkpoints)")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=_command(task))


def _command(task: str):
    def run(args: argparse.Namespace) -> int:
        from pipeline.config import load_config
        from pipeline.train.config import TrainConfig
        from pipeline.train.driver import JobError, run_training

        values = {"task": task}
        if getattr(args, "init_from", None):
            values["finetune.init_from"] = args.init_from
        cfg = load_config(TrainConfig, args.config, args.overrides, values)
        try:
            result = run_training(cfg, restart=args.restart)
        except JobError as e:
            raise UsageError(str(e)) from None
        m = result.metrics
        summary = (f"val accuracy {m['val_accuracy']:.3f}" if "val_accuracy" in m
                   else f"val loss {m['val_loss']:.4f}" if "val_loss" in m
                   else f"loss {m.get('loss', float('nan')):.4f}")
        print(f"[hip] {args.command} done in {result.elapsed_s:.0f} s: step {m.get('step')}, "
              f"loss {m.get('loss', float('nan')):.4f}, {summary}; run {result.run_id}; "
              f"checkpoint {result.checkpoint}")
        return 0

    return run
