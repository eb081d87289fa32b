"""Successive halving with trials that wait PAUSED at a rung: synchronous HyperBand
(`scheduler.type: hyperband`) and the ASHA paper's promotion rule (`scheduler.type: asha`
with `asha_rule: promote`), and the trial generator that keeps their concurrency.

Why not Ray's schedulers for these: Ray's ASHAScheduler decides when a trial reaches a rung,
comparing it with the results recorded there so far, so the first arrivals always go on
(with a dozen trials on 2 slots, the first two ran to step 800-1000: ~30% of the sweep's
work, docs/benchmarks.md). Ray's HyperBandScheduler fills its brackets starting with the one
that never stops a trial. And Tune's concurrency limit (the variant generator's
max_concurrent, or a ConcurrencyLimiter) counts PAUSED trials as running, so trials waiting
at a rung would stop new ones from starting and the rung would never fill.

Halving: `brackets` brackets, trials dealt round-robin; bracket b has rungs at
grace x rf^(b + k) steps below max_t (bracket 0 = ASHA's rungs). A trial reaching a rung
records its metric there and waits PAUSED unless promoted:
  synchronous   the rung is decided once every trial of the bracket reached it (or ended
                before it): the best max(1, n // rf) of the n there go on, the rest stop.
  asynchronous  (ASHA, Li et al. 2020, Algorithm 2) whenever a result arrives, the best
                n // rf of the n there so far are promotable: those not yet promoted go on
                at once. A trial is never promoted on fewer than rf results. When the rung
                can receive no more trials (all of the bracket reached it or ended, and the
                rung below is decided), the best max(1, n // rf) go on (those promoted
                earlier go on regardless) and the rest stop.
Promoted trials resume from their Tune checkpoint (lean trials: pipeline/train/inprocess.py),
before any new trial starts. At most `max_running` trials run at once: paused trials do not
count. Tune saves no scheduler state, so the decisions go to `state_uri` (the sweep folder's
halving.json) after every change and come back when a sweep is resumed.
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

    def set_state(self, state: dict) -> None:
        """A resumed sweep restores the generator's saved __dict__; keep the Slots object it
        shares with the scheduler, not the saved copy."""
        slots = self.slots
        super().set_state(state)
        self.slots = slots


def rungs(grace: int, rf: float, max_t: int, brackets: int = 1) -> list[list[int]]:
    """Each bracket's rung steps: grace x rf^(b + k) below max_t (bracket 0 = ASHA's)."""
    return [[r for k in range(64) if (r := int(grace * rf ** (b + k))) < max_t]
            for b in range(brackets)]


class Halving(FIFOScheduler):
    def __init__(self, *, metric: str, mode: str, max_t: int, grace: int, rf: float,
                 total: int, slots: Slots, brackets: int = 1, synchronous: bool = True,
                 time_attr: str = "step", state_uri: str | None = None):
        super().__init__()
        self.state_uri = state_uri  # the decisions so far, for a resumed sweep (see _load)
        self.restored: set[str] = set()  # trials of the saved state not yet added again
        self._metric_name, self.sign = metric, (1.0 if mode == "min" else -1.0)
        self.time_attr, self.rf, self.slots = time_attr, rf, slots
        self.synchronous = synchronous
        self.rungs = rungs(grace, rf, max_t, brackets)
        self.size = [len(range(b, total, brackets)) for b in range(brackets)]  # round robin
        self.bracket: dict[str, int] = {}
        self.next_rung: dict[str, int] = {}  # trial -> index of its next rung
        self.seen: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
        self.promoted: dict[tuple[int, int], set[str]] = defaultdict(set)
        self.gone: dict[int, set[str]] = defaultdict(set)  # ended before their next rung
        self.go_on: set[str] = set()  # promoted, waiting to be resumed
        self.decided: set[tuple[int, int]] = set()
        self.trials: dict[str, Trial] = {}

    # ---------------------------------------------------------------- bookkeeping

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        tid = trial.trial_id
        if not self.bracket:
            self._load()
        self.trials[tid] = trial
        if tid in self.restored:
            # A resumed sweep adds every trial again: Tune's ended ones as TERMINATED or
            # ERROR, the rest as PENDING, and Tune starts every PENDING trial. One waiting
            # at a rung (or promoted, not yet resumed) is PAUSED again here, before Tune
            # files it by status; one this scheduler stopped stops at its next report.
            self.restored.discard(tid)
            if trial.status in (Trial.TERMINATED, Trial.ERROR):
                self._ended(tune_controller, trial)
            elif tid in self.slots.paused or tid in self.go_on:
                trial.set_status(Trial.PAUSED)
            return
        if tid in self.bracket:
            # A recovered trial is added again: it is back, in its bracket, with the rungs
            # it reached.
            self.gone[self.bracket[tid]].discard(tid)
            return
        b = len(self.bracket) % len(self.rungs)
        self.bracket[tid], self.next_rung[tid] = b, 0
        self._save()

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
        self._save()

    # ---------------------------------------------------------------- resume

    def _save(self) -> None:
        """Write every decision's inputs to state_uri: Tune does not save a scheduler, and
        a resumed sweep (hip sweep --resume) must not lose who waits at which rung."""
        if self.state_uri is None:
            return
        from pipeline import storage

        storage.write_json(self.state_uri, {
            "bracket": self.bracket, "next_rung": self.next_rung,
            "seen": [[b, k, v] for (b, k), v in self.seen.items()],
            "promoted": [[b, k, sorted(v)] for (b, k), v in self.promoted.items()],
            "gone": [[b, sorted(v)] for b, v in self.gone.items()],
            "decided": sorted([b, k] for b, k in self.decided),
            "go_on": sorted(self.go_on), "waiting": sorted(self.slots.paused)})

    def _load(self) -> None:
        from pipeline import storage

        if self.state_uri is None or not storage.exists(self.state_uri):
            return
        s = storage.read_json(self.state_uri)
        self.bracket, self.next_rung = dict(s["bracket"]), dict(s["next_rung"])
        for b, k, v in s["seen"]:
            self.seen[(b, k)] = dict(v)
        for b, k, v in s["promoted"]:
            self.promoted[(b, k)] = set(v)
        for b, v in s["gone"]:
            self.gone[b] = set(v)
        self.decided = {(b, k) for b, k in s["decided"]}
        self.go_on, self.slots.paused = set(s["go_on"]), set(s["waiting"])
        self.restored = set(self.bracket)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        # Ray 2.60 calls this too when it requeues a failed trial to recover it (within
        # sweep.max_failures): the trial is ERROR by then and on_trial_add follows. It is
        # not gone, and its rung must wait for it.
        if trial.status == Trial.ERROR and trial.should_recover():
            return
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    # ---------------------------------------------------------------- decisions

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        tid = trial.trial_id
        b, k = self.bracket[tid], self.next_rung[tid]
        if tid in self.gone[b]:
            return TrialScheduler.STOP  # stopped before the sweep was resumed
        rungs = self.rungs[b]
        if k >= len(rungs) or result.get(self.time_attr, 0) < rungs[k]:
            return TrialScheduler.CONTINUE
        value = result.get(self._metric_name)
        self.seen[(b, k)][tid] = self.sign * float(value) if value is not None else math.inf
        self.next_rung[tid] = k + 1
        action = self._decide(tune_controller, b, k, current=tid)
        self._save()
        return action

    def _complete(self, b: int, k: int) -> bool:
        """Can no more trials reach rung (b, k)? Every trial of the bracket reached it or
        ended before it, and (asynchronous) the rung below is decided: trials waiting there
        may still be promoted."""
        there = self.seen[(b, k)]
        ended_before = {t for t in self.gone[b] if t not in there}
        below = k == 0 or (b, k - 1) in self.decided
        return below and len(there) + len(ended_before) >= self.size[b]

    def _decide(self, tune_controller, b: int, k: int, current: str | None) -> str:
        """Promote at rung (b, k) what the rule allows now; once the rung is complete keep
        the best max(1, n // rf) and stop the rest. -> the current trial's action."""
        there, promoted = self.seen[(b, k)], self.promoted[(b, k)]
        if (b, k) in self.decided:
            if current is None:
                return TrialScheduler.CONTINUE
            # A late arrival (a recovered trial, decided without): on if it beats one
            # that went on.
            bar = max((there[t] for t in promoted), default=-math.inf)
            if there[current] <= bar:
                promoted.add(current)
                return TrialScheduler.CONTINUE
            return TrialScheduler.STOP
        ranked = sorted(there, key=there.get)
        complete = self._complete(b, k)
        if complete:
            self.decided.add((b, k))
            quota = max(1, int(len(there) // self.rf))
        else:
            quota = 0 if self.synchronous else int(len(there) // self.rf)
        action = TrialScheduler.CONTINUE
        for rank, tid in enumerate(ranked):
            if tid in self.gone[b]:
                continue
            if rank < quota or tid in promoted:
                if tid not in promoted:
                    promoted.add(tid)
                    if tid != current:
                        self.go_on.add(tid)
                continue
            if tid == current:
                action = TrialScheduler.STOP if complete else TrialScheduler.PAUSE
                if action == TrialScheduler.PAUSE:
                    self.slots.paused.add(tid)
            elif complete:  # waiting at the rung: stop it (gone before its next rung)
                self.gone[b].add(tid)
                self.slots.paused.discard(tid)
                trial = self.trials.get(tid)  # None: a resumed sweep has not re-added it
                if trial is not None and trial.status in (Trial.PAUSED, Trial.PENDING):
                    tune_controller.stop_trial(trial)
        if complete and k + 1 < len(self.rungs[b]):
            self._decide(tune_controller, b, k + 1, current=None)  # may be complete now
        return action

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Promoted trials first (the highest rung first), then new ones."""
        trials = tune_controller.get_trials()
        if sum(t.status == Trial.RUNNING for t in trials) >= self.slots.max_running:
            return None
        waiting = [t for t in trials
                   if t.status == Trial.PAUSED and t.trial_id in self.go_on]
        if waiting:
            trial = max(waiting, key=lambda t: self.next_rung[t.trial_id])
            self.go_on.discard(trial.trial_id)
            self.slots.paused.discard(trial.trial_id)
            self._save()
            return trial
        return next((t for t in trials if t.status == Trial.PENDING), None)

    def debug_string(self) -> str:
        kind = "synchronous" if self.synchronous else "asynchronous"
        return (f"Halving ({kind}): rungs {self.rungs}; {len(self.slots.paused)} paused at "
                f"a rung, {len(self.go_on)} promoted")


__all__ = ["Halving", "PauseAwareGenerator", "Slots", "rungs"]
