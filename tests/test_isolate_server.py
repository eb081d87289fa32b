"""The fork server behind per-file isolation (pipeline/data/isolate.py, forkserver.py): a
crashed or timed-out decode child is replaced by a fork of the same server, not by a new
interpreter, and a server that dies is replaced by a new one. In-process, no Ray."""

from __future__ import annotations

import os
import signal
import time

import pytest
from PIL import Image

from pipeline.data import isolate
from pipeline.data.config import PreprocessConfig
from pipeline.data.decode import DecodeSpec
from pipeline.data.isolate import DECODE_FAULT_ENV


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(names, timeout_s) -> {name: (kind, reason)} through decode_isolated, in order."""
    monkeypatch.setenv(DECODE_FAULT_ENV, "crash:crashme;hang:hangme")
    spec = DecodeSpec.from_config(PreprocessConfig(modality="image", image={"size": 8}))
    isolate.shutdown()

    def run(names: list[str], timeout_s: float = 60.0) -> list[tuple[str, str]]:
        for n in names:
            Image.new("RGB", (12, 12), (9, 99, 199)).save(tmp_path / f"{n}.png")
        items = [(i, str(tmp_path / f"{n}.png")) for i, n in enumerate(names)]
        out = list(isolate.decode_isolated(items, spec.decode, isolate.read_local,
                                           timeout_s))
        assert [i for i, _ in out] == list(range(len(names)))  # in order, one per file
        return [(r[0], r[1] if r[0] == "err" else "") for _, r in out], \
            [r[2] for _, r in out if r[0] == "err"]

    yield run
    isolate.shutdown()


def test_crashed_and_timed_out_children_are_forks_of_one_server(run):
    assert run(["a"])[0] == [("ok", "")]
    server = isolate._SERVER
    first = isolate._CHILD
    assert _ppid(first.pid) == server.pid  # a fork of the server, not of this process

    results, details = run(["b", "crashme1", "c", "crashme2", "d", "hangme", "e"], 2.0)
    assert results == [("ok", ""), ("err", "crashed"), ("ok", ""), ("err", "crashed"),
                       ("ok", ""), ("err", "timeout"), ("ok", "")]
    assert "SIGABRT" in details[0] and "SIGABRT" in details[1]
    assert "file_timeout_s=2" in details[2]
    assert isolate._SERVER is server and server.alive()  # unchanged after 3 replacements
    child = isolate._CHILD
    assert child.pid != first.pid and _ppid(child.pid) == server.pid
    assert not os.path.exists(f"/proc/{first.pid}")  # the crashed one was reaped


def test_a_killed_server_is_replaced(run):
    assert run(["a"])[0] == [("ok", "")]
    old = isolate._SERVER
    os.kill(old.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while old.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)

    results, details = run(["b", "crashme", "c"])
    assert results == [("ok", ""), ("err", "crashed"), ("ok", "")]
    assert "SIGABRT" in details[0]  # the new server's child crashed: its signal is known
    new = isolate._SERVER
    assert new is not old and new.pid != old.pid and new.alive()
    assert _ppid(isolate._CHILD.pid) == new.pid


def test_the_server_runs_one_thread(run):
    run(["a"])
    assert len(os.listdir(f"/proc/{isolate._SERVER.pid}/task")) == 1


def test_forks_share_the_servers_imports(run):
    """A replacement costs a fork, not an interpreter start with the decoders' imports."""
    run(["a"])
    start = time.monotonic()
    results, _ = run(["crashme1", "crashme2", "crashme3", "crashme4", "b"])
    assert results == [("err", "crashed")] * 4 + [("ok", "")]
    assert time.monotonic() - start < 5  # 4 fresh interpreters would take >= 4 x ~1.5 s


def test_a_batch_left_early_does_not_leak_answers_into_the_next(run, tmp_path):
    run(["a", "b", "c"])
    spec = DecodeSpec.from_config(PreprocessConfig(modality="image", image={"size": 8}))
    items = [(i, str(tmp_path / f"{n}.png")) for i, n in enumerate("abc")]
    results = isolate.decode_isolated(items, spec.decode, isolate.read_local, 60)
    next(results)
    results.close()  # two answers unread
    assert run(["c", "b"])[0] == [("ok", ""), ("ok", "")]
