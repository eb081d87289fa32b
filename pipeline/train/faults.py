"""Test-only fault hooks of the training loop, set through the environment.

    HIP_TEST_FAULT="rank:step:marker_path"  that rank exits hard (os._exit) once, after the
                                            given step, and writes the marker file
    HIP_TEST_STEP_DELAY_S=S                 every step sleeps S seconds (a run long enough
                                            to lose a node in)

The driver forwards both to the workers of a running cluster (TEST_ENVS).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "HIP_TEST_FAULT"
DELAY_ENV = "HIP_TEST_STEP_DELAY_S"
TEST_ENVS = (FAULT_ENV, DELAY_ENV)


def maybe_fault(rank: int, step: int) -> None:
    if delay := os.environ.get(DELAY_ENV):  # tests: a run long enough to lose a node in
        time.sleep(float(delay))
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if rank == int(fault_rank) and step == int(fault_step) and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        # Ray Train registers a reported checkpoint at the controller's next poll of the
        # workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a group that
        # dies inside that window resumes from the checkpoint before. Wait it out so the
        # test pins down resume-from-latest rather than that race.
        time.sleep(6)
        os._exit(17)  # a hard worker death, as a preempted node would give


__all__ = ["FAULT_ENV", "DELAY_ENV", "TEST_ENVS", "maybe_fault"]
