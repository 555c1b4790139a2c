"""tfpneumo.runs.locked: one run per fold folder (train) and per output (submit); a lock left
by a killed run is recovered."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tfpneumo import runs
from tfpneumo.runs import Locked, locked


def fake_lock(path, pid: int, start: str | None, host: str | None = None, what: str = "train"):
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                "start": start, "token": "0" * 16, "what": what}))


def test_lock_is_released_after_the_block_and_after_an_exception(tmp_path):
    lock = tmp_path / runs.LOCK
    with locked(lock, "train fold 0"):
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not lock.exists()
    with pytest.raises(ZeroDivisionError), locked(lock, "train fold 0"):
        raise ZeroDivisionError
    assert not lock.exists()


def test_a_second_holder_is_refused_with_the_folder_and_the_pid(tmp_path):
    lock = tmp_path / runs.LOCK
    with locked(lock, "train fold 0"):
        with pytest.raises(Locked) as info, locked(lock, "train fold 0"):
            pass
        assert lock.exists()  # the refused one leaves the holder's lock alone
    assert str(info.value) == (f"{tmp_path}: train fold 0 refused, train fold 0 of process "
                               f"{os.getpid()} on {socket.gethostname()} holds it "
                               f"(remove {lock} if that process is gone)")


def test_lock_of_a_living_process_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / runs.LOCK
        fake_lock(lock, sleeper.pid, runs._start_marker(sleeper.pid))
        with pytest.raises(Locked, match=f"process {sleeper.pid} on"), locked(lock, "submit"):
            pass
        fake_lock(lock, sleeper.pid, runs._start_marker(sleeper.pid), host="elsewhere.invalid")
        with pytest.raises(Locked, match="on elsewhere.invalid holds it"), locked(lock, "submit"):
            pass  # another host's pid cannot be checked from here
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_a_dead_process_or_a_reused_pid_is_recovered(tmp_path):
    lock = tmp_path / runs.LOCK
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    fake_lock(lock, int(dead.stdout), None)  # as a run killed by -9 leaves it
    with locked(lock, "train fold 0"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    if runs._start_marker(os.getpid()) is not None:
        fake_lock(lock, os.getpid(), "1")  # this pid, but a process that started long ago
        with locked(lock, "train fold 0"):
            assert json.loads(lock.read_text())["token"] != "0" * 16
    fake_lock(lock, os.getpid(), runs._start_marker(os.getpid()))  # this very process
    with pytest.raises(Locked), locked(lock, "train fold 0"):
        pass


def test_a_lock_being_written_is_respected_and_an_old_empty_one_recovered(tmp_path):
    lock = tmp_path / runs.LOCK
    lock.write_text("")
    with pytest.raises(Locked, match="another process is taking its lock"), locked(lock, "x"):
        pass
    os.utime(lock, (1, 1))  # left by a crash long ago
    with locked(lock, "x"):
        pass
    assert not lock.exists()


def test_train_refuses_a_fold_another_run_holds(tmp_path):
    from tfpneumo.config import load_config
    from tfpneumo.training.run import train_fold

    cfg = load_config(None, ["experiment=locked", f"data.cache={tmp_path / 'no-cache'}"])
    fold_dir = runs.fold_dir(cfg.experiment, 0, tmp_path)
    fold_dir.mkdir(parents=True)
    with locked(fold_dir / runs.LOCK, "train fold 0"):
        with pytest.raises(Locked, match=f"^{fold_dir}: train fold 0 refused, train fold 0 of "
                                         f"process {os.getpid()}"):
            train_fold(cfg, 0, tmp_path)
    assert sorted(p.name for p in fold_dir.iterdir()) == []  # nothing written, lock released


def test_locked_folder_removes_the_folders_it_made_when_left_empty(tmp_path):
    """A run that failed on its inputs leaves nothing (tests/training/test_run.py); one that
    wrote something keeps its folder."""
    fold = tmp_path / "runs" / "x" / "fold_0"
    with runs.locked_folder(fold, "train fold 0"):
        assert (fold / runs.LOCK).exists()
    assert not (tmp_path / "runs").exists()
    with runs.locked_folder(fold, "train fold 0"):
        (fold / "config.yaml").write_text("x: 1\n")
    assert sorted(p.name for p in fold.iterdir()) == ["config.yaml"]
