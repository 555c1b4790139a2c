"""Faults through the real CLI: kill -9 of prepare and submit, an output folder that cannot be
created, a full disk. Each killed or failed run must leave no corrupt file under a final name;
a rerun must give the bytes of an uninterrupted run. (kill -9 of train: tests/test_e2e.py.)

References are computed in this process with the library functions; the runs that are
killed are subprocesses (``python -m tfpneumo.cli``) killed with SIGKILL on their whole process
group; reruns and the submit error cases go through the CLI in this process (typer's
CliRunner), which saves a TensorFlow start-up each.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import make_run

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo.config import load_config

PREPARE_SET = ["prepare.shard_size=4", "prepare.size=64", "prepare.workers=1"]
PREPARE_ARGS = ["--size", "64", "--workers", "1", "--set", "prepare.shard_size=4"]
SUBMIT_SIZE = 64
# tiny batches so that a submit run spends a few batches writing its CSV
SUBMIT_SET = ["experiment=tiny", "data.image_size=64", "data.batch_size=2"]
SUBMIT_RULE = ["--bottom", "0.5"]
TIMING_KEYS = ("seconds",)  # JSON fields that measure time, not content


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m tfpneumo.cli ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "tfpneumo.cli", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


def start(*args: str, cwd: Path, wrapper: Path | None = None) -> subprocess.Popen:
    """The CLI in its own session, so that killpg reaches it and any worker it spawned."""
    cmd = [sys.executable, str(wrapper)] if wrapper else [sys.executable, "-m", "tfpneumo.cli"]
    return subprocess.Popen([*cmd, *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Polls ``condition()`` every 5 ms while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the kill: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError("timed out waiting for the moment to kill")
        time.sleep(0.005)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 1, no traceback, exactly one ``error:`` line that contains ``needles``."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def cli_in_process(args: list[str]):
    """The CLI run in this process (saves a TensorFlow start-up): typer's Result."""
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    return CliRunner().invoke(app, args)


def assert_in_process_one_line_error(args: list[str], *needles: str) -> None:
    """:func:`cli_in_process` exits with code 1 by the CLI's own handler (SystemExit, not a
    stray exception that would print a traceback) and one ``error:`` line."""
    result = cli_in_process(args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content(path: Path) -> str:
    """sha256 of a cache file; JSON files without their timing fields (top level)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        for key in TIMING_KEYS:
            data.pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return sha256(path)


def cache_contents(out: Path) -> dict[str, str]:
    return {p.name: content(p) for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference_cache(siim_mini, tmp_path_factory, tf) -> Path:
    """An uninterrupted prepare of siim-mini at 64 px with 4 images per shard (18 shards)."""
    from tfpneumo.data.prepare import prepare_cache

    out = tmp_path_factory.mktemp("reference") / "cache"
    prepare_cache(siim_mini, out, load_config(None, PREPARE_SET), progress=False)
    assert len(list(out.glob("*.tfrecord"))) == 18
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount permission; else the test is skipped)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(mount: Path, leave: int) -> None:
    """Fills a filesystem up to ``leave`` free bytes."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    with open(mount / "filler", "wb") as f:
        f.write(bytes(max(0, free - leave)))


# ----------------------------------------------------------------------------- prepare

def test_prepare_killed_then_rerun_gives_identical_cache(siim_mini, reference_cache, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    k = random.Random(seed).randint(1, 12)  # kill once k of the 18 shards are complete
    out = tmp_path / "X"
    args = ["prepare", "--data", str(siim_mini), "--out", str(out), *PREPARE_ARGS]
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: len(list(out.glob("*.tfrecord.json"))) >= k, proc)
    kill_group(proc)
    note = f"killed after {k} sidecars (seed {seed})"

    assert not (out / "manifest.json").exists(), note  # it really was interrupted
    done = sorted(p.name for p in out.glob("*.tfrecord.json"))
    assert len(done) >= k, note
    # Whatever carries a final name is whole: every shard present is the reference's bytes.
    for shard in out.glob("*.tfrecord"):
        assert sha256(shard) == sha256(reference_cache / shard.name), (shard.name, note)

    r = cli_in_process(args)  # the rerun: in this process, where TensorFlow is loaded already
    assert r.exit_code == 0, (note, r.output[-2000:])
    assert f"18 shards ({18 - len(done)} written, {len(done)} reused)" in r.output, (note,
                                                                                   r.output)
    assert not list(out.glob("*.tmp")), note
    got, want = cache_contents(out), cache_contents(reference_cache)
    assert got == want, note
    # Everything but the JSON timing fields is compared byte for byte.
    for name in want:
        if not name.endswith(".json"):
            assert (out / name).read_bytes() == (reference_cache / name).read_bytes(), name


def test_prepare_output_that_cannot_be_created(siim_mini, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = cli("prepare", "--data", str(siim_mini), "--out", str(blocker / "cache"),
            *PREPARE_ARGS, cwd=tmp_path)
    assert_one_line_error(r, str(blocker / "cache"), "cannot write")
    assert blocker.read_text() == "not a folder"


def test_prepare_disk_full(siim_mini, reference_cache, tmp_path, tmpfs):
    fill(tmpfs, 160 * 1024)  # room for a few of the 18 shards (~15 KB each), not all
    out = tmpfs / "cache"
    r = cli("prepare", "--data", str(siim_mini), "--out", str(out), *PREPARE_ARGS, cwd=tmp_path)
    assert_one_line_error(r, "cannot write", "No space left on device")
    assert not (out / "manifest.json").exists() and not (out / "index.csv").exists()
    shards = list(out.glob("*.tfrecord"))
    assert 0 < len(shards) < 18
    for path in out.iterdir():  # no corrupt file under a final name
        if path.suffix == ".tmp":
            continue
        if path.name.endswith(".json"):  # a sidecar: whole JSON, same content
            assert content(path) == content(reference_cache / path.name), path.name
        else:
            assert sha256(path) == sha256(reference_cache / path.name), path.name


# ----------------------------------------------------------------------------- submit

SLOW_SUBMIT = """\
# The real CLI with each test DICOM's loading slowed down, so that a kill lands while the
# CSV is being written (the output bytes do not depend on it).
import sys
import time

import tfpneumo.inference.images as images

_load = images.load_image


def slow_load(*args, **kwargs):
    time.sleep(0.25)
    return _load(*args, **kwargs)


images.load_image = slow_load
from tfpneumo.cli import app  # noqa: E402

sys.argv[0] = "tfpneumo"
app()
"""


@pytest.fixture(scope="module")
def submit_run(siim_mini, tmp_path_factory, tf) -> dict:
    """A tiny untrained model as runs/tiny/fold_0/best.keras and the CSV that an uninterrupted
    submit writes from it (in this process)."""
    from tfpneumo.inference.submission import submit

    work = tmp_path_factory.mktemp("submit")
    make_run(work, experiment="tiny")
    sets = [*SUBMIT_SET, f"data.cache={work / 'no-cache'}"]
    ref = work / "reference.csv"
    submit(load_config(None, sets), out=ref, data=siim_mini, size=SUBMIT_SIZE,
           rule={"bottom": 0.5}, workdir=work, progress=False)
    args = ["submit", "--data", str(siim_mini), "--size", str(SUBMIT_SIZE), *SUBMIT_RULE]
    for s in sets:
        args += ["--set", s]
    return {"work": work, "reference": ref, "args": args}


def test_submit_killed_leaves_no_partial_csv_and_rerun_is_identical(submit_run, monkeypatch):
    work = submit_run["work"]
    monkeypatch.chdir(work)  # the CLI finds runs/<experiment> in the working folder
    wrapper = work / "slow_submit.py"
    wrapper.write_text(SLOW_SUBMIT)
    out = work / "killed.csv"
    tmp = work / "killed.csv.tmp"
    args = [*submit_run["args"], "--out", str(out)]
    proc = start(*args, cwd=work, wrapper=wrapper)
    wait_for(tmp.exists, proc)
    time.sleep(random.uniform(0.0, 0.8))  # somewhere within the 10 x 0.25 s of writing
    kill_group(proc)
    assert tmp.exists()
    assert not out.exists()  # only the temporary file, never a partial submission

    r = cli_in_process(args)
    assert r.exit_code == 0, r.output[-2000:]
    assert not tmp.exists()
    assert out.read_bytes() == submit_run["reference"].read_bytes()
    assert len(out.read_text().splitlines()) == 11  # header + the 10 test ids


def test_submit_output_that_cannot_be_created(submit_run, monkeypatch):
    work = submit_run["work"]
    monkeypatch.chdir(work)  # the CLI finds runs/<experiment> in the working folder
    blocker = work / "a_file"
    blocker.write_text("not a folder")
    assert_in_process_one_line_error(
        [*submit_run["args"], "--out", str(blocker / "sub.csv")], "cannot write")
    assert sorted(p.name for p in work.glob("a_file*")) == ["a_file"]
    assert blocker.read_text() == "not a folder"


def test_submit_disk_full(submit_run, tmpfs, monkeypatch):
    monkeypatch.chdir(submit_run["work"])
    out = tmpfs / "submission.csv"
    old = submit_run["reference"].read_bytes()
    out.write_bytes(old)  # a previous submission must survive a failed rerun intact
    fill(tmpfs, 0)
    assert_in_process_one_line_error([*submit_run["args"], "--out", str(out)], "cannot write",
                                     "No space left on device")
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler", "submission.csv"]


def test_predict_disk_full(submit_run, siim_mini, tmpfs, monkeypatch):
    """Issue 11: predict on a full disk left 0-byte PNGs under final names."""
    monkeypatch.chdir(submit_run["work"])
    (dicom,) = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:1]
    out = tmpfs / "pred"
    out.mkdir()
    old = out / f"{dicom.stem}_prob.png"
    old.write_bytes(b"a previous prediction")  # must survive a failed rerun intact
    fill(tmpfs, 0)
    args = ["predict", str(dicom), "--out", str(out), "--size", str(SUBMIT_SIZE), "--no-hflip",
            *SUBMIT_RULE]
    for s in [*SUBMIT_SET, f"data.cache={submit_run['work'] / 'no-cache'}"]:
        args += ["--set", s]
    assert_in_process_one_line_error(args, f"{old}: cannot write (No space left on device); "
                                           "free space and rerun")
    assert old.read_bytes() == b"a previous prediction"
    assert sorted(p.name for p in out.iterdir()) == [old.name]


# ----------------------------------------------------------------------------- train

def test_train_checkpoint_disk_full(tmpfs, tf, capfd):
    """The checkpoint writer of train (RunState's top-k, no training): on a full disk a clean
    OSError naming the checkpoint, no h5py tracebacks, and the files already there whole (HDF5
    writing the file itself raised, printed tracebacks, then crashed the process)."""
    import types

    import keras

    from tfpneumo.training.callbacks import RunState

    inp = keras.Input((16, 16, 1))
    net = keras.Model(inp, keras.layers.Conv2D(64, 3)(keras.layers.Conv2D(64, 3)(inp)))  # ~150 KB
    run = tmpfs / "fold_0"
    state = RunState(run, (0.5,), top_k=2, trainer=types.SimpleNamespace(net=net))
    state._update_top_k(0, 0.5)
    first = run / "checkpoints" / "epoch001-dice0.5000.weights.h5"
    kept = {p: p.read_bytes() for p in (first, run / "best.weights.h5")}
    fill(tmpfs, 16 * 1024)
    with pytest.raises(OSError) as info:
        state._update_top_k(1, 0.7)  # better: a new checkpoint and a new best.weights.h5
    second = run / "checkpoints" / "epoch002-dice0.7000.weights.h5"
    assert str(info.value) == f"[Errno 28] No space left on device: '{second}'"
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p.name for p in run.rglob("*")) == sorted(
        ["checkpoints", first.name, "best.weights.h5"])
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_train_full_disk_is_a_one_line_error(tmp_path, tf, monkeypatch):
    """ENOSPC from anywhere in a fold's training: one line naming the file, lock released."""
    import errno

    from tfpneumo import TfpneumoError
    from tfpneumo.training import run

    path = tmp_path / "runs" / "full" / "fold_0" / "state" / "epoch-0002.npz"

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(run, "_train_fold_locked", full)
    cfg = load_config(None, ["experiment=full", f"data.cache={tmp_path / 'no-cache'}"])
    with pytest.raises(TfpneumoError) as info:
        run.train_fold(cfg, 0, tmp_path)
    assert str(info.value) == (f"{path}: cannot write (No space left on device); free space "
                               "and rerun to resume")
    assert not (tmp_path / "runs" / "full" / "fold_0" / ".lock").exists()
