"""Cooled-down evaluation: what a run would score if its learning rate were annealed now.

Early in a run, val_loss ranks learning rates by how noisy they still are, not by where they
are heading: a high rate sits on a higher loss plateau until its schedule decays, so on the
sweep benchmark every rate that ends best ranked in the worse half at steps 50 and 100, and
ASHA and HyperBand stopped them there (docs/benchmarks.md, "Sweeps"). A short cooldown
removes that noise term: train a throwaway copy for `trainer.eval_cooldown_steps` steps with
the learning rate falling linearly to `optim.min_lr_ratio` of its current value, evaluate
the copy, restore the run. The same observation underlies warmup-stable-decay schedules
(a short decay from any point of a constant-lr run gives the loss a full schedule would);
docs/sweeps.md "Early rungs and slow starters" has the measurements.

The probe leaves the run exactly as it was: weights and optimizer state are restored, its
batches are the next ones of the run's own stream, read ahead and then handed to the run as
usual (Lookahead), and its random draws (masks, dropout) use their own seeds. A run's
trajectory is therefore the same with and without probes, and a swept configuration's
final value does not depend on the scheduler's evaluation settings.

How long. A cooldown of K steps from step s scores what a run of s + K steps would end at,
so a short one still favours rates that are fast over a short horizon: on the sweep
benchmark, K = 25 at step 200 ranked 1.82e-2 ahead of 1.37e-2 and 2.07e-2, which end
better at step 1000; K = 100 ranked them as the full runs end (docs/benchmarks.md,
"third look"). `trainer.eval_cooldown_fraction` f makes the probe grow with the run:
K(s) = max(eval_cooldown_steps, f x s x lr_factor(s)), at most the steps left, where
lr_factor is the schedule's multiplier at s: the later the rung the longer the cooldown,
but a run whose schedule has already decayed most of the way (at 80% of a cosine run the
factor is ~0.1) has little left to anneal and gets a short probe.

Cost: K optimizer steps per probed evaluation (none at the last step, whose schedule has
already decayed), and one copy of the weights and optimizer state while it runs.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.train.build import lr_factor
from pipeline.train.checkpoints import unwrap
from pipeline.train.config import TrainConfig
from pipeline.train.steps import step_seed


class Lookahead:
    """An endless batch iterator that can show its next batches before handing them out.

    make(position) -> the underlying generator; it keeps `position` (a dict the generator
    updates, see loop._batches) current with what it has read. `consumed` is what the run
    has taken (what checkpoints save): batches read ahead by `peek` are still to come."""

    def __init__(self, make: Callable[[dict[str, int]], Iterator[Any]],
                 consumed: dict[str, int]) -> None:
        self.consumed = consumed
        self._read = dict(consumed)  # the generator's own position (ahead after a peek)
        self._it = make(self._read)
        self._ahead: deque[tuple[Any, dict[str, int]]] = deque()

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        batch, position = self._ahead.popleft() if self._ahead else self._pull()
        self.consumed.update(position)
        return batch

    def peek(self, n: int) -> list[Any]:
        """The next n batches, which later calls of next() still return."""
        while len(self._ahead) < n:
            self._ahead.append(self._pull())
        return [batch for batch, _ in list(self._ahead)[:n]]

    def _pull(self) -> tuple[Any, dict[str, int]]:
        batch = next(self._it)
        return batch, dict(self._read)


def lr_scales(k: int, floor: float) -> list[float]:
    """Multipliers of the current learning rate for k cooldown steps: linear from just
    below 1 to just above `floor` (optim.min_lr_ratio)."""
    return [floor + (1 - floor) * (1 - (i + 1) / (k + 1)) for i in range(k)]


def probe_length(step: int, cfg: TrainConfig) -> int:
    """Cooldown steps of a probe at `step` (see the module doc)."""
    t = cfg.trainer
    grown = round(t.eval_cooldown_fraction * step * lr_factor(step, cfg))
    return max(0, min(max(t.eval_cooldown_steps, grown), t.steps - step))


def cooled_eval(run: Any, step: Callable[[Any, list[Any], int], float],
                evaluate: Callable[[Any], dict[str, float]]) -> dict[str, float]:
    """evaluate(run) after a cooldown of probe_length(run.step) steps, on a copy of the run's
    state; the run is left as it was. step(run, micro_batches, seed) is one optimizer step
    of the loop (loop._optimizer_step: no schedule step, run.step unchanged); the probe's
    seeds are not any step's of the run."""
    cfg = run.ctx.cfg
    k, accum = probe_length(run.step, cfg), run.accum
    model = unwrap(run.model)
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    optimizer = copy.deepcopy(run.opt.state_dict())  # also holds every group's current lr
    batches = run.train_data.peek(k * accum)
    base = [group["lr"] for group in run.opt.param_groups]
    try:
        for i, scale in enumerate(lr_scales(k, cfg.optim.min_lr_ratio)):
            for group, lr in zip(run.opt.param_groups, base, strict=True):
                group["lr"] = lr * scale
            seed = step_seed(cfg.trainer.seed, run.ctx.rank, -(run.step * 100_003 + i + 1))
            step(run, batches[i * accum:(i + 1) * accum], seed)
        return evaluate(run)
    finally:
        with torch.no_grad():
            model.load_state_dict(weights)
        run.opt.load_state_dict(optimizer)


__all__ = ["Lookahead", "cooled_eval", "lr_scales", "probe_length"]
