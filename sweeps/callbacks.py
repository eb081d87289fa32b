"""Ray Train callbacks of a sweep trial (they run in the trial's Train controller actor).

TrialReport       TuneReportCallback that holds back the run's last report. Tune may stop a
                  trial on any report (ASHA at max_t always does), and stopping kills the
                  trial actor; the last report is therefore sent by the trial itself after
                  run_training has closed the MLflow run and uploaded the final checkpoint.
PlacementGroupReaper
                  (pipeline/train/pg_reaper.py) frees the placement group of a trial ASHA killed.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


class TrialReport(TuneReportCallback):
    """Forward reports to Tune except the one at `final_step` (the trial sends that one)."""

    def __init__(self, final_step: int):
        super().__init__()
        self.final_step = final_step

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and metrics[0].get("step", 0) >= self.final_step:
            return
        super().after_report(run_context, metrics, checkpoint)


__all__ = ["TrialReport"]
