"""``tfpneumo train`` on several machines: two worker processes on 127.0.0.1 (one CPU device
each, MultiWorkerMirroredStrategy through ``--workers``) against MirroredStrategy over two
logical CPUs in one process and against one device with the same global batch.

Oracles: the run states of the other strategies, trained on the same cache with the same seed
(the weights after the last epoch, BatchNorm statistics and optimizer moments included), and
for the kill test the epoch count, the optimizer's step counter and the run folder of an
uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

THIS = Path(__file__).resolve()
TESTS_DIR = THIS.parents[1]
TIMEOUT = 300  # seconds for one launch (about 60-90 s on 2 shared cores)

sys.path.insert(0, str(TESTS_DIR))
from system.test_scaleout import child_env, free_ports  # noqa: E402

pytestmark = pytest.mark.slow


def config_file(folder: Path, cache: Path, epochs: int, steps: int, batch: int = 4) -> Path:
    """A tiny run: resnet18 with thin decoder, 64 px, global batch ``batch``, no augmentation,
    and synchronized BatchNorm so that one device and two replicas compute the same
    statistics."""
    cfg = {
        "experiment": "run", "seed": 3,
        "data": {"cache": str(cache), "image_size": 64, "batch_size": batch, "shuffle_buffer": 16},
        "augment": {"hflip": 0.0, "color_p": 0.0, "affine_p": 0.0},
        "model": {"encoder": "resnet18", "encoder_weights": "none",
                  "decoder_filters": [16, 8, 8, 8, 8], "sync_batchnorm": True,
                  "skip_dropout": 0.0, "head_dropout": 0.0},
        "optimizer": {"lr": 0.001, "warmup_epochs": 0.0},
        "train": {"epochs": epochs, "steps_per_epoch": steps, "swa_epochs": 0, "top_k": 1,
                  "tensorboard_images": 0, "val_thresholds": [0.5]},
    }
    path = folder / f"tiny-{epochs}x{steps}-b{batch}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from factories import COUNTS, write_shards

    folder = tmp_path_factory.mktemp("mw-cache") / "cache"
    write_shards(folder, COUNTS, texture=True)
    return folder


def env(**extra: str) -> dict[str, str]:
    # One thread per op: three processes share the two cores without oversubscribing them.
    return child_env(TF_NUM_INTRAOP_THREADS="1", **extra)


def launch_workers(config: Path, experiment: str, cwd: Path, ports: list[int]):
    workers = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [subprocess.Popen(
        [sys.executable, "-m", "tfpneumo.cli", "train", "--config", str(config), "--fold", "0",
         "--set", f"experiment={experiment}", "--workers", workers, "--worker-index", str(i)],
        cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(len(ports))]


def finish(procs, timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def final_state(run: Path) -> dict[str, np.ndarray]:
    state = json.loads((run / "state" / "state.json").read_text())
    with np.load(run / "state" / state["arrays"]) as z:
        return {k: z[k] for k in z.files}


def max_differences(a: dict, b: dict, prefix: str) -> list[float]:
    """Per array: the largest difference, relative to the array's largest value where that
    is over 1 (BatchNorm's moving statistics of raw pixels reach ~1e4, where float32 steps
    are 1e-3)."""
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    out = []
    for k in keys:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        out.append(float(np.max(np.abs(x - y), initial=0.0) / max(1.0, np.max(np.abs(y),
                                                                               initial=0.0))))
    return out


LOCAL = """
import sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfpneumo.config import load_config
from tfpneumo.training.run import train
for strategy in ("mirrored", "one_device"):
    cfg = load_config(sys.argv[1], [f"experiment={strategy}", f"train.strategy={strategy}"])
    print(train(cfg, [0], Path(sys.argv[2])))
"""


def test_two_machines_train_like_two_gpus_and_like_one_device(cache, tmp_path):
    # Global batch 12 on the 40 images of fold 0: one device validates in batches 12, 12, 12,
    # 4; two replicas in one process (6 each) get 8 batches of 5, since plain batches of 6
    # would leave one replica's 4th step empty (that failed: TensorFlow's CPU convolution
    # returns its input for an empty batch); two machines validate 20 images each, in 4
    # batches of 5 (data.pipeline.even_batches).
    config = config_file(tmp_path, cache, epochs=1, steps=1, batch=12)
    script = tmp_path / "local.py"
    script.write_text(LOCAL)
    workers = launch_workers(config, "two_machines", tmp_path, free_ports(2))
    # MirroredStrategy over 2 logical CPUs, then one device, in one process (measured: the
    # same figures as each in a process of its own)
    local = subprocess.Popen([sys.executable, str(script), str(config), str(tmp_path)],
                             env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = finish([*workers, local])
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{err[-3000:]}"
    (_, chief_out, chief_err), (_, worker_out, worker_err), _ = results
    assert "multi_worker x2, worker 0 of 2" in chief_err
    assert "trained as worker 1" in worker_out

    runs = tmp_path / "runs"
    two, mirrored, one = (runs / name / "fold_0" for name in ("two_machines", "mirrored",
                                                              "one_device"))
    # Only the chief wrote: the run folder holds what a one-machine run holds, nothing more,
    # and the other worker's temporary folder is gone.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in mirrored.iterdir())
    scratch = re.search(r"this worker only (\S+)", worker_err).group(1)
    assert not Path(scratch).exists()
    assert json.loads((two / "result.json").read_text())["epochs"] == 1

    a, b, c = final_state(two), final_state(mirrored), final_state(one)
    # One optimizer step, compared through the weights (BatchNorm statistics included) and
    # Adam's moments (0.1 x the all-reduced gradient and 0.001 x its square). Later Adam steps
    # amplify float differences where a gradient is near 0, hence one step.
    report = {pair: (max(max_differences(x, y, "net_")), max(max_differences(x, y, "opt_")))
              for pair, (x, y) in {"two/mirrored": (a, b), "two/one": (a, c)}.items()}
    print(report)
    # Two processes = one process with two replicas: the same rows of the same global batch on
    # each replica, the same all-reduced gradients and BatchNorm moments; only oneDNN's float
    # order inside the convolutions differs (measured 3.5e-7 and 1.7e-9; 6.4e-7 and 1.1e-9
    # with a global batch of 4).
    assert report["two/mirrored"][0] < 1e-5 and report["two/mirrored"][1] < 1e-7, report
    # = one device with the global batch: synchronized BatchNorm computes its moments over
    # the same 12 images (measured 1.9e-5 and 2.4e-8: Adam's first step divides each gradient
    # by its own size). On the flat images of the other tests Keras' E[x^2] - E[x]^2 loses
    # most digits, and gradients differed by up to 6 %.
    assert report["two/one"][0] < 5e-5 and report["two/one"][1] < 1e-7, report
    assert int(a["n_net"]) == int(c["n_net"])

    # Validation: each machine scored its half of the fold, and the all-reduced figures are
    # those of the whole fold on one process's two replicas.
    val = {name: validation_logs(run) for name, run in
           (("two", two), ("mirrored", mirrored), ("one", one))}
    assert val["two"].keys() == val["mirrored"].keys() == val["one"].keys()
    for key, value in val["two"].items():
        assert value == pytest.approx(val["mirrored"][key], rel=1e-5), key
    # and one device's (batches 12, 12, 12, 4), but for the positives-only mask loss: a mean
    # over each batch's positive images, which depends on how the fold is batched (measured
    # 0.806 on 8 batches of 5, 0.642 on one device). val_label_loss is a mean over images
    # (compat.loss_figures_per_image; Keras' figure was 53.17 on one device, where the mean
    # over the 40 images is 63.81).
    for key, value in val["two"].items():
        if key not in ("val_mask_loss", "val_loss"):
            assert value == pytest.approx(val["one"][key], rel=1e-5), key


def validation_logs(run: Path) -> dict[str, float]:
    """The ``val_*`` figures of the last epoch in ``run``'s history.csv."""
    with (run / "history.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    return {k: float(v) for k, v in last.items() if k.startswith("val_")}


def wait_for_epochs(run: Path, n: int, procs) -> None:
    """Until the chief's run state records ``n`` completed epochs (the workers are then inside
    the next epoch's loop)."""
    deadline = time.time() + TIMEOUT
    state = run / "state" / "state.json"
    while not (state.exists() and json.loads(state.read_text())["completed_epochs"] >= n):
        assert all(p.poll() is None for p in procs), f"a worker ended before epoch {n} was saved"
        assert time.time() < deadline, f"epoch {n} not saved in {TIMEOUT} s"
        time.sleep(0.1)


def test_killed_or_preempted_worker_and_relaunch_resume(cache, tmp_path):
    """kill -9 of the chief mid-epoch: the relaunch resumes from the last completed epoch;
    SIGTERM to a worker (a preemption notice): every worker stops after the same step, the
    chief saves that step first, and the relaunch resumes from it. The run ends as an
    uninterrupted one: 3 epochs, 3 x 3 optimizer steps, a complete run folder."""
    config = config_file(tmp_path, cache, epochs=3, steps=3)
    ports = free_ports(2)
    run = tmp_path / "runs" / "killed" / "fold_0"

    procs = launch_workers(config, "killed", tmp_path, ports)
    try:
        wait_for_epochs(run, 1, procs)
        time.sleep(0.3)  # inside the second epoch
        os.kill(procs[0].pid, signal.SIGKILL)  # the chief, holding the run folder's lock
        # The other worker's next collective fails once it misses the chief's heartbeats; it
        # exits with an error (or is stopped here if it waits too long).
        try:
            procs[1].wait(timeout=120)
        except subprocess.TimeoutExpired:
            procs[1].kill()
    finally:
        finish(procs, timeout=30)
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["completed_epochs"] == 1 and "steps_into_epoch" not in state
    assert optimizer_steps(run) == 3
    assert not (run / "result.json").exists()
    assert (run / ".lock").exists()  # left by the killed chief: stale, the relaunch takes it

    procs = launch_workers(config, "killed", tmp_path, ports)
    try:
        wait_for_epochs(run, 2, procs)
        os.kill(procs[1].pid, signal.SIGTERM)
        preempted = finish(procs)
    finally:
        finish(procs, timeout=30)
    assert "resuming" in preempted[0][2] and "after epoch 1" in preempted[0][2]
    assert "Epoch 1/3" not in preempted[0][1] and "Epoch 2/3" in preempted[0][1]
    for code, _, err in preempted:  # both stopped on their own, with the same message
        assert code == 1 and "stopped by SIGTERM in epoch 3 after step" in err, err[-2000:]
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["completed_epochs"] == 2 and 1 <= state["steps_into_epoch"] <= 3
    done_steps = 2 * 3 + state["steps_into_epoch"]
    assert optimizer_steps(run) == done_steps  # saved at the step it stopped, not the epoch

    results = finish(launch_workers(config, "killed", tmp_path, ports))
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"relaunched worker {i} failed:\n{err[-3000:]}"
    assert f"after epoch 2 and {state['steps_into_epoch']} steps of epoch 3" in results[0][2]
    rows = (run / "history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]
    assert json.loads((run / "result.json").read_text())["epochs"] == 3
    assert optimizer_steps(run) == 9  # 3 epochs x 3 steps: the schedule continued
    assert not (run / ".lock").exists()


def optimizer_steps(run: Path) -> int:
    final = final_state(run)
    return max(int(final[k]) for k in final
               if k.startswith("opt_") and final[k].shape == () and final[k].dtype.kind == "i")
