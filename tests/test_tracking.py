"""MLflow conventions on a real SQLite store: the experiment opens in MLflow's training-runs
view, each run names the `hip` command that made it and its shards as a dataset input."""

from __future__ import annotations

import time

import pytest
from netutil import free_port

from pipeline import run_logger, tracking

MANIFEST = {"modality": "image", "splits": {"train": 90, "val": 10}, "classes": ["a", "b"],
            "columns": {"image": {"shape": [16, 16, 3], "dtype": "uint8"}}}


def test_experiments_are_tagged_as_model_development(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    new = tracking.experiment_id(uri, "fresh")
    assert c.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made before the tag existed gets it; a user's own kind is kept.
    old = c.create_experiment("old")
    assert tracking.experiment_id(uri, "old") == old
    assert c.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    mine = c.create_experiment("mine", tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})
    tracking.experiment_id(uri, "mine")
    assert c.get_experiment(mine).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


def test_runs_record_their_source_and_shards_as_a_dataset(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", run_name="r", params={"a": 1},
                                tags=tracking.source_tags("hip pretrain"))
    tracking.log_dataset(uri, run_id, MANIFEST, "gs://bucket/shards/image")
    run = tracking.client(uri).get_run(run_id)
    assert run.data.tags["mlflow.source.name"] == "hip pretrain"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "image" and inp.dataset.source_type == "gs"
    assert inp.dataset.digest == tracking.manifest_hash(MANIFEST)
    assert "gs://bucket/shards/image" in inp.dataset.source
    assert '"train": 90' in inp.dataset.profile and "uint8" in inp.dataset.schema
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]


def _log_at_once(uri: str, runs: list[str]) -> list[str]:
    """log_dataset for every run from its own thread, released together -> the errors."""
    import threading

    barrier, errors = threading.Barrier(len(runs)), []

    def log(run_id: str) -> None:
        barrier.wait()
        try:
            tracking.log_dataset(uri, run_id, MANIFEST, "/data/shards/image")
        except Exception as e:  # noqa: BLE001 - any failure is the test's finding
            errors.append(repr(e)[:200])

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_runs_starting_together_all_record_the_shared_dataset(tmp_path):
    """A sweep's first trials log the same shards at once: in a SQL store they race to
    create the experiment's dataset row, and the loser's insert broke the unique key (a
    benchmark trial failed with it). 8 threads at a barrier, 5 fresh stores: before the
    fix most rounds raised."""
    for round_ in range(5):
        uri = f"sqlite:///{tmp_path}/race{round_}.db"
        runs = [tracking.start_run(uri, "race", run_name=f"r{i}", params={}, tags={})
                for i in range(8)]
        assert _log_at_once(uri, runs) == []
        c = tracking.client(uri)
        for run_id in runs:
            (inp,) = c.get_run(run_id).inputs.dataset_inputs
            assert inp.dataset.digest == tracking.manifest_hash(MANIFEST)


def test_ui_links_open_the_runs_table(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.experiment_id(uri, "exp")
    link = tracking.ui_link(uri, "exp")
    assert f"mlflow ui --backend-store-uri {uri}" in link
    assert link.endswith(f"/#/experiments/{exp}/runs?workflowType=machine_learning")


# ------------------------------------------------------------ RunLogger: outages of MLflow


class _Flaky:
    """A real MlflowClient whose writes fail like an unreachable server while state["down"]."""

    def __init__(self, real, state):
        self._real, self._state = real, state

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in ("log_batch", "log_artifact", "set_terminated"):
            return attr

        def call(*args, **kwargs):
            if self._state["down"]:
                raise ConnectionError("Connection refused")
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    """(uri, run_id, state, warnings): a SQLite run reached through _Flaky clients; no
    back-off sleeps and no wait between attempts while down."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", run_name="r", params={}, tags={})
    state = {"down": False}
    real = tracking.client
    monkeypatch.setattr(tracking, "client", lambda u: _Flaky(real(u), state))
    monkeypatch.setattr(run_logger, "RETRY_BUDGET_S", 0.0)
    monkeypatch.setattr(run_logger, "PROBE_INTERVAL_S", 0.0)
    return uri, run_id, state, []


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in tracking.client(uri).get_metric_history(run_id, key)]


def test_run_logger_buffers_an_outage_and_sends_it_in_order(flaky):
    uri, run_id, state, warnings = flaky
    log = run_logger.RunLogger(uri, run_id, warn=warnings.append)
    assert all(log.log_metrics({"loss": 1.0 / s, "lr": 0.1}, s) for s in (1, 2, 3))
    state["down"] = True
    assert not any(log.log_metrics({"loss": 1.0 / s, "lr": 0.1}, s) for s in range(4, 9))
    assert not log.set_tags({"hip.resumed_from_step": "3"})
    assert not log.log_bytes("reconstructions/step_000008.png", b"png")
    assert log.pending == {"points": 10, "tags": 1, "artifacts": 1}
    assert len(warnings) == 1 and "unreachable" in warnings[0]  # one line for the outage
    assert "ConnectionError: Connection refused" in warnings[0]
    state["down"] = False
    assert log.log_metrics({"loss": 0.1, "lr": 0.1}, 9)  # the first call that gets through
    assert log.pending == {"points": 0, "tags": 0, "artifacts": 0}
    assert "answers again" in warnings[1]
    assert "sent the 12 metric points, 1 tags, 1 artifacts held" in warnings[1]
    assert _steps(uri, run_id) == list(range(1, 10)) and _steps(uri, run_id, "lr") == \
        list(range(1, 10))
    run = tracking.client(uri).get_run(run_id)
    assert run.data.tags["hip.resumed_from_step"] == "3"
    assert [a.path for a in tracking.client(uri).list_artifacts(run_id, "reconstructions")] \
        == ["reconstructions/step_000008.png"]
    assert log.flush() and len(warnings) == 2  # nothing left: no attempt, no line


def test_run_logger_keeps_the_newest_points_and_says_how_many_were_dropped(flaky,
                                                                            monkeypatch):
    uri, run_id, state, warnings = flaky
    monkeypatch.setattr(run_logger, "MAX_BUFFERED_POINTS", 5)
    log = run_logger.RunLogger(uri, run_id, warn=warnings.append)
    state["down"] = True
    for s in range(1, 11):
        log.log_metrics({"loss": float(s)}, s)
    assert log.pending["points"] == 5
    assert [w.split(":")[0] for w in warnings] == ["[hip] warning", "[hip] warning"]
    assert "buffer full" in warnings[1]
    assert not log.flush(budget=0)  # still down at the end: one line naming what is lost
    assert "5 metric points" in warnings[2] and "not logged" in warnings[2]
    state["down"] = False
    assert log.flush(budget=0)
    assert _steps(uri, run_id) == [6, 7, 8, 9, 10]
    assert "5 older ones were dropped" in warnings[3]


def test_run_logger_drops_what_mlflow_rejects_and_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", run_name="r", params={}, tags={})
    warnings = []
    log = run_logger.RunLogger(uri, run_id, warn=warnings.append)
    assert log.log_metrics({"bad*name": 1.0}, 1)  # an invalid metric name: never retried
    assert log.log_metrics({"loss": 1.0}, 2)
    assert len(warnings) == 1 and "rejected metrics" in warnings[0]
    assert _steps(uri, run_id) == [2] and log.pending["points"] == 0


def test_run_logger_bounds_the_time_an_unreachable_server_costs(monkeypatch, capsys):
    """A real refused connection: MLflow's own retries (7 over ~4 minutes) are off for the
    logger's thread only, each call gives up within its budget, and while MLflow is down
    calls between probes return at once."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setattr(run_logger, "RETRY_BUDGET_S", 1.5)  # attempts at 0 and 1 s
    warnings = []
    log = run_logger.RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32,
                               warn=warnings.append)
    t0 = time.monotonic()
    assert not log.log_metrics({"loss": 1.0}, 1)
    assert 1.0 <= time.monotonic() - t0 < 10
    t1 = time.monotonic()
    assert not log.log_metrics({"loss": 1.0}, 2)  # before the next probe: buffered only
    assert time.monotonic() - t1 < 0.5
    assert len(warnings) == 1 and log.pending["points"] == 2
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 7  # other callers keep MLflow's default
    t2 = time.monotonic()
    assert not run_logger.end_run(log.uri, log.run_id, "KILLED", budget=0)
    assert time.monotonic() - t2 < 5
    assert "could not mark MLflow run" in capsys.readouterr().err


def test_run_logger_gives_up_on_a_server_that_never_answers(monkeypatch):
    """A server that accepts connections and never replies (a hung process, a black hole):
    each attempt ends after REQUEST_TIMEOUT_S, not MLflow's 120 s per request."""
    import socket

    monkeypatch.setattr(run_logger, "RETRY_BUDGET_S", 0.0)
    monkeypatch.setattr(run_logger, "REQUEST_TIMEOUT_S", 0.5)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes the handshakes; nobody reads or answers
        log = run_logger.RunLogger(f"http://127.0.0.1:{hung.getsockname()[1]}", "0" * 32,
                                   warn=lambda message: None)
        t0 = time.monotonic()
        assert not log.log_metrics({"loss": 1.0}, 1)
        assert time.monotonic() - t0 < 5
