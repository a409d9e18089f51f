"""One writer per store: the lock file, a second writer refused, readers unaffected, stale locks recovered."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from _lock_helpers import weights

from devinterp.errors import StaleLockWarning, StoreError, StoreLockedError
from devinterp.store import LOCK_FILE, SnapshotStore

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "_lock_helpers.py"), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(proc: subprocess.Popen, expected: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
    raise AssertionError(f"no {expected!r} within {timeout}s")


def test_two_processes_second_writer_refused_reader_consistent(tmp_path):
    root = str(tmp_path / "store")
    steps = 30
    go, stop = tmp_path / "go", tmp_path / "stop"
    first = _spawn("writer", root, str(steps), "0.02", str(go))
    _wait_line(first, "ready")  # the first writer holds the store and waits
    reader = _spawn("reader", root, str(stop))
    second = _spawn("second", root)
    out, err = second.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["refused"], err
    _wait_line(reader, "reading")
    go.write_text("")  # the first writer goes on while the reader reads
    # the refusal names the holder (pid, host, since when) and what to do
    assert f"pid {first.pid}" in result["message"] and socket.gethostname() in result["message"]
    assert "since 20" in result["message"] and "another folder" in result["message"]
    assert result["holder"]["pid"] == first.pid
    _wait_line(first, "done")
    assert first.wait(timeout=60) == 0
    stop.write_text("")
    out, err = reader.communicate(timeout=120)
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["errors"] == 0 and seen["reads"] > steps, err  # read throughout, never an error
    assert seen["last_steps"] == list(range(steps))
    # every snapshot of the first writer is intact, and the lock is gone
    store = SnapshotStore(root)
    assert store.steps() == list(range(steps)) and store.verify().ok
    for step in (0, steps // 2, steps - 1):
        assert torch.equal(store.load(step).state_dict["w"], weights(step)["w"])
    assert not (Path(root) / LOCK_FILE).exists()


def test_sigkilled_holder_leaves_a_lock_the_next_writer_recovers(tmp_path):
    root = tmp_path / "store"
    holder = _spawn("holder", str(root))
    _wait_line(holder, "ready")
    with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
        SnapshotStore(root, mode="a")  # alive: refused
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = json.loads((root / LOCK_FILE).read_text())
    assert lock["pid"] == holder.pid  # left behind by the kill
    with pytest.warns(StaleLockWarning, match=f"pid {holder.pid}.*recovered|recovered"):
        store = SnapshotStore(root, mode="a")
    assert store.lock_note is not None and str(holder.pid) in store.lock_note
    store.save(1, weights(1))
    assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    store.close()
    assert not (root / LOCK_FILE).exists()
    assert SnapshotStore(root).steps() == [0, 1] and SnapshotStore(root).verify().ok


def test_same_process_second_writer_and_release(tmp_path):
    root = tmp_path / "s"
    writer = SnapshotStore(root, mode="a")
    writer.save(0, weights(0))
    with pytest.raises(StoreLockedError, match="this very process"):
        SnapshotStore(root, mode="a")
    reader = SnapshotStore(root)  # readers never need the lock
    assert reader.steps() == [0]
    writer.close()
    with pytest.raises(StoreError, match="closed"):
        writer.save(1, weights(1))
    assert writer.steps() == [0]  # reading a closed writer still works
    with SnapshotStore(root, mode="a") as again:
        again.save(1, weights(1))
    assert not (root / LOCK_FILE).exists()
    dropped = SnapshotStore(root, mode="a")
    del dropped
    gc.collect()  # a store that is garbage-collected releases its lock
    SnapshotStore(root, mode="a").close()


def test_lock_of_another_host_is_never_broken(tmp_path):
    root = tmp_path / "s"
    SnapshotStore(root, mode="a").close()
    (root / LOCK_FILE).write_text(json.dumps({"pid": 1234, "host": "gpu-node-7", "started": time.time() - 60,
                                              "purpose": "SnapshotStore(mode='a')", "token": "x"}))
    with pytest.raises(StoreLockedError) as info:
        SnapshotStore(root, mode="a")
    msg = str(info.value)
    assert "pid 1234 on host gpu-node-7" in msg and f"delete {root / LOCK_FILE}" in msg
    assert "\n" not in msg and info.value.holder["host"] == "gpu-node-7"
    assert (root / LOCK_FILE).exists()


def test_reused_pid_counts_as_stale(tmp_path):
    """A lock whose pid now runs a process started after the lock was taken is stale."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    root = tmp_path / "s"
    SnapshotStore(root, mode="a").close()
    (root / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "started": 1000.0, "token": "old"}))
    with pytest.warns(StaleLockWarning):
        SnapshotStore(root, mode="a").close()
    (root / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                              "started": 1000.0, "token": "old"}))
    with pytest.warns(StaleLockWarning, match="newer process"):
        SnapshotStore(root, mode="a").close()


def test_fsspec_store_second_writer_refused():
    root = f"memory://lock-test-{uuid.uuid4().hex}"
    writer = SnapshotStore(root, mode="a")
    writer.save(0, weights(0))
    with pytest.raises(StoreLockedError):
        SnapshotStore(root, mode="a")
    assert SnapshotStore(root).steps() == [0]
    writer.close()
    SnapshotStore(root, mode="a").close()


def test_a_file_is_not_a_store(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        SnapshotStore(path, mode="a")
    with pytest.raises(StoreError, match="is a file, not a"):
        SnapshotStore.open(path)


def test_racing_writers_one_wins(tmp_path):
    """Threads of one process racing for the same store: exactly one gets it, the others are refused."""
    import threading

    root = tmp_path / "s"
    SnapshotStore(root, mode="a").close()
    barrier = threading.Barrier(6)
    won: list[SnapshotStore] = []
    refused: list[str] = []

    def contend() -> None:
        barrier.wait()
        try:
            won.append(SnapshotStore(root, mode="a"))
        except StoreLockedError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleLockWarning)  # no live lock may be judged stale in a race
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(won) == 1 and len(refused) == 5  # a thread that judged a lock stale would count in neither
    won[0].close()
