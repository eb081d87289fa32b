"""Synchronous HyperBand (successive halving with a cohort barrier) for `scheduler.type:
hyperband`, and the trial generator that keeps its concurrency.

Why not Ray's HyperBandScheduler: it fills its brackets starting with the one that never
stops a trial (s = 0: the first ceil(log_rf(max_t)) + 1 trials all run to max_t), so a
sweep of a dozen trials saves almost nothing; and Tune's concurrency limit (the variant
generator's max_concurrent, or a ConcurrencyLimiter) counts PAUSED trials as running, so
trials waiting at a rung stop new ones from starting and the cohort never completes.

SyncHalving: `brackets` brackets, trials dealt round-robin; bracket b has rungs at
grace x rf^(b + k) steps below max_t (bracket 0 = ASHA's rungs). A trial reaching a rung is
PAUSED until every trial of its bracket has reached that rung (or ended); then the best
max(1, n // rf) of the n there go on (resumed from their Tune checkpoint) and the rest are
stopped. No trial is promoted on an early comparison, unlike ASHA's first arrivals.
At most `max_running` trials run at once: paused trials do not count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator


class Slots:
    """Shared by the scheduler and the generator: which trials wait PAUSED at a rung."""

    def __init__(self, max_running: int):
        self.max_running = max_running
        self.paused: set[str] = set()


class PauseAwareGenerator(BasicVariantGenerator):
    """BasicVariantGenerator whose max_concurrent does not count trials waiting at a rung."""

    def __init__(self, slots: Slots, **kwargs: Any):
        super().__init__(max_concurrent=0, **kwargs)
        self.slots = slots

    def next_trial(self):
        if len(self._live_trials - self.slots.paused) >= self.slots.max_running:
            return None
        return super().next_trial()


def rungs(grace: int, rf: float, max_t: int, brackets: int = 1) -> list[list[int]]:
    """Each bracket's rung steps: grace x rf^(b + k) below max_t (bracket 0 = ASHA's)."""
    return [[r for k in range(64) if (r := int(grace * rf ** (b + k))) < max_t]
            for b in range(brackets)]


class SyncHalving(FIFOScheduler):
    def __init__(self, *, metric: str, mode: str, max_t: int, grace: int, rf: float,
                 total: int, slots: Slots, brackets: int = 1, time_attr: str = "step"):
        super().__init__()
        self._metric_name, self.sign = metric, (1.0 if mode == "min" else -1.0)
        self.time_attr, self.rf, self.slots = time_attr, rf, slots
        self.rungs = rungs(grace, rf, max_t, brackets)
        self.size = [len(range(b, total, brackets)) for b in range(brackets)]  # round robin
        self.bracket: dict[str, int] = {}
        self.next_rung: dict[str, int] = {}  # trial -> index of its next rung
        self.seen: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
        self.gone: dict[int, set[str]] = defaultdict(set)  # ended before their next rung
        self.go_on: set[str] = set()  # promoted, waiting to be resumed
        self.decided: set[tuple[int, int]] = set()
        self.trials: dict[str, Trial] = {}

    # ---------------------------------------------------------------- bookkeeping

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        b = len(self.bracket) % len(self.rungs)
        self.bracket[trial.trial_id], self.next_rung[trial.trial_id] = b, 0
        self.trials[trial.trial_id] = trial

    def _ended(self, tune_controller, trial: Trial) -> None:
        tid = trial.trial_id
        b = self.bracket.get(tid)
        if b is None or tid in self.gone[b]:
            return
        self.gone[b].add(tid)
        self.slots.paused.discard(tid)
        self.go_on.discard(tid)
        # Its absence may complete the rung others wait at.
        k = self.next_rung[tid]
        if k < len(self.rungs[b]):
            self._decide(tune_controller, b, k, current=None)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    # ---------------------------------------------------------------- decisions

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        tid = trial.trial_id
        b, k = self.bracket[tid], self.next_rung[tid]
        rungs = self.rungs[b]
        if k >= len(rungs) or result.get(self.time_attr, 0) < rungs[k]:
            return TrialScheduler.CONTINUE
        value = result.get(self._metric_name)
        self.seen[(b, k)][tid] = self.sign * float(value) if value is not None else math.inf
        self.next_rung[tid] = k + 1
        return self._decide(tune_controller, b, k, current=tid)

    def _decide(self, tune_controller, b: int, k: int, current: str | None) -> str:
        """The rung (b, k) is complete when every trial of the bracket reached it or ended
        before it; then keep the best max(1, n // rf). -> the current trial's action."""
        if (b, k) in self.decided:
            return TrialScheduler.CONTINUE
        there = self.seen[(b, k)]
        ended_before = {t for t in self.gone[b] if t not in there}
        if len(there) + len(ended_before) < self.size[b]:
            if current is not None:
                self.slots.paused.add(current)
                return TrialScheduler.PAUSE
            return TrialScheduler.CONTINUE
        self.decided.add((b, k))
        keep = set(sorted(there, key=there.get)[:max(1, int(len(there) // self.rf))])
        action = TrialScheduler.CONTINUE
        for tid in there:
            if tid in self.gone[b]:
                continue
            if tid == current:
                action = TrialScheduler.CONTINUE if tid in keep else TrialScheduler.STOP
            elif tid in keep:
                self.go_on.add(tid)
            else:
                trial = self.trials[tid]
                if trial.status in (Trial.PAUSED, Trial.PENDING):
                    self.slots.paused.discard(tid)
                    tune_controller.stop_trial(trial)
        return action

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        running = sum(t.status == Trial.RUNNING for t in trials)
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if running >= self.slots.max_running:
            return None
        for trial in trials:
            if trial.status == Trial.PAUSED and trial.trial_id in self.go_on:
                self.go_on.discard(trial.trial_id)
                self.slots.paused.discard(trial.trial_id)
                return trial
        return None

    def debug_string(self) -> str:
        return (f"SyncHalving: rungs {self.rungs}; {len(self.slots.paused)} paused at a "
                f"rung, {len(self.go_on)} promoted")


__all__ = ["SyncHalving", "PauseAwareGenerator", "Slots", "rungs"]
