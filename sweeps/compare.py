"""`hip compare`: which setting of a sweep won, and how its trials' curves differ.

Reads everything from MLflow through an explicit MlflowClient, so any tracking URI works (a
SQLite file, an `mlflow server`): the sweep's parent run (its metric, mode and swept keys,
as sweeps/tags.py writes them) and its child runs (one per trial stage; the scored one per
trial). Writes a terminal table (trials sorted by the metric) and PNG plots: the metric
against each swept parameter, and the trials' loss and metric curves. The PNGs are also
logged to the parent run under compare/.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import tracking
from sweeps import tags as T

CURVE_METRIC = "loss"  # the train loss, logged every log_every steps by rank 0


class CompareError(ValueError):
    """Nothing to compare (no such experiment or sweep): one line, exit code 2."""


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    status: str
    metric: float | None
    params: dict[str, str]
    steps: int | None
    wall_s: float | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    startup_s: float | None = None  # process start to first optimizer step
    steps_per_s: float | None = None  # optimizer steps per second after the first


@dataclass
class Comparison:
    parent_run_id: str
    sweep: str
    metric: str
    mode: str
    keys: list[str]
    rows: list[TrialRow]
    table: str
    plots: list[Path]


def _all_runs(c, experiment_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_sweep(uri: str, experiment: str, sweep_run_id: str | None = None):
    """The sweep's parent run: the given one, else the newest sweep in the experiment."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no experiment {experiment!r} at {uri}")
    if sweep_run_id:
        try:
            run = c.get_run(sweep_run_id)
        except Exception:  # MlflowException: unknown run id
            raise CompareError(f"no run {sweep_run_id} at {uri}") from None
        if not T.SweepRunTags.from_run(run).is_sweep:
            raise CompareError(f"run {sweep_run_id} is not a sweep's parent run (no "
                               f"{T.ROLE}=sweep tag)")
        if run.info.experiment_id != exp.experiment_id:
            raise CompareError(f"run {sweep_run_id} is not in experiment {experiment!r}")
        return run
    runs = c.search_runs([exp.experiment_id], T.query_sweeps(),
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise CompareError(f"experiment {experiment!r} at {uri} holds no sweep "
                           "(run `hip sweep` first)")
    return runs[0]


def _status(run) -> str:
    tag = T.TrialRunTags.from_run(run).status
    if tag:
        return tag
    return {"RUNNING": "RUNNING", "FINISHED": "FINISHED", "FAILED": "FAILED"}.get(
        run.info.status, run.info.status)


def collect(uri: str, parent, metric: str) -> list[TrialRow]:
    """One row per trial: its scored run (the finetune stage of pretrain-then-finetune)."""
    c = tracking.client(uri)
    sweep = T.SweepRunTags.from_run(parent)
    keys = sweep.space_keys
    runs = _all_runs(c, parent.info.experiment_id,
                     f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows: dict[str, TrialRow] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):  # newer wins per trial
        tags = T.TrialRunTags.from_run(run)
        if tags.superseded:
            continue
        if sweep.kind == "pretrain-then-finetune" and tags.stage == "pretrain":
            continue
        params = {k: run.data.params.get(k, json.dumps(tags.values.get(k))) for k in keys}
        curves = {}
        for name in dict.fromkeys([CURVE_METRIC, metric]):
            hist = c.get_metric_history(run.info.run_id, name)
            curves[name] = sorted((int(m.step), float(m.value)) for m in hist)
        steps = max((s for h in curves.values() for s, _ in h), default=None)
        end = run.info.end_time or int(time.time() * 1000)
        value = run.data.metrics.get(metric)
        trial_id = tags.trial_id or run.info.run_id
        rows[trial_id] = TrialRow(
            trial_id=trial_id, run_id=run.info.run_id,
            status=_status(run), metric=value, params=params, steps=steps,
            wall_s=(end - run.info.start_time) / 1000.0, curves=curves,
            startup_s=run.data.metrics.get("startup_s"),
            steps_per_s=run.data.metrics.get("steps_per_s"))
    return list(rows.values())


def sort_rows(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    def key(r: TrialRow):
        ok = r.metric is not None and math.isfinite(r.metric)
        return (not ok, (r.metric if mode == "min" else -r.metric) if ok else 0.0)

    return sorted(rows, key=key)


def format_table(rows: list[TrialRow], keys: list[str], metric: str) -> str:
    header = ["#", "trial", "status", metric, *keys, "steps", "wall s", "startup s",
              "steps/s"]
    body = []
    for i, r in enumerate(rows, 1):
        body.append([str(i), r.trial_id, r.status,
                     f"{r.metric:.4f}" if r.metric is not None else "-",
                     *(r.params.get(k, "-") for k in keys),
                     str(r.steps) if r.steps is not None else "-",
                     f"{r.wall_s:.0f}" if r.wall_s is not None else "-",
                     f"{r.startup_s:.1f}" if r.startup_s is not None else "-",
                     f"{r.steps_per_s:.2f}" if r.steps_per_s is not None else "-"])
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plot_metric_vs_params(rows: list[TrialRow], keys: list[str], metric: str,
                          space: dict[str, str], out: Path) -> list[Path]:
    """One PNG per swept key: the metric of every trial that has one, by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    scored = [r for r in rows if r.metric is not None and math.isfinite(r.metric)]
    for key in keys:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [_number(r.params.get(key)) for r in scored]
        numeric = all(x is not None for x in xs) and xs
        if not numeric:  # categorical values (e.g. group tuples): one slot per value
            labels = list(dict.fromkeys(r.params.get(key, "-") for r in scored))
            xs = [labels.index(r.params.get(key, "-")) for r in scored]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        for finished, marker, label in ((True, "o", "finished"),
                                        (False, "x", "stopped early / not finished")):
            pts = [(x, r.metric) for x, r in zip(xs, scored, strict=True)
                   if (r.status == "FINISHED") == finished]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=label)
        if numeric and (space.get(key, "").startswith("loguniform")
                        or (min(xs) > 0 and max(xs) / min(xs) >= 20)):
            ax.set_xscale("log")  # values over decades (learning rates)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (last reported)")
        ax.set_title(f"{metric} vs {key}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric}_vs_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_curves(rows: list[TrialRow], metric: str, out: Path) -> Path:
    """Train loss and the sweep metric against step, one line per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys([CURVE_METRIC, metric]))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in rows:
            hist = r.curves.get(name) or []
            if not hist:
                continue
            label = f"{r.trial_id} " + ", ".join(f"{k.split('.')[-1]}={v}"
                                                  for k, v in r.params.items())
            ax.plot(*zip(*hist, strict=True), linestyle="-" if r.status == "FINISHED" else "--",
                    marker="." if len(hist) < 20 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name} per trial (dashed: stopped early / not finished)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(uri: str, experiment: str, *, sweep_run_id: str | None = None,
            metric: str | None = None, out_dir: str | Path | None = None,
            log_to_run: bool = True) -> Comparison:
    """Table + plots of one sweep (the newest in `experiment` unless `sweep_run_id`)."""
    parent = find_sweep(uri, experiment, sweep_run_id)
    sweep = T.SweepRunTags.from_run(parent)
    sweep_metric = sweep.metric or "val_loss"
    metric = metric or sweep_metric
    mode = (sweep.mode or "min") if metric == sweep_metric else \
        ("max" if "acc" in metric else "min")
    keys = sweep.space_keys
    rows = sort_rows(collect(uri, parent, metric), mode)
    if not rows:
        raise CompareError(f"sweep run {parent.info.run_id} has no trial runs yet")
    table = format_table(rows, keys, metric)
    out = Path(out_dir or Path("runs") / "compare" / parent.info.run_id)
    out.mkdir(parents=True, exist_ok=True)
    space = {k.removeprefix("space."): v for k, v in parent.data.params.items()
             if k.startswith("space.")}
    plots = [*plot_metric_vs_params(rows, keys, metric, space, out),
             plot_curves(rows, metric, out)]
    (out / "trials.txt").write_text(table + "\n")
    if log_to_run:
        c = tracking.client(uri)
        for path in [*plots, out / "trials.txt"]:
            c.log_artifact(parent.info.run_id, str(path), "compare")
    return Comparison(parent.info.run_id, sweep.name or "", metric, mode, keys, rows,
                      table, plots)


__all__ = ["compare", "find_sweep", "collect", "format_table", "sort_rows", "Comparison",
           "TrialRow", "CompareError"]

