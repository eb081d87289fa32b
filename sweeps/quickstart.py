"""The quickstart's sweep stage: run sweeps/quickstart.yaml, then `hip compare` on it."""

from __future__ import annotations

from pathlib import Path

from sweeps.compare import compare
from sweeps.driver import run_sweep
from sweeps.plan import plan_sweep

SWEEP_FILE = Path(__file__).with_name("quickstart.yaml")


def run_quickstart_sweep(job_overrides: list[str], *, steps: int, tracking_uri: str,
                         out_dir: Path) -> tuple[str, str]:
    """-> (comparison table, note). Reuses a finished sweep of the same name (resume)."""
    overrides = [*job_overrides, f"trainer.steps={steps}",
                 f"trainer.eval_every={max(1, steps // 4)}",
                 f"trainer.checkpoint_every={max(1, steps // 2)}",
                 f"scheduler.grace_period={max(1, steps // 4)}"]
    plan = plan_sweep(SWEEP_FILE, overrides)
    result = run_sweep(plan, resume=True, log=lambda *_: None)
    cmp = compare(tracking_uri, plan.experiment, sweep_run_id=result.parent_run_id,
                  out_dir=out_dir)
    best = result.best
    note = (f"({len(result.trials)} trials, {result.count('EARLY_STOPPED')} stopped by ASHA; "
            f"best {best.values if best else '-'})")
    return cmp.table, note
